"""Seshu's forward outside training — evaluation, generation prefill — with the SSD scan's C loop
(`fedem.model.native`) against fedem's torch code for the same scan, in one process.

seshu-small (vocabulary 16,000) runs `model(ids)` under `torch.no_grad()` on the same random batch at
each length, alternating the two paths (`FEDEM_NATIVE` read per call) for several rounds; each path's
best time counts. Also the scan alone at the longest length: one layer's `ChunkedScan` forward.
Results: `<out>/scoring_forward.{json,md}`.

    python bench/scoring_forward.py                        # seshu-small, L=512 and 2048, batch 8
    python bench/scoring_forward.py --quick --out /tmp/s   # tiny model, L=64: a smoke run
"""

import argparse
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers.utils import logging

from fedem.model import native
from fedem.model.seshu import SeshuSize, build_model
from fedem.model.ssd import ChunkedScan
from generation_latency import SMALL, TINY, VOCAB, Vocab
from machine import machine_info, machine_line, write_report

REPO = Path(__file__).resolve().parents[1]
PATHS = {"C loop": "1", "torch": "0"}  # FEDEM_NATIVE


def best_seconds(run: Callable[[], object], rounds: int) -> dict[str, float]:
    """Each path's best time over `rounds` alternating calls, after one warm-up call of each."""
    best = {name: float("inf") for name in PATHS}
    for round_ in range(rounds + 1):
        for name, flag in PATHS.items():
            os.environ["FEDEM_NATIVE"] = flag
            start = time.perf_counter()
            run()
            if round_:  # round 0 warms up (and builds the C loop)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def scan_inputs(size: SeshuSize, batch: int, length: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    heads = size.num_heads
    return (
        torch.randn(batch, length, heads, size.head_dim, generator=g),
        F.softplus(torch.randn(batch, length, heads, generator=g) - 1),
        -torch.exp(torch.randn(heads, generator=g)),
        torch.randn(batch, length, size.n_groups, size.state_size, generator=g),
        torch.randn(batch, length, size.n_groups, size.state_size, generator=g),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny model, length 64: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    logging.set_verbosity_error()
    size, lengths = (TINY, [64]) if args.quick else (SMALL, args.lengths)
    torch.manual_seed(0)
    model = build_model(size, Vocab(VOCAB)).eval()  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for length in lengths:
            generator = torch.Generator().manual_seed(length)
            ids = torch.randint(3, VOCAB, (args.batch, length), generator=generator)
            seconds = best_seconds(partial(model, ids), args.rounds)
            rows.append({"what": f"whole forward, L={length}", "seconds": seconds})
        scan = scan_inputs(size, args.batch, lengths[-1])
        seconds = best_seconds(lambda: ChunkedScan.apply(*scan, None, size.chunk_size), args.rounds)
        rows.append({"what": f"one layer's scan, L={lengths[-1]}", "seconds": seconds})
    os.environ.pop("FEDEM_NATIVE")
    for row in rows:
        row["speedup"] = round(row["seconds"]["torch"] / row["seconds"]["C loop"], 3)
        row["seconds"] = {name: round(s, 4) for name, s in row["seconds"].items()}
    report: dict[str, Any] = {
        "machine": machine_info(),
        "size": size.model_dump(),
        "batch": args.batch,
        "rounds": args.rounds,
        "built": native.builds(size.head_dim, size.state_size, size.chunk_size),
        "rows": rows,
    }
    write_report(args.out, "scoring_forward", report, markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    size = report["size"]
    lines = [
        "# Seshu's forward outside training: the SSD scan's C loop against torch code",
        "",
        machine_line(report["machine"]),
        "",
        f"{size['num_hidden_layers']} × {size['hidden_size']} Seshu, batch {report['batch']}, float32, "
        f"no gradient; best of {report['rounds']} alternating rounds per path, in one process. "
        + ("" if report["built"] else "**The C loop could not be built here: both columns are torch.**"),
        "",
        "| | C loop (s) | torch (s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        s = row["seconds"]
        lines.append(f"| {row['what']} | {s['C loop']:.4f} | {s['torch']:.4f} | {row['speedup']:.2f}× |")
    lines += ["", "Command: `python bench/scoring_forward.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
