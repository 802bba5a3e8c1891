"""GPU figures: Seshu on mamba-ssm's kernels, on fedem's torch path, and a LlamaForCausalLM of its size.

Training (forward + backward + clip + AdamW, bf16 autocast over float32 weights as `fedem pretrain` runs
on a GPU, batch 8, random token ids) for each model size and length, each configuration in a fresh
child process so that peak GPU memory (`torch.cuda.max_memory_allocated`) is its own:

    kernels   Seshu where mamba-ssm and causal-conv1d are installed: their fused CUDA/Triton kernels
    fedem     the same Seshu with `FEDEM_KERNELS=0`: fedem's torch path (compiled mixer) on the GPU
    llama     LlamaForCausalLM of about the same parameter count, SDPA attention

and generation (greedy, batch 1, float32): ms per new token after prompts of 16, 2048 and 8192 tokens,
Seshu on the kernels against the Llama with its KV cache. Ratios are taken within the run. Needs a CUDA
device and `pip install 'fedem[cuda]'`; results go to `<out>/gpu.{json,md}`.

    python bench/gpu.py                      # → bench/results/gpu.{md,json}
    python bench/gpu.py --quick --out /tmp/b # small shapes, a smoke run
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fedem.config import load_yaml  # noqa: E402
from machine import machine_info, machine_line, write_report  # noqa: E402
from train_throughput import LLAMA, REPO, SMALL  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    # seshu-small and the Llama of vs_llama.py, vocabulary 8,000: ~7.2M each
    "small": {"vocab": 8_000, "seshu": SMALL, "llama": LLAMA},
    # seshu-base, vocabulary 16,000: 133M; the Llama with 17 layers: 133M
    "base": {
        "vocab": 16_000,
        "seshu": load_yaml(REPO / "configs" / "seshu-base.yaml")["model"],
        "llama": {
            "hidden_size": 768,
            "num_hidden_layers": 17,
            "intermediate_size": 2048,
            "num_attention_heads": 12,
        },
    },
}
TRAIN = [("small", 512), ("small", 2048), ("base", 2048)]  # (size, length)
PATHS = {"small": ("llama", "kernels", "fedem"), "base": ("llama", "kernels")}
PROMPTS = (16, 2048, 8192)
BATCH, WARMUP, STEPS, NEW_TOKENS = 8, 3, 10, 32
# mamba-ssm's Triton kernels autotune and compile at their first call (minutes), within the warm-up.
CHILD_TIMEOUT_S = 600


def build(size: dict[str, Any], path: str) -> Any:
    """A model of `size` on the GPU: Seshu (either path) or the Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

    from fedem.model.seshu import SeshuSize, build_model

    class Vocab:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self) -> int:
            return size["vocab"]

    torch.manual_seed(0)
    model: Any
    if path == "llama":  # transformers' default attention: SDPA (flash / memory-efficient kernels on CUDA)
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=size["vocab"], tie_word_embeddings=True, **size["llama"])
        )
    else:
        model = build_model(SeshuSize(**size["seshu"]), cast(PreTrainedTokenizerBase, Vocab()))
    return model.cuda()


