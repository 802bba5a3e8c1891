"""The config of `fedem simulate`: frozen pydantic models that refuse unknown keys.

One YAML file (configs/simulate.yaml) plus `key=value` overrides and a few flags; the policy and its
options are checked against `fedem.policy.POLICIES` when the config is built, so a typo in
`policy_options` fails before any hub or model is started.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedem.languages import language
from fedem.train.config import LoraSettings

Baseline = Literal["base", "alone", "centralised"]
BASELINES: tuple[Baseline, ...] = ("base", "alone", "centralised")
Gate = Literal["hub", "accept"]
ReleaseMethod = Literal["ties", "dare_ties", "linear", "task_arithmetic", "dare_linear"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalSettings(Strict):
    """Held-out evaluation of every head and baseline: bpb on `mono/<lang>.valid.txt`, chrF (en→xx)
    on `pairs/en-<lang>.test.tsv` (FLORES devtest); neither is ever in a training shard."""

    languages: list[str] | None = Field(
        default=None, description="default: English (forgetting) and every client's language"
    )
    mono: Path = Path("data/mono")
    pairs: Path = Path("data/parallel")
    max_lines: int = Field(default=64, gt=0)
    max_pairs: int = Field(default=16, gt=0)
    max_new_tokens: int = Field(default=64, gt=0)
    batch_size: int = Field(default=16, gt=0)

    @field_validator("languages")
    @classmethod
    def _known(cls, codes: list[str] | None) -> list[str] | None:
        return [language(code).code for code in codes] if codes is not None else None


class SimulateConfig(Strict):
    """`fedem simulate`: `clients` donors, `rounds` rounds of `policy`, baselines, one report."""

    base: Path = Field(description="the base checkpoint folder (pushed to the embedded hub as release v1)")
    clients: int = Field(default=4, ge=1, le=64)
    policy: str = "relay"
    steps_per_client: int = Field(default=20, gt=0, description="optimizer steps per donor per round")
    policy_options: dict[str, Any] = Field(
        default_factory=dict, description="the policy's other options, e.g. method/density/order/seed"
    )
    rounds: int = Field(default=2, ge=1)
    languages: list[str] = Field(
        default_factory=lambda: ["hi", "ta"],
        description="client i holds pairs of languages[i mod len]; clients sharing a language get "
        "disjoint contiguous slices of its file",
    )
    pairs_dir: Path = Field(default=Path("data/parallel"), description="folder of en-<lang>.tsv")
    examples_per_client: int = Field(default=200, gt=0, description="pairs in each client's shard (cap)")
    eval_size: int = Field(default=16, gt=0, description="pairs of each shard held out from training")
    max_length: int = Field(default=256, gt=8)
    train: dict[str, Any] = Field(
        default_factory=dict, description="TrainSettings overrides for donors and baselines alike"
    )
    lora: LoraSettings = LoraSettings()
    eval: EvalSettings = EvalSettings()
    baselines: list[Baseline] = Field(default_factory=lambda: list(BASELINES))
    gate: Gate = Field(
        default="accept",
        description="accept: the simulator accepts donors' versions itself (fast); hub: the embedded hub's "
        "evaluation worker screens, scores and decides every pushed version with the δ/ε gate",
    )
    eval_data: Path = Field(
        default=Path("data"),
        description="gate hub: the worker's held-out data in data/ layout (mono/<lang>.valid.txt, "
        "parallel/en-<lang>.test.tsv); only the eval languages' files are handed to the hub",
    )
    accept_delta: float = Field(default=0.0, description="gate hub: minimum task-metric improvement (δ)")
    accept_epsilon: float = Field(default=0.02, ge=0, description="gate hub: largest relative bpb worsening")
    gate_timeout_s: float = Field(default=900.0, gt=0, description="gate hub: longest wait for a decision")
    release: ReleaseMethod | None = Field(
        default=None, description="after the last round, merge the accepted heads into base release v2"
    )
    release_density: float = Field(default=0.5, gt=0, le=1, description="density of ties/dare merges")
    prompt: str | None = Field(
        default=None, description="generate from this prompt with v2 (or the base + the final head)"
    )
    max_concurrent_clients: int = Field(default=2, ge=1, description="donor processes alive at once")
    client_timeout_s: float = Field(default=3600.0, gt=0, description="a donor process is killed after")
    seed: int = 0
    out: Path = Path("runs/simulate")

    @field_validator("languages")
    @classmethod
    def _codes(cls, codes: list[str]) -> list[str]:
        if not codes:
            raise ValueError("give at least one language")
        resolved = [language(code).code for code in codes]
        if "en" in resolved:
            raise ValueError("shards are English↔X pairs: 'en' is not a shard language")
        return resolved

    @field_validator("train")
    @classmethod
    def _no_steps(cls, train: dict[str, Any]) -> dict[str, Any]:
        from fedem.train.config import TrainSettings

        if "max_steps" in train:
            raise ValueError("steps come from steps_per_client (and rounds for the baselines), not train")
        TrainSettings.model_validate(train)  # a typo fails here, not in a donor process
        return train

    @model_validator(mode="after")
    def _policy(self) -> "SimulateConfig":
        from fedem.policy import make_policy

        if "steps_per_client" in self.policy_options:
            raise ValueError("set steps_per_client at the top level, not in policy_options")
        make_policy(self.policy, steps_per_client=self.steps_per_client, **self.policy_options)
        if self.examples_per_client <= self.eval_size:
            raise ValueError(f"examples_per_client must exceed eval_size ({self.eval_size})")
        return self

    @property
    def client_names(self) -> list[str]:
        return [f"c{i}" for i in range(self.clients)]

    def client_language(self, index: int) -> str:
        return self.languages[index % len(self.languages)]

    @property
    def eval_languages(self) -> list[str]:
        if self.eval.languages is not None:
            return list(self.eval.languages)
        return ["en", *dict.fromkeys(self.client_language(i) for i in range(self.clients))]

    @property
    def train_settings(self) -> dict[str, Any]:
        """Donors' and baselines' TrainSettings (without max_steps): the finetune defaults, the seed,
        then `train`; evaluation and checkpoints are sparse, as these runs are short."""
        from fedem.train.config import FinetuneConfig

        default = FinetuneConfig.model_fields["train"].default.model_dump()
        default.pop("max_steps")
        return {**default, "seed": self.seed, **self.train}
