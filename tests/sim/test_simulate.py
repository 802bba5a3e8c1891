"""`fedem simulate`: shards, the report, and whole simulations with a real hub and real donor processes."""

import json
from pathlib import Path
from typing import Any

import pytest

from fedem.config import validate
from fedem.errors import UserError
from fedem.sim.adapters import load_weights, save_weights
from fedem.sim.config import SimulateConfig
from fedem.sim.report import gap_line, gaps, markdown, write_report
from fedem.sim.runner import simulate
from fedem.sim.shards import plan_shards, write_shards

REPO = Path(__file__).resolve().parents[2]


def tiny_config(base: Path, out: Path, **extra: Any) -> SimulateConfig:
    data: dict[str, Any] = {
        "base": str(base),
        "clients": 2,
        "rounds": 1,
        "steps_per_client": 2,
        "languages": ["hi", "ta"],
        "pairs_dir": str(REPO / "data" / "parallel"),
        "examples_per_client": 20,
        "eval_size": 4,
        "max_length": 96,
        "train": {"batch_size": 4, "warmup_steps": 0, "log_every": 1, "eval_every": 100, "save_every": 100},
        "lora": {"r": 4, "alpha": 8},
        "eval": {
            "mono": str(REPO / "data" / "mono"),
            "pairs": str(REPO / "data" / "parallel"),
            "max_lines": 4,
            "max_pairs": 2,
            "max_new_tokens": 8,
        },
        "out": str(out),
        **extra,
    }
    return validate(SimulateConfig, data)


# --- config and shards ---------------------------------------------------------------------------


def test_config_checks_the_policy_and_its_options(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "out", policy="parallel-merge", policy_options={"method": "ties"})
    assert cfg.eval_languages == ["en", "hi", "ta"]
    assert cfg.client_names == ["c0", "c1"]
    with pytest.raises(UserError, match="unknown policy"):
        tiny_config(tmp_path, tmp_path / "out", policy="gossip")
    with pytest.raises(UserError, match="method"):
        tiny_config(tmp_path, tmp_path / "out", policy="fedavg", policy_options={"method": "ties"})
    with pytest.raises(UserError, match="train"):
        tiny_config(tmp_path, tmp_path / "out", train={"max_steps": 3})
    with pytest.raises(UserError, match="languages"):
        tiny_config(tmp_path, tmp_path / "out", languages=["en"])


def test_the_shipped_simulate_config_validates() -> None:
    from fedem.config import load_yaml

    cfg = validate(SimulateConfig, load_yaml(REPO / "configs" / "simulate.yaml"))
    assert cfg.clients == 4 and set(cfg.baselines) == {"base", "alone", "centralised"}
    demo = validate(SimulateConfig, load_yaml(REPO / "configs" / "demo-federation.yaml"))
    assert (demo.gate, demo.release, demo.prompt) == ("hub", "ties", "English: How are you?\nHindi:")


def test_shards_are_disjoint_contiguous_blocks_per_language() -> None:
    plan = plan_shards(["c0", "c1", "c2", "c3"], ["hi", "ta"], {"hi": 100, "ta": 60}, per_client=20)
    assert plan == [("c0", "hi", 0, 20), ("c1", "ta", 0, 20), ("c2", "hi", 50, 20), ("c3", "ta", 30, 20)]
    small = plan_shards(["c0", "c1"], ["hi"], {"hi": 10}, per_client=20)
    assert small == [("c0", "hi", 0, 5), ("c1", "hi", 5, 5)]
    with pytest.raises(UserError, match="cannot be split"):
        plan_shards(["c0", "c1", "c2"], ["hi"], {"hi": 2}, per_client=1)


def test_write_shards_is_deterministic_and_never_uses_test_pairs(tmp_path: Path) -> None:
    pairs = REPO / "data" / "parallel"
    first = write_shards(["c0", "c1", "c2"], ["hi", "ta", "hi"], pairs, 5, tmp_path / "a")
    again = write_shards(["c0", "c1", "c2"], ["hi", "ta", "hi"], pairs, 5, tmp_path / "b")
    texts = [s.path.read_text(encoding="utf-8") for s in first]
    assert texts == [s.path.read_text(encoding="utf-8") for s in again]
    assert [s.path.name for s in first] == ["en-hi.tsv", "en-ta.tsv", "en-hi.tsv"]
    assert all(len(t.splitlines()) == 5 for t in texts)
    assert not set(texts[0].splitlines()) & set(texts[2].splitlines())  # two hi donors, disjoint
    test = set((pairs / "en-hi.test.tsv").read_text(encoding="utf-8").splitlines())
    assert not test & set(texts[0].splitlines())


