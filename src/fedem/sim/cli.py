"""`fedem simulate`: the command-line face of `fedem.sim.runner.simulate`."""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedem.sim.config import SimulateConfig


def simulate_config(args: argparse.Namespace) -> "SimulateConfig":
    """The YAML of --config, the key=value overrides, then the flags (flags win)."""
    from fedem.config import apply_overrides, load_yaml, validate
    from fedem.sim.config import SimulateConfig

    data = load_yaml(args.config) if args.config else {}
    data = apply_overrides(data, args.overrides)
    for key, value in (
        ("base", args.base),
        ("clients", args.clients),
        ("policy", args.policy),
        ("rounds", args.rounds),
        ("steps_per_client", args.steps_per_client),
        ("out", args.out),
    ):
        if value is not None:
            data[key] = value
    return validate(SimulateConfig, data, source=str(args.config or "simulate"))


def cmd_simulate(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.sim.runner import simulate

    return simulate(simulate_config(args))


def add_simulate_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `fedem simulate` on the main parser's subcommands."""
    from fedem.cli import _add_common  # here, not at the top: fedem.cli imports this module

    sim = commands.add_parser(
        "simulate",
        help="simulate a federation: embedded hub, N donor processes, a report against the baselines",
    )
    sim.add_argument("--config", type=Path, help="YAML recipe (see configs/simulate.yaml)")
    sim.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. eval.max_pairs=8"
    )
    sim.add_argument("--base", type=Path, help="base checkpoint folder")
    sim.add_argument("--clients", type=int, help="number of simulated donors")
    # no `choices=`: listing POLICIES would import torch for every `fedem` command; the config's
    # validation refuses an unknown policy with the list of known ones
    sim.add_argument("--policy", help="federation policy: relay, parallel-merge or fedavg (docs/policies.md)")
    sim.add_argument("--rounds", type=int)
    sim.add_argument("--steps-per-client", type=int, help="optimizer steps per donor per round")
    sim.add_argument("--out", type=Path, help="a fresh folder for the hub, runs and the report")
    _add_common(sim)
    sim.set_defaults(handler=cmd_simulate)
