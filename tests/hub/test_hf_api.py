"""The HuggingFace-compatible read API, exercised with the real clients: `huggingface_hub` in this
process, and `transformers` in a fresh one with `HF_ENDPOINT` pointing at the hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.hub.conftest import BASE, Hub, push, read_folder, sha256

INPUT_IDS = [[5, 17, 42, 7, 99, 3, 250, 11]]

LOAD = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], revision="v1").eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], revision="v1")
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[3]))).logits
ids = torch.tensor(tokenizer("hello world")["input_ids"])
save_file({"logits": logits.contiguous(), "ids": ids}, sys.argv[2])
"""


@pytest.fixture
def released(hub: Hub, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Hub, dict[str, bytes]]:
    """The tiny Seshu checkpoint published as v1, and a v2 that differs, so `v1` must really be v1."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # in case the environment says offline
    files = read_folder(tiny_model_dir)
    with hub.client() as client:
        assert push(client, hub.auth("admin"), BASE, files).status_code == 201
        v2 = {**files, "README.md": b"# v2\n"}
        assert push(client, hub.auth("admin"), BASE, v2).status_code == 201
    return hub, files


def test_snapshot_download_fetches_a_release_byte_for_byte(
    released: tuple[Hub, dict[str, bytes]], tmp_path: Path
) -> None:
    hub, files = released

    folder = Path(snapshot_download(BASE, revision="v1", endpoint=hub.url, cache_dir=tmp_path / "cache"))

    assert "model.safetensors" in files and "config.json" in files
    assert read_folder(folder) == files


def test_hf_api_reports_commits_trees_and_missing_things(
    released: tuple[Hub, dict[str, bytes]], tmp_path: Path
) -> None:
    hub, files = released
    api = HfApi(endpoint=hub.url)

    v1, main = api.model_info(BASE, revision="v1"), api.model_info(BASE)
    tree = {f.path: f for f in api.list_repo_tree(BASE, revision=v1.sha, recursive=True)}

    assert v1.sha is not None and len(v1.sha) == 40 and v1.sha != main.sha
    assert sorted(s.rfilename for s in v1.siblings or []) == sorted(files)
    assert sorted(tree) == sorted(files)
    weights = tree["model.safetensors"]
    assert isinstance(weights, huggingface_hub.hf_api.RepoFile) and weights.lfs is not None
    assert weights.lfs.sha256 == sha256(files["model.safetensors"]) and weights.size == len(
        files["model.safetensors"]
    )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(BASE, "adapter_config.json", revision="v1", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(BASE, revision="v9")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("seshu/nothing-here")


def test_from_pretrained_through_hf_endpoint_gives_identical_logits(
    released: tuple[Hub, dict[str, bytes]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    hub, _files = released
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")
    }
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = tmp_path / "out.safetensors"

    subprocess.run(
        [sys.executable, "-c", LOAD, BASE, str(out), json.dumps(INPUT_IDS)], env=env, check=True, timeout=300
    )

    local = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = local(torch.tensor(INPUT_IDS)).logits
    remote = load_file(out)
    torch.testing.assert_close(remote["logits"], expected, rtol=0, atol=1e-6)
    assert remote["ids"].numel() > 0
    assert not any((tmp_path / "hf").rglob("*.incomplete"))
