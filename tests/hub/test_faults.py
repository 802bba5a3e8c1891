"""The hub under faults: SIGKILLed at random moments while donors lease, pull and push; a client
SIGKILLed mid-push; many donors racing for one lease. Afterwards the invariants of
`fedem.hub.integrity` are checked in the database and the store. Runs on the `make_hub` hub: SQLite
and one process, or PostgreSQL and 4 worker processes under `make test-postgres`."""

import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save_file
from sqlalchemy import func, select

from fedem.client import HubAPIError, HubClient
from fedem.hub.auth import create_user
from fedem.hub.integrity import (
    Acknowledged,
    Hold,
    check_acknowledged,
    check_history,
    check_store,
    overlapping_holds,
)
from fedem.hub.models import Blob, Revision
from fedem.hub.store import ArtifactStore
from tests.hub.conftest import ADAPTER, BASE, Hub, create_repos, sha256

REPO = Path(__file__).resolve().parents[2]


def write_adapter(folder: Path, seed: int, rank: int = 4, width: int = 64) -> Path:
    """A small LoRA adapter folder, as peft saves one (its own random weights, so its own blobs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.backbone.layers.0.mixer.in_proj"
    tensors = {
        f"{prefix}.lora_A.weight": rng.standard_normal((rank, width), dtype=np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((2 * width, rank), dtype=np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["in_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def add_donors(hub: Hub, count: int) -> list[str]:
    """`count` donor users created in the running hub's database; their tokens."""
    database = hub.db()
    with database.session() as session:
        tokens = [create_user(session, f"donor{i}", "donor")[1] for i in range(count)]
        session.commit()
    database.engine.dispose()
    return tokens


def invariants(hub: Hub, acknowledged: list[Acknowledged], holds: list[Hold]) -> list[str]:
    database = hub.db()
    store = ArtifactStore(str(hub.blobs))
    with database.session() as session:
        problems = check_store(session, store) + check_history(session)
        problems += check_acknowledged(session, store, acknowledged)
    database.engine.dispose()
    return problems + overlapping_holds(holds)


class Donors:
    """Donor threads looping lease → pull the base → push a new adapter version, until told to stop.
    Every outcome of a push is allowed except a wrong one: an acknowledged push is recorded (and must
    be on the hub later), a push cut off by a crash has an unknown outcome (it may be there or not)."""

    def __init__(self, hub: Hub, tokens: list[str], adapters: list[str], work: Path) -> None:
        self.hub, self.adapters, self.work = hub, adapters, work
        self.acknowledged: list[Acknowledged] = []
        self.holds: list[Hold] = []
        self.cut_off = 0  # requests that died with the hub (connection dropped mid-request)
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, t)) for i, t in enumerate(tokens)]

    def __enter__(self) -> "Donors":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)

    def _run(self, index: int, token: str) -> None:
        rng = random.Random(index)
        with HubClient(self.hub.url, token, timeout=60, retries=2, backoff_s=0.1) as client:
            for round_ in range(10_000):
                if self.stop.is_set():
                    return
                seed = index * 10_000 + round_
                try:
                    self._round(client, rng.choice(self.adapters), self.work / str(seed), seed)
                except httpx.TransportError:
                    self.cut_off += 1
                except HubAPIError as err:
                    # taken; expired while the hub was down; or over the per-token rate limit: wait
                    if err.status not in (409, 410, 429):
                        self.failures.append(err)
                        return
                    time.sleep(rng.uniform(0.05, 0.2))
                except BaseException as err:
                    self.failures.append(err)
                    return

    def _round(self, client: HubClient, adapter: str, folder: Path, seed: int) -> None:
        lease = client.lease(adapter)
        start = time.time()
        expires = datetime.fromisoformat(lease["expires_at"]).timestamp()
        client.pull(BASE, "v1", folder / "base")
        write_adapter(folder / "adapter", seed)
        ended = time.time()
        self.holds.append(Hold(adapter, start, min(ended, expires)))
        try:
            done = client.push(adapter, folder / "adapter", lease_id=lease["lease_id"])
        except httpx.TransportError:
            self.cut_off += 1
            try:  # the outcome is unknown: give the lease back if the push did not land
                client.release(lease["lease_id"])
            except (httpx.TransportError, HubAPIError):
                pass
            return
        files = {f["path"]: f["sha256"] for f in done.revision["files"]}
        self.acknowledged.append(Acknowledged(adapter, done.revision["commit"], files))