# --- the report ----------------------------------------------------------------------------------


def fake_report() -> dict[str, Any]:
    cfg = {"clients": 2, "rounds": 2, "steps_per_client": 5, "eval": {"max_lines": 4, "max_pairs": 2}}
    metrics = {"bpb/hi": 2.0, "bpb/en": 3.0, "chrf/en-hi": 10.0, "mean_bpb": 2.5, "mean_chrf": 10.0}
    return {
        "config": cfg,
        "policy": {"name": "relay", "repr": "Relay(steps_per_client=5)"},
        "baselines": {
            "base": {"metrics": {**metrics, "bpb/hi": 2.5, "chrf/en-hi": 1.0}},
            "alone": {
                "c0": {"lang": "hi", "metrics": {**metrics, "bpb/hi": 2.1, "bpb/en": 3.2}},
                "c1": {"lang": "ta", "metrics": {**metrics, "bpb/hi": 2.4, "bpb/en": 3.0}},
            },
            "centralised": {"metrics": {**metrics, "bpb/hi": 1.96, "chrf/en-hi": 12.0}},
        },
        "rounds": [
            {
                "round": r,
                "head": f"sim/community@v{r + 3}",
                "decision": "accepted",
                "contributors": ["c0", "c1"],
                "weights": {"c1": 1.0},
                "note": "relay round",
                "seconds": 1.0,
                "metrics": {**metrics, "bpb/hi": 2.2 - 0.2 * r},
            }
            for r in range(2)
        ],
        "shards": [],
        "decisions": [],
    }


def test_gap_lines_say_who_loses_and_by_how_much() -> None:
    line = gap_line("relay", "bpb/hi", 2.0, 1.96)
    assert line == "relay is 0.0400 bpb worse than centralised on hi (+2.04%)"
    assert gap_line("fedavg", "chrf/en-hi", 13.0, 12.0) == (
        "fedavg is 1.00 chrF better than centralised on en-hi (-8.33%)"
    )
    assert gap_line("relay", "bpb/en", 3.0, 3.0).startswith("relay matches centralised on en")
    found = {g["metric"]: g for g in gaps(fake_report())}
    assert found["bpb/hi"]["worse_by"] == pytest.approx(0.04)  # the last round against centralised
    assert found["chrf/en-hi"]["worse_by"] == pytest.approx(2.0)


def test_markdown_tables_rounds_against_every_baseline(tmp_path: Path) -> None:
    report = fake_report()
    text = markdown(report)
    assert "| metric | base | alone | centralised | relay r0 | relay r1 |" in text
    # alone on hi is the hi donor's number; on en (no donor's language) the mean of both donors
    assert "| bpb/hi | 2.5000 | 2.1000 | 1.9600 | 2.2000 | 2.0000 |" in text
    assert "| bpb/en | 3.0000 | 3.1000 |" in text
    assert "relay loses to centralised training on 2 of 5 metrics" in text
    summary = write_report(tmp_path, report)
    assert {Path(p).name for p in summary["plots"]} == {"bpb.png", "chrf.png"}
    assert json.loads((tmp_path / "report.json").read_text())["gaps"][0]["metric"] == "bpb/en"
    assert (tmp_path / "bpb.png").read_bytes().startswith(b"\x89PNG")


def test_adapter_weights_round_trip_through_a_peft_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from fedem.sim.baselines import initial_adapter
    from fedem.sim.shards import Shard

    cfg = tiny_config(tiny_model_dir, tmp_path / "out")
    shard = write_shards(["c0"], ["hi"], cfg.pairs_dir, 10, tmp_path / "shards")[0]
    assert isinstance(shard, Shard)
    init = initial_adapter(cfg, shard, tmp_path / "init", "sha")
    weights = load_weights(init)
    assert weights.scale == pytest.approx(2.0) and set(weights.ranks.values()) == {4}
    assert all(float(b.abs().sum()) == 0 for _, b in weights.factors.values())  # fresh: ΔW = 0
    saved = save_weights(weights, init, tmp_path / "copy", {"task": "translate"}, "sha")
    again = load_weights(saved)
    for name, (a, b) in weights.factors.items():
        assert torch.equal(a, again.factors[name][0]) and torch.equal(b, again.factors[name][1])


# --- whole simulations ---------------------------------------------------------------------------


