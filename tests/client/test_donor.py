"""The donor (`fedem client run`) against a real hub: uvicorn on a loopback port, a tiny base release.

Each run trains the tiny Seshu for a few steps on 60 en-hi pairs, so a turn takes seconds.
"""

import argparse
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from fedem.client import HubAPIError
from fedem.client.cli import add_client_parser
from fedem.client.donor import DonorRun, adapter_shape, fits, pending_runs, push_pending, run_donor
from fedem.errors import UserError
from fedem.provenance import weights_fingerprint
from fedem.train.callbacks import Deadline
from tests.client.conftest import ADAPTER, BASE, DonorHub, publish_base

TRAIN = {"batch_size": 4, "warmup_steps": 0, "log_every": 1, "eval_every": 100, "save_every": 100}


def donor(hub: DonorHub, who: str, data: Path, workdir: Path, **extra: Any) -> DonorRun:
    settings: dict[str, Any] = {
        "hub": hub.url,
        "token": hub.tokens[who],
        "adapter": ADAPTER,
        "data": data,
        "workdir": workdir,
        "max_steps": 4,
        "eval_size": 8,
        "max_length": 96,
        "margin_s": 1,
        "train": TRAIN,
        "backoff_s": 0.2,
        **extra,
    }
    return DonorRun(**settings)


