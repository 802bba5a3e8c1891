"""A hub for the donor tests: uvicorn in a thread, that can be stopped and started again on the same
port (a hub that goes away mid-run and comes back), plus a tiny base release to train on.

While the hub is stopped its port is closed, so a client gets "connection refused" — the failure a
donor sees when a hub restarts — rather than a request that waits in a listening socket's backlog.
"""

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from sqlalchemy import select, update
from transformers import PreTrainedTokenizerFast

from fedem.client import HubClient
from fedem.hub.app import create_app
from fedem.hub.auth import create_user
from fedem.hub.db import Database
from fedem.hub.models import Repo, Revision
from fedem.hub.settings import HubSettings
from fedem.model.seshu import SeshuSize, build_model

BASE = "seshu/base"
ADAPTER = "seshu/adapter-en-hi"
TINY = SeshuSize(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, chunk_size=16)
USERS = (("admin", "maintainer"), ("ann", "donor"), ("bo", "donor"), ("cy", "donor"))


@dataclass
class DonorHub:
    root: Path
    settings: dict[str, Any]
    port: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    pseudonyms: dict[str, str] = field(default_factory=dict)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "DonorHub":
        app = create_app(HubSettings(root=self.root, **self.settings))
        if not self.tokens:
            with app.state.db.session() as session:
                for name, role in USERS:
                    user, self.tokens[name] = create_user(session, name, role)  # type: ignore[arg-type]
                    self.pseudonyms[name] = user.pseudonym
                session.commit()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"
        return self

    def stop(self) -> None:
        """Shut the server down and close its port (uvicorn closes the listening socket)."""
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(15)
            self.server = self.thread = None

    def client(self, who: str | None = None) -> HubClient:
        return HubClient(self.url, self.tokens[who] if who else None, timeout=30)

    def accept(self, repo: str) -> None:
        """Mark `repo`'s pending versions accepted, standing in for the evaluation worker (pushes may
        wait in an evaluation queue; the relay continues only from accepted versions)."""
        settings = HubSettings(root=self.root, **self.settings)
        db = Database(settings.database_url)
        with db.session() as session:
            repo_id = session.scalar(select(Repo.id).where(Repo.name == repo))
            session.execute(
                update(Revision)
                .where(Revision.repo_id == repo_id, Revision.status == "pending")
                .values(status="accepted")
            )
            session.commit()
        db.engine.dispose()


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Any]:
    """`make_hub(**settings)` starts a hub with users admin (maintainer), ann, bo, cy (donors)."""
    hubs: list[DonorHub] = []

    def make(**settings: Any) -> DonorHub:
        hubs.append(DonorHub(tmp_path / f"hub{len(hubs)}", settings).start())
        return hubs[-1]

    yield make
    for hub in hubs:
        hub.stop()


def save_base(folder: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> Path:
    """A tiny Seshu release folder: weights, config, tokenizer."""
    torch.manual_seed(seed)
    build_model(TINY, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_releases(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> tuple[Path, Path]:
    """Two tiny base releases (different weights, same tokenizer): v1 and a later v2."""
    root = tmp_path_factory.mktemp("releases")
    return save_base(root / "v1", tiny_tokenizer, 0), save_base(root / "v2", tiny_tokenizer, 1)


@pytest.fixture
def relay_hub(make_hub: Any, tiny_releases: tuple[Path, Path]) -> DonorHub:
    """A hub with base release seshu/base@v1 and an empty adapter repo seshu/adapter-en-hi."""
    hub: DonorHub = make_hub()
    publish_base(hub, tiny_releases[0])
    return hub


def publish_base(hub: DonorHub, release: Path, adapters: tuple[str, ...] = (ADAPTER,)) -> None:
    with hub.client("admin") as admin:
        names = {r["name"] for r in admin.repos()}
        if BASE not in names:
            admin.create_repo(BASE, "model")
        admin.push(BASE, release, description="tiny release")
        for adapter in adapters:
            if adapter not in names:
                admin.create_repo(adapter, "adapter", base_repo=BASE)


@pytest.fixture(scope="session")
def my_pairs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """60 en-hi pairs in a file whose name does not say the language (the adapter's name does)."""
    path = tmp_path_factory.mktemp("donor-data") / "my_pairs.tsv"
    lines = (data_dir / "parallel" / "en-hi.tsv").read_text(encoding="utf-8").splitlines()[:60]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
