"""Seshu's tokenizer: exact round trip, byte fallback, HF loading, and `train_tokenizer`'s outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fedem.data.balance import balance
from fedem.data.corpus import load_mono
from fedem.data.normalise import normalise
from fedem.errors import UserError
from fedem.languages import LANGUAGES
from fedem.model.tokenizer import (
    BYTE_TOKENS,
    GPT2_PATTERN,
    PRETOKEN_PATTERN,
    SPECIAL_TOKENS,
    save_tokenizer,
    train_bpe,
    train_tokenizer,
)
from fedem.provenance import read_provenance

UNSEEN = "emoji 😀🎉, CJK 漢字かな, math 𝔘𝔫𝔦, snowman ☃"


@pytest.fixture(scope="module")
def seshu(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreTrainedTokenizerFast, Path]:
    """The real thing: a 16,000-token BPE on all balanced training text (~3 s), and where it is saved."""
    tokenizer = train_bpe(balance(load_mono(data_dir / "mono"), temperature=3.0), vocab_size=16000)
    return tokenizer, save_tokenizer(tokenizer, tmp_path_factory.mktemp("seshu-tokenizer"))


def _held_out_lines(data_dir: Path, lang: str) -> list[str]:
    """The raw (un-normalised) non-blank lines of a held-out file."""
    text = (data_dir / "mono" / f"{lang}.valid.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if normalise(line)]


def test_special_and_byte_tokens_come_first(seshu: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, _ = seshu
    vocab = tokenizer.get_vocab()
    assert [vocab[token] for token in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert [vocab[token] for token in BYTE_TOKENS] == list(range(4, 260))
    assert len(tokenizer) == 16000
    assert tokenizer("नमस्ते").input_ids[0] == tokenizer.bos_token_id == 1


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_every_held_out_line_round_trips(
    seshu: tuple[PreTrainedTokenizerFast, Path], data_dir: Path, lang: str
) -> None:
    tokenizer, _ = seshu
    lines = _held_out_lines(data_dir, lang)
    decoded = tokenizer.batch_decode(tokenizer(lines).input_ids, skip_special_tokens=True)
    mismatches = [(line, got) for line, got in zip(lines, decoded, strict=True) if got != normalise(line)]
    assert not mismatches, f"{len(mismatches)} of {len(lines)} {lang} lines changed, first: {mismatches[0]}"


def test_unseen_characters_fall_back_to_bytes(seshu: tuple[PreTrainedTokenizerFast, Path]) -> None:
    tokenizer, _ = seshu
    ids = tokenizer(UNSEEN).input_ids
    assert tokenizer.unk_token_id not in ids
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(ids)  # 😀 is F0 9F 98 80
    assert tokenizer.decode(ids, skip_special_tokens=True) == UNSEEN


def test_fresh_process_loads_it_with_autotokenizer(
    seshu: tuple[PreTrainedTokenizerFast, Path], data_dir: Path, tmp_path: Path
) -> None:
    tokenizer, folder = seshu
    lines = [UNSEEN] + [_held_out_lines(data_dir, lang)[0] for lang in sorted(LANGUAGES)]
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tokenizer(json.loads(sys.stdin.read())).input_ids\n"
        "print(json.dumps({'ids': ids, 'fedem': [m for m in sys.modules if m.split('.')[0] == 'fedem']}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        input=json.dumps(lines),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["fedem"] == []
    assert loaded["ids"] == tokenizer(lines).input_ids


def test_gpt2_pattern_cuts_words_at_vowel_signs() -> None:
    """Why the pre-tokenizer keeps \\p{M}: GPT-2's regex splits 'नमस्ते' at its vowel sign and virama."""

    def pieces(pattern: str, text: str) -> list[str]:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        return [piece for piece, _ in split.pre_tokenize_str(text)]

    assert pieces(PRETOKEN_PATTERN, "नमस्ते दुनिया") == ["नमस्ते", " दुनिया"]
    assert len(pieces(GPT2_PATTERN, "नमस्ते दुनिया")) > 2
    assert pieces(GPT2_PATTERN, "it's here") == ["it", "'s", " here"]