class OnStep(TrainerCallback):
    """Calls `action(step)` at every step end (to slow, interrupt or disturb a run)."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.action(state.global_step)


class OnTrainEnd(TrainerCallback):
    def __init__(self, action: Any) -> None:
        self.action = action

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.action()


def live_leases(hub: DonorHub) -> list[dict[str, Any]]:
    with hub.client("admin") as admin:
        return admin._json("GET", "/api/leases")


def adapter_weights(folder: Path) -> dict[str, Any]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_relay_of_donors_across_a_new_base_release(
    relay_hub: DonorHub, my_pairs: Path, tmp_path: Path, tiny_releases: tuple[Path, Path]
) -> None:
    hub = relay_hub

    first = run_donor(donor(hub, "ann", my_pairs, tmp_path / "ann"))

    with hub.client() as reader:
        v1 = reader.revision(ADAPTER, "v1")
        reader.pull(ADAPTER, "v1", tmp_path / "pulled-v1")
    assert first["version"] == "v1" and first["parent"] is None and first["base"] == f"{BASE}@v1"
    assert first["steps"] == 4 and first["stopped_early"] is False
    assert v1["base"] == f"{BASE}@v1" and v1["metrics"]["eval_loss"] > 0 and v1["metrics"]["eval_bpb"] > 0
    assert v1["metrics"]["train_examples"] == 52 and v1["description"].startswith(
        "52 translation examples from my_pairs.tsv"
    )
    assert sorted(f["path"] for f in v1["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "fedem.json",
        "metrics.jsonl",
    ]
    published = (tmp_path / "pulled-v1" / "fedem.json").read_text(encoding="utf-8")
    assert str(tmp_path) not in published and str(Path.home()) not in published  # no local paths
    assert json.loads(published)["config"]["base"] == f"{BASE}@v1"
    assert json.loads(published)["base_sha256"] == weights_fingerprint(tiny_releases[0])
    assert not pending_runs(tmp_path / "ann") and not live_leases(hub)
    hub.accept(ADAPTER)

    # ann holds the adapter: bo without --wait is told who holds it, until when
    with hub.client("ann") as ann:
        held = ann.lease(ADAPTER)
    with pytest.raises(UserError, match=f"leased by {hub.pseudonyms['ann']} until") as taken:
        run_donor(donor(hub, "bo", my_pairs, tmp_path / "bo"))
    assert "--wait" in str(taken.value)

    # with --wait bo gets it as soon as ann gives it back, and continues ann's version
    releaser = threading.Timer(1.0, lambda: hub.client("ann").release(held["lease_id"]))
    releaser.start()
    second = run_donor(donor(hub, "bo", my_pairs, tmp_path / "bo", wait=True, wait_max_s=30))
    releaser.join()

    assert second["version"] == "v2" and second["parent"] == "v1" and second["rebased"] is False
    bo_run = Path(second["out"])
    provenance = json.loads((bo_run / "upload" / "fedem.json").read_text(encoding="utf-8"))
    assert provenance["parent"] == f"{ADAPTER}@v1" and "init_base_sha256" not in provenance
    before, after = adapter_weights(tmp_path / "pulled-v1"), adapter_weights(bo_run)
    assert before.keys() == after.keys()
    assert all(not before[k].equal(after[k]) for k in before if "lora_B" in k)  # trained, not frozen
    hub.accept(ADAPTER)

    # a new base release: the relay continues from the head, rebased and recorded
    publish_base(hub, tiny_releases[1])
    third = run_donor(donor(hub, "cy", my_pairs, tmp_path / "cy"))

    assert third["version"] == "v3" and third["base"] == f"{BASE}@v2" and third["rebased"] is True
    rebased = json.loads((Path(third["out"]) / "upload" / "fedem.json").read_text(encoding="utf-8"))
    assert rebased["base_sha256"] == weights_fingerprint(tiny_releases[1])
    assert rebased["init_base_sha256"] == weights_fingerprint(tiny_releases[0])
    assert rebased["parent"] == f"{ADAPTER}@v2"


def test_the_deadline_stops_training_in_time_to_push(
    make_hub: Any, tiny_releases: tuple[Path, Path], my_pairs: Path, tmp_path: Path
) -> None:
    hub = make_hub(lease_ttl_s=15)
    publish_base(hub, tiny_releases[0])
    slow = OnStep(lambda _step: time.sleep(0.25))

    summary = run_donor(donor(hub, "ann", my_pairs, tmp_path, max_steps=10_000, margin_s=4), (slow,))

    assert summary["stopped_early"] is True and 0 < summary["steps"] < 10_000
    pushed_at = datetime.fromisoformat(hub.client().revision(ADAPTER, "v1")["created_at"])
    expires = datetime.fromisoformat(summary["expires_at"])
    assert pushed_at.replace(tzinfo=UTC) < expires.replace(tzinfo=UTC)
    assert (Path(summary["out"]) / "fedem.json").is_file()


def test_ctrl_c_releases_the_lease_and_pushes_nothing(
    relay_hub: DonorHub, my_pairs: Path, tmp_path: Path
) -> None:
    def interrupt(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_donor(donor(relay_hub, "ann", my_pairs, tmp_path), (OnStep(interrupt),))

    assert not live_leases(relay_hub) and not pending_runs(tmp_path)
    assert relay_hub.client().repo(ADAPTER)["revisions"] == 0


def test_a_hub_restart_at_push_time_is_retried(relay_hub: DonorHub, my_pairs: Path, tmp_path: Path) -> None:
    def outage() -> None:  # the hub goes away as training ends and is back 2 s later
        relay_hub.stop()
        threading.Timer(2.0, relay_hub.start).start()

    # no --adapter: the hub assigns the open one that fits the data
    cfg = donor(relay_hub, "ann", my_pairs, tmp_path, adapter=None, lang="hi", hub_retry_s=60)
    summary = run_donor(cfg, (OnTrainEnd(outage),))

    assert summary["adapter"] == ADAPTER and summary["version"] == "v1"
    assert not pending_runs(tmp_path)


def test_a_version_the_hub_could_not_take_waits_for_push_resume(
    relay_hub: DonorHub, my_pairs: Path, tmp_path: Path
) -> None:
    cfg = donor(relay_hub, "ann", my_pairs, tmp_path, hub_retry_s=1)

    with pytest.raises(UserError, match="push --resume") as gone:
        run_donor(cfg, (OnTrainEnd(relay_hub.stop),))

    (waiting,) = pending_runs(tmp_path)
    assert str(waiting) in str(gone.value)
    relay_hub.start()
    (lease,) = live_leases(relay_hub)  # not released: it is what the resumed push uses
    with relay_hub.client("admin") as admin:
        admin.release(lease["lease_id"])  # …but suppose it ended meanwhile: resume takes a new one

    resumed = push_pending(tmp_path, relay_hub.tokens["ann"])

    assert [p["version"] for p in resumed["pushed"]] == ["v1"] and resumed["kept"] == []
    assert resumed["pushed"][0]["lease_id"] != lease["lease_id"]
    assert not pending_runs(tmp_path) and not live_leases(relay_hub)
    assert push_pending(tmp_path, relay_hub.tokens["ann"]) == {
        "workdir": str(tmp_path),
        "pushed": [],
        "kept": [],
    }


def _tiny_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4,), float(seed))}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")
    return folder


def test_lease_any_picks_the_open_adapter_that_most_needs_work(
    make_hub: Any, tiny_releases: tuple[Path, Path], tmp_path: Path
) -> None:
    hub = make_hub()
    names = [f"seshu/{n}-en-hi" for n in ("a", "b", "c", "d", "g")]
    publish_base(hub, tiny_releases[0], adapters=tuple(names))
    with hub.client("admin") as admin:
        admin.create_repo("seshu/unreleased", "model")
        admin.create_repo("seshu/f-en-hi", "adapter", base_repo="seshu/unreleased")  # nothing to train on
    with hub.client("cy") as cy:
        for i, name in enumerate(["seshu/b-en-hi", "seshu/g-en-hi", "seshu/a-en-hi", "seshu/a-en-hi"]):
            lease = cy.lease(name)
            cy.push(name, _tiny_adapter(tmp_path / str(i), i), lease_id=lease["lease_id"])
            hub.accept(name)
            time.sleep(0.01)
        cy.lease("seshu/d-en-hi")  # held: not open

    picks = []
    with hub.client("ann") as ann, hub.client("bo") as bo:
        picks.append(ann.lease_any()["repo"])  # c: no version yet (d has none either, but is leased)
        picks.append(bo.lease_any()["repo"])  # b: one version, older than g's
        picks.append(ann.lease_any(among=["seshu/a-en-hi"])["repo"])
        picks.append(bo.lease_any()["repo"])  # g
        with pytest.raises(HubAPIError) as none_open:
            bo.lease_any()

    assert picks == ["seshu/c-en-hi", "seshu/b-en-hi", "seshu/a-en-hi", "seshu/g-en-hi"]
    assert (none_open.value.status, none_open.value.code) == (404, "no_open_adapter")


def test_adapter_names_announce_task_and_language() -> None:
    assert adapter_shape("seshu/adapter-en-hi") == ("translate", "hi")
    assert adapter_shape("seshu/adapter-ta") == ("lm", "ta")
    assert adapter_shape("seshu/adapter-en") == ("lm", "en")
    assert adapter_shape("seshu/special") == (None, None)
    assert fits("seshu/adapter-en-hi", "translate", "hi") and not fits(
        "seshu/adapter-en-ta", "translate", "hi"
    )
    assert not fits("seshu/adapter-hi", "translate", "hi") and fits("seshu/adapter-hi", "lm", None)


def test_the_data_must_fit_the_adapter_before_anything_is_leased(my_pairs: Path, tmp_path: Path) -> None:
    cfg = DonorRun(
        hub="http://127.0.0.1:9", token="t", adapter="seshu/adapter-en-ta", data=my_pairs, lang="hi"
    )
    with pytest.raises(UserError, match="for Tamil, but my_pairs.tsv is Hindi"):
        run_donor(cfg)
    with pytest.raises(UserError, match="which language"):
        run_donor(DonorRun(hub="http://127.0.0.1:9", token="t", adapter="seshu/x", data=my_pairs))


def test_deadline_stops_before_the_next_step_would_overrun() -> None:
    now = [datetime(2025, 1, 1, tzinfo=UTC)]
    stopper = Deadline(now[0] + timedelta(seconds=10), margin_s=5, clock=lambda: now[0])
    state, control, args = TrainerState(max_steps=100), TrainerControl(), TrainingArguments("unused")
    stopper.on_train_begin(args, state, control)
    stopper.steps.append(2.0)  # a step takes about 2 s

    state.global_step = 1
    stopper.on_step_end(args, state, control)
    assert not control.should_training_stop  # 5 s left before the margin: another step fits

    now[0] += timedelta(seconds=3.5)
    state.global_step = 2
    stopper.on_step_end(args, state, control)
    assert control.should_training_stop and control.should_save
    assert stopper.stopped_early and stopper.stopped_at_step == 2

    finished = Deadline(now[0], margin_s=5, clock=lambda: now[0])
    state.global_step, control = 100, TrainerControl()
    finished.on_step_end(args, state, control)
    assert not finished.stopped_early  # the last step is not an early stop


def _client_cli(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_client_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["client", *argv])
    return args.handler(args)


def test_cli_needs_a_hub_and_a_token(monkeypatch: pytest.MonkeyPatch, my_pairs: Path, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDEM_HUB", raising=False)
    monkeypatch.delenv("FEDEM_TOKEN", raising=False)
    with pytest.raises(UserError, match="which hub"):
        _client_cli("run", "--data", str(my_pairs))
    with pytest.raises(UserError, match="token"):
        _client_cli("run", "--data", str(my_pairs), "--hub", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="--resume"):
        _client_cli("push", "--token", "t")
    monkeypatch.setenv("FEDEM_TOKEN", "t")
    assert (
        _client_cli("push", "--resume", "--workdir", str(tmp_path))["message"]
        == "nothing waiting to be pushed"
    )
