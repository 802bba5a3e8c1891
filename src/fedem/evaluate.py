"""Evaluation: perplexity and bits-per-byte per language, chrF/BLEU on held-out translation pairs.

Bits-per-byte (bpb) is the headline metric because it compares across tokenizers and scripts:
a line's total negative log-likelihood in nats, divided by ln 2 and by the line's UTF-8 byte count.
Perplexity is per token, so it is only comparable between models that share a tokenizer. The
definition is lm-evaluation-harness's `bits_per_byte` for `loglikelihood_rolling` tasks (one line a
document, scored after a BOS — or EOS — prefix, newline not counted), so `lm_eval` on the tasks
`fedem lm-eval-tasks` writes reproduces these numbers (fedem/lm_eval_tasks.py, docs/compare.md).

Any causal LM can be evaluated — a Seshu checkpoint, another HF folder, a hub repo, a GGUF file — and
each report also gives the model's parameter count, its tokenizer premium per language (tokens for
a FLORES sentence ÷ tokens for its English side) and its scoring speed on this machine.

Translation is scored with sacrebleu: chrF (character n-grams, robust for Indic morphology and the
primary translation metric here) and BLEU with sacrebleu's default '13a' tokenisation. The FLORES-200
SentencePiece tokenisation ('flores200', spBLEU) would suit Indic targets better, but it needs the
`sentencepiece` package and a model download, and fedem must run offline. See docs/evaluate.md.
"""

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from sacrebleu.metrics import BLEU, CHRF
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fedem.data.corpus import Pair, load_mono, read_pairs, test_pairs_path
from fedem.data.packing import pad_batch
from fedem.data.prompts import translation_prompt
from fedem.errors import UserError
from fedem.generate import generate_ids, load_for_inference
from fedem.languages import LANGUAGES, language
from fedem.loss import count_labelled, summed_nll
from fedem.model.fertility import premium, tokenizer_counter
from fedem.model.load import ModelSource, load_pretrained, model_source
from fedem.model.seshu import count_parameters
from fedem.provenance import write_json_atomic, write_provenance

SEED = 0
BLEU_TOKENIZE = "13a"
Direction = Literal["en-xx", "xx-en"]


@dataclass(frozen=True)
class TextScore:
    """Summed likelihood of some text; `nll` in nats over `tokens` predicted tokens and `bytes` bytes."""

    nll: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.bytes)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def batch_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of a padded batch's labelled tokens, and their count.

    `batch` is `pad_batch`'s output: each position predicts the next token; labels of -100 (padding,
    prompts) are skipped."""
    batch = {key: value.to(device) for key, value in batch.items()}
    nll = summed_nll(model, batch)  # without the (batch, width, vocabulary) logits on a CPU (fedem.loss)
    return nll.item(), int(count_labelled(batch["labels"]))


@torch.no_grad()
def score_lines(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lines: Sequence[str],
    batch_size: int = 16,
    max_length: int = 1024,
) -> TextScore:
    """Negative log-likelihood of each line given only BOS, summed over `lines`.

    Each line is scored on its own (as `[BOS] + tokens`, every text token predicted), so the result
    does not depend on batching or order. A tokenizer without BOS uses EOS, as lm-evaluation-harness
    does. Lines longer than `max_length` tokens are truncated, and their byte count is that of the
    text the kept tokens cover.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows = []
    byte_count = 0
    for line, ids in zip(lines, encoded, strict=True):
        kept = ids[: max_length - 1]
        rows.append([prefix, *kept])
        covered = line if len(kept) == len(ids) else cast(str, tokenizer.decode(kept))
        byte_count += len(covered.encode("utf-8"))
    rows.sort(key=len)  # similar lengths together: less padding per batch
    nll = 0.0
    tokens = 0
    for start in range(0, len(rows), batch_size):
        features = [
            {"input_ids": torch.tensor(r), "labels": torch.tensor(r)}
            for r in rows[start : start + batch_size]
        ]
        batch_sum, batch_tokens = batch_nll(model, pad_batch(features, tokenizer.pad_token_id), device)
        nll += batch_sum
        tokens += batch_tokens
    model.train(was_training)
    return TextScore(nll=nll, tokens=tokens, bytes=byte_count)


