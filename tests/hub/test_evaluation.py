"""Server-side evaluation of submitted adapters: the queue, the worker, screening, the acceptance gate
and single-blind review, on a real app (TestClient) with a tiny real base model and peft adapters."""

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import PreTrainedTokenizerFast

from fedem.cli import main
from fedem.errors import UserError
from fedem.hub import cli as hub_cli
from fedem.hub.acceptance import decide
from fedem.hub.app import create_app
from fedem.hub.auth import create_user
from fedem.hub.db import Database
from fedem.hub.evaluation import claim_next, evaluate_revision, run_worker
from fedem.hub.models import Evaluation, Repo, Revision
from fedem.hub.screening import ScreeningError, check_config, check_norm
from fedem.hub.settings import HubSettings
from fedem.hub.store import ArtifactStore
from fedem.model.load import load_model
from fedem.model.seshu import SeshuSize, build_model
from fedem.provenance import weights_fingerprint, write_provenance
from tests.hub.conftest import push, read_folder

TINY = SeshuSize(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, chunk_size=16)
BASE = "seshu/base"
ADAPTER = "seshu/adapter-en-hi"  # a translation adapter: its task metric is chrF on en→hi
DATA = Path(__file__).resolve().parents[2] / "data"
ACCEPTING = {"accept_delta": -100.0}  # a gate any sane adapter passes: only the ε rule can reject
FAST = {"eval_max_lines": 6, "eval_max_pairs": 4, "eval_max_new_tokens": 6}


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Seshu base (seed 7, so its fingerprint differs from tests/conftest.py's tiny model)."""
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("base")
    build_model(TINY, tiny_tokenizer).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out server data: a few lines of en/hi/ta and a few en-hi pairs."""
    out = tmp_path_factory.mktemp("eval-data")
    (out / "mono").mkdir()
    (out / "pairs").mkdir()
    for lang in ("en", "hi", "ta"):
        lines = (DATA / "mono" / f"{lang}.valid.txt").read_text(encoding="utf-8").splitlines()[:6]
        (out / "mono" / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = (DATA / "parallel" / "en-hi.test.tsv").read_text(encoding="utf-8").splitlines()[:4]
    (out / "pairs" / "en-hi.tsv").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return out


def make_adapter(base: Path, out: Path, seed: int, scale: float = 1e-3) -> Path:
    """A real peft LoRA adapter on in_proj (r=4), lora_B small random values, with fedem.json."""
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    model.save_pretrained(str(out))
    write_provenance(out, "finetune", {"task": "translate"}, base_sha256=weights_fingerprint(base))
    return out


def edit_tensors(folder: Path, change: Any) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, **fields: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **fields}), encoding="utf-8")


@dataclass
class Setup:
    settings: HubSettings
    client: TestClient
    tokens: dict[str, str]
    pseudonyms: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def lease(self, who: str) -> dict[str, Any]:
        reply = self.client.post(f"/api/adapters/{ADAPTER}/lease", headers=self.auth(who))
        assert reply.status_code == 201, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def submit(self, who: str, folder: Path) -> dict[str, Any]:
        lease = self.lease(who)
        reply = push(self.client, self.auth(who), ADAPTER, read_folder(folder), lease_id=lease["lease_id"])  # type: ignore[arg-type]
        assert reply.status_code == 201, reply.text
        result: dict[str, Any] = reply.json()
        return result

    def evaluations(self, state: str | None = None) -> list[dict[str, Any]]:
        params = {"state": state} if state else {}
        reply = self.client.get("/api/evaluations", params=params, headers=self.auth("admin"))
        assert reply.status_code == 200, reply.text
        result: list[dict[str, Any]] = reply.json()
        return result

    def evaluation(self, commit: str) -> dict[str, Any]:
        return next(e for e in self.evaluations() if e["commit"] == commit)

    def head(self) -> str | None:
        head: str | None = self.client.get(f"/api/repos/{ADAPTER}").json()["head"]
        return head


@pytest.fixture
def make_setup(tmp_path: Path, base_dir: Path, eval_data: Path) -> Iterator[Any]:
    """`make_setup(**settings)`: an app with admin/ann/bo, the base pushed as seshu/base v1 and the
    translation adapter repo created; the TestClient runs the app's lifespan."""
    stack: list[TestClient] = []

    def make(**overrides: Any) -> Setup:
        settings = HubSettings(
            root=tmp_path / f"hub{len(stack)}", eval_data=eval_data, **{**FAST, **overrides}
        )
        app = create_app(settings)
        tokens, pseudonyms = {}, {}
        with app.state.db.session() as session:
            for name, role in (("admin", "maintainer"), ("ann", "donor"), ("bo", "donor")):
                user, tokens[name] = create_user(session, name, role)  # type: ignore[arg-type]
                pseudonyms[name] = user.pseudonym
            session.commit()
        client = TestClient(app).__enter__()
        stack.append(client)
        setup = Setup(settings, client, tokens, pseudonyms)
        for body in (
            {"name": BASE, "kind": "model"},
            {"name": ADAPTER, "kind": "adapter", "base_repo": BASE},
        ):
            client.post("/api/repos", json=body, headers=setup.auth("admin")).raise_for_status()
        base = push(client, setup.auth("admin"), BASE, read_folder(base_dir))  # type: ignore[arg-type]
        assert base.status_code == 201 and base.json()["status"] == "accepted"
        return setup

    yield make
    for client in stack:
        client.__exit__(None, None, None)


# --- the acceptance gate (pure) -----------------------------------------------------------------------


def lm(bpb: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"bpb": bpb, "ppl": {k: 2**v for k, v in bpb.items()}, "chrf": {}, "bleu": {}, **extra}


def test_decide_task_metric_bpb_with_delta_edges() -> None:
    scores = {
        "base": lm({"en": 2.2, "hi": 3.2}),
        "previous": lm({"en": 2.0, "hi": 3.0}),
        "candidate": lm({"en": 1.9, "hi": 3.0}),  # mean bpb 2.5 → 2.45: improvement 0.05
    }
    assert decide(scores, delta=0.05, epsilon=0.02)[0] == "accepted"  # exactly δ passes
    decision, reason = decide(scores, delta=0.0501, epsilon=0.02)
    assert decision == "rejected" and "less than δ = 0.0501" in reason and "previous accepted" in reason
    assert decide(scores, delta=-1.0, epsilon=0.0)[0] == "accepted"  # nothing worse at all: ε=0 is fine
    no_previous = {**scores, "previous": None}  # compared with the base: improvement 0.25
    decision, reason = decide(no_previous, delta=0.2, epsilon=0.02)
    assert decision == "accepted" and "against the base" in reason


def test_decide_epsilon_edges_reject_a_worse_language_whatever_the_gain() -> None:
    reference = lm({"en": 2.0, "hi": 3.0})
    at_edge = {"base": reference, "previous": None, "candidate": lm({"en": 2.04, "hi": 2.0})}
    assert decide(at_edge, delta=0.0, epsilon=0.02)[0] == "accepted"  # +2.00% on en: exactly ε
    over = {**at_edge, "candidate": lm({"en": 2.0401, "hi": 2.0})}  # big mean gain, en +2.005%
    decision, reason = decide(over, delta=0.0, epsilon=0.02)
    assert decision == "rejected" and "bpb of en worsens by 2.005%" in reason and "ε = 2%" in reason


def test_decide_translation_uses_chrf_and_refuses_non_finite_scores() -> None:
    previous = lm({"en": 2.0, "hi": 3.0}, chrf={"en-hi": 29.0}, bleu={"en-hi": 3.0})
    candidate = lm({"en": 2.01, "hi": 3.01}, chrf={"en-hi": 30.0}, bleu={"en-hi": 3.5})  # bpb slightly worse
    scores = {"base": previous, "previous": previous, "candidate": candidate}
    decision, reason = decide(scores, delta=1.0, epsilon=0.02)
    assert decision == "accepted" and "chrF (en-hi) 29.0000 → 30.0000" in reason
    assert decide(scores, delta=1.5, epsilon=0.02)[0] == "rejected"
    broken = {**scores, "candidate": lm({"en": math.nan, "hi": 3.0}, chrf={"en-hi": 90.0})}
    decision, reason = decide(broken, delta=0.0, epsilon=0.02)
    assert decision == "rejected" and "not a finite score" in reason
    with pytest.raises(ValueError, match="different languages"):
        decide({**scores, "candidate": lm({"en": 2.0})}, delta=0.0, epsilon=0.02)


def test_screening_rules_on_their_own(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    config = {"peft_type": "LORA", "r": 512, "lora_alpha": 8, "target_modules": ["in_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ScreeningError, match="rank r must be an integer in 1…256"):
        check_config(tmp_path)
    edit_json(tmp_path / "adapter_config.json", r=8, use_dora=True)
    with pytest.raises(ScreeningError, match="uses use_dora"):
        check_config(tmp_path)
    assert check_norm(5.0, [], 10.0) is None  # no history: skipped
    assert check_norm(5.0, [0.0], 10.0) is None  # untrained (ΔW = 0) history says nothing
    assert check_norm(5.0, [0.4, 0.5, 9.0], 10.0) == 0.5
    with pytest.raises(ScreeningError, match=r"10\.2× the median"):
        check_norm(5.1, [0.4, 0.5, 9.0], 10.0)


# --- the worker on a real app --------------------------------------------------------------------------


def test_a_pushed_version_is_evaluated_blind_then_decided_and_named(
    make_setup: Any, base_dir: Path, tmp_path: Path
) -> None:
    hub: Setup = make_setup(**ACCEPTING)
    first = hub.submit("ann", make_adapter(base_dir, tmp_path / "a1", seed=1))
    queued = hub.evaluations("queued")
    log = hub.client.get(f"/api/repos/{ADAPTER}/log").json()
    as_donor = hub.client.get("/api/evaluations", headers=hub.auth("ann"))

    assert first["status"] == "pending" and first["contributor"] == hub.pseudonyms["ann"]
    assert log[0]["contributor"] == hub.pseudonyms["ann"] and hub.head() is None
    assert [(e["tag"], e["state"], e["contributor"]) for e in queued] == [
        ("v1", "queued", hub.pseudonyms["ann"])
    ]
    assert as_donor.status_code == 403

    done = run_worker(hub.settings, once=True)
    row = hub.evaluation(first["commit"])
    assert [(d["tag"], d["decision"]) for d in done] == [("v1", "accepted")]
    assert row["state"] == "done" and row["decision"] == "accepted" and row["contributor"] == "ann"
    scores = row["scores"]
    assert scores["previous"] is None and scores["task"] == {
        "metric": "chrf",
        "pair": "en-hi",
        "base": f"{BASE}@v1",
        "previous": None,
        "notes": [],
    }
    for role in ("base", "candidate"):
        assert sorted(scores[role]["bpb"]) == sorted(scores[role]["ppl"]) == ["en", "hi", "ta"]
        assert list(scores[role]["chrf"]) == list(scores[role]["bleu"]) == ["en-hi"]
        assert all(0 < x < 20 for x in scores[role]["bpb"].values())
    assert scores["screening"]["passed"] and scores["screening"]["rank"] == 4
    assert "against the base" in row["reason"]
    assert hub.head() == "v1"
    assert hub.client.get(f"/api/repos/{ADAPTER}/log").json()[0]["contributor"] == "ann"

    # A second version, judged against v1 by a strict gate, is rejected: stored, never the head.
    lease = hub.lease("bo")
    assert lease["from_revision"] == "v1"
    files = read_folder(make_adapter(base_dir, tmp_path / "a2", seed=2))
    second = push(hub.client, hub.auth("bo"), ADAPTER, files, lease_id=lease["lease_id"]).json()  # type: ignore[arg-type]
    assert (
        second["tag"] == "v2" and second["parent"] == "v1" and second["contributor"] == hub.pseudonyms["bo"]
    )
    strict = hub.settings.model_copy(update={"accept_delta": 50.0})
    assert [d["decision"] for d in run_worker(strict, once=True)] == ["rejected"]
    row = hub.evaluation(second["commit"])
    assert (
        row["contributor"] == "bo"
        and "less than δ = 50" in row["reason"]
        and "(previous: v1)" in row["reason"]
    )
    assert row["scores"]["previous"]["bpb"] == scores["candidate"]["bpb"]  # v1, scored again, same numbers
    assert hub.head() == "v1" and hub.lease("ann")["from_revision"] == "v1"
    statuses = {r["tag"]: r["status"] for r in hub.client.get(f"/api/repos/{ADAPTER}/log").json()}
    assert statuses == {"v1": "accepted", "v2": "rejected"}
    assert hub.client.get(f"/{ADAPTER}/resolve/v2/adapter_config.json").status_code == 200  # kept

    # A maintainer overrides the gate: audited, and v2 becomes the head.
    refused = hub.client.post(
        f"/api/evaluations/{second['commit']}/decision",
        json={"decision": "accepted", "reason": "manual review"},
        headers=hub.auth("ann"),
    )
    override = hub.client.post(
        f"/api/evaluations/{row['id']}/decision",
        json={"decision": "accepted", "reason": "manual review"},
        headers=hub.auth("admin"),
    )
    audit = hub.client.get("/api/audit", headers=hub.auth("admin")).json()
    assert refused.status_code == 403
    assert override.status_code == 200 and override.json()["decision"] == "accepted"
    assert override.json()["reason"] == "maintainer admin: manual review"
    assert hub.head() == "v2"
    assert [e["detail"]["decision"] for e in audit if e["action"] == "evaluation_override"] == ["accepted"]
    assert [e["detail"]["decision"] for e in audit if e["action"] == "evaluation"] == ["rejected", "accepted"]


def test_poisoned_submissions_are_rejected_before_scoring(
    make_setup: Any, base_dir: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    hub: Setup = make_setup(**ACCEPTING)
    base = base_dir
    hub.submit("ann", make_adapter(base, tmp_path / "good", seed=1))
    assert [d["decision"] for d in run_worker(hub.settings, once=True)] == ["accepted"]

    def poisoned(name: str, change: Any) -> Path:
        folder = make_adapter(base, tmp_path / name, seed=3)
        change(folder)
        return folder

    def nan(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight"][0, 0] = math.nan

    def rank_mismatch(t: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.backbone.layers.1.mixer.in_proj.lora_B.weight"
        t[key] = torch.zeros(t[key].shape[0], 8)

    def wrong_in_dim(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight"] = torch.zeros(4, 32)

    def absurd(t: dict[str, torch.Tensor]) -> None:
        for key in t:
            if "lora_B" in key:
                t[key] *= 1e4

    cases = {
        "nan": (lambda f: edit_tensors(f, nan), "holds 1 non-finite value(s)"),
        "rank": (
            lambda f: edit_tensors(f, rank_mismatch),
            "has shape [296, 8], but the base and r imply [296, 4]",
        ),
        "in-dim": (
            lambda f: edit_tensors(f, wrong_in_dim),
            "has shape [4, 32], but the base and r imply [4, 64]",
        ),
        "norm": (
            lambda f: edit_tensors(f, absurd),
            "× the median ‖ΔW‖ of the adapter's 1 accepted version(s)",
        ),
        "base": (
            lambda f: write_provenance(
                f, "finetune", {}, base_sha256=weights_fingerprint(hub_other_model(tmp_path))
            ),
            "trained on another base",
        ),
        "target": (
            lambda f: edit_json(f / "adapter_config.json", target_modules=["in_proj", "out_proj"]),
            "target_modules ['out_proj'] are not allowed",
        ),
    }
    commits = {
        name: hub.submit("bo", poisoned(name, change))["commit"] for name, (change, _) in cases.items()
    }

    # `fedem hub evaluate --once` (the CLI around run_worker) takes the whole queue.
    monkeypatch.setattr(hub_cli, "configure_json_logging", lambda verbose=False: None)
    root, data = str(hub.settings.root), str(hub.settings.eval_data)
    assert main(["hub", "evaluate", "--root", root, "--eval-data", data, "--once", "--delta", "-100"]) == 0

    for name, (_, expected) in cases.items():
        row = hub.evaluation(commits[name])
        assert row["decision"] == "rejected", (name, row["reason"])
        assert row["reason"].startswith("screening: ") and expected in row["reason"], (name, row["reason"])
        assert "candidate" not in row["scores"] and row["scores"]["screening"]["passed"] is False
    assert hub.head() == "v1" and hub.lease("ann")["from_revision"] == "v1"
    assert [row["state"] for row in hub.evaluations()] == ["done"] * 7


def hub_other_model(tmp_path: Path) -> Path:
    """Another model (other weights): only its fingerprint matters."""
    out = tmp_path / "other-model"
    if not out.exists():
        out.mkdir()
        save_file({"w": torch.ones(3)}, str(out / "model.safetensors"))
    return out


def test_two_workers_never_claim_the_same_job(make_setup: Any) -> None:
    hub: Setup = make_setup()
    database = Database(hub.settings.database_url)
    with database.session() as session:
        repo = session.scalar(select(Repo).where(Repo.name == ADAPTER))
        base = session.scalar(select(Revision).order_by(Revision.id).limit(1))
        assert repo is not None and base is not None
        for number in range(1, 25):
            revision = Revision(
                repo_id=repo.id,
                number=number,
                commit=f"{number:040x}",
                base_id=base.id,
                contributor_id=base.contributor_id,
                status="pending",
            )
            session.add_all([revision, Evaluation(revision=revision)])
        session.commit()

    claimed: dict[str, list[int]] = {"w1": [], "w2": [], "w3": []}
    start = threading.Barrier(len(claimed))

    def work(name: str) -> None:
        db = Database(hub.settings.database_url)
        start.wait()
        with db.session() as session:
            while (job := claim_next(session, name)) is not None:
                claimed[name].append(job.id)
        db.engine.dispose()

    threads = [threading.Thread(target=work, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [job for jobs in claimed.values() for job in jobs]
    assert sorted(every) == sorted(set(every)) and len(every) == 24
    with database.session() as session:
        rows = session.scalars(select(Evaluation)).all()
        assert all(r.state == "running" and r.id in claimed[r.worker or ""] for r in rows)
    database.engine.dispose()


def test_the_serving_process_can_run_the_worker_and_never_serves_the_eval_data(
    make_setup: Any, base_dir: Path, tmp_path: Path
) -> None:
    hub: Setup = make_setup(eval_worker=True, eval_poll_s=0.1, **ACCEPTING)
    pushed = hub.submit("ann", make_adapter(base_dir, tmp_path / "a1", seed=1))
    deadline = time.monotonic() + 45
    while hub.evaluation(pushed["commit"])["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hub.evaluation(pushed["commit"])["decision"] == "accepted" and hub.head() == "v1"

    held_out = (hub.settings.eval_data or Path()) / "pairs" / "en-hi.tsv"
    secret = held_out.read_text(encoding="utf-8").splitlines()[0].split("\t")[1]
    listing = json.dumps(hub.evaluations())
    assert secret not in listing  # scores only: no references or hypotheses are kept
    for url in (
        f"/{BASE}/resolve/main/../../{held_out}",
        f"/{BASE}/resolve/main/pairs/en-hi.tsv",
        f"/api/models/{BASE}/tree/main/pairs",
        "/pairs/en-hi.tsv",
    ):
        reply = hub.client.get(url)
        assert reply.status_code in (404, 405, 422) and secret not in reply.text, url


@contextlib.contextmanager
def database(hub: Setup) -> Iterator[Session]:
    db = Database(hub.settings.database_url)
    try:
        with db.session() as session:
            yield session
    finally:
        db.engine.dispose()


def broken_settings(hub: Setup, tmp_path: Path) -> HubSettings:
    return hub.settings.model_copy(update={"eval_data": tmp_path / "empty"})


def test_an_evaluation_error_fails_the_job_and_leaves_the_version_pending(
    make_setup: Any, base_dir: Path, tmp_path: Path
) -> None:
    hub: Setup = make_setup()
    pushed = hub.submit("ann", make_adapter(base_dir, tmp_path / "a1", seed=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no mono/ folder"):  # a worker refuses unusable data
        run_worker(hub.settings.model_copy(update={"eval_data": tmp_path / "empty"}), once=True)
    with database(hub) as session:  # the data goes missing while the worker runs
        evaluation = claim_next(session, "w1")
        assert evaluation is not None
        evaluate_revision(
            session, ArtifactStore(hub.settings.artifact_url), broken_settings(hub, tmp_path), evaluation
        )
    row = hub.evaluation(pushed["commit"])
    log = hub.client.get(f"/api/repos/{ADAPTER}/log").json()
    assert row["state"] == "failed" and row["decision"] is None and "has no mono/ folder" in row["reason"]
    assert row["contributor"] == hub.pseudonyms["ann"] and log[0]["status"] == "pending"
    assert run_worker(hub.settings, once=True) == []  # a failed job is not retried by itself
    decided = hub.client.post(
        f"/api/evaluations/{pushed['commit']}/decision",
        json={"decision": "rejected", "reason": "could not be evaluated"},
        headers=hub.auth("admin"),
    )
    assert decided.status_code == 200 and decided.json()["state"] == "done"
    assert decided.json()["contributor"] == "ann" and hub.head() is None
    assert (
        hub.client.get("/api/evaluations", params={"state": "bogus"}, headers=hub.auth("admin")).status_code
        == 422
    )
    missing = hub.client.post(
        f"/api/evaluations/{'0' * 40}/decision",
        json={"decision": "accepted", "reason": "x"},
        headers=hub.auth("admin"),
    )
    assert missing.status_code == 404 and missing.json()["error"] == "evaluation_not_found"
