"""Temperature balancing: the weights formula and what resampling does to each language."""

from collections import Counter

import pytest

from fedem.data.balance import balance, temperature_weights
from fedem.data.corpus import Corpus


def _corpus() -> Corpus:
    """A big language (1,000 chars), a medium one (200) and a small one (40), lines of 10 chars."""
    return {
        "big": [f"big{i:07d}" for i in range(100)],
        "mid": [f"mid{i:07d}" for i in range(20)],
        "small": [f"sml{i:07d}" for i in range(4)],
    }


def _chars(corpus: Corpus) -> dict[str, int]:
    return {lang: sum(map(len, lines)) for lang, lines in corpus.items()}


def test_weights_follow_size_to_the_power_one_over_t() -> None:
    weights = temperature_weights({"a": 100, "b": 1}, temperature=2.0)
    assert weights == pytest.approx({"a": 10 / 11, "b": 1 / 11})
    assert sum(temperature_weights({"a": 7, "b": 3, "c": 5}, 3.0).values()) == pytest.approx(1.0)


def test_weights_drop_empty_languages_and_reject_bad_temperatures() -> None:
    assert set(temperature_weights({"a": 5, "b": 0}, 1.0)) == {"a"}
    with pytest.raises(ValueError, match="positive"):
        temperature_weights({"a": 5}, 0.0)


def test_temperature_one_keeps_every_line_once() -> None:
    corpus = _corpus()
    balanced = balance(corpus, temperature=1.0)
    for lang, lines in corpus.items():
        assert sorted(balanced[lang]) == sorted(lines)


def test_higher_temperature_flattens_the_mix() -> None:
    def spread(temperature: float) -> float:
        chars = _chars(balance(_corpus(), temperature))
        return max(chars.values()) / min(chars.values())

    spreads = [spread(t) for t in (1.0, 2.0, 5.0, 100.0)]
    assert spreads == sorted(spreads, reverse=True)
    assert spreads[0] == pytest.approx(25.0)
    assert spreads[-1] < 1.5


def test_character_counts_follow_the_weights_within_one_line() -> None:
    corpus = _corpus()
    weights = temperature_weights(_chars(corpus), 3.0)
    balanced = balance(corpus, temperature=3.0, budget=5000)
    for lang, chars in _chars(balanced).items():
        target = weights[lang] * 5000
        assert target <= chars < target + 10


def test_small_languages_are_repeated_only_after_every_line_is_used() -> None:
    corpus = _corpus()
    small = balance(corpus, temperature=5.0)["small"]
    assert len(small) > len(corpus["small"])
    assert sorted(small[:4]) == sorted(corpus["small"])
    counts = Counter(small)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_large_languages_are_subsampled_without_repeats() -> None:
    big = balance(_corpus(), temperature=5.0)["big"]
    assert len(big) < 100
    assert len(set(big)) == len(big)


def test_same_seed_same_result_other_seed_other_order() -> None:
    corpus = _corpus()
    assert balance(corpus, 3.0, seed=7) == balance(corpus, 3.0, seed=7)
    assert balance(corpus, 3.0, seed=7) != balance(corpus, 3.0, seed=8)


def test_empty_language_is_left_out() -> None:
    assert set(balance({"a": ["xyz"], "b": []}, 3.0)) == {"a"}