# --- translation -------------------------------------------------------------------------------------


def newline_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every token whose text contains a newline.

    The prompt template puts one segment per line, so a translation ends at the first newline as
    surely as at EOS. A newline is one ASCII byte, so it is never split across tokens: stopping on these
    ids (as extra EOS ids) catches every newline the model can emit, without decoding at each step.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if "\n" in text]


def _translation_config(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    stops = [tokenizer.eos_token_id, *newline_token_ids(tokenizer)]
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(dict.fromkeys(stops)),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@torch.no_grad()
def translate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    src_lang: str,
    tgt_lang: str,
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> list[str]:
    """Greedy translations of `sources`, in input order, with the training prompt template.

    Prompts are batched with LEFT padding and an attention mask. That is exact for Mamba-2 in
    transformers 5.x: each mixer zeroes its padded inputs, so the recurrent state and the causal conv
    start from zeros at the first real token (tests check batched against one-by-one decoding).
    Prompts are sorted by length so batches carry little padding. Generation stops at EOS or at a
    newline; the text is stripped.
    """
    prompts = [translation_prompt(source, src_lang, tgt_lang) for source in sources]
    config = _translation_config(tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    results = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, padding_side="left")
        output = generate_ids(model, batch.to(device), config)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
            results[i] = text.split("\n", 1)[0].strip()
    model.train(was_training)
    return results


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus chrF and BLEU (sacrebleu), with the metric signatures so a number can be reproduced."""
    chrf, bleu = CHRF(), BLEU(tokenize=BLEU_TOKENIZE)
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    return {
        "chrf": round(chrf_score.score, 4),
        "bleu": round(bleu_score.score, 4),
        "chrf_signature": str(chrf.get_signature()),
        "bleu_signature": str(bleu.get_signature()),
    }


# --- what to evaluate (read before loading the model, so a bad path fails fast) -------------------------


def expand_directions(directions: Sequence[str]) -> list[Direction]:
    """The directions asked for, 'both' expanded; anything else is a user error."""
    result: list[Direction] = []
    for direction in directions:
        if direction not in ("en-xx", "xx-en", "both"):
            raise UserError(f"unknown direction {direction!r}; use en-xx, xx-en or both")
        wanted: list[Direction] = ["en-xx", "xx-en"] if direction == "both" else [cast(Direction, direction)]
        result.extend(d for d in wanted if d not in result)
    if not result:
        raise UserError("no translation direction given")
    return result


def held_out_text(mono: Path, languages: list[str] | None, max_lines: int | None) -> dict[str, list[str]]:
    """The first `max_lines` lines of each `<lang>.valid.txt`: file order, so always the same lines."""
    corpus = load_mono(mono, split="valid", languages=languages)
    return {code: lines if max_lines is None else lines[:max_lines] for code, lines in corpus.items()}


def held_out_pairs(pairs: Path, languages: list[str] | None, max_pairs: int) -> dict[str, list[Pair]]:
    """The first `max_pairs` test pairs per language: given languages minus English, else all found."""
    if not pairs.is_dir():
        raise UserError(f"no such folder of parallel test pairs: {pairs}")
    if languages is None:
        found = (p.name.split(".", 1)[0][3:] for p in sorted(pairs.glob("en-*.test.tsv")))
        codes = [code for code in found if code in LANGUAGES and code != "en"]
        if not codes:
            raise UserError(f"no en-<lang>.test.tsv files for known languages in {pairs}")
    else:
        codes = [code for code in languages if code != "en"]
    return {code: read_pairs(test_pairs_path(pairs, code), code)[:max_pairs] for code in codes}


def _check_limits(max_lines: int | None, max_pairs: int, batch_size: int, max_new_tokens: int) -> None:
    for name, value in [
        ("max_pairs", max_pairs),
        ("batch_size", batch_size),
        ("max_new_tokens", max_new_tokens),
    ]:
        if value < 1:
            raise UserError(f"{name} must be at least 1, not {value}")
    if max_lines is not None and max_lines < 1:
        raise UserError(f"max_lines must be at least 1 (or None for all lines), not {max_lines}")


# --- the evaluate command ----------------------------------------------------------------------------


def flores_text(test_pairs: dict[str, list[Pair]]) -> dict[str, list[str]]:
    """Each language's side of the test pairs, English first (FLORES is multi-way parallel: every
    `en-<lang>.test.tsv` holds the same English sentences, so the first file's English side serves)."""
    if not test_pairs:
        return {}
    first = next(iter(test_pairs.values()))
    return {
        "en": [p.english for p in first],
        **{code: [p.other for p in pairs] for code, pairs in test_pairs.items()},
    }


@dataclass
class Throughput:
    """Tokens and bytes scored, and the seconds it took: the model's scoring speed on this machine."""

    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def report(self, device: torch.device) -> dict[str, Any]:
        return {
            "device": device.type,
            "threads": torch.get_num_threads(),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
            "bytes_per_second": round(self.bytes / self.seconds, 1) if self.seconds else None,
        }


def language_modelling(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: dict[str, list[str]],
    batch_size: int,
    throughput: Throughput | None = None,
) -> dict[str, dict[str, Any]]:
    """bpb and per-token perplexity for each language's lines; scoring time is added to `throughput`."""
    results = {}
    for code, lines in text.items():
        started = time.perf_counter()
        score = score_lines(model, tokenizer, lines, batch_size=batch_size)
        if throughput is not None:
            throughput.seconds += time.perf_counter() - started
            throughput.tokens += score.tokens
            throughput.bytes += score.bytes
        results[code] = {
            "bpb": round(score.bits_per_byte, 6),
            "perplexity": round(score.perplexity, 4),
            "lines": len(lines),
            "tokens": score.tokens,
            "bytes": score.bytes,
        }
    return results


def tokenizer_premium(
    tokenizer: PreTrainedTokenizerBase, test_pairs: dict[str, list[Pair]]
) -> dict[str, float]:
    """Tokens for each language's side of the test pairs ÷ tokens for the English side (English: 1.0)."""
    count = tokenizer_counter(cast(PreTrainedTokenizerFast, tokenizer))
    premiums = {code: round(premium(count, pairs), 4) for code, pairs in test_pairs.items()}
    return {"en": 1.0, **premiums} if premiums else {}


def translation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test_pairs: dict[str, list[Pair]],
    directions: Sequence[Direction],
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, dict[str, Any]]:
    """chrF and BLEU per direction, keyed "en-hi", "hi-en", …; the first 3 outputs kept as examples."""
    results = {}
    for code, pairs in test_pairs.items():
        for direction in directions:
            src, tgt = ("en", code) if direction == "en-xx" else (code, "en")
            sources = [p.english if src == "en" else p.other for p in pairs]
            references = [p.other if src == "en" else p.english for p in pairs]
            hypotheses = translate(model, tokenizer, sources, src, tgt, max_new_tokens, batch_size)
            examples = [
                {"source": s, "reference": r, "hypothesis": h}
                for s, r, h in zip(sources[:3], references[:3], hypotheses[:3], strict=True)
            ]
            scores = translation_scores(hypotheses, references)
            results[f"{src}-{tgt}"] = {**scores, "pairs": len(pairs), "examples": examples}
    return results


