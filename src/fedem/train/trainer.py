"""The one training loop behind pretraining, continued pretraining and LoRA fine-tuning.

It is the HF `Trainer` — so checkpoints, `--resume`, gradient accumulation, bf16 on a GPU and
multi-GPU through `accelerate launch`/`torchrun` come with it — plus three small additions:
the training loss without materialised logits on a CPU (`SeshuTrainer.compute_loss`,
`fedem.loss`), per-language bits-per-byte at every evaluation (`SeshuTrainer.evaluate`) and a
`metrics.jsonl` log that the plot and the hub read back.
"""

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from fedem.errors import UserError
from fedem.evaluate import score_lines
from fedem.loss import causal_lm_loss, fuses
from fedem.train.allocator import keep_freed_memory
from fedem.train.config import TrainSettings

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def training_arguments(
    train: TrainSettings, out: Path, evaluate: bool, group_by_length: bool = False
) -> TrainingArguments:
    """The only place fedem settings become HF `TrainingArguments`.

    `group_by_length` batches rows of similar length together (HF's `LengthGroupedSampler`: shuffled
    megabatches of 50 batches, sorted within), for padded rows of varying length. On fedem's en-hi
    translation rows (max_length 192, batch 8) 45% of a random batch's positions were text and 97% of
    a grouped one's: 1.5× the text tokens per second of LoRA fine-tuning on 2 cores
    (bench/results/finetune_batching.md).
    """
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.log_every,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.eval_every,
        save_strategy="steps",
        save_steps=train.save_every,
        save_total_limit=train.keep_checkpoints,
        seed=train.seed,
        data_seed=train.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
    )


class MetricsLog(TrainerCallback):
    """Appends every logged dict (train loss, eval metrics) with its step to `metrics.jsonl`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self,
        args: TrainingArguments,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class SeshuTrainer(Trainer):
    """A Trainer that computes the loss with `fedem.loss` and also reports bits-per-byte and
    perplexity per language at each evaluation."""

    def __init__(self, *args: Any, heldout: dict[str, list[str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heldout = heldout or {}

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        # The fused loss returns no logits (evaluation asks for them) and calls the model's modules
        # directly, which would bypass a distributed wrapper's hooks: only for the bare, local model.
        if return_outputs or model is not self.model or "labels" not in inputs or not fuses(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return causal_lm_loss(model, inputs, num_items_in_batch)

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if not self.heldout:
            return metrics
        model = cast(PreTrainedModel, self.model)
        tokenizer = cast(PreTrainedTokenizerBase, self.processing_class)
        per_language: dict[str, float] = {}
        for lang, lines in self.heldout.items():
            score = score_lines(model, tokenizer, lines, batch_size=self.args.eval_batch_size)
            per_language[f"{metric_key_prefix}_{lang}_bpb"] = score.bits_per_byte
            per_language[f"{metric_key_prefix}_{lang}_ppl"] = score.perplexity
        bpbs = [v for k, v in per_language.items() if k.endswith("_bpb")]
        per_language[f"{metric_key_prefix}_bpb"] = sum(bpbs) / len(bpbs)
        self.log(per_language)
        return {**metrics, **per_language}


def run_training(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Dataset,
    eval_set: Dataset | None,
    settings: TrainSettings,
    out: Path,
    collator: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None,
    heldout: dict[str, list[str]] | None = None,
    resume: bool = False,
    callbacks: Sequence[TrainerCallback] = (),
    group_by_length: bool = False,
) -> SeshuTrainer:
    """Train `model` in `out` (checkpoints in `out/checkpoint-N`) and save the result in `out`.

    Args:
        resume: continue from the last checkpoint in `out`; an error if there is none.
        heldout: lines per language scored for bits-per-byte at every evaluation.
        callbacks: extra Trainer callbacks (tests use one to crash a run on purpose).
        group_by_length: batch rows of similar length together (padded rows; see `training_arguments`).
    """
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = get_last_checkpoint(str(out)) if resume else None
    if resume and checkpoint is None:
        raise UserError(f"--resume: no checkpoint-N folder in {out} to resume from")
    _truncate_metrics(out, after_step=int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0)
    keep_freed_memory()  # 1.2-2x more tokens/s on a CPU (fedem.train.allocator)
    arguments = training_arguments(
        settings, out, evaluate=eval_set is not None, group_by_length=group_by_length
    )
    trainer = SeshuTrainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collator,
        heldout=heldout,
        callbacks=[MetricsLog(out / METRICS_FILE), *callbacks],
    )
    log.info("training %s for %d steps in %s", type(model).__name__, settings.max_steps, out)
    trainer.train(resume_from_checkpoint=checkpoint)
    if eval_set is not None and trainer.state.global_step % settings.eval_every != 0:
        trainer.evaluate()  # always end with the final model's numbers
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; fedem.json records the config
    tokenizer.save_pretrained(out)
    return trainer


def _truncate_metrics(out: Path, after_step: int) -> None:
    """Drop logged rows past the step a run restarts from, so a resumed run logs each step once."""
    kept = [row for row in read_metrics(out) if row["step"] <= after_step]
    (out / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


def read_metrics(out: Path) -> list[dict[str, float]]:
    """The rows of a run's `metrics.jsonl`."""
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
