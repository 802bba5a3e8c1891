"""A real hub for the tests: uvicorn in a subprocess on 127.0.0.1, its own root folder and users.

The test process binds the listening socket and hands it to the server process, so the port is
free of races and stays the same across a SIGKILL and restart (connections made while the server is
down wait in the socket's backlog). Users are created directly in the hub's database before start.

Two environment variables run the same tests on a production-like hub (`make test-postgres`):
`FEDEM_TEST_DB_URL`, a PostgreSQL server URL (each hub gets a fresh database there, dropped after
the test), and `FEDEM_TEST_HUB_WORKERS`, the number of uvicorn worker processes (default 1).
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from fedem.hub.auth import create_user
from fedem.hub.db import Database, migrate
from fedem.hub.settings import HubSettings

BASE = "seshu/base"
ADAPTER = "seshu/adapter-en-hi"
USERS = (("admin", "maintainer"), ("ann", "donor"), ("bo", "donor"))
SERVER_DB_URL = os.environ.get("FEDEM_TEST_DB_URL")
WORKERS = int(os.environ.get("FEDEM_TEST_HUB_WORKERS", "1"))

SERVER = """
import json, socket, sys
from fedem.hub.cli import run_hub
from fedem.hub.settings import HubSettings
settings = HubSettings(**json.loads(sys.argv[1]))
sock = socket.socket(fileno=int(sys.argv[2]))
run_hub(settings, int(sys.argv[3]), sockets=[sock], log_level="warning", timeout_graceful_shutdown=2)
"""


@dataclass
class Hub:
    root: Path
    settings: dict[str, Any]
    tokens: dict[str, str]
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> "Hub":
        fd = self.sock.fileno()
        args = [sys.executable, "-c", SERVER, json.dumps(self.settings), str(fd), str(WORKERS)]
        # its own process group, so that `kill` reaches every worker process at once
        self.proc = subprocess.Popen(args, pass_fds=[fd], start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode} at start-up")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
        raise RuntimeError("hub did not start in 60 s")

    def kill(self) -> None:
        """SIGKILL to the server and its workers: no shutdown code runs, exactly like a crash."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def db(self) -> Database:
        return Database(HubSettings(**self.settings).database_url)

    def stored_blobs(self) -> list[Path]:
        """Artifact files in the store (outside its temp folder)."""
        return sorted(p for p in self.blobs.glob("??/*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted((self.blobs / "tmp").iterdir())

    def temp_sizes(self) -> list[int]:
        """Bytes written so far to each upload in progress; one that finishes (is renamed) between
        listing and stat is left out."""
        sizes = []
        for path in self.temp_files():
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                continue
        return sizes


def fresh_server_database(server_url: str) -> str:
    """A new, empty database on the server at `server_url`; returns its URL."""
    name = f"hub_{uuid.uuid4().hex[:16]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_server_database(url: str) -> None:
    server = make_url(url).set(database="postgres")
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)"))
    engine.dispose()


def start_hub(root: Path, **settings: Any) -> Hub:
    """Create the hub's database and users, then start the server."""
    root.mkdir(parents=True, exist_ok=True)
    if SERVER_DB_URL and "db_url" not in settings:
        settings["db_url"] = fresh_server_database(SERVER_DB_URL)
    config = {"root": str(root), **settings}
    database = Database(HubSettings(**config).database_url)
    migrate(database.engine)
    with database.session() as session:
        tokens = {name: create_user(session, name, role)[1] for name, role in USERS}  # type: ignore[arg-type]
        session.commit()
    database.engine.dispose()
    return Hub(root=root, settings=config, tokens=tokens).start()


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Any]:
    """`make_hub(**settings)` starts a fresh hub; all are stopped after the test."""
    hubs: list[Hub] = []

    def make(**settings: Any) -> Hub:
        hubs.append(start_hub(tmp_path / f"hub{len(hubs)}", **settings))
        return hubs[-1]

    yield make
    for hub in hubs:
        hub.stop()
        hub.sock.close()
        if SERVER_DB_URL:
            drop_server_database(hub.settings["db_url"])


@pytest.fixture
def hub(make_hub: Any) -> Hub:
    """A hub with default settings and two repos: the base model and an adapter on it."""
    hub: Hub = make_hub()
    create_repos(hub)
    return hub


def create_repos(hub: Hub) -> None:
    with hub.client() as client:
        for body in (
            {"name": BASE, "kind": "model"},
            {"name": ADAPTER, "kind": "adapter", "base_repo": BASE},
        ):
            client.post("/api/repos", json=body, headers=hub.auth("admin")).raise_for_status()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_blob(client: httpx.Client, headers: dict[str, str], data: bytes, **params: Any) -> httpx.Response:
    return client.put(f"/api/blobs/{sha256(data)}", content=data, headers=headers, params=params)


def push(
    client: httpx.Client, headers: dict[str, str], repo: str, files: dict[str, bytes], **body: Any
) -> httpx.Response:
    """Upload what the hub lacks (HEAD first), then publish the revision; returns the publish reply."""
    for data in files.values():
        if client.head(f"/api/blobs/{sha256(data)}").status_code != 200:
            put_blob(client, headers, data).raise_for_status()
    manifest = [{"path": p, "sha256": sha256(d), "size": len(d)} for p, d in files.items()]
    return client.post(f"/api/repos/{repo}/revisions", json={"files": manifest, **body}, headers=headers)


def read_folder(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
