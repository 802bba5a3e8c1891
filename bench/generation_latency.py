"""Generation speed: milliseconds per new token after a short and a long prompt, Seshu against a Llama.

Both models are freshly initialised (speed does not depend on the weights): seshu-small as fedem
builds it, and the `LlamaForCausalLM` with the same width, vocabulary and parameter count
(`fedem.model.baseline`). For each prompt length and batch size, greedy `generate` runs twice — once
for 1 new token (prompt processing + 1 step) and once for 1 + N — and

    ms per new token = (time(1 + N) − time(1)) / N            prefill s = time(1)

so the prompt's cost is measured apart from the per-token cost. Each figure is the best of `--repeats`
rounds over every configuration (`measure`).
Seshu keeps a fixed-size recurrent state per layer (transformers' `Mamba2Cache`: a convolution window
and the SSM state), so its per-token cost should not grow with the prompt; a Transformer's KV cache
does. Targets (issue 5): Seshu's ms/token after 8192 tokens ≤ 1.2× that after 16, and below Llama's at
prompts ≥ 2048. Results: `<out>/generation_latency.{json,md}`.

    python bench/generation_latency.py                       # prompts 16 512 2048 8192 → bench/results/
    python bench/generation_latency.py --quick --out /tmp/g  # tiny models, short prompts: a smoke run
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from fedem.config import load_yaml
from fedem.model.baseline import build_matched_llama
from fedem.model.seshu import SeshuSize, build_model, count_parameters
from machine import machine_info, machine_line, write_report

REPO = Path(__file__).resolve().parents[1]
SMALL = SeshuSize(**load_yaml(REPO / "configs" / "seshu-small.yaml")["model"])
TINY = SeshuSize(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, chunk_size=16)
VOCAB = 16_000


class Vocab:
    """Stands in for a tokenizer when building a config: its length and special ids are all that is read."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def timed_generate(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # never stop early at a random EOS
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def measure(
    models: dict[str, PreTrainedModel], plan: list[tuple[int, int]], new_tokens: int, repeats: int
) -> dict[str, list[dict[str, Any]]]:
    """Per model, a row for each (prompt length, batch) of `plan`, each time the best of `repeats`.

    The repeats are rounds over every configuration, not one configuration's repeats back to back:
    this VM's speed drifts by 10-30% over minutes, and a slow spell then costs each configuration one
    repeat instead of all of one configuration's (after 8,192 tokens Seshu had measured 16.4 ms a
    token, after 2,048 11.1 ms, a minute apart in one run)."""
    prompts = {
        (length, batch): torch.randint(
            3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length)
        )
        for length, batch in plan
    }
    for model in models.values():  # warm-up: first-call allocations and dispatch
        timed_generate(model, prompts[plan[0]][:, :16], 2)
    best = {(name, key): [float("inf"), float("inf")] for name in models for key in plan}
    for _ in range(repeats):
        for key in plan:
            for name, model in models.items():
                times = best[(name, key)]
                times[0] = min(times[0], timed_generate(model, prompts[key], 1))
                times[1] = min(times[1], timed_generate(model, prompts[key], 1 + new_tokens))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for (name, (length, batch)), (one, many) in best.items():
        per_token = max(many - one, 0.0) / new_tokens
        rows[name].append(
            {
                "prompt": length,
                "batch": batch,
                "prefill_s": round(one, 4),
                "ms_per_token": round(1000 * per_token, 3),
                "tokens_per_s": round(batch / per_token, 1) if per_token else float("inf"),
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "# Generation latency: Seshu vs a Llama of the same size",
        "",
        machine_line(report["machine"]),
        "",
        f"Greedy decoding, float32, {report['new_tokens']} new tokens timed after the prompt (prompt "
        f"processing measured apart), best of {report['repeats']} rounds over all configurations. "
        f"Parameters: Seshu {report['params']['seshu']:,}, Llama {report['params']['llama']:,} "
        f"({report['llama_layers']} layers).",
        "",
        "| prompt | batch | Seshu ms/token | Llama ms/token | Seshu / Llama | Seshu prefill s "
        "| Llama prefill s |",
        "|---|---|---|---|---|---|---|",
    ]
    for seshu, llama in zip(rows["seshu"], rows["llama"], strict=True):
        lines.append(
            f"| {seshu['prompt']} | {seshu['batch']} | {seshu['ms_per_token']} | {llama['ms_per_token']} "
            f"| {seshu['ms_per_token'] / llama['ms_per_token']:.2f} | {seshu['prefill_s']} "
            f"| {llama['prefill_s']} |"
        )
    lines += ["", "## Targets (issue 5)", ""]
    for target in report["targets"]:
        lines.append(f"- {'met' if target['met'] else 'MISSED'}: {target['what']} — {target['measured']}")
    return "\n".join(lines) + "\n"


def targets(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    seshu = {(r["prompt"], r["batch"]): r["ms_per_token"] for r in rows["seshu"]}
    llama = {(r["prompt"], r["batch"]): r["ms_per_token"] for r in rows["llama"]}
    prompts = sorted({p for p, b in seshu if b == 1})
    flat = seshu[(prompts[-1], 1)] / seshu[(prompts[0], 1)]
    found = [
        {
            "what": f"Seshu ms/token after {prompts[-1]} tokens ≤ 1.2× after {prompts[0]}",
            "measured": f"{flat:.2f}×",
            "met": flat <= 1.2,
        }
    ]
    for prompt in (p for p in prompts if p >= 2048):
        ratio = seshu[(prompt, 1)] / llama[(prompt, 1)]
        found.append(
            {
                "what": f"Seshu ms/token below Llama's after {prompt} tokens",
                "measured": f"{seshu[(prompt, 1)]} vs {llama[(prompt, 1)]} ms ({ratio:.2f}×)",
                "met": ratio < 1.0,
            }
        )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (4 only at 512)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny models and prompts 16 64: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    logging.set_verbosity_error()  # the stock scan warns once that mamba_ssm is missing; expected on CPU
    size, prompts = (TINY, [16, 64]) if args.quick else (SMALL, args.prompts)
    torch.manual_seed(0)
    seshu = build_model(size, Vocab(VOCAB)).eval()  # type: ignore[arg-type]
    llama = build_matched_llama(size, Vocab(VOCAB))  # type: ignore[arg-type]
    llama.config.max_position_embeddings = max(prompts) + args.new_tokens + 8
    llama.eval()
    models: dict[str, PreTrainedModel] = {"seshu": seshu, "llama": llama}
    plan = [(p, 1) for p in prompts] + [(prompts[min(1, len(prompts) - 1)], b) for b in args.batches if b > 1]
    rows = measure(models, plan, args.new_tokens, args.repeats)
    report = {
        "machine": machine_info(),
        "size": size.model_dump(),
        "params": {name: count_parameters(model) for name, model in models.items()},
        "llama_layers": llama.config.num_hidden_layers,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rows": rows,
        "targets": targets(rows),
    }
    write_report(args.out, "generation_latency", report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
