"""How `fedem finetune` batches translation rows: padding, and the text tokens/s of LoRA it gives.

Fine-tuning rows are a prompt and its translation, padded to the longest row of their batch; the loss
is on the translation only. Two things decide how much of a step is wasted: padding (rows drawn at
random sit beside rows several times longer) and the LM head, the largest product of a step, whose
rows for prompt and padding positions have no label. fedem batches rows of similar length (HF's
`LengthGroupedSampler`, what the Trainer uses with `train_sampling_strategy="group_by_length"`) and
sends only labelled positions through the head (`fedem.loss`).

In one process, seshu-small over a tokenizer trained on the shipped corpus, fedem's en→xx rows of
one language pair (max_length 192, batch 8), taking turns batch by batch after every shape has been
compiled: LoRA on rows drawn at random (the Trainer's default sampler), LoRA on length-grouped rows
(fedem's), and full fine-tuning on the same grouped rows, each over batches drawn at random places
of an epoch of its order. Each one's text tokens/s (positions that are not padding) over the same number
of steps, and the share of padding and of labelled positions.
Results: `<out>/finetune_batching.{json,md}`.

    python bench/finetune_batching.py                        # seshu-small → bench/results/
    python bench/finetune_batching.py --quick --out /tmp/f   # tiny model and tokenizer: a smoke run
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging

from fedem.config import validate
from fedem.data.packing import pad_batch
from fedem.loss import count_labelled
from fedem.model.load import load_model
from fedem.model.seshu import build_model
from fedem.model.tokenizer import train_tokenizer
from fedem.train.allocator import keep_freed_memory
from fedem.train.config import FinetuneConfig
from fedem.train.finetune import adapter_model, translation_rows
from generation_latency import SMALL, TINY
from lora_finetune import Batch, Step, training_step
from machine import machine_info, machine_line, write_report

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 192


def spread_batches(
    rows: list[tuple[list[int], list[int]]],
    order: list[int],
    size: int,
    count: int,
    pad_id: int,
    generator: torch.Generator,
) -> list[Batch]:
    """`count` padded batches of `size` rows at random places in the whole epoch that `order` makes, in
    epoch order. A grouped epoch's first batches are its longest rows, and batches evenly spaced
    through it land on the same places of each 50-batch megabatch (every 75th batch, 16 of an epoch of
    1,200: alternately a megabatch's first, which is its longest, and its middle one)."""
    epoch = [order[start : start + size] for start in range(0, len(order), size)]
    picked = torch.randperm(len(epoch), generator=generator)[:count].sort().values.tolist()
    return [
        pad_batch(
            [{"input_ids": torch.tensor(rows[i][0]), "labels": torch.tensor(rows[i][1])} for i in epoch[n]],
            pad_id,
        )
        for n in picked
    ]


def shares(batch_list: list[Batch]) -> dict[str, float]:
    """Shares of all positions that are text (not padding) and that the loss counts."""
    positions = sum(b["input_ids"].numel() for b in batch_list)
    text = sum(int(b["attention_mask"].sum()) for b in batch_list)
    labelled = sum(int(count_labelled(b["labels"])) for b in batch_list)
    return {"text": round(text / positions, 4), "labelled": round(labelled / positions, 4)}


def text_tokens_per_second(runs: dict[str, tuple[Step, list[Batch]]]) -> dict[str, float]:
    """Each run's text tokens/s over its batches (as many for each run), taking turns batch by batch.

    Every batch is first run once untimed: each padded width is a new compile of the mixer
    (`fedem.model.mixer`), which a long fine-tuning run pays once per width and this short one must not
    count."""
    for step, batch_list in runs.values():
        for batch in batch_list:
            step(batch)
    seconds = dict.fromkeys(runs, 0.0)
    for index in range(min(len(batch_list) for _, batch_list in runs.values())):
        for name, (step, batch_list) in runs.items():
            start = time.perf_counter()
            step(batch_list[index])
            seconds[name] += time.perf_counter() - start
    return {
        name: sum(int(b["attention_mask"].sum()) for b in batch_list) / seconds[name]
        for name, (_, batch_list) in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=Path, default=REPO / "data" / "parallel" / "en-hi.tsv")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=48, help="timed steps per run (--quick: 3)")
    parser.add_argument("--quick", action="store_true", help="tiny model and vocabulary: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    logging.set_verbosity_error()
    keep_freed_memory()  # as fedem's training does (`fedem.train.allocator`)
    size, vocab, steps = (TINY, 1000, 3) if args.quick else (SMALL, 16_000, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        train_tokenizer(REPO / "data" / "mono", base, vocab_size=vocab, compare=False)
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(base)
        torch.manual_seed(0)
        build_model(size, tokenizer).save_pretrained(base)
        cfg = validate(
            FinetuneConfig,
            {
                "base": str(base),
                "pairs": str(args.pairs),
                "out": str(Path(tmp) / "adapter"),
                "max_length": MAX_LENGTH,
                "direction": "en-xx",
            },
        )
        rows = translation_rows(cfg, tokenizer)
        generator = torch.Generator().manual_seed(0)
        lengths = [len(ids) for ids, _ in rows]
        random_order = torch.randperm(len(rows), generator=generator).tolist()
        grouped_order = list(LengthGroupedSampler(args.batch, lengths=lengths, generator=generator))
        drawn = {
            name: spread_batches(rows, order, args.batch, steps, tokenizer.pad_token_id, generator)
            for name, order in (("random", random_order), ("grouped", grouped_order))
        }
        runs = {
            "lora_random": (training_step(adapter_model(cfg)), drawn["random"]),
            "lora_grouped": (training_step(adapter_model(cfg)), drawn["grouped"]),
            "full_grouped": (training_step(load_model(base)), drawn["grouped"]),
        }
        speed = text_tokens_per_second(runs)
    grouping = speed["lora_grouped"] / speed["lora_random"]
    report = {
        "machine": machine_info(),
        "size": size.model_dump(),
        "vocabulary": len(tokenizer),
        "pairs": args.pairs.name,
        "rows": len(rows),
        "max_length": MAX_LENGTH,
        "batch": args.batch,
        "steps": steps,
        "shares": {name: shares(batch_list) for name, batch_list in drawn.items()},
        "widths": {name: [b["input_ids"].shape[1] for b in batch_list] for name, batch_list in drawn.items()},
        "text_tokens_per_s": {name: round(value, 1) for name, value in speed.items()},
        "grouping_speedup": round(grouping, 3),
        "lora_vs_full": round(speed["lora_grouped"] / speed["full_grouped"], 3),
    }
    write_report(args.out, "finetune_batching", report, markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    shares, speed = report["shares"], report["text_tokens_per_s"]
    return "\n".join(
        [
            "# How fine-tuning batches translation rows",
            "",
            machine_line(report["machine"]),
            "",
            f"Seshu {report['size']['hidden_size']}×{report['size']['num_hidden_layers']}, vocabulary "
            f"{report['vocabulary']:,}; {report['rows']:,} en→xx rows of {report['pairs']} (max_length "
            f"{report['max_length']}), batch {report['batch']}, {report['steps']} timed steps each on "
            "batches drawn at random places of an epoch, the three runs taking turns batch by batch after "
            "every batch had run once; float32, fused AdamW. "
            "Text tokens are the positions that are not padding; the loss counts the labelled ones (the "
            "translation).",
            "",
            "| run | text share | labelled share | text tokens/s | vs LoRA on random batches |",
            "|---|---|---|---|---|",
            f"| LoRA, rows drawn at random (the Trainer's default) | {shares['random']['text']:.0%} "
            f"| {shares['random']['labelled']:.0%} | {speed['lora_random']:,.0f} | 1.00× |",
            f"| LoRA, rows grouped by length (fedem) | {shares['grouped']['text']:.0%} "
            f"| {shares['grouped']['labelled']:.0%} | {speed['lora_grouped']:,.0f} "
            f"| {report['grouping_speedup']:.2f}× |",
            f"| full fine-tuning, rows grouped by length | {shares['grouped']['text']:.0%} "
            f"| {shares['grouped']['labelled']:.0%} | {speed['full_grouped']:,.0f} "
            f"| {speed['full_grouped'] / speed['lora_random']:.2f}× |",
            "",
            f"LoRA vs full fine-tuning on fedem's batches: {report['lora_vs_full']:.2f}×.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
