"""Training throughput and peak memory of seshu-small: the chunked scan against the plain sequential scan.

For each sequence length and each scan path (`fedem.model.scan.SCANS`: transformers' chunked SSD scan,
and the step-by-step recurrence as the baseline) a fresh child process builds seshu-small over a
16,000-token vocabulary, runs warm-up steps and then timed training steps (forward, backward, gradient
clipping, fused AdamW as fedem's Trainer) on random token ids, and reports

    tokens/s = batch · length · steps / seconds        peak RSS (`ru_maxrss` of the child)

One child per configuration keeps the peak-memory figures apart. The figure to compare across machines
is the ratio chunked / sequential at each length, measured in the same run. Results, with the machine
they were taken on, go to `<out>/train_throughput.json` and `.md`.

Memory. The sequential scan keeps every time step's state for backward (layers · length · batch · heads
· head_dim · state floats), which at length 1024 and batch 8 does not fit in a small machine. Each child
runs under an address-space limit (`--mem-limit-gib`), so a configuration that does not fit fails alone
instead of pushing the machine into the OOM killer. The sequential path then runs at the largest halved
batch that is predicted to fit (from the overhead measured at the shorter length) and does fit, and the
chunked scan is timed again at that batch, so that every ratio compares like with like.

    python bench/train_throughput.py                      # lengths 256 1024, batch 8 → bench/results/
    python bench/train_throughput.py --lengths 256 --steps 5 --budget 30
    python bench/train_throughput.py --quick --out /tmp/b # tiny model, length 64: a smoke run (seconds)
"""

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedem.config import load_yaml
from machine import machine_info, memory_available, write_report

REPO = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = load_yaml(REPO / "configs" / "seshu-small.yaml")["model"]
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "head_dim": 16, "chunk_size": 16}
# A LlamaForCausalLM with seshu-small's parameter count (7.16M vs 7.20M at vocabulary 8,000): the
# attention baseline of bench/vs_llama.py, measured by this harness under the path name "llama".
LLAMA = {"hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 768, "num_attention_heads": 4}
LLAMA_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2}
# A MambaForCausalLM (Mamba-1) of seshu-small's width and depth on its best stock CPU path,
# `use_mambapy`: the path name "mamba1". Issue 5: Seshu ≥ 10× it.
MAMBA1 = {
    "hidden_size": SMALL["hidden_size"],
    "num_hidden_layers": SMALL["num_hidden_layers"],
    "state_size": 16,
}
MAMBA1_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16}
VOCAB = 16_000
EAGER = "-eager"  # a scan path with this suffix runs fedem's training mixer uncompiled (see `Job`)
MIB, GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class Job:
    """One (scan path, length, batch) configuration, measured in its own process.

    `path` is a `SCANS` name, "llama" for the attention model of `size` (a LlamaConfig's fields), or
    "mamba1" for a Mamba-1 on transformers' `use_mambapy` path (a MambaConfig's fields). A scan name
    ending in "-eager" runs that scan with `FEDEM_COMPILE=0`: fedem's training mixer uncompiled, as on
    a machine without a C++ compiler; every other path runs as the environment says (compiled unless
    `FEDEM_COMPILE=0`, which the test suite sets).
    """

    path: str
    length: int
    batch: int
    warmup: int
    steps: int
    budget_s: float
    size: dict[str, Any]  # SeshuSize fields, or LlamaConfig fields for path "llama"
    vocab: int
    threads: int
    mem_limit_bytes: int  # RLIMIT_AS of the child; 0 = none