def test_train_bpe_rejects_a_vocabulary_without_room_for_merges() -> None:
    with pytest.raises(ValueError, match="260"):
        train_bpe({"en": ["hello world"]}, vocab_size=260)


@pytest.fixture(scope="module")
def small_data(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `data/`-shaped folder with a slice of en/hi/ta mono text and test pairs; returns its mono folder."""
    root = tmp_path_factory.mktemp("small-data")
    (root / "mono").mkdir()
    (root / "parallel").mkdir()
    for lang in ("en", "hi", "ta"):
        for name, count in ((f"{lang}.txt", 300), (f"{lang}.valid.txt", 40)):
            lines = (data_dir / "mono" / name).read_text(encoding="utf-8").splitlines()[:count]
            (root / "mono" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if lang != "en":
            name = f"en-{lang}.test.tsv"
            pairs = (data_dir / "parallel" / name).read_text(encoding="utf-8").splitlines()[:40]
            (root / "parallel" / name).write_text("\n".join(pairs) + "\n", encoding="utf-8")
    return root / "mono"


def test_train_tokenizer_writes_tokenizer_report_and_provenance(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    summary = train_tokenizer(small_data, out, vocab_size=600, temperature=2.0, seed=3)

    for name in ("tokenizer.json", "tokenizer_config.json", "fertility.json", "fertility.md", "fedem.json"):
        assert (out / name).is_file(), name
    assert set(summary["files"]) == {"tokenizer", "fertility_json", "fertility_md", "provenance"}
    assert json.loads(json.dumps(summary)) == summary
    assert summary["languages"] == ["en", "hi", "ta"]
    assert summary["vocab_size"] == len(AutoTokenizer.from_pretrained(out)) == 600
    assert summary["worst_premium_language"] in {"hi", "ta"}
    assert set(summary["baselines"]) == {"bytes", "english-only", "gpt2-regex"}

    report = json.loads((out / "fertility.json").read_text(encoding="utf-8"))
    assert list(report["tokenizers"]) == ["seshu", "bytes", "english-only", "gpt2-regex"]
    assert "valid.txt" in report["sources"]["text"]
    provenance = read_provenance(out)
    assert provenance["command"] == "tokenizer train"
    assert provenance["config"] == {
        "data": str(small_data),
        "out": str(out),
        "vocab_size": 600,
        "temperature": 2.0,
        "languages": ["en", "hi", "ta"],
        "pairs": str(small_data.parent / "parallel"),
        "seed": 3,
        "compare": True,
    }


def test_train_tokenizer_is_reproducible(small_data: Path, tmp_path: Path) -> None:
    saved = []
    for name in ("a", "b"):
        train_tokenizer(small_data, tmp_path / name, vocab_size=500, languages=["hi", "ta"], compare=False)
        saved.append((tmp_path / name / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved[0] == saved[1]


def test_train_tokenizer_without_pairs_or_held_out_text(small_data: Path, tmp_path: Path) -> None:
    """A bare folder of text still works: no premium, fertility measured on the training text."""
    mono = tmp_path / "mine"
    mono.mkdir()
    (mono / "hi.txt").write_bytes((small_data / "hi.txt").read_bytes())
    summary = train_tokenizer(mono, tmp_path / "out", vocab_size=400, compare=False)
    assert summary["worst_premium"] is None
    assert summary["baselines"] == {}
    report = (tmp_path / "out" / "fertility.md").read_text(encoding="utf-8")
    assert "training text for hi" in report
    assert "none (premium not measured)" in report


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": 100}, "too small"),
        ({"temperature": 0.0}, "temperature"),
        ({"languages": ["xx"]}, "unknown language"),
        ({"languages": ["gu"]}, "no train text"),
        ({"data": Path("does/not/exist")}, "no such file or folder"),
        ({"pairs": Path("does/not/exist")}, "no such pairs folder"),
    ],
)
def test_train_tokenizer_user_mistakes(
    small_data: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"data": small_data, "out": tmp_path / "tok", "vocab_size": 400} | change
    with pytest.raises(UserError, match=message):
        train_tokenizer(**arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "tok").exists()


def test_train_tokenizer_refuses_a_file_as_output(small_data: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="is a file"):
        train_tokenizer(small_data, tmp_path / "taken", vocab_size=400)