def _summary(results: dict[str, Any]) -> dict[str, float]:
    """Unweighted means over languages / directions (perplexity is left out: per-token, not comparable)."""
    summary = {}
    for section, metric, name in [
        ("language_modelling", "bpb", "mean_bpb"),
        ("flores", "bpb", "mean_flores_bpb"),
        ("translation", "chrf", "mean_chrf"),
        ("translation", "bleu", "mean_bleu"),
    ]:
        values = [entry[metric] for entry in results.get(section, {}).values()]
        if values:
            summary[name] = round(sum(values) / len(values), 6)
    return summary


def _load(source: ModelSource, adapter: Path | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model ready for evaluation: an adapter is merged (only onto a checkpoint folder, whose
    weights its recorded base can be checked against); on the GPU when there is one."""
    if adapter is not None:
        if source.kind != "folder":
            raise UserError(f"--adapter needs a checkpoint folder as --model, not {source.kind} {source}")
        return load_for_inference(Path(source.location), adapter)
    model, tokenizer = load_pretrained(source)
    cast(torch.nn.Module, model).to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer


def evaluate(
    model: str | Path,
    out: Path | None,
    adapter: Path | None = None,
    mono: Path | None = None,
    pairs: Path | None = None,
    languages: list[str] | None = None,
    max_lines: int | None = 200,
    max_pairs: int = 50,
    directions: Sequence[str] = ("en-xx",),
    batch_size: int = 16,
    max_new_tokens: int = 128,
    gguf_file: str | None = None,
    translate_pairs: int | None = None,
) -> dict[str, Any]:
    """Evaluate a causal LM (optionally with a LoRA adapter) on held-out text and FLORES test pairs.

    `model` is a checkpoint folder, a `.gguf` file, or a hub repo `org/name[@revision]`
    (`gguf_file` picks a GGUF file inside a folder or repo). With test pairs, each language's FLORES
    side is also scored for bpb and the tokenizer premium, and the first `translate_pairs` (default:
    all `max_pairs`) are translated for chrF/BLEU; `translate_pairs=0` skips translation.

    Deterministic apart from `speed`: torch is seeded, the lines and pairs are the first N of fixed
    files, and decoding is greedy; the report holds no timestamps. All inputs are read before the
    model is loaded, so a wrong path or language fails in a second, not after loading.
    """
    if mono is None and pairs is None:
        raise UserError("nothing to evaluate: give held-out text (--mono) and/or test pairs (--pairs)")
    for code in languages or []:
        language(code)
    _check_limits(max_lines, max_pairs, batch_size, max_new_tokens)
    if translate_pairs is not None and not 0 <= translate_pairs <= max_pairs:
        raise UserError(
            f"translate_pairs must be between 0 and max_pairs ({max_pairs}), not {translate_pairs}"
        )
    wanted = expand_directions(directions)
    source = model_source(model, gguf_file)
    text = held_out_text(mono, languages, max_lines) if mono is not None else None
    test_pairs = held_out_pairs(pairs, languages, max_pairs) if pairs is not None else None
    torch.manual_seed(SEED)
    loaded, tokenizer = _load(source, adapter)
    n_translate = max_pairs if translate_pairs is None else translate_pairs
    settings = {
        "languages": languages, "max_lines": max_lines, "max_pairs": max_pairs, "directions": wanted,
        "translate_pairs": n_translate, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "seed": SEED, "decoding": "greedy", "bleu_tokenize": BLEU_TOKENIZE,
    }  # fmt: skip
    results: dict[str, Any] = {"model": str(source), "adapter": str(adapter) if adapter else None}
    results["settings"] = settings
    results["model_info"] = {
        "source": source.kind,
        "architecture": type(loaded).__name__,
        "parameters": count_parameters(loaded),
        "vocab_size": len(tokenizer),
    }
    throughput = Throughput()
    if text is not None:
        results["language_modelling"] = language_modelling(loaded, tokenizer, text, batch_size, throughput)
    if test_pairs is not None:
        flores = language_modelling(loaded, tokenizer, flores_text(test_pairs), batch_size, throughput)
        for code, value in tokenizer_premium(tokenizer, test_pairs).items():
            flores[code]["premium"] = value
        results["flores"] = flores
        if n_translate:
            subset = {code: pairs[:n_translate] for code, pairs in test_pairs.items()}
            results["translation"] = translation(
                loaded, tokenizer, subset, wanted, batch_size, max_new_tokens
            )
    results["speed"] = throughput.report(next(loaded.parameters()).device)
    results["summary"] = _summary(results)
    if out is not None:
        write_report(
            out, results, {"mono": str(mono) if mono else None, "pairs": str(pairs) if pairs else None}
        )
    return results


# --- reports -----------------------------------------------------------------------------------------


def write_report(out: Path, results: dict[str, Any], inputs: dict[str, Any]) -> None:
    """`report.json`, `report.md` and provenance in `out`, each written atomically."""
    write_json_atomic(out / "report.json", results)
    write_text_atomic(out / "report.md", markdown_report(results))
    config = {"model": results["model"], "adapter": results["adapter"], **inputs, **results["settings"]}
    write_provenance(out, "evaluate", config)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; like write_json_atomic, outputs are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


METRICS = [  # (section, key, heading, digits, with a mean column)
    ("language_modelling", "bpb", "Bits per byte (lower is better)", 4, True),
    (
        "language_modelling",
        "perplexity",
        "Perplexity per token (lower is better; same tokenizer only)",
        2,
        False,
    ),
    ("flores", "bpb", "Bits per byte on FLORES test sentences (lower is better)", 4, True),
    (
        "flores",
        "premium",
        "Tokenizer premium: tokens ÷ tokens of the English side (lower is fairer)",
        2,
        False,
    ),
    ("translation", "chrf", "chrF (higher is better)", 2, True),
    ("translation", "bleu", f"BLEU (higher is better; sacrebleu tokenize={BLEU_TOKENIZE})", 2, True),
]


def _row_label(results: dict[str, Any]) -> str:
    label = Path(results["model"]).name
    return f"{label} + {Path(results['adapter']).name}" if results.get("adapter") else label


def markdown_report(results: dict[str, Any]) -> str:
    """One Markdown table per metric: a column per language or direction, a row for the model.

    A row per model means reports of several checkpoints stack into one comparison table.
    """
    lines = [f"# Evaluation of {_row_label(results)}", ""]
    for section, key, heading, digits, with_mean in METRICS:
        entries: dict[str, dict[str, Any]] = results.get(section, {})
        if not entries:
            continue
        columns = list(entries)
        values = [f"{entries[c][key]:.{digits}f}" for c in columns]
        if with_mean:
            columns.append("mean")
            values.append(f"{sum(entries[c][key] for c in entries) / len(entries):.{digits}f}")
        lines += [f"## {heading}", "", "| model | " + " | ".join(columns) + " |"]
        lines += [
            "|---" * (len(columns) + 1) + "|",
            f"| {_row_label(results)} | " + " | ".join(values) + " |",
            "",
        ]
    lines += _notes(results)
    return "\n".join(lines).rstrip() + "\n"


def _notes(results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    info, speed = results["model_info"], results["speed"]
    notes = ["## Settings", ""]
    notes.append(
        f"- model: {info['architecture']} ({info['source']}), {info['parameters']:,} parameters, "
        f"vocabulary {info['vocab_size']:,}"
    )
    if speed["tokens_per_second"] is not None:
        notes.append(
            f"- scoring speed: {speed['tokens_per_second']:,.0f} tokens/s, {speed['bytes_per_second']:,.0f} "
            f"bytes/s ({speed['device']}, {speed['threads']} threads; varies from run to run)"
        )
    if "language_modelling" in results:
        notes.append(f"- held-out text: first {settings['max_lines'] or 'all'} lines of `<lang>.valid.txt`")
    if "flores" in results:
        notes.append(
            f"- FLORES: first {settings['max_pairs']} pairs of `en-<lang>.test.tsv`, each side scored"
        )
    if "translation" in results:
        first = next(iter(results["translation"].values()))
        notes.append(
            f"- translation: first {settings['translate_pairs']} pairs of `en-<lang>.test.tsv`, greedy"
        )
        notes.append(f"- sacrebleu: `{first['chrf_signature']}`, `{first['bleu_signature']}`")
    return notes