class _Vocab:
    """Stands in for a tokenizer in `seshu_config`: its length and special ids are all that is read."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(job: Job) -> Any:
    """The model `job` trains: a Seshu of `job.size`, or for path "llama" a LlamaForCausalLM of it."""
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

    from fedem.model.seshu import SeshuSize, build_model

    if job.path == "llama":
        config = LlamaConfig(
            vocab_size=job.vocab, tie_word_embeddings=True, max_position_embeddings=job.length, **job.size
        )
        return LlamaForCausalLM(config)
    if job.path == "mamba1":
        return MambaForCausalLM(
            MambaConfig(vocab_size=job.vocab, tie_word_embeddings=True, use_mambapy=True, **job.size)
        )
    return build_model(SeshuSize(**job.size), _Vocab(job.vocab))  # type: ignore[arg-type]


def _prepare(job: Job) -> dict[str, Any]:
    """What every measurement does first, in its child: fedem's allocator tuning, quiet logging, the
    thread count. Returns what is worth reporting about it."""
    import torch
    from transformers.utils import logging

    from fedem.train.allocator import keep_freed_memory

    # As `fedem.train` does before training; for every path, the baseline included, so ratios stay fair.
    allocator_tuned = keep_freed_memory()
    logging.set_verbosity_error()  # the stock scan warns once that mamba_ssm is missing; expected on CPU
    if job.threads:
        torch.set_num_threads(job.threads)
    return {"threads": torch.get_num_threads(), "allocator_tuned": allocator_tuned}


def training_step(job: Job) -> tuple[Any, Callable[[], float]]:
    """`job`'s model and one training step of it on fixed random ids, as fedem's Trainer takes it: its
    loss, backward, clipping, fused AdamW (the Trainer's default `adamw_torch_fused`; torch's CPU default
    loops over the parameters). The step runs under `job`'s scan and returns the loss."""
    import contextlib

    import torch

    from fedem.loss import causal_lm_loss
    from fedem.model.scan import use_scan

    torch.manual_seed(0)
    model = build(job)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
    ids = torch.randint(3, job.vocab, (job.batch, job.length))
    stock = job.path in ("llama", "mamba1")

    def step() -> float:
        with contextlib.nullcontext() if stock else use_scan(job.path.removesuffix(EAGER)):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})  # fedem's training loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def measure(job: Job) -> dict[str, Any]:
    """Build the model, warm up, time `job.steps` steps (fewer if the budget runs out); in the child."""
    from fedem.model.seshu import count_parameters

    setup = _prepare(job)
    model, step = training_step(job)
    rss_model = _peak_rss_mib()
    step_seconds: list[float] = []
    start = time.perf_counter()
    for _ in range(job.warmup):
        step()
    warmup_s = time.perf_counter() - start
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    while len(step_seconds) < job.steps:
        t0 = time.perf_counter()
        loss = step()
        step_seconds.append(time.perf_counter() - t0)
        if time.perf_counter() - start > job.budget_s:
            break
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    steps = len(step_seconds)
    return {
        "path": job.path,
        "length": job.length,
        "batch": job.batch,
        "parameters": count_parameters(model),
        **setup,
        "warmup_steps": job.warmup,
        "warmup_s": warmup_s,
        "steps": steps,
        "budget_cut": steps < job.steps,
        "seconds": seconds,
        "step_seconds": step_seconds,
        "tokens_per_s": job.batch * job.length * steps / seconds,
        # Time in the kernel, mostly page faults: what varies most between runs of the same step here.
        "system_s_per_step": (after.ru_stime - usage.ru_stime) / steps,
        "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
        "rss_after_build_mib": rss_model,
        "peak_rss_mib": _peak_rss_mib(),
        "final_loss": loss,
    }


def alternate(jobs: tuple[Job, ...]) -> dict[str, Any]:
    """Time `jobs` in this one process taking turns, one step of each per round, after each one's
    warm-up; each one's tokens/s from its median step. In the child.

    The same minutes for every configuration: this VM's speed drifts by 10-30% over minutes, which
    moved a ratio of consecutive runs by as much (vs_llama at L=512: 1.04× and 0.93× an hour apart),
    and a slow burst here slows one step of each. Rounds stop at the first job's `steps`, or once its
    `budget_s` has passed after at least 3. No peak memory: the process holds every model at once.
    """
    setup = _prepare(jobs[0])
    steps = {job.path: training_step(job)[1] for job in jobs}
    for job in jobs:
        for _ in range(job.warmup):
            steps[job.path]()
    times: dict[str, list[float]] = {path: [] for path in steps}
    start = time.perf_counter()
    for done in range(jobs[0].steps):
        if done >= 3 and time.perf_counter() - start > jobs[0].budget_s:
            break
        for path, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[path].append(time.perf_counter() - t0)
    return {
        **setup,
        "rounds": len(times[jobs[0].path]),
        "step_seconds": times,
        "tokens_per_s": {
            job.path: job.batch * job.length / statistics.median(times[job.path]) for job in jobs
        },
    }


