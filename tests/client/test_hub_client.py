"""`HubClient` and `fedem hub …` against a real hub: uvicorn on a loopback port, SQLite and blobs in tmp."""

import argparse
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from safetensors.torch import save_file

from fedem.client import HubAPIError, HubClient
from fedem.errors import UserError
from fedem.hub.app import create_app
from fedem.hub.auth import create_user
from fedem.hub.cli import JsonFormatter, add_hub_parser, bootstrap_admin
from fedem.hub.settings import HubSettings

BASE = "seshu/base"
ADAPTER = "seshu/adapter-en-hi"


@dataclass
class Hub:
    url: str
    app: FastAPI
    tokens: dict[str, str]

    def client(self, who: str | None = None) -> HubClient:
        return HubClient(self.url, self.tokens[who] if who else None, timeout=30)


@contextmanager
def running_hub(root: Path, donors: int = 2, **settings: Any) -> Iterator[Hub]:
    """A hub served by uvicorn in a thread, on a socket bound before start (no port race)."""
    app = create_app(HubSettings(root=root, **settings))
    users = [("admin", "maintainer")] + [(f"donor{i}", "donor") for i in range(donors)]
    with app.state.db.session() as session:
        tokens = {name: create_user(session, name, role)[1] for name, role in users}  # type: ignore[arg-type]
        session.commit()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30  # generous: the machine may be busy with other tests
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield Hub(f"http://127.0.0.1:{sock.getsockname()[1]}", app, tokens)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with running_hub(tmp_path / "hub") as running, running.client("admin") as admin:
        admin.create_repo(BASE, "model")
        admin.create_repo(ADAPTER, "adapter", base_repo=BASE)
        yield running


