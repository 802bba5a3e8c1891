"""`fedem serve --model seshu/base@v1 --hub URL`: a release served straight from a real hub, read with
`huggingface_hub.snapshot_download`, answered to the official `openai` client; and the refusals."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from fedem.client import HubClient
from fedem.errors import UserError
from fedem.model.load import local_folder
from tests.hub.conftest import BASE, Hub


def test_fedem_serve_a_hub_release_by_repo_and_revision(
    hub: Hub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with HubClient(hub.url, hub.tokens["admin"]) as admin:
        admin.push(BASE, tiny_model_dir, description="release 1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "FEDEM_HUB": hub.url}
    command = [sys.executable, "-m", "fedem.cli", "serve", "--model", f"{BASE}@v1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "fedem serve did not start"
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [f"{BASE}@v1"]
        reply = client.completions.create(
            model=f"{BASE}@v1", prompt="English: hello", max_tokens=4, temperature=0
        )
        assert reply.usage is not None and reply.usage.completion_tokens > 0
    finally:
        server.terminate()
        server.wait(30)
    # the snapshot is the release, file for file
    snapshot = next((tmp_path / "hf-cache").glob("models--seshu--base/snapshots/*"))
    pushed = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    assert sorted(p.name for p in snapshot.iterdir()) == pushed


def test_a_missing_release_or_repo_is_one_clear_line(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(UserError, match=r"cannot download seshu/base@v9"):
        local_folder(f"{BASE}@v9", hub.url)
    with pytest.raises(UserError, match="no such model"):
        local_folder(str(tmp_path / "nowhere" / "model"), hub.url)
    assert local_folder(tmp_path) == tmp_path  # a folder is used as it is


def test_fedem_evaluate_a_hub_release_through_hf_endpoint(
    hub: Hub, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`fedem evaluate --model seshu/base@v1` with `HF_ENDPOINT` at the hub: the same report as the folder."""
    with HubClient(hub.url, hub.tokens["admin"]) as admin:
        admin.push(BASE, tiny_model_dir, description="release 1")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_ENDPOINT": hub.url}
    reports = {}
    for name, model in (("hub", f"{BASE}@v1"), ("folder", str(tiny_model_dir))):
        out = tmp_path / name
        command = [sys.executable, "-m", "fedem.cli", "evaluate", "--model", model, "--languages", "hi",
                   "--max-lines", "4", "--max-pairs", "2", "--out", str(out)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[name] = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert reports["hub"]["language_modelling"] == reports["folder"]["language_modelling"]
    assert reports["hub"]["translation"] == reports["folder"]["translation"]