def _child(measurement: Callable[[Any], dict[str, Any]], what: Any, job: Job, conn: Connection) -> None:
    if job.path.endswith(EAGER):
        os.environ["FEDEM_COMPILE"] = "0"  # read when fedem is imported, after this
    if job.mem_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (job.mem_limit_bytes, job.mem_limit_bytes))
    try:
        conn.send(measurement(what))
    except BaseException as err:  # noqa: B036 — report anything (MemoryError included) to the parent
        text = str(err).strip()
        conn.send(
            {
                "error": f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": "),
                "traceback": traceback.format_exc(limit=3),
                "peak_rss_mib": _peak_rss_mib(),
            }
        )
    finally:
        conn.close()


def in_child(measurement: Callable[[Any], dict[str, Any]], what: Any, job: Job) -> dict[str, Any]:
    """`measurement(what)` in a fresh spawned process under `job`'s memory limit (and uncompiled, for an
    "-eager" path); a crash (e.g. killed for memory) becomes an error entry."""
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(measurement, what, job, send))
    process.start()
    send.close()
    try:
        result: dict[str, Any] = receive.recv()
    except EOFError:
        result = {"error": "the child process died without a result"}
    process.join()
    if process.exitcode and "error" not in result:
        result["error"] = f"the child process exited with {process.exitcode}"
    if process.exitcode == -9:  # SIGKILL: most likely the kernel's OOM killer
        result["error"] += " (killed: out of memory?)"
    return result


def run_job(job: Job) -> dict[str, Any]:
    """`measure(job)` in a fresh process (`in_child`)."""
    return {"path": job.path, "length": job.length, "batch": job.batch, **in_child(measure, job, job)}


def is_memory_error(result: dict[str, Any]) -> bool:
    error = result.get("error", "")
    return any(s in error for s in ("can't allocate memory", "MemoryError", "out of memory"))


def state_bytes(size: dict[str, int], length: int, batch: int) -> int:
    """Bytes of per-step states the sequential scan keeps for backward (float32), over all layers."""
    heads = 2 * size["hidden_size"] // size["head_dim"]  # expand = 2 (SeshuSize's default)
    return 4 * size["num_hidden_layers"] * length * batch * heads * size["head_dim"] * size["state_size"]


def predicted_peak(
    size: dict[str, int], length: int, batch: int, chunked: dict[str, Any] | None, overhead: float
) -> float:
    """Rough peak bytes of a sequential run: the chunked run's activations scaled to this batch, plus the
    kept states times `overhead` (allocator slack; measured at a shorter length, 1 when unknown)."""
    base = 0.0
    if chunked is not None and "error" not in chunked:
        built, peak = chunked["rss_after_build_mib"] * MIB, chunked["peak_rss_mib"] * MIB
        base = built + (peak - built) * batch / chunked["batch"]
    return base + overhead * state_bytes(size, length, batch)


def fitting_batch(
    size: dict[str, int],
    length: int,
    batch: int,
    chunked: dict[str, Any] | None,
    overhead: float,
    mem_limit: int,
) -> int:
    """The largest of batch, batch/2, … (at least 1) whose predicted sequential peak fits the limit.

    10% headroom: the limit is on address space, which runs ahead of the resident set.
    """
    while batch > 1 and predicted_peak(size, length, batch, chunked, overhead) > 0.9 * mem_limit:
        batch //= 2
    return batch


