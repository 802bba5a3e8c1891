"""Training and evaluation inside the simulator's process: the baselines (each donor alone,
centralised on the union) and the held-out scores every head and baseline gets.
"""

import logging
from pathlib import Path
from typing import Any

from fedem.provenance import write_provenance
from fedem.sim.config import SimulateConfig
from fedem.sim.shards import Shard

log = logging.getLogger(__name__)


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`evaluate`'s results as {"bpb/hi": …, "chrf/en-hi": …, "mean_bpb": …, "mean_chrf": …}."""
    flat = {f"bpb/{code}": float(v["bpb"]) for code, v in results.get("language_modelling", {}).items()}
    flat.update({f"chrf/{d}": float(v["chrf"]) for d, v in results.get("translation", {}).items()})
    for key in ("mean_bpb", "mean_chrf"):
        if key in results.get("summary", {}):
            flat[key] = float(results["summary"][key])
    return flat


def score(
    cfg: SimulateConfig, adapter: Path | None, out: Path, model: Path | None = None
) -> dict[str, float]:
    """Held-out bpb per language and chrF per direction of the base, or `model` (+ `adapter`)."""
    from fedem.evaluate import evaluate

    results = evaluate(
        model or cfg.base,
        out,
        adapter=adapter,
        mono=cfg.eval.mono,
        pairs=cfg.eval.pairs,
        languages=cfg.eval_languages,
        max_lines=cfg.eval.max_lines,
        max_pairs=cfg.eval.max_pairs,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    return flat_metrics(results)


def finetune_config(cfg: SimulateConfig, shard: Shard, init: Path, steps: int, out: Path) -> Any:
    """The `FinetuneConfig` a donor would build for `shard` (same split, settings and initial adapter)."""
    from fedem.config import validate
    from fedem.train.config import FinetuneConfig

    data = {
        "base": cfg.base,
        "task": "translate",
        "pairs": shard.path,
        "lang": shard.lang,
        "init": init,
        "max_length": cfg.max_length,
        "eval_size": cfg.eval_size,
        "lora": cfg.lora.model_dump(),
        "train": {**cfg.train_settings, "max_steps": steps},
        "out": out,
    }
    return validate(FinetuneConfig, data, source="simulate")


def train_alone(cfg: SimulateConfig, shard: Shard, init: Path, out: Path) -> dict[str, Any]:
    """Baseline (b): the donor alone, on its shard, for steps_per_client × rounds steps."""
    from fedem.train.finetune import finetune

    return finetune(finetune_config(cfg, shard, init, cfg.steps_per_client * cfg.rounds, out))


def train_centralised(cfg: SimulateConfig, shards: list[Shard], init: Path, out: Path) -> dict[str, Any]:
    """Baseline (c): one LoRA on the union of the shards, clients × steps_per_client × rounds steps.
    `finetune` splits each shard's file on its own, exactly as its donor does, so the union holds
    precisely the rows the donors train on, and none they hold out."""
    from fedem.train.finetune import finetune

    steps = cfg.clients * cfg.steps_per_client * cfg.rounds
    union = {"pairs": [shard.path for shard in shards], "lang": None}  # each file is named en-<lang>.tsv
    return finetune(finetune_config(cfg, shards[0], init, steps, out).model_copy(update=union))


def initial_adapter(cfg: SimulateConfig, shard: Shard, out: Path, base_sha256: str) -> Path:
    """A fresh LoRA adapter with `cfg.lora` (A random from `cfg.seed`, B = 0: ΔW = 0), saved in `out`."""
    import torch

    from fedem.config import to_plain
    from fedem.train.finetune import adapter_model

    ft = finetune_config(cfg, shard, out, 1, out).model_copy(update={"init": None})
    torch.manual_seed(cfg.seed)
    model = adapter_model(ft)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    config = {"task": "translate", "lora": to_plain(cfg.lora), "seed": cfg.seed}
    write_provenance(out, "simulate-init", config, base_sha256=base_sha256)
    return out
