"""Configs: every shipped recipe validates; overrides are typed; errors name the key."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from fedem.config import apply_overrides, load_yaml, validate
from fedem.errors import UserError
from fedem.sim.config import SimulateConfig
from fedem.train.config import FinetuneConfig, PretrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    data = load_yaml(path)
    schema: type[BaseModel]
    if "clients" in data:
        schema = SimulateConfig
    else:
        schema = FinetuneConfig if "base" in data else PretrainConfig

    cfg = validate(schema, data, source=path.name)

    assert isinstance(cfg, SimulateConfig) or cfg.train.max_steps > 0
    assert path.read_text().startswith("# "), "a recipe opens with the command that runs it"


def test_overrides_are_parsed_as_yaml_values() -> None:
    data = apply_overrides(
        {"train": {"max_steps": 5}},
        ["train.max_steps=7", "train.learning_rate=0.001", "data.languages=[hi, ta]"],
    )
    assert data == {"train": {"max_steps": 7, "learning_rate": 1e-3}, "data": {"languages": ["hi", "ta"]}}


def test_validation_error_names_the_key() -> None:
    with pytest.raises(UserError, match=r"train\.max_steps: Input should be greater than 0"):
        validate(PretrainConfig, {"init_from": "x", "train": {"max_steps": 0}})


def test_malformed_override() -> None:
    with pytest.raises(UserError, match="key.sub=value"):
        apply_overrides({}, ["no-equals-sign"])