def run_until_it_fits(job: Job, notes: list[str]) -> dict[str, Any]:
    """`run_job`, halving the batch after each out-of-memory failure (down to 1)."""
    while True:
        print(f"length {job.length:5d}  {job.path:10s} batch {job.batch:3d} …", end=" ", flush=True)
        result = run_job(job)
        _print_result(result)
        if not (is_memory_error(result) and job.batch > 1):
            return result
        notes.append(f"length {job.length}: {job.path} at batch {job.batch} ran out of memory; halved")
        job = replace(job, batch=job.batch // 2)


def summarise(results: list[dict[str, Any]], lengths: list[int]) -> list[dict[str, Any]]:
    """Per length: chunked / sequential tokens/s and sequential / chunked peak memory.

    Compared at the sequential run's batch when the chunked scan was timed at it too; otherwise the
    speed-up compares different batches (`same_batch` false) and the memory ratio is left out.
    """
    ok = [r for r in results if "error" not in r]
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"length": length, "batch": None, "speedup": None, "memory_ratio": None}
        row["same_batch"] = None
        base = next((r for r in ok if r["path"] == "sequential" and r["length"] == length), None)
        chunked = [r for r in ok if r["path"] == "chunked" and r["length"] == length]
        if base and chunked:
            fast = next((r for r in chunked if r["batch"] == base["batch"]), chunked[0])
            row["batch"] = base["batch"]
            row["speedup"] = fast["tokens_per_s"] / base["tokens_per_s"]
            row["same_batch"] = fast["batch"] == base["batch"]
            if row["same_batch"]:
                row["memory_ratio"] = base["peak_rss_mib"] / fast["peak_rss_mib"]
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    env = ", ".join(f"{k}={v}" for k, v in m["environment"].items()) or "none set"
    lines = [
        "# Training throughput: chunked vs sequential scan",
        "",
        f"seshu{'-tiny (quick)' if s['quick'] else '-small'}, {report['parameters']:,} parameters, "
        f"vocabulary {s['vocab']:,}, batch {s['batch']}, float32; forward + backward + clip + fused AdamW on "
        f"random ids, timed after {s['warmup']} warm-up step(s), at most ~{s['budget']:.0f} s of timed "
        "steps per configuration. Each configuration ran in its own process; peak memory is that "
        "process's peak RSS (model, optimizer, activations and allocator slack).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB ({m['memory_available_gib']} available); Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}; load average "
        f"{m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end; "
        f"threading/allocator environment: {env}.",
        "",
        "| length | scan | batch | steps | s/step | tokens/s | peak RSS (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['path']} | {r['batch']} | — | — | failed: {r['error']} | — |")
            continue
        cut = " (budget)" if r["budget_cut"] else ""
        lines.append(
            f"| {r['length']} | {r['path']} | {r['batch']} | {r['steps']}{cut} | "
            f"{r['seconds'] / r['steps']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} |"
        )
    lines += [
        "",
        "| length | batch | speed-up chunked / sequential (tokens/s) | peak memory sequential / chunked |",
        "|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        speed = f"{row['speedup']:.1f}×" if row["speedup"] else "—"
        if row["speedup"] and not row["same_batch"]:
            speed += " (chunked at another batch)"
        memory = f"{row['memory_ratio']:.2f}×" if row["memory_ratio"] else "—"
        lines.append(f"| {row['length']} | {row['batch'] or '—'} | {speed} | {memory} |")
    if report["notes"]:
        lines += ["", *(f"- {note}" for note in report["notes"])]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the chunked scan")
    parser.add_argument("--sequential-steps", type=int, default=5, help="timed steps of the sequential scan")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per configuration")
    parser.add_argument(
        "--budget",
        type=float,
        default=40.0,
        help="seconds of timed steps per configuration: stops early (after at least one step) past it",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument(
        "--mem-limit-gib",
        type=float,
        default=None,
        help="address-space limit per child (default: 80%% of the memory available at start; 0: none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default bench/results; with --quick a temporary folder)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: seshu-tiny shape, length 64, batch 2, 2 steps"
    )
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.sequential_steps, *args.lengths) < 1 or args.warmup < 0:
        parser.error("lengths, --batch and the step counts must be positive (--warmup may be 0)")
    if args.quick:
        args.lengths, args.batch, args.steps, args.sequential_steps, args.warmup = [64], 2, 2, 1, 1
        args.out = args.out or Path(tempfile.gettempdir()) / "fedem-bench-quick"
    args.out = args.out or REPO / "bench" / "results"
    return args


def _print_result(result: dict[str, Any]) -> None:
    if "error" in result:
        print(f"failed: {result['error']}", flush=True)
        return
    per_step = result["seconds"] / result["steps"]
    print(
        f"{result['tokens_per_s']:10,.0f} tokens/s  {per_step:7.2f} s/step  "
        f"peak {result['peak_rss_mib']:7,.0f} MiB  ({result['steps']} steps)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    size = TINY if args.quick else SMALL
    vocab = 1000 if args.quick else VOCAB
    if args.mem_limit_gib is None:
        mem_limit = int(0.8 * memory_available())
    else:
        mem_limit = int(args.mem_limit_gib * GIB)
    machine = machine_info()
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    overhead = 1.0  # sequential's bytes of peak per byte of kept state, beyond the chunked run's peak
    for length in sorted(args.lengths):
        job = Job(
            path="chunked",
            length=length,
            batch=args.batch,
            warmup=args.warmup,
            steps=args.steps,
            budget_s=args.budget,
            size=size,
            vocab=vocab,
            threads=args.threads,
            mem_limit_bytes=mem_limit,
        )
        chunked = run_until_it_fits(job, notes)
        results.append(chunked)

        batch = chunked["batch"]  # args.batch unless the chunked scan itself ran out of memory
        if mem_limit:
            batch = fitting_batch(size, length, batch, chunked, overhead, mem_limit)
            if batch < chunked["batch"]:
                need = predicted_peak(size, length, chunked["batch"], chunked, overhead)
                notes.append(
                    f"length {length}: sequential at batch {chunked['batch']} predicted to need "
                    f"{need / GIB:.1f} GiB > limit {mem_limit / GIB:.1f} GiB; ran at batch {batch}"
                )
        sequential = run_until_it_fits(
            replace(job, path="sequential", batch=batch, steps=args.sequential_steps), notes
        )
        results.append(sequential)
        if "error" in sequential:
            continue
        if "error" not in chunked and chunked["batch"] == sequential["batch"]:
            extra = sequential["peak_rss_mib"] * MIB - predicted_peak(size, length, batch, chunked, 0.0)
            overhead = max(1.0, extra / state_bytes(size, length, batch))
        elif sequential["batch"] != chunked["batch"]:
            # The speed-up is only like for like at one batch: time the chunked scan at this one too.
            results.append(run_until_it_fits(replace(job, batch=sequential["batch"]), notes))
    machine["load_average_end"] = list(os.getloadavg())
    machine["torch_threads"] = next((r["threads"] for r in results if "threads" in r), None)
    report: dict[str, Any] = {
        "benchmark": "train_throughput",
        "command": " ".join(
            ["python", "bench/train_throughput.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": machine,
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "size": size,
            "vocab": vocab,
            "mem_limit_bytes": mem_limit,
            "optimizer": "fused AdamW(lr=3e-3, weight_decay=0.1), clip 1.0",
        },
        "parameters": next((r["parameters"] for r in results if "parameters" in r), 0),
        "results": results,
        "summary": summarise(results, sorted(args.lengths)),
        "notes": notes,
    }
    write_report(args.out, "train_throughput", report, markdown(report))
    for row in report["summary"]:
        if row["speedup"]:
            memory = f", peak memory ×{row['memory_ratio']:.2f}" if row["memory_ratio"] else ""
            print(f"length {row['length']:5d}  speed-up chunked/sequential {row['speedup']:.1f}×{memory}")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.out / 'train_throughput.json'} and .md")
    return report


if __name__ == "__main__":
    main()