def test_hub_sigkilled_under_load_keeps_every_acknowledged_push(make_hub: Any, tmp_path: Path) -> None:
    # short leases: one granted just before a crash (its 201 lost) frees itself within seconds
    hub: Hub = make_hub(lease_ttl_s=5, sweep_every_s=1)
    adapters = [f"seshu/adapter-{i}" for i in range(4)]
    with hub.client() as client:
        client.post("/api/repos", json={"name": BASE, "kind": "model"}, headers=hub.auth("admin"))
        for name in adapters:
            body = {"name": name, "kind": "adapter", "base_repo": BASE}
            client.post("/api/repos", json=body, headers=hub.auth("admin")).raise_for_status()
    with HubClient(hub.url, hub.tokens["admin"]) as admin:
        admin.push(BASE, write_adapter(tmp_path / "base-v1", seed=0))
    tokens = add_donors(hub, 12)
    killer = random.Random(7)

    with Donors(hub, tokens, adapters, tmp_path / "donors") as donors:
        for _ in range(3):
            time.sleep(killer.uniform(1.0, 2.5))
            hub.kill()
            hub.start()  # same root and port; requests sent meanwhile wait in the socket's backlog
        time.sleep(1.5)
    hub.stop()

    assert donors.failures == []
    assert donors.acknowledged and donors.cut_off > 0  # pushes landed, and the kills cut requests off
    assert invariants(hub, donors.acknowledged, donors.holds) == []
    assert hub.temp_files() == []


def test_a_client_killed_mid_push_leaves_nothing_half_visible(hub: Hub, tmp_path: Path) -> None:
    with hub.client() as client:
        lease = client.post(f"/api/adapters/{ADAPTER}/lease", headers=hub.auth("ann")).json()
    folder = write_adapter(tmp_path / "adapter", seed=1)
    weights = folder / "adapter_model.safetensors"
    big = 128 << 20  # zeros after a valid header: a file that takes a moment to upload
    header = json.dumps({"w": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]}}).encode()
    with weights.open("wb") as out:
        out.write(len(header).to_bytes(8, "little") + header)
        out.truncate(8 + len(header) + big)
    push = [sys.executable, "-m", "fedem.cli", "hub", "push", ADAPTER, str(folder), "--lease"]
    push += [lease["lease_id"], "--hub", hub.url, "--token", hub.tokens["ann"]]
    client_proc = subprocess.Popen(push, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(size > 1 << 20 for size in hub.temp_sizes()):  # the weights are streaming in
        assert client_proc.poll() is None, f"the push ended ({client_proc.returncode}) before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    client_proc.kill()
    client_proc.wait()

    deadline = time.monotonic() + 15
    while hub.temp_files() and time.monotonic() < deadline:  # the hub sees the connection drop
        time.sleep(0.05)
    weights_sha = sha256(weights.read_bytes())
    database = hub.db()
    with database.session() as session:
        weights_row = session.get(Blob, weights_sha)
        revisions = session.scalar(select(func.count()).select_from(Revision))
    database.engine.dispose()
    with hub.client() as client:
        head = client.head(f"/api/blobs/{weights_sha}")
        live = client.get("/api/leases", headers=hub.auth("admin")).json()

    assert hub.temp_files() == [] and weights_row is None and head.status_code == 404
    assert revisions == 0 and [row["lease_id"] for row in live] == [lease["lease_id"]]
    with HubClient(hub.url, hub.tokens["ann"]) as ann:  # the donor pushes again, and it lands
        done = ann.push(ADAPTER, folder, lease_id=lease["lease_id"])
    files = {f["path"]: f["sha256"] for f in done.revision["files"]}
    assert files["adapter_model.safetensors"] == weights_sha
    assert invariants(hub, [Acknowledged(ADAPTER, done.revision["commit"], files)], []) == []


def test_fifty_donors_race_for_one_lease_and_exactly_one_wins(make_hub: Any) -> None:
    hub: Hub = make_hub()
    create_repos(hub)
    clients = [HubClient(hub.url, token, timeout=60) for token in add_donors(hub, 50)]
    for client in clients:
        client.whoami()  # each token is checked once before the race, so it starts together
    start = threading.Barrier(len(clients))
    outcomes: list[tuple[int, str]] = []

    def race(client: HubClient) -> None:
        start.wait()
        try:
            outcomes.append((201, client.lease(ADAPTER)["holder"]))
        except HubAPIError as err:  # the refusal names who holds the lease
            outcomes.append((err.status, f"{err.code}:{err.body.get('holder')}"))

    threads = [threading.Thread(target=race, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for client in clients:
        client.close()

    winners = [who for status, who in outcomes if status == 201]
    assert len(outcomes) == 50 and len(winners) == 1
    assert sorted(outcomes)[1:] == [(409, f"leased:{winners[0]}")] * 49
    assert invariants(hub, [], []) == []
