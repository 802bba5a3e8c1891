"""A causal LM's next-token loss (training) and summed NLL (evaluation) with the LM head fused, in chunks.

transformers' `…ForCausalLM.forward` computes the logits of every position, (batch·length, vocabulary)
floats — 131 MB at batch 8, length 256, vocabulary 16k — then their log-softmax and, in backward, the
gradient of each: several passes over memory far larger than a CPU's caches, around matmuls that are
not faster for being whole. torch's `F.linear_cross_entropy` with `LinearCrossEntropyOptions` runs the
head and the loss `CHUNK_ROWS` positions at a time and takes the gradients of the hidden states and of
the head's weight in the same pass, so the logits never exist in full. Measured on 2 cores (hidden
320, float32, forward + backward of head and loss, with fedem's allocator tuning): 2,048 positions ×
vocabulary 16k, pretraining's shape, 209 → 178 ms; 4,096 × 16k with the head frozen (LoRA) 291 →
235 ms, trained 409 → 353 ms; 16,384 × 8k 814 → 690 ms; the loss and gradients equal to ~1e-6
relative, and a training step's peak memory lower by about the logits' size twice. Chunks of 512
rows measured as fast as or faster than 128, 256 and torch's own "auto" choice at each shape.

Only labelled positions go through the head: the op computes the logits of rows labelled -100 and
then ignores them, and in fine-tuning most rows are a prompt or padding. On batches of 8 of fedem's
en-hi translation rows drawn at random (20% of positions labelled, seshu-small, 2 cores) a LoRA step
took 1.41× less time and a full fine-tuning step 1.40× less; grouped by length, as `fedem finetune`
batches them (41% labelled), 1.21× and 1.23× less (docs/design.md, "Fine-tuning's batches"). In
packed pretraining only each row's last position has no label, and the gather with its scatter in
backward costs ~2-3 ms of a 1.3 s step at (8, 256).

`fedem.train`'s Trainer and `fedem.evaluate` both use it, where it was measured: on a CPU, for a plain
`nn.Linear` head after a separate backbone (a LoRA-wrapped head or any other module falls back to the
model's own forward); and for the same arithmetic as
`transformers.loss.loss_utils.ForCausalLMLoss`: labels shifted left by one with -100 appended, mean
over labelled positions, or their sum over `num_items_in_batch` (the Trainer's gradient accumulation).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from fedem.data.packing import IGNORE_INDEX

CHUNK_ROWS = 512
_CHUNKED = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK_ROWS)


def _causal_lm(model: torch.nn.Module) -> Any:
    """The transformers model inside `model` (a peft wrapper's LoRA layers stay injected in it)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def fuses(model: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss` and `summed_nll` take the fused path for `model`: a CPU model whose
    head is a plain `nn.Linear` after a separate backbone (else they use the model's own forward)."""
    causal_lm = _causal_lm(model)
    head = causal_lm.get_output_embeddings()
    return (
        type(head) is torch.nn.Linear
        and head.weight.device.type == "cpu"
        and causal_lm.base_model is not causal_lm
    )


def _next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t + 1; the last position has nothing to predict (as ForCausalLMLoss)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def count_labelled(labels: torch.Tensor) -> torch.Tensor:
    """How many next tokens of (batch, length) `labels` the loss counts: those not -100."""
    return (_next_tokens(labels) != IGNORE_INDEX).sum()


def _fused_nll(
    model: torch.nn.Module, features: Mapping[str, torch.Tensor], targets: torch.Tensor
) -> torch.Tensor:
    """Σ −log p over `targets` from the backbone's hidden states, the head applied in chunks."""
    causal_lm = _causal_lm(model)
    hidden = causal_lm.base_model(**features, use_cache=False).last_hidden_state  # (b, l, d)
    head = causal_lm.get_output_embeddings()
    targets = targets.flatten().to(hidden.device)
    labelled = targets != IGNORE_INDEX
    hidden, targets = hidden.flatten(0, 1)[labelled], targets[labelled]
    return F.linear_cross_entropy(
        hidden.to(head.weight.dtype),
        head.weight,
        targets,
        linear_bias=head.bias,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        options=_CHUNKED,
    )


def _split(inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's inputs without the labels, and the next-token targets."""
    return {key: value for key, value in inputs.items() if key != "labels"}, _next_tokens(inputs["labels"])


def summed_nll(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ −log p(next token) in nats over the labelled positions of `inputs` (input_ids, labels and
    optionally attention_mask; labels -100 are skipped), fused where `fuses(model)`.

    On the fused path the sum is also the more accurate one: 2e-8 from a float64 reference over 50
    Kannada FLORES sentences under SmolLM2-135M, against 1e-4 for float32 cross-entropy on the logits.
    """
    features, targets = _split(inputs)
    if fuses(model):
        return _fused_nll(model, features, targets)
    logits = model(**features, use_cache=False).logits.float()
    return F.cross_entropy(
        logits.flatten(0, 1),
        targets.flatten().to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def causal_lm_loss(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """The training loss of `inputs` (input_ids, labels, optionally attention_mask) under `model`.

    The same value and gradients as `model(**inputs).loss` (the mean over labelled positions, or their
    sum over `num_items_in_batch`), computed without materialising the logits where `fuses(model)`.
    """
    if not fuses(model):
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return model(**inputs, **extra, use_cache=False).loss
    nll = _fused_nll(model, *_split(inputs))
    if num_items_in_batch is None:
        count = count_labelled(inputs["labels"])
    else:
        count = torch.as_tensor(num_items_in_batch, device=nll.device)
    # A batch with nothing to predict (every label -100: a prompt that fills max_length) has nll 0. Its
    # loss is 0, not 0/0: the fused op scales gradients it computed in forward by the upstream
    # gradient, and an infinite one would turn its zeros into NaN weights after the optimizer step.
    return nll / count.clamp(min=1)
