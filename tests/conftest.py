"""Shared fixtures: a tiny tokenizer and a tiny randomly initialised Seshu checkpoint.

Both are built from the shipped data in seconds, once per test session.
"""

import os
from pathlib import Path

# The suite trains tiny models in many shapes, each of which torch.compile would compile anew; it runs
# fedem's training mixer eagerly (also in the CLI and server subprocesses, which inherit this), and
# tests the compiled mixer on its own (tests/model/test_mixer.py).
os.environ.setdefault("FEDEM_COMPILE", "0")

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fedem.data.balance import balance
from fedem.data.corpus import load_mono
from fedem.model.seshu import SeshuSize, build_model
from fedem.model.tokenizer import save_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
TINY = SeshuSize(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, chunk_size=16)
TEST_LANGUAGES = ["en", "hi", "ta"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """A 1,000-token BPE over a few hundred lines of English, Hindi and Tamil."""
    corpus = {lang: lines[:400] for lang, lines in load_mono(DATA / "mono", languages=TEST_LANGUAGES).items()}
    tokenizer = train_bpe(balance(corpus, temperature=3.0), vocab_size=1000)
    save_tokenizer(tokenizer, tmp_path_factory.mktemp("tokenizer"))
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A saved, randomly initialised tiny Seshu with its tokenizer (treat as read-only)."""
    torch.manual_seed(0)
    model = build_model(TINY, tiny_tokenizer)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_mono(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mono folder with 300 training and 16 held-out lines of English and Hindi (fast to tokenise)."""
    folder = tmp_path_factory.mktemp("mono")
    for lang in ("en", "hi"):
        for suffix, count in ((".txt", 300), (".valid.txt", 16)):
            lines = (DATA / "mono" / f"{lang}{suffix}").read_text(encoding="utf-8").splitlines()[:count]
            (folder / f"{lang}{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_pretrain_data(tokenizer_dir: Path, mono: Path, out: Path, **train: object) -> dict[str, object]:
    """Config data for a seconds-long tiny pretraining run."""
    return {
        "model": TINY.model_dump(),
        "tokenizer": str(tokenizer_dir),
        "data": {"mono": str(mono), "seq_len": 64, "eval_lines": 4},
        "train": {
            "max_steps": 20,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "log_every": 2,
            "eval_every": 10,
            "save_every": 10,
            **train,
        },
        "out": str(out),
    }


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> Path:
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    save_tokenizer(tiny_tokenizer, out)
    return out
