"""`fedem finetune`: train a LoRA adapter on a Seshu base, for translation or for a language's text.

The adapter is saved alone (`adapter_model.safetensors` + `adapter_config.json`, loadable with
`PeftModel.from_pretrained`) with `fedem.json` recording the base's sha256, so merging and the hub can
refuse it on another base. `init` continues an existing adapter — loaded *trainable*: peft loads
adapters frozen by default, and training a frozen relayed adapter silently changes nothing.

`rebase` is the one sanctioned exception to "an adapter belongs to its base": after a new base
release the relay continues from the adapter's head on the new base, so `init` may have been trained
on another base. That is recorded, never silent: fedem.json then holds `init_base_sha256` (the
base the init adapter was trained on) beside `base_sha256` (the new one), and `parent` names the
hub version that was continued.
"""

import logging
import math
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase, TrainerCallback

from fedem.config import to_plain
from fedem.data.corpus import load_mono, read_pairs
from fedem.data.packing import IGNORE_INDEX, Examples, pad_batch, prompt_response
from fedem.data.prompts import translation_examples
from fedem.errors import UserError
from fedem.evaluate import batch_nll
from fedem.model.load import load_adapter, load_model, load_tokenizer
from fedem.model.lora import with_fused_layers
from fedem.provenance import read_provenance, weights_fingerprint, write_provenance
from fedem.train.config import FinetuneConfig
from fedem.train.plot import plot_metrics
from fedem.train.trainer import run_training

log = logging.getLogger(__name__)


def translation_rows(
    cfg: FinetuneConfig, tokenizer: PreTrainedTokenizerBase, path: Path | None = None
) -> list[tuple[list[int], list[int]]]:
    """Prompt/response rows from a pairs file (`path`, else the config's only one); the loss is on the
    response (and its EOS) only."""
    path = path or pairs_files(cfg)[0]
    rows = []
    for pair in read_pairs(path, cfg.lang):
        for prompt, response in translation_examples(pair, cfg.direction):
            prompt_ids = tokenizer(prompt)["input_ids"]  # starts with BOS
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            rows.append(prompt_response(prompt_ids, response_ids, cfg.max_length))
    return rows


def text_rows(cfg: FinetuneConfig, tokenizer: PreTrainedTokenizerBase) -> list[tuple[list[int], list[int]]]:
    """One row per line of text, `[BOS] line [EOS]`, every token learned."""
    assert cfg.data is not None
    lines = [line for lang_lines in load_mono(cfg.data).values() for line in lang_lines]
    rows = []
    for ids in tokenizer(lines)["input_ids"]:
        full = (ids + [tokenizer.eos_token_id])[: cfg.max_length]
        rows.append((full, list(full)))
    return rows


def pairs_files(cfg: FinetuneConfig) -> list[Path]:
    assert cfg.pairs is not None
    return cfg.pairs if isinstance(cfg.pairs, list) else [cfg.pairs]


def training_split(
    cfg: FinetuneConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Examples, Examples | None]:
    """Training and held-out rows. Each pairs file is split on its own, so fine-tuning on several
    donors' files trains on exactly the rows each donor trains on and holds out what each holds out
    (the simulator's centralised baseline relies on this)."""
    seed = cfg.train.seed
    if cfg.task == "lm":
        return split_rows(text_rows(cfg, tokenizer), cfg.eval_size, seed)
    parts = [
        split_rows(translation_rows(cfg, tokenizer, path), cfg.eval_size, seed) for path in pairs_files(cfg)
    ]
    held_out = [row for _, evaluation in parts if evaluation is not None for row in evaluation.rows]
    return Examples([row for train, _ in parts for row in train.rows]), Examples(
        held_out
    ) if held_out else None


def split_rows(
    rows: list[tuple[list[int], list[int]]], eval_size: int, seed: int
) -> tuple[Examples, Examples | None]:
    """A seeded shuffle, then the last `eval_size` rows held out (never trained on)."""
    if len(rows) <= eval_size:
        raise UserError(f"only {len(rows)} examples: need more than eval_size={eval_size}")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    if eval_size == 0:
        return Examples(shuffled), None
    return Examples(shuffled[:-eval_size]), Examples(shuffled[-eval_size:])


@torch.no_grad()
def response_bits_per_byte(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: Examples, batch_size: int
) -> float:
    """Bits per UTF-8 byte of the learned tokens (the responses) of held-out rows.

    Unlike the Trainer's `eval_loss` (nats per token, averaged per batch) this is comparable across
    tokenizers and batchings, so two donors' versions of an adapter can be ranked by it. The bytes are
    those of the decoded target text; EOS costs bits but has no bytes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, byte_count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples.rows[i][0]))  # less padding
    for start in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[start : start + batch_size]]
        nll += batch_nll(model, pad_batch(rows, tokenizer.pad_token_id), device)[0]
    for _, labels in examples.rows:
        learned = [t for t in labels[1:] if t != IGNORE_INDEX]
        byte_count += len(cast(str, tokenizer.decode(learned, skip_special_tokens=True)).encode("utf-8"))
    model.train(was_training)
    return nll / math.log(2) / max(byte_count, 1)


def adapter_model(cfg: FinetuneConfig) -> PeftModel:
    """The base with a fresh LoRA adapter, or with `cfg.init` loaded trainable."""
    base = load_model(cfg.base)
    if cfg.init is not None:
        model = load_adapter(base, cfg.init, cfg.base, trainable=True, check_base=not cfg.rebase)
        for adapter_config in model.peft_config.values():
            # the base it is trained on from now on; a relayed adapter may name a hub repo here, which
            # peft would otherwise try to look up on huggingface.co when saving
            adapter_config.base_model_name_or_path = str(cfg.base)
    else:
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, with_fused_layers(lora))
    return model


def finetune(
    cfg: FinetuneConfig, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, Any]:
    """Train a LoRA adapter as `cfg` describes; returns a JSON-able summary."""
    tokenizer = load_tokenizer(cfg.base)
    train_set, eval_set = training_split(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    model = adapter_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:  # a relayed adapter loaded frozen would silently train nothing
        raise RuntimeError("the adapter has no trainable parameters")
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    base_sha256 = weights_fingerprint(cfg.base)
    lineage: dict[str, Any] = {}
    if cfg.parent is not None:
        lineage["parent"] = cfg.parent
    if cfg.init is not None and cfg.rebase:
        lineage["init_base_sha256"] = read_provenance(cfg.init).get("base_sha256")
        if lineage["init_base_sha256"] != base_sha256:
            log.info("rebasing %s onto %s", cfg.parent or cfg.init, cfg.base)
    write_provenance(cfg.out, "finetune", to_plain(cfg), base_sha256=base_sha256, **lineage)
    trainer = run_training(
        model,
        tokenizer,
        train_set,
        eval_set,
        cfg.train,
        cfg.out,
        collator=partial(pad_batch, pad_id=tokenizer.pad_token_id),
        resume=resume,
        callbacks=callbacks,
        group_by_length=cfg.group_by_length,
    )
    plot = plot_metrics(cfg.out)
    final = {k: v for row in trainer.state.log_history for k, v in row.items() if k == "eval_loss"}
    if eval_set is not None:
        final["eval_bpb"] = response_bits_per_byte(model, tokenizer, eval_set, cfg.train.batch_size)
    return {
        "out": str(cfg.out),
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "base_sha256": base_sha256,
        "plot": str(plot) if plot else None,
        "metrics": final,
    }
