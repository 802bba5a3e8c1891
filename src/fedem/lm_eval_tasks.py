"""fedem's evaluation as task definitions for EleutherAI's lm-evaluation-harness (`lm_eval`).

`fedem lm-eval-tasks --out DIR` writes one task YAML per language and metric, each reading a JSONL
file of exactly the lines `fedem evaluate` scores (the same functions pick them), so a peer's tool
can check fedem's numbers:

    fedem_text_<lang>          held-out text, `loglikelihood_rolling` → bits_per_byte
    fedem_flores_<lang>        each side of the FLORES test pairs, likewise
    fedem_translate_<src>_<tgt>  the translation prompt, greedy `generate_until` "\\n" → chrf, bleu
    fedem_text, fedem_flores, fedem_translate   groups of the above (unweighted means)

Paths in the YAMLs are absolute, because lm_eval resolves `data_files` against its working folder.
Which BOS the model sees matters and differs by task — see docs/compare.md: scoring tasks need
`add_bos_token=False` (lm_eval prepends the BOS/EOS prefix itself), translation the tokenizer's
default (adapters are trained on `[BOS] + prompt`).
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedem.data.corpus import Pair
from fedem.data.prompts import translation_prompt
from fedem.errors import UserError
from fedem.evaluate import (
    expand_directions,
    flores_text,
    held_out_pairs,
    held_out_text,
    write_text_atomic,
)
from fedem.languages import language
from fedem.provenance import write_provenance

SCORING_METRICS = ["bits_per_byte", "byte_perplexity", "word_perplexity"]
TRANSLATION_METRICS = ["chrf", "bleu"]


def _dataset(data_file: Path) -> dict[str, Any]:
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "metadata": {"version": 1.0},
    }


def scoring_task(name: str, data_file: Path) -> dict[str, Any]:
    """A task scoring each `text` line on its own: lm_eval's bits_per_byte = Σ NLL / (ln 2 · Σ bytes)."""
    return {
        "task": name,
        **_dataset(data_file),
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",  # a field name: the line verbatim, no template rendering
        "metric_list": [{"metric": m} for m in SCORING_METRICS],  # with lm_eval's default aggregations
    }


def translation_task(name: str, data_file: Path, max_new_tokens: int) -> dict[str, Any]:
    """A task prompting with fedem's template and decoding greedily to the first newline."""
    return {
        "task": name,
        **_dataset(data_file),
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "reference",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [{"metric": m} for m in TRANSLATION_METRICS],
    }


def group(name: str, tasks: list[str], metric: str) -> dict[str, Any]:
    """A group reporting the unweighted mean of its tasks' `metric`, as fedem's summary does."""
    aggregate = {"metric": metric, "aggregation": "mean", "weight_by_size": False}
    return {"group": name, "task": tasks, "aggregate_metric_list": [aggregate], "metadata": {"version": 1.0}}


def _translation_rows(pairs: list[Pair], src: str, tgt: str) -> list[dict[str, str]]:
    rows = []
    for pair in pairs:
        source, reference = (pair.english, pair.other) if src == "en" else (pair.other, pair.english)
        rows.append({"prompt": translation_prompt(source, src, tgt), "reference": reference})
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def export_lm_eval_tasks(
    out: Path,
    mono: Path | None = None,
    pairs: Path | None = None,
    languages: list[str] | None = None,
    max_lines: int | None = 200,
    max_pairs: int = 50,
    directions: Sequence[str] = ("en-xx",),
    max_new_tokens: int = 128,
) -> dict[str, Any]:
    """Write task YAMLs + JSONL data to `out` for the same lines `fedem evaluate` would use.

    The arguments mean what they mean for `evaluate`, so one set of settings gives both tools the same
    documents. Returns the task and group names.
    """
    if mono is None and pairs is None:
        raise UserError("nothing to export: give held-out text (--mono) and/or test pairs (--pairs)")
    for code in languages or []:
        language(code)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    wanted = expand_directions(directions)
    text = held_out_text(mono, languages, max_lines) if mono is not None else {}
    test_pairs = held_out_pairs(pairs, languages, max_pairs) if pairs is not None else {}
    documents: dict[str, tuple[str, dict[str, list[str]]]] = {
        "text": ("fedem_text", text),
        "flores": ("fedem_flores", flores_text(test_pairs)),
    }
    configs: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[str]] = {}
    for kind, (prefix, by_language) in documents.items():
        for code, lines in by_language.items():
            data_file = out / "data" / f"{kind}-{code}.jsonl"
            _write_jsonl(data_file, [{"text": line} for line in lines])
            configs[f"{prefix}_{code}"] = scoring_task(f"{prefix}_{code}", data_file)
            groups.setdefault(prefix, []).append(f"{prefix}_{code}")
    for code, lang_pairs in test_pairs.items():
        for direction in wanted:
            src, tgt = ("en", code) if direction == "en-xx" else (code, "en")
            name = f"fedem_translate_{src}_{tgt}"
            data_file = out / "data" / f"translate-{src}-{tgt}.jsonl"
            _write_jsonl(data_file, _translation_rows(lang_pairs, src, tgt))
            configs[name] = translation_task(name, data_file, max_new_tokens)
            groups.setdefault("fedem_translate", []).append(name)
    metric = {"fedem_text": "bits_per_byte", "fedem_flores": "bits_per_byte", "fedem_translate": "chrf"}
    for name, tasks in groups.items():
        configs[name] = group(name, tasks, metric[name])
    for name, config in configs.items():
        write_text_atomic(out / f"{name}.yaml", yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    settings = {
        "mono": str(mono) if mono else None, "pairs": str(pairs) if pairs else None,
        "languages": languages, "max_lines": max_lines, "max_pairs": max_pairs, "directions": wanted,
        "max_new_tokens": max_new_tokens,
    }  # fmt: skip
    write_provenance(out, "lm-eval-tasks", settings)
    return {"out": str(out), "groups": list(groups), "tasks": [n for n in configs if n not in groups]}
