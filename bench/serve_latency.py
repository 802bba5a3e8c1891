"""Latency of `fedem serve`: time to first token and tokens/s, 1 and 8 concurrent streams.

The server (`python -m fedem.cli serve`, i.e. `fedem serve`) runs in its own process on
127.0.0.1; this process is the client, streaming `/v1/completions` over httpx (server-sent events).
Every request asks for exactly `--max-tokens` tokens the same way (sampling, temperature 1, a fixed
seed per stream); a stream that ends early on the end-of-sequence token is counted with the tokens it
got (the usage chunk). One model generates one request at a time, in arrival order, so with 8
concurrent streams the 8th waits for the 7 before it: its time to first token includes their whole
generation. Measured per level of concurrency, after one warm-up request:

- **ttft_s**: request sent → first non-empty text chunk (p50, mean, max over streams and rounds);
- **stream_tokens_per_s**: a stream's tokens after the first / (its last chunk − its first chunk);
- **aggregate_tokens_per_s**: all completion tokens of a round / the round's wall time.

Results go to `<out>/serve_latency.json` and `.md`.

    python bench/serve_latency.py                          # runs/demo/seshu-small → bench/results/
    python bench/serve_latency.py --model DIR --rounds 5
    python bench/serve_latency.py --quick --model DIR --out /tmp/b   # a smoke run
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from child_server import ChildServer, free_port
from machine import machine_info, write_report

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "runs" / "demo" / "seshu-small"
PROMPT = "English: The weather is pleasant today, so we will walk to the market.\nHindi:"


class Server(ChildServer):
    """`fedem serve` in a child process, its log in a file."""

    def __init__(self, model: Path, log_path: Path) -> None:
        port = free_port()
        command = [sys.executable, "-m", "fedem.cli", "serve", "--model", str(model), "--port", str(port)]
        super().__init__([*command, "--name", "bench"], port, log_path, REPO)
        self.wait_healthy("/healthz", 180, "the server")


def one_stream(url: str, max_tokens: int, seed: int) -> dict[str, float]:
    """One streamed completion: seconds to the first text, seconds to the end, completion tokens."""
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"] and not first:
                first = now
            if chunk["choices"]:
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {
        "ttft_s": first - start,
        "total_s": end - start,
        "tokens": tokens,
        "decode_s": (last or end) - first,
    }


def run_round(url: str, streams: int, max_tokens: int, seed: int) -> tuple[list[dict[str, float]], float]:
    """`streams` streams started together; their results and the round's wall time."""
    results: list[dict[str, float]] = [{} for _ in range(streams)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = one_stream(url, max_tokens, seed=seed + i)
        except BaseException as err:  # re-raised below, in the bench's own thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return results, wall


def run_level(url: str, streams: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    ttfts, rates, aggregate = [], [], []
    tokens_total = 0
    for r in range(rounds):
        results, wall = run_round(url, streams, max_tokens, seed=1000 * r)
        tokens = sum(int(res["tokens"]) for res in results)
        tokens_total += tokens
        aggregate.append(tokens / wall)
        ttfts += [res["ttft_s"] for res in results]
        rates += [
            (res["tokens"] - 1) / res["decode_s"]
            for res in results
            if res["decode_s"] > 0 and res["tokens"] > 1
        ]
    return {
        "streams": streams,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "completion_tokens": tokens_total,
        "ttft_s": {
            "p50": statistics.median(ttfts),
            "mean": statistics.fmean(ttfts),
            "max": max(ttfts),
            "min": min(ttfts),
        },
        "stream_tokens_per_s": statistics.median(rates) if rates else None,
        "aggregate_tokens_per_s": statistics.median(aggregate),
    }


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Serve latency: time to first token and tokens/s",
        "",
        f"Model `{s['model']}` ({report['parameters']:,} parameters) served by `fedem serve` on 127.0.0.1, "
        f"one generation at a time in arrival order; streamed `/v1/completions`, prompt of "
        f"{report['prompt_tokens']} tokens, max_tokens {s['max_tokens']}, sampling (temperature 1), "
        f"{s['rounds']} round(s) per level after a warm-up request.",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu'] or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; {m['date']}; "
        f"load average {m['load_average_start'][0]:.2f} at start.",
        "",
        "| streams | TTFT p50 (s) | TTFT mean (s) | TTFT max (s) | tokens/s per stream | total tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for level in report["levels"]:
        t = level["ttft_s"]
        rate = level["stream_tokens_per_s"]
        lines.append(
            f"| {level['streams']} | {t['p50']:.3f} | {t['mean']:.3f} | {t['max']:.3f} | "
            f"{'–' if rate is None else f'{rate:.1f}'} | {level['aggregate_tokens_per_s']:.1f} |"
        )
    lines += [
        "",
        "With 8 streams the requests queue: each waits for those ahead of it, so TTFT grows with its place "
        "in the queue while the per-stream decode rate stays that of a lone stream.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 tokens, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.rounds = 8, 1
    if not (args.model / "config.json").is_file():
        parser.error(f"no checkpoint at {args.model} (pass --model DIR)")

    import torch
    from transformers import AutoConfig, AutoTokenizer

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = machine_info(("fastapi", "uvicorn", "httpx"), gpu=gpu)
    config = AutoConfig.from_pretrained(args.model)
    prompt_tokens = len(AutoTokenizer.from_pretrained(args.model)(PROMPT)["input_ids"])
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.model, Path(tmp) / "serve.log")
        try:
            parameters = httpx.get(f"{server.url}/healthz", timeout=10).json().get("parameters")
            one_stream(server.url, args.max_tokens, seed=0)  # warm-up
            levels = [run_level(server.url, n, args.rounds, args.max_tokens) for n in (1, 8)]
        finally:
            server.stop()
    report = {
        "settings": {
            "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "quick": args.quick,
        },
        "machine": {**machine, "load_average_end": list(os.getloadavg())},
        "parameters": parameters,
        "vocab_size": config.vocab_size,
        "prompt_tokens": prompt_tokens,
        "levels": levels,
        "command": "python bench/serve_latency.py" + (" --quick" if args.quick else ""),
    }
    write_report(args.out, "serve_latency", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
