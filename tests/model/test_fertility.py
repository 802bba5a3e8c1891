"""Fertility measurement (unit level) and the fairness target on the real data at vocab 16,000."""

import json
from pathlib import Path
from typing import Any

import pytest

from fedem.data.corpus import Pair
from fedem.model.fertility import (
    FAIRNESS_TARGET,
    FertilityTable,
    LanguageFertility,
    count_bytes,
    fertility_table,
    load_test_pairs,
    measure_language,
    premium,
    render_markdown,
    write_fertility,
)
from fedem.model.tokenizer import train_tokenizer

INDIC = ["as", "bn", "gu", "hi", "kn", "ml", "mr", "or", "pa", "ta", "te"]


def count_chars(lines: list[str]) -> list[int]:
    """A stand-in tokenizer: one token per character."""
    return [len(line) for line in lines]


def test_count_bytes_is_utf8_length() -> None:
    assert count_bytes(["a", "अ", "😀", ""]) == [1, 3, 4, 0]


def test_measure_language_counts_chars_words_tokens() -> None:
    row = measure_language(count_bytes, ["नमस्ते दुनिया", "hi"], None)
    assert (row.chars, row.words, row.tokens, row.premium) == (15, 3, 39, None)
    assert row.tokens_per_char == pytest.approx(39 / 15)
    assert row.tokens_per_word == pytest.approx(39 / 3)


def test_premium_is_a_ratio_of_totals() -> None:
    pairs = [Pair("ab", "abcd", "hi"), Pair("abcdefgh", "abcdefgh", "hi")]
    assert premium(count_chars, pairs) == pytest.approx(12 / 10)


def test_fertility_table_sets_english_premium_and_skips_empty_languages() -> None:
    text = {"en": ["hello"], "hi": ["नमस्ते"], "ta": []}
    pairs = {"hi": [Pair("hello", "नमस्ते", "hi")]}
    table = fertility_table("bytes", 256, count_bytes, text, pairs)
    assert list(table.languages) == ["en", "hi"]
    assert table.languages["en"].premium == 1.0
    assert table.languages["hi"].premium == pytest.approx(18 / 5)
    assert fertility_table("bytes", 256, count_bytes, text, {}).languages["en"].premium is None


def _table() -> FertilityTable:
    return FertilityTable(
        "toy",
        100,
        {
            "en": LanguageFertility(chars=100, words=20, tokens=25, premium=1.0),
            "hi": LanguageFertility(chars=100, words=20, tokens=40, premium=1.6),
            "or": LanguageFertility(chars=10, words=2, tokens=3, premium=None),
        },
    )


def test_headline_numbers() -> None:
    table = _table()
    assert table.extremes() == ("hi", "en")
    assert table.max_min_ratio() == pytest.approx(0.4 / 0.25)
    assert table.worst_premium() == ("hi", 1.6)
    assert FertilityTable("none", 1, {"en": LanguageFertility(1, 1, 1)}).worst_premium() is None


def test_markdown_tables_are_aligned_and_mark_missing_values() -> None:
    other = FertilityTable("other", 50, {"en": LanguageFertility(100, 20, 30, 1.0)})
    markdown = render_markdown([_table(), other], {"text": "somewhere"})
    assert "| toy " in markdown and "- text: somewhere" in markdown
    assert "1.60 (hi)" in markdown
    for block in markdown.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        assert len({len(row) for row in rows}) <= 1, block
    or_rows = [line for line in markdown.splitlines() if line.startswith("| or ")]
    assert len(or_rows) == 3 and all(row.rstrip(" |").endswith("–") for row in or_rows)


def test_write_fertility_writes_json_and_markdown(tmp_path: Path) -> None:
    json_path, md_path = write_fertility(tmp_path, [_table()], {"text": "t"})
    report = json.loads(json_path.read_text(encoding="utf-8"))
    toy = report["tokenizers"]["toy"]
    assert report["target_max_min_tokens_per_char"] == FAIRNESS_TARGET
    assert toy["max_min_tokens_per_char"] == 1.6
    assert (toy["worst_premium"], toy["worst_premium_language"]) == (1.6, "hi")
    assert toy["languages"]["or"] == {
        "chars": 10,
        "words": 2,
        "tokens": 3,
        "tokens_per_char": 0.3,
        "tokens_per_word": 1.5,
        "premium": None,
    }
    assert md_path.read_text(encoding="utf-8").startswith("# Tokenizer fertility")


def test_load_test_pairs_reads_the_flores_files(data_dir: Path) -> None:
    pairs = load_test_pairs(data_dir / "parallel", ["en", "hi", "or", "mine"])
    assert list(pairs) == ["hi", "or"]
    assert len(pairs["hi"]) == len(pairs["or"]) == 500
    assert [pair.english for pair in pairs["hi"]] == [pair.english for pair in pairs["or"]]  # multi-way


@pytest.fixture(scope="module")
def real_report(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`fedem tokenizer train` on all shipped data at the default settings (~10 s: three trainings)."""
    out = tmp_path_factory.mktemp("tokenizer-16k")
    summary = train_tokenizer(data_dir / "mono", out, vocab_size=16000)
    report: dict[str, Any] = json.loads((out / "fertility.json").read_text(encoding="utf-8"))
    return {"summary": summary, **report["tokenizers"]}


def test_fairness_target_is_met_at_16k(real_report: dict[str, Any]) -> None:
    ours = real_report["seshu"]
    assert sorted(ours["languages"]) == sorted(INDIC + ["en"])
    assert ours["max_min_tokens_per_char"] <= FAIRNESS_TARGET
    assert real_report["summary"]["target_met"] is True


def test_ours_beats_the_english_only_bpe_on_the_worst_premium(real_report: dict[str, Any]) -> None:
    assert real_report["seshu"]["worst_premium"] < real_report["english-only"]["worst_premium"]
    assert real_report["seshu"]["worst_premium"] < 1.5


def test_keeping_marks_with_letters_beats_the_gpt2_regex(real_report: dict[str, Any]) -> None:
    ours, gpt2 = real_report["seshu"]["languages"], real_report["gpt2-regex"]["languages"]
    for lang in INDIC:
        assert ours[lang]["tokens_per_char"] < gpt2[lang]["tokens_per_char"], lang
    assert (
        real_report["seshu"]["max_min_tokens_per_char"] < real_report["gpt2-regex"]["max_min_tokens_per_char"]
    )


def test_bytes_baseline_counts_utf8_bytes(real_report: dict[str, Any]) -> None:
    rows = real_report["bytes"]["languages"]
    assert rows["en"]["tokens_per_char"] == pytest.approx(1.0, abs=0.01)
    assert all(2.4 < rows[lang]["tokens_per_char"] < 3.0 for lang in INDIC)  # mostly 3-byte code points