def make_model(folder: Path, numel: int = 256 * 1024, seed: int = 0) -> Path:
    """A folder like a saved checkpoint: weights (1 MiB by default), config and a nested tokenizer file."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.randn(numel), "b": torch.zeros(8)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64, "seed": seed}), encoding="utf-8")
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
    (folder / ".cache").mkdir(exist_ok=True)
    (folder / ".cache" / "skip.json").write_text("{}", encoding="utf-8")  # hidden: never pushed
    return folder


def requests_of(client: HubClient) -> list[httpx.Request]:
    seen: list[httpx.Request] = []
    client.http.event_hooks["request"].append(seen.append)
    return seen


def test_repos_are_created_listed_and_shown(hub: Hub) -> None:
    with hub.client("admin") as admin, hub.client() as anonymous:
        assert admin.whoami()["role"] == "maintainer"
        names = [r["name"] for r in anonymous.repos()]
        shown = anonymous.repo(ADAPTER)
        with pytest.raises(HubAPIError) as missing:
            anonymous.repo("seshu/nope")
        with pytest.raises(HubAPIError) as unauthorised:
            anonymous.create_repo("seshu/other", "model")

    assert names == [ADAPTER, BASE]
    assert shown["kind"] == "adapter" and shown["base_repo"] == BASE and shown["head"] is None
    assert (missing.value.status, missing.value.code) == (404, "repo_not_found")
    assert unauthorised.value.status == 401 and "Bearer" in unauthorised.value.message


def test_push_then_pull_is_byte_identical_and_a_second_push_reuses_blobs(hub: Hub, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    with hub.client("admin") as admin:
        first = admin.push(BASE, src, description="first release", metrics={"bpb": 1.5})
        sent = requests_of(admin)
        second = admin.push(BASE, src, description="same bytes")
    with hub.client() as reader:
        pulled = reader.pull(BASE, "v1", tmp_path / "out")
        again = reader.pull(BASE, "main", tmp_path / "out")
        log = reader.log(BASE)
        hf = reader.hf_revision(BASE, "v1")

    files = ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    assert first.revision["tag"] == "v1" and sorted(first.moved) == files and first.reused == []
    assert first.revision["metrics"] == {"bpb": 1.5} and first.revision["contributor"] == "admin"
    assert [f["path"] for f in first.revision["files"]] == files
    assert second.revision["tag"] == "v2" and second.moved == [] and sorted(second.reused) == files
    assert "PUT" not in {r.method for r in sent}
    assert sorted(pulled.moved) == files and pulled.bytes == sum(f["size"] for f in first.revision["files"])
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    assert not (tmp_path / "out" / ".cache").exists()
    assert again.moved == [] and sorted(again.reused) == files  # already there with the right hash
    assert [entry["tag"] for entry in log] == ["v2", "v1"] and log[0]["parent"] == "v1"
    assert hf["sha"] == first.revision["commit"] and sorted(s["rfilename"] for s in hf["siblings"]) == files


def test_pull_resumes_a_partial_file_with_a_range_request(hub: Hub, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src", numel=768 * 1024)  # 3 MiB of weights
    weights = (src / "model.safetensors").read_bytes()
    half = len(weights) // 2
    with hub.client("admin") as admin:
        admin.push(BASE, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(weights[:half])

    with hub.client() as reader:
        sent = requests_of(reader)
        done = reader.pull(BASE, "v1", out)

    ranges = [r.headers.get("range") for r in sent if r.url.path.endswith("/model.safetensors")]
    assert ranges == [f"bytes={half}-"]
    small = sum((src / name).stat().st_size for name in ("config.json", "tokenizer/tokenizer.json"))
    assert done.bytes == len(weights) - half + small  # only the missing half of the weights came over
    assert (out / "model.safetensors").read_bytes() == weights
    assert not (out / "model.safetensors.part").exists()


def test_a_corrupt_partial_file_is_detected_and_removed(hub: Hub, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    with hub.client("admin") as admin:
        admin.push(BASE, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.part").write_bytes(b"\0" * 1000)  # wrong bytes: the resume cannot match

    with hub.client() as reader, pytest.raises(Exception, match="sha256"):
        reader.pull(BASE, "v1", out)
    assert not (out / "model.safetensors.part").exists()
    with hub.client() as reader:
        reader.pull(BASE, "v1", out)  # and the next pull starts over
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_donor_pushes_an_adapter_version_under_a_lease(hub: Hub, tmp_path: Path) -> None:
    with hub.client("admin") as admin:
        admin.push(BASE, make_model(tmp_path / "base"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {"lora_A": torch.randn(4, 64), "lora_B": torch.zeros(64, 4)},
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}), encoding="utf-8")

    with hub.client("donor0") as donor:
        with pytest.raises(HubAPIError) as no_lease:
            donor.push(ADAPTER, adapter)
        lease = donor.lease(ADAPTER)
        pushed = donor.push(ADAPTER, adapter, description="en-hi", lease_id=lease["lease_id"])
        with pytest.raises(HubAPIError) as ended:
            donor.release(lease["lease_id"])
        next_lease = donor.lease(ADAPTER)  # the push freed the adapter

    assert (no_lease.value.status, no_lease.value.code) == (409, "lease_required")
    assert lease["base"] == f"{BASE}@v1" and lease["from_revision"] is None
    assert pushed.revision["tag"] == "v1" and pushed.revision["base"] == f"{BASE}@v1"
    assert pushed.revision["status"] == "pending"
    assert pushed.revision["contributor"].startswith("donor-")  # single-blind until a decision
    assert ended.value.status == 409
    assert next_lease["from_revision"] is None  # v1 waits for evaluation; leases start from accepted


# --- the CLI ----------------------------------------------------------------------------------------


def hub_cli(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="fedem")
    add_hub_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["hub", *argv])
    return args.handler(args)


def test_cli_lease_round_trip_with_environment_defaults(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDEM_HUB", hub.url)
    monkeypatch.setenv("FEDEM_TOKEN", hub.tokens["donor0"])

    lease = hub_cli("lease", ADAPTER, "--json")
    with pytest.raises(UserError, match="leased"):
        hub_cli("lease", ADAPTER, "--token", hub.tokens["donor1"])
    released = hub_cli("unlease", lease["lease_id"])
    listed = hub_cli("ls")

    assert released["outcome"] == "released" and released["lease_id"] == lease["lease_id"]
    assert listed["repos"][ADAPTER]["kind"] == "adapter"


def test_cli_push_pull_and_log(hub: Hub, tmp_path: Path) -> None:
    src = make_model(tmp_path / "src")
    (tmp_path / "metrics.json").write_text('{"chrf": 40.5}', encoding="utf-8")
    remote = ["--hub", hub.url, "--token", hub.tokens["admin"]]

    pushed = hub_cli(
        "push",
        BASE,
        str(src),
        *remote,
        "--description",
        "r1",
        "--metrics-json",
        str(tmp_path / "metrics.json"),
    )
    pulled = hub_cli("pull", BASE, "--out", str(tmp_path / "out"), "--hub", hub.url)
    log = hub_cli("log", BASE, "--hub", hub.url)

    assert pushed["tag"] == "v1" and len(pushed["uploaded"]) == 3
    assert pulled["tag"] == "v1" and pulled["bytes_downloaded"] == pushed["bytes_uploaded"]
    assert log["revisions"]["v1"]["metrics"] == {"chrf": 40.5} and log["revisions"]["v1"]["files"] == 3


def test_cli_errors_are_user_errors(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDEM_HUB", raising=False)
    monkeypatch.delenv("FEDEM_TOKEN", raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"

    with pytest.raises(UserError, match="cannot reach hub"):
        hub_cli("ls", "--hub", closed)
    with pytest.raises(UserError, match="--hub"):
        hub_cli("ls")
    with pytest.raises(UserError, match="token"):
        hub_cli("lease", ADAPTER, "--hub", hub.url)
    with pytest.raises(UserError, match="no repo"):
        hub_cli("log", "seshu/nope", "--hub", hub.url)
    with pytest.raises(UserError, match="maintainers"):
        hub_cli(
            "repo", "create", "seshu/x", "--kind", "model", "--hub", hub.url, "--token", hub.tokens["donor0"]
        )


def test_cli_user_add_then_the_token_works_on_that_hub(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    added = hub_cli("user", "add", "ravi", "--role", "donor", "--root", str(root))
    with pytest.raises(UserError, match="already exists"):
        hub_cli("user", "add", "ravi", "--role", "donor", "--root", str(root))

    with running_hub(root, donors=0) as running:
        assert bootstrap_admin(running.app.state.db) is None  # users exist: no admin is made
        with HubClient(running.url, added["token"]) as client:
            assert client.whoami() == {"name": "ravi", "role": "donor", "pseudonym": added["pseudonym"]}


def test_first_start_creates_admin_once(tmp_path: Path) -> None:
    app = create_app(HubSettings(root=tmp_path))
    token = bootstrap_admin(app.state.db)
    assert token is not None and token.startswith("fedem_")
    assert bootstrap_admin(app.state.db) is None


def test_json_log_lines() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', None, None)
    record.args = ("127.0.0.1:5000", "GET", "/healthz", "1.1", 200)
    record.root = "/srv/hub"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info" and line["method"] == "GET" and line["status"] == 200
    assert line["root"] == "/srv/hub" and line["message"].startswith("127.0.0.1:5000")


def test_a_rate_limited_client_waits_as_told_and_carries_on(tmp_path: Path) -> None:
    """Over the hub's per-token rate (2 requests, then 5/s) every call still succeeds: a 429 is retried
    after its Retry-After; with no retries left the 429 reaches the caller with that wait."""
    with running_hub(tmp_path / "hub", rate_limit_per_s=5.0, rate_limit_burst=2) as running:
        with running.client("donor0") as donor:
            seen: list[int] = []
            donor.http.event_hooks["response"].append(lambda r: seen.append(r.status_code))
            assert [donor.whoami()["name"] for _ in range(6)] == ["donor0"] * 6
            assert 429 in seen and seen[-1] == 200
        impatient = HubClient(running.url, running.tokens["donor1"], retries=0)
        with impatient, pytest.raises(HubAPIError) as refused:
            for _ in range(4):
                impatient.whoami()
        assert refused.value.status == 429 and refused.value.retry_after is not None