def test_relay_end_to_end_with_a_real_hub_and_donor_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    summary = simulate(tiny_config(tiny_model_dir, out, policy="relay"))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    (entry,) = report["rounds"]
    assert entry["contributors"] == ["c0", "c1"]  # round 0: the list as given
    assert [t["start"] for t in entry["turns"]] == ["sim/community@v1", "sim/community@v2"]
    assert entry["head"] == "sim/community@v3" and summary["head"] == "sim/community@v3"
    assert all(t["steps"] == 2 and t["train_examples"] == 16 for t in entry["turns"])
    decisions = [(d["version"], d["decision"]) for d in report["decisions"]]
    assert decisions == [("v1", "accepted"), ("v2", "accepted"), ("v3", "accepted")]
    assert set(report["baselines"]) == {"base", "alone", "centralised"}
    assert report["baselines"]["centralised"]["steps"] == 4
    assert report["baselines"]["centralised"]["train_examples"] == 32
    assert [a["steps"] for a in report["baselines"]["alone"].values()] == [2, 2]
    for metrics in (entry["metrics"], report["baselines"]["centralised"]["metrics"]):
        assert set(metrics) >= {"bpb/en", "bpb/hi", "bpb/ta", "chrf/en-hi", "chrf/en-ta", "mean_bpb"}
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "than centralised on hi" in text and "| relay r0 |" in text
    assert (out / "bpb.png").is_file() and (out / "chrf.png").is_file()
    assert (out / "logs" / "round-00-c1.log").is_file()


def test_fedavg_aggregates_parallel_donors_and_pushes_the_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    simulate(tiny_config(tiny_model_dir, out, policy="fedavg", baselines=["base"]))
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    (entry,) = report["rounds"]
    assert [t["repo"] for t in entry["turns"]] == ["sim/c0", "sim/c1"]
    assert {t["start"] for t in entry["turns"]} == {"sim/community@v1"}
    assert entry["weights"] == {"c0": 0.5, "c1": 0.5}  # 16 training pairs each
    assert entry["head"] == "sim/community@v2" and entry["decision"] == "accepted"
    head = load_weights(out / "rounds" / "round-00" / "aggregate")
    assert any(float(b.abs().sum()) > 0 for _, b in head.factors.values())  # the donors' updates landed
    assert json.loads((out / "rounds" / "round-00" / "aggregate" / "fedem.json").read_text())["base_sha256"]
    assert gaps(report) == []  # no centralised baseline asked for: no gap claimed


def test_hub_gate_then_release_and_generation(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    cfg = tiny_config(
        tiny_model_dir,
        out,
        policy="relay",
        baselines=["base"],
        gate="hub",
        eval_data=str(REPO / "data"),
        accept_delta=-1000.0,
        accept_epsilon=1000.0,
        release="linear",
        prompt="English: How are you?\nHindi:",
    )
    summary = simulate(cfg)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    donors = [d for d in report["decisions"] if d["round"] is not None]
    assert [(d["client"], d["version"], d["decision"]) for d in donors] == [
        ("c0", "v2", "accepted"),
        ("c1", "v3", "accepted"),
    ]
    assert all(d["by"] == "hub worker" and "δ" in d["reason"] for d in donors)  # the worker's gate
    assert report["hub"]["eval_worker"] and report["rounds"][0]["head"] == "sim/community@v3"
    release = report["release"]
    assert release["release"] == "sim/base@v2" == summary["release"]
    # every accepted version in the relay's lineage on this release is credited, the seed adapter too
    assert release["merged"] == ["sim/community@v3"] and release["credits"] == ["c0", "c1", "sim-maintainer"]
    card = Path(release["card"]).read_text(encoding="utf-8")
    assert "`sim/community@v3` by c1" in card and "Contributors credited: c0, c1, sim-maintainer." in card
    assert set(release["metrics"]) >= {"bpb/en", "bpb/hi", "chrf/en-hi"} and release["v1_metrics"]
    generation = report["generation"]
    assert generation["model"] == "sim/base@v2" and generation["text"] == summary["generation"]
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## Release" in text and "| release v2 |" in text and "## Generation" in text
    assert "Gate: the hub's evaluation worker" in text


def test_the_simulate_command_parses_flags_over_the_yaml(tmp_path: Path) -> None:
    import argparse

    from fedem.sim.cli import add_simulate_parser, simulate_config

    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["simulate", "--config", str(REPO / "configs" / "simulate.yaml"), "eval.max_pairs=4"]
        + ["--clients", "3", "--policy", "fedavg", "--rounds", "5", "--out", str(tmp_path / "o"), "--json"]
    )
    cfg = simulate_config(args)
    assert (cfg.clients, cfg.policy, cfg.rounds, cfg.eval.max_pairs) == (3, "fedavg", 5, 4)
    assert cfg.out == tmp_path / "o" and args.json


def test_simulate_refuses_a_used_out_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "something").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        simulate(tiny_config(tiny_model_dir, tmp_path / "sim"))