def train(
    size: dict[str, Any], path: str, length: int, batch: int, warmup: int, steps: int
) -> dict[str, Any]:
    import torch

    model = build(size, path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(3, size["vocab"], (batch, length), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": batch * length * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "warmup_s": warmup_s,
        "peak_gib": torch.cuda.max_memory_allocated() / (1 << 30),
    }


def generate(size: dict[str, Any], path: str, prompts: list[int], new_tokens: int) -> dict[str, Any]:
    import torch

    model = build(size, path)
    model.eval()
    result = {}
    for prompt in prompts:
        ids = torch.randint(3, size["vocab"], (1, prompt), device="cuda")
        kwargs = {"do_sample": False, "pad_token_id": 0, "suppress_tokens": [2]}
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=2, **kwargs)  # warm-up: kernels, cache shapes
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids=ids, max_new_tokens=1, **kwargs)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(input_ids=ids, max_new_tokens=new_tokens + 1, **kwargs)
            torch.cuda.synchronize()
            total = time.perf_counter() - start
        result[str(prompt)] = 1000 * (total - prefill) / new_tokens  # ms per token after the prompt
    return result


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs one job in a fresh interpreter (`--child`), with `FEDEM_KERNELS=0` for the fedem path.

    Its own process group, killed whole after `CHILD_TIMEOUT_S`: Triton's and inductor's compile
    workers, which outlive a killed parent, go with it instead of holding the output pipe open.
    """
    env = os.environ | ({"FEDEM_KERNELS": "0"} if job["path"] == "fedem" else {})
    command = [sys.executable, __file__, "--child", json.dumps(job)]
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"error": f"no result within {CHILD_TIMEOUT_S} s"}
    if process.returncode:
        lines = stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {process.returncode}"}
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def run_child(job: dict[str, Any]) -> None:
    import torch

    from fedem.model.scan import KERNELS

    assert torch.cuda.is_available(), "needs a CUDA device"
    wanted = job["path"] == "kernels"
    assert KERNELS == wanted or job["path"] == "llama", (
        "mamba-ssm and causal-conv1d do not import" if wanted else "FEDEM_KERNELS=0 did not take"
    )
    size = SIZES[job["size"]] if not job.get("quick") else QUICK
    if job["kind"] == "train":
        out = train(size, job["path"], job["length"], job["batch"], job["warmup"], job["steps"])
    else:
        out = generate(size, job["path"], job["prompts"], job["new_tokens"])
    print(json.dumps(out))


QUICK = {
    "vocab": 512,
    "seshu": {"hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "head_dim": 16, "chunk_size": 64},
    "llama": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2},
}


def report(results: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        "# GPU: Seshu on mamba-ssm's kernels vs fedem's torch path vs a same-size Llama",
        "",
        f"GPU: {info['gpu']}. {machine_line(info)}",
        "",
        f"Training, batch {BATCH}, bf16 autocast, forward + backward + clip + fused AdamW; {STEPS} steps "
        f"timed after {WARMUP} warm-up steps. Ratios are Seshu's tokens/s over the Llama's.",
        "",
        "| size | length | path | parameters | tokens/s | vs Llama | ms/step | peak GiB | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["train"]:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['length']} | {row['path']} | failed: {row['error']} |||||")
            continue
        llama = next(
            r
            for r in results["train"]
            if r["size"] == row["size"] and r["length"] == row["length"] and r["path"] == "llama"
        )
        versus = f"{row['tokens_per_s'] / llama['tokens_per_s']:.2f}×" if "tokens_per_s" in llama else "—"
        lines.append(
            f"| {row['size']} | {row['length']} | {row['path']} | {row['parameters'] / 1e6:.1f}M | "
            f"{row['tokens_per_s']:,.0f} | {versus} | {row['ms_per_step']:.1f} | {row['peak_gib']:.2f} | "
            f"{row['warmup_s']:.1f} |"
        )
    lines += [
        "",
        f"Generation, batch 1, float32, greedy: ms per new token over {NEW_TOKENS} tokens after the prompt.",
        "",
        "| model | " + " | ".join(f"after {p}" for p in PROMPTS) + " |",
        "|---|" + "---|" * len(PROMPTS),
    ]
    for name, row in results["generate"].items():
        cells = [f"{row[str(p)]:.2f}" if str(p) in row else row.get("error", "—") for p in PROMPTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps: a smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    quick = {"quick": True, "warmup": 1, "steps": 2} if args.quick else {"warmup": WARMUP, "steps": STEPS}
    results: dict[str, Any] = {"train": [], "generate": {}}
    for size, length in TRAIN[:1] if args.quick else TRAIN:
        for path in PATHS[size]:
            job = {"kind": "train", "size": size, "path": path, "length": length, "batch": BATCH, **quick}
            results["train"].append({"size": size, "length": length, "path": path, **child(job)})
            print(results["train"][-1], flush=True)
    for path in ("kernels", "llama"):
        prompts = [16, 256] if args.quick else list(PROMPTS)
        job = {
            "kind": "generate",
            "size": "small",
            "path": path,
            "prompts": prompts,
            "new_tokens": NEW_TOKENS,
            **quick,
        }
        results["generate"][f"small, {path}"] = child(job)
        print(path, results["generate"][f"small, {path}"], flush=True)
    info = machine_info(("peft", "mamba_ssm", "causal_conv1d", "triton"), gpu=torch.cuda.get_device_name())
    write_report(args.out, "gpu", {"machine": info, **results}, report(results, info))
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
