"""The simulator's embedded hub: a real `fedem hub` server subprocess on 127.0.0.1, its users, and
the maintainer-side calls the simulator makes on it (pushes, decisions, waiting for the worker).
"""

import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedem.client.hub_client import HubAPIError, HubClient
from fedem.errors import UserError
from fedem.sim.adapters import PUSHED
from fedem.sim.config import SimulateConfig

log = logging.getLogger(__name__)

BASE_REPO = "sim/base"
HEAD_REPO = "sim/community"
MAINTAINER = "sim-maintainer"
BASE_SUFFIXES = (".json", ".safetensors", ".txt", ".model")

SERVER = """
import json, socket, sys
import uvicorn
from fedem.hub.app import create_app
from fedem.hub.settings import HubSettings
app = create_app(HubSettings(**json.loads(sys.argv[1])))
config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
uvicorn.Server(config).run(sockets=[socket.socket(fileno=int(sys.argv[2]))])
"""


@dataclass
class EmbeddedHub:
    """A hub server subprocess on 127.0.0.1 and the tokens of its users."""

    root: Path
    tokens: dict[str, str]
    sock: socket.socket
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


@contextmanager
def embedded_hub(
    root: Path, donors: Sequence[str], log_file: Path, extra: dict[str, Any] | None = None
) -> Iterator[EmbeddedHub]:
    """Start a fresh hub in `root` (which must not hold one) with `MAINTAINER` and `donors`; stop it after.
    `extra` holds further `HubSettings` (e.g. the evaluation worker's), so the hub is the sim config's.

    This process binds the socket and hands it to the server, so the port is chosen race-free."""
    from fedem.hub.auth import create_user
    from fedem.hub.db import Database, migrate
    from fedem.hub.settings import HubSettings

    if (root / "hub.db").exists():
        raise UserError(f"{root} already holds a hub: simulate into a fresh --out")
    root.mkdir(parents=True, exist_ok=True)
    settings = {"root": str(root), **(extra or {})}
    database = Database(HubSettings(**settings).database_url)
    migrate(database.engine)
    tokens: dict[str, str] = {}
    with database.session() as session:
        for name, role in [(MAINTAINER, "maintainer"), *((d, "donor") for d in donors)]:
            tokens[name] = create_user(session, name, role)[1]  # type: ignore[arg-type]
        session.commit()
    database.engine.dispose()
    sock = socket.create_server(("127.0.0.1", 0))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as sink:
        args = [sys.executable, "-c", SERVER, json.dumps(settings), str(sock.fileno())]
        proc = subprocess.Popen(args, pass_fds=[sock.fileno()], stdout=sink, stderr=subprocess.STDOUT)
    hub = EmbeddedHub(root, tokens, sock, proc)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the embedded hub exited with {proc.returncode}; see {log_file}")
            try:
                if httpx.get(f"{hub.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the embedded hub did not start in 120 s; see {log_file}")
            time.sleep(0.2)
        log.info("hub at %s (root %s)", hub.url, root)
        yield hub
    finally:
        hub.stop()


def decide(client: HubClient, revision: dict[str, Any], accept: bool, reason: str) -> dict[str, Any]:
    """Settle a pending adapter version through the maintainer decision endpoint; a version the hub
    accepted at once (a hub without an evaluation queue) is recorded as such."""
    record = {"repo": revision["repo"], "version": revision["tag"], "commit": revision["commit"]}
    if revision.get("status", "accepted") != "pending":
        return {**record, "decision": revision.get("status", "accepted"), "reason": "accepted by the hub"}
    decision = "accepted" if accept else "rejected"
    response = client.http.post(
        f"/api/evaluations/{revision['commit']}/decision", json={"decision": decision, "reason": reason}
    )
    if response.status_code >= 400:
        raise HubAPIError(response.status_code, "decision_failed", response.text[:300])
    return {**record, "decision": decision, "reason": reason}


def hub_settings(cfg: SimulateConfig, staged: Path | None) -> dict[str, Any]:
    """The embedded hub's extra `HubSettings`: none with gate "accept"; with gate "hub", the evaluation
    worker on `staged` data, the sim's δ/ε gate and the sim's eval limits (so the worker's and the
    report's numbers are measured alike)."""
    if cfg.gate != "hub" or staged is None:
        return {}
    return {
        "eval_worker": True,
        "eval_data": str(staged.resolve()),
        "eval_poll_s": 0.5,
        "accept_delta": cfg.accept_delta,
        "accept_epsilon": cfg.accept_epsilon,
        "eval_max_lines": cfg.eval.max_lines,
        "eval_max_pairs": cfg.eval.max_pairs,
        "eval_max_new_tokens": cfg.eval.max_new_tokens,
    }


def stage_eval_data(source: Path, languages: Sequence[str], dest: Path) -> Path:
    """`source`'s `mono/<lang>.valid.txt` and `parallel/en-<lang>.test.tsv` of `languages` only (links):
    the worker scores every language it finds, and a training `<lang>.txt` beside them would make it
    read that instead of the held-out file."""
    for code in languages:
        valid = source / "mono" / f"{code}.valid.txt"
        if not valid.is_file():
            raise UserError(f"eval_data {source}: no held-out text {valid}")
        (dest / "mono").mkdir(parents=True, exist_ok=True)
        (dest / "mono" / valid.name).symlink_to(valid.resolve())
        test = source / "parallel" / f"en-{code}.test.tsv"
        if code != "en" and test.is_file():
            (dest / "parallel").mkdir(parents=True, exist_ok=True)
            (dest / "parallel" / test.name).symlink_to(test.resolve())
    return dest


def await_decision(client: HubClient, revision: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """gate "hub": wait until the hub's worker has decided a pushed version (polling its evaluation as
    the maintainer), so the next lease starts from what the gate accepted; a failed evaluation leaves
    the version pending, which is never the head, and is recorded as `failed`."""
    record = {"repo": revision["repo"], "version": revision["tag"], "commit": revision["commit"]}
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.http.get(f"/api/evaluations/{revision['commit']}")
        if response.status_code >= 400:
            raise HubAPIError(response.status_code, "evaluation_failed", response.text[:300])
        found = response.json()
        if found["state"] in ("done", "failed"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{revision['repo']}@{revision['tag']}: no decision in {timeout_s:.0f} s")
        time.sleep(0.5)
    decision = found["decision"] if found["state"] == "done" else "failed"
    return {**record, "decision": decision, "reason": found["reason"], "by": "hub worker"}


def push_adapter(
    client: HubClient, repo: str, folder: Path, base: str, description: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Push an adapter folder as the maintainer: lease, push (ends the lease); returns the revision."""
    lease = client.lease(repo)
    try:
        done = client.push(
            repo, folder, description, metrics, lease_id=lease["lease_id"], base=base, include=list(PUSHED)
        )
    except BaseException:
        client.release(lease["lease_id"])
        raise
    return done.revision


def version_of(tag: str) -> int:
    """`v3` → 3."""
    return int(tag.lstrip("v"))


def stage_base(base: Path, dest: Path) -> Path:
    """The base's top-level weights, config and tokenizer files (symlinked): what a release holds."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(base.iterdir()):
        if path.is_file() and path.suffix in BASE_SUFFIXES:
            (dest / path.name).symlink_to(path.resolve())
    return dest
