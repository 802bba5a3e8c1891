"""Publishing base releases from accepted adapters (`fedem hub release`) and by continued pretraining
(`fedem hub cpt`), against a real hub; the release loads with plain transformers and reproduces the
numbers in its model card."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from fedem.errors import UserError
from fedem.evaluate import evaluate
from fedem.hub.cli import parse_every
from fedem.hub.release import continue_pretraining, release
from fedem.provenance import weights_fingerprint, write_provenance
from tests.client.conftest import ADAPTER, BASE, DonorHub

OTHER = "seshu/adapter-en-ta"


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A held-out folder in data/ layout: 4 lines of Hindi text and 2 en-hi test pairs."""
    root = tmp_path_factory.mktemp("eval-data")
    (root / "mono").mkdir()
    (root / "parallel").mkdir()
    hindi = (data_dir / "mono" / "hi.valid.txt").read_text(encoding="utf-8").splitlines()[:4]
    (root / "mono" / "hi.valid.txt").write_text("\n".join(hindi) + "\n", encoding="utf-8")
    pairs = (data_dir / "parallel" / "en-hi.test.tsv").read_text(encoding="utf-8").splitlines()[:2]
    (root / "parallel" / "en-hi.test.tsv").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return root


def _adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on `base` with random non-zero B (a trained adapter's shape and provenance)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    write_provenance(out, "finetune", {"task": "translate"}, base_sha256=weights_fingerprint(base))
    return out


def _contribute(hub: DonorHub, donor: str, repo: str, folder: Path) -> None:
    with hub.client(donor) as client:
        lease = client.lease(repo)
        client.push(
            repo, folder, description=f"{donor}'s pairs", lease_id=lease["lease_id"], base=lease["base"]
        )
    hub.accept(repo)


def test_release_merges_accepted_heads_and_reproduces_its_card(
    relay_hub: DonorHub, tiny_releases: tuple[Path, Path], eval_data: Path, tmp_path: Path
) -> None:
    base = tiny_releases[0]
    with relay_hub.client("admin") as admin:
        admin.create_repo(OTHER, "adapter", base_repo=BASE)
    _contribute(relay_hub, "ann", ADAPTER, _adapter(base, tmp_path / "a1", seed=1))
    _contribute(relay_hub, "bo", OTHER, _adapter(base, tmp_path / "a2", seed=2))

    with relay_hub.client("admin") as admin:
        summary = release(admin, BASE, tmp_path / "work", method="ties", density=0.5, eval_data=eval_data)
        card = admin.http.get(f"/{BASE}/resolve/v2/README.md").text

    assert summary["release"] == f"{BASE}@v2"
    assert sorted(summary["merged"]) == [f"{ADAPTER}@v1", f"{OTHER}@v1"] and summary["skipped"] == []
    assert summary["credits"] == ["ann", "bo"]  # named once accepted
    assert f"`{ADAPTER}@v1` by ann" in card and "Contributors credited: ann, bo." in card and "ties" in card
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        AutoModelForCausalLM.from_pretrained({BASE!r}, revision="v2").save_pretrained(sys.argv[1])
        AutoTokenizer.from_pretrained({BASE!r}, revision="v2").save_pretrained(sys.argv[1])
        assert "fedem" not in sys.modules
        """
    )
    env = {**os.environ, "HF_ENDPOINT": relay_hub.url, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "v2")], check=True, env=env, cwd=tmp_path)
    rescored = evaluate(
        tmp_path / "v2",
        None,
        mono=eval_data / "mono",
        pairs=eval_data / "parallel",
        max_lines=64,
        max_pairs=16,
    )
    card_bpb = float(re.search(r"\| bpb hi \| [0-9.]+ \| ([0-9.]+) \|", card).group(1))  # type: ignore[union-attr]
    assert rescored["language_modelling"]["hi"]["bpb"] == pytest.approx(card_bpb, abs=1e-4)


def test_release_skips_heads_pinned_to_an_older_release(
    relay_hub: DonorHub, tiny_releases: tuple[Path, Path], tmp_path: Path
) -> None:
    v1, v2 = tiny_releases
    _contribute(relay_hub, "ann", ADAPTER, _adapter(v1, tmp_path / "a1", seed=1))
    with relay_hub.client("admin") as admin:
        admin.push(BASE, v2, description="a newer release")

        summary = release(admin, BASE, tmp_path / "work")

    assert summary["release"] is None
    assert summary["skipped"] == [f"{ADAPTER}@v1 (trained on {BASE}@v1)"]


def test_continued_pretraining_publishes_the_next_release(
    relay_hub: DonorHub, eval_data: Path, tmp_path: Path
) -> None:
    text = tmp_path / "hi.txt"
    text.write_text("\n".join(f"नई पंक्ति {i} हिन्दी पाठ" for i in range(64)) + "\n", encoding="utf-8")

    with relay_hub.client("admin") as admin:
        summary = continue_pretraining(admin, BASE, text, tmp_path / "work", max_steps=2, eval_data=eval_data)
        files = {f["path"] for f in admin.revision(BASE, "v2")["files"]}

    assert summary["release"] == f"{BASE}@v2" and summary["steps"] == 2
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= files
    assert not any(path.startswith("checkpoint-") for path in files)


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("6h", 21600), ("1d", 86400), ("90", 90)])
def test_every_takes_durations(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1h", "0d"])
def test_every_refuses_nonsense(text: str) -> None:
    with pytest.raises(UserError, match="--every"):
        parse_every(text)
