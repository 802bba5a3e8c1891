"""The fused training loss equals the model's own loss and gradients, for full, LoRA and Trainer use."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from fedem.data.packing import IGNORE_INDEX
from fedem.loss import CHUNK_ROWS, causal_lm_loss, fuses, summed_nll
from fedem.model.seshu import LORA_TARGETS
from fedem.train.trainer import SeshuTrainer


def _inputs(vocab: int, batch: int = 3, length: int = 400) -> dict[str, torch.Tensor]:
    """Rows of different lengths (right padding, labels -100 there) and an unlabelled prompt: more
    positions than one chunk of the fused loss, so several chunks and a partial one are exercised."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 300:] = 0
    input_ids[1, 300:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[2, :50] = IGNORE_INDEX
    assert batch * length > 2 * CHUNK_ROWS
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _loss_and_grads(
    model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items: int | None) -> None:
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    stock, stock_grads = _loss_and_grads(model, lambda: model(**inputs, **extra, use_cache=False).loss)
    fused, fused_grads = _loss_and_grads(model, lambda: causal_lm_loss(model, inputs, num_items))
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == stock_grads.keys() and stock_grads
    for name, grad in stock_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_items", [None, 517])
def test_full_model_loss_and_gradients_match(tiny_model_dir: Path, num_items: int | None) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    assert fuses(model)
    _assert_same(model, _inputs(model.config.vocab_size), num_items)
    # The tied embedding gets both gradients: as the input table and as the head.
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_lora_loss_and_gradients_match(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    model = get_peft_model(base, config).train()
    assert fuses(model)
    _assert_same(model, _inputs(base.config.vocab_size), None)


def test_llama_loss_matches() -> None:
    """Any causal LM with an `nn.Linear` head (the benchmarks' Llama baseline), bias-free or not."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).train()
    _assert_same(model, _inputs(300), 600)


def test_a_wrapped_head_falls_back_to_the_models_own_forward(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)).train()
    assert not fuses(model)
    _assert_same(model, _inputs(base.config.vocab_size), None)


def test_trainer_uses_the_same_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    trainer = SeshuTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    inputs = _inputs(model.config.vocab_size)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=517)
        stock = model(**inputs, num_items_in_batch=517, use_cache=False).loss
        # Evaluation asks for the outputs too: the logits come from the model's own forward.
        eval_loss, outputs = trainer.compute_loss(model, dict(inputs), return_outputs=True)
    torch.testing.assert_close(loss, stock, rtol=1e-5, atol=1e-6)
    assert outputs.logits.shape[:2] == inputs["input_ids"].shape
    own_loss = model(**inputs, use_cache=False).loss.detach()
    torch.testing.assert_close(eval_loss, own_loss, rtol=1e-5, atol=1e-6)


def test_training_steps_take_the_fused_path(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `Trainer.train` (accelerate's prepared model, gradient accumulation), not only by hand."""
    import fedem.train.trainer as trainer_module

    calls: list[object] = []

    def counted(*args: object) -> torch.Tensor:
        calls.append(args[-1])  # num_items_in_batch
        return causal_lm_loss(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "causal_lm_loss", counted)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = _inputs(model.config.vocab_size, batch=4)
    rows = [{key: value[i] for key, value in inputs.items()} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        report_to="none",
        save_strategy="no",
    )
    SeshuTrainer(model=model, args=args, train_dataset=rows).train()  # type: ignore[arg-type]
    labelled = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert len(calls) == 2 and sum(int(n) for n in calls) == 2 * labelled  # type: ignore[call-overload]


@pytest.mark.parametrize("lora_on_head", [False, True])
def test_summed_nll_matches_a_float64_reference(tiny_model_dir: Path, lora_on_head: bool) -> None:
    """What `fedem evaluate` sums: fused (no grad) or, for a wrapped head, from the model's logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if lora_on_head:
        config = LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False)
        model = get_peft_model(model, config).eval()
    assert fuses(model) is not lora_on_head
    inputs = _inputs(model.config.vocab_size)
    with torch.no_grad():
        nll = summed_nll(model, inputs)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        targets = inputs["labels"][:, 1:].flatten()
        reference = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).double(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    torch.testing.assert_close(nll.double(), reference, rtol=1e-6, atol=0.0)


def test_a_batch_with_nothing_to_predict_leaves_the_weights_finite(tiny_model_dir: Path) -> None:
    """Every label -100 (a prompt filling max_length): loss 0 and zero gradients, alone or accumulated."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    inputs = _inputs(model.config.vocab_size)
    inputs["labels"] = torch.full_like(inputs["labels"], IGNORE_INDEX)
    for num_items in (None, 0):
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, inputs, num_items)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
