"""On a CUDA device with mamba-ssm and causal-conv1d installed (`pip install 'fedem[cuda]'`), the kernels
compute what fedem's CPU path computes — the training layer with all its gradients, and cached decoding
— and a LoRA on `LORA_TARGETS` stays effective on them. Skipped without them (CI has no GPU).

The kernels multiply float32 in TF32 (10-bit mantissa) where the CPU path keeps float32, so the two
agree to ~1e-3, not to the 1e-4 of the CPU-only tests.
"""

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.models.mamba2 import modeling_mamba2

from fedem.model.scan import KERNELS, ByDevice
from fedem.model.seshu import LORA_TARGETS, SeshuSize, build_model
from tests.model.conftest import TinyVocab, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and KERNELS),
        reason="needs a CUDA device and mamba-ssm + causal-conv1d",
    ),
]

# The kernels want channel counts in multiples of 8; 2 layers, 8 heads of 32 channels, state 64.
SIZE = SeshuSize(hidden_size=128, num_hidden_layers=2, state_size=64, head_dim=32, chunk_size=64)
TOLERANCE = 5e-3
CUDA = torch.device("cuda")


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts the calls that reach each installed dispatcher's CUDA kernel."""
    counts: dict[str, int] = {}
    for name in (
        "mamba2_split_conv1d_scan_combined",
        "mamba2_chunk_scan",
        "mamba2_selective_state_update",
        "causal_conv1d_update",
    ):
        dispatch = getattr(modeling_mamba2, name)
        assert isinstance(dispatch, ByDevice)

        def counted(
            *args: Any, _kernel: Callable[..., Any] = dispatch.kernel, _name: str = name, **kwargs: Any
        ) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(dispatch, "kernel", counted)
    yield counts


def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same random Seshu twice: on the CPU and on the GPU."""
    torch.manual_seed(0)
    cpu = build_model(SIZE, TinyVocab())
    gpu = build_model(SIZE, TinyVocab()).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().cpu(), grads


@pytest.mark.parametrize("length", [64, 200])  # whole chunks, and a ragged last chunk
def test_training_kernels_match_the_cpu_path(length: int, kernel_calls: dict[str, int]) -> None:
    cpu, gpu = pair()
    ids = torch.randint(3, 97, (2, length))
    logits, grads = loss_and_grads(cpu, ids)
    logits_gpu, grads_gpu = loss_and_grads(gpu, ids.to(CUDA))
    assert kernel_calls == {"mamba2_split_conv1d_scan_combined": SIZE.num_hidden_layers}
    assert rel_err(logits_gpu, logits) <= TOLERANCE
    assert grads.keys() == grads_gpu.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert rel_err(grads_gpu[name], grad) <= TOLERANCE, name


def test_cached_decoding_on_kernels_matches_a_cpu_forward(kernel_calls: dict[str, int]) -> None:
    cpu, gpu = pair()
    cpu.eval()
    gpu.eval()
    prompt = torch.randint(3, 97, (2, 70))
    new_tokens = 6
    with torch.no_grad():
        out = gpu.generate(
            input_ids=prompt.to(CUDA),
            max_new_tokens=new_tokens,
            do_sample=False,
            suppress_tokens=[TinyVocab.eos_token_id],  # all six steps, whatever the random model prefers
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=TinyVocab.pad_token_id,
        )
        full = cpu(input_ids=out.sequences.cpu(), use_cache=False).logits
    # Each new token's logits, from the cache, against the logits one position before it from scratch.
    cached = torch.stack(out.logits, dim=1).cpu()  # (batch, new tokens, vocab)
    assert cached.shape[1] == new_tokens
    assert rel_err(cached, full[:, prompt.shape[1] - 1 : -1]) <= TOLERANCE
    assert kernel_calls["mamba2_chunk_scan"] == SIZE.num_hidden_layers  # the prompt, in one pass
    decoded = (new_tokens - 1) * SIZE.num_hidden_layers  # then one token at a time
    assert kernel_calls["mamba2_selective_state_update"] == kernel_calls["causal_conv1d_update"] == decoded


def test_lora_on_its_targets_is_effective_on_the_kernels(kernel_calls: dict[str, int]) -> None:
    _, gpu = pair()
    ids = torch.randint(3, 97, (2, 128), device=CUDA)
    gpu.train()
    with torch.no_grad():
        base = gpu(input_ids=ids, use_cache=False).logits
    # init_lora_weights=False starts B random, so the adapter changes the output from the first step.
    lora = get_peft_model(gpu, LoraConfig(r=4, target_modules=list(LORA_TARGETS), init_lora_weights=False))
    out = lora(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    lora_grads = [p.grad for name, p in lora.named_parameters() if "lora_" in name]
    assert len(lora_grads) == 2 * SIZE.num_hidden_layers * len(LORA_TARGETS)
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    adapted = out.logits.detach()
    assert rel_err(adapted, base) > 10 * TOLERANCE  # the adapter is not bypassed
    merged = lora.merge_and_unload()
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids, use_cache=False).logits, adapted) <= TOLERANCE
    assert kernel_calls["mamba2_split_conv1d_scan_combined"] == 3 * SIZE.num_hidden_layers
