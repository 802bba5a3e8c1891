"""Language balancing by temperature sampling (as in XLM-R and mT5).

With n_l characters of text in language l, language l is sampled with probability
p_l ∝ n_l^(1/T). T = 1 keeps the natural proportions (English and Marathi dominate our corpus);
larger T flattens them so Odia and Assamese, with ~0.2 MB each, are not drowned out. Balancing
repeats the lines of small languages and subsamples large ones; it never invents text.
"""

import random

from fedem.data.corpus import Corpus


def temperature_weights(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    """Sampling probability per language: p_l ∝ size_l^(1/T), summing to 1."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    scaled = {lang: size ** (1.0 / temperature) for lang, size in sizes.items() if size > 0}
    total = sum(scaled.values())
    return {lang: value / total for lang, value in scaled.items()}


def balance(corpus: Corpus, temperature: float, seed: int = 0, budget: int | None = None) -> Corpus:
    """Resample each language to its temperature share of a character budget.

    Args:
        corpus: lines per language.
        temperature: T in p_l ∝ n_l^(1/T); 1.0 returns the corpus unchanged in size.
        seed: makes the shuffle and the repeats reproducible.
        budget: total characters to draw; defaults to the corpus size (one balanced "epoch").

    Returns:
        lines per language whose character counts follow the temperature weights; each language's
        lines are shuffled and cycled, so a line is repeated only after every line was used.
    """
    sizes = {lang: sum(map(len, lines)) for lang, lines in corpus.items()}
    weights = temperature_weights(sizes, temperature)
    total = budget if budget is not None else sum(sizes.values())
    rng = random.Random(seed)
    balanced: Corpus = {}
    for lang, lines in corpus.items():
        if lang not in weights:
            continue
        target = weights[lang] * total
        order = list(lines)
        drawn: list[str] = []
        chars = 0
        while chars < target:
            rng.shuffle(order)
            for line in order:
                drawn.append(line)
                chars += len(line)
                if chars >= target:
                    break
        balanced[lang] = drawn
    return balanced
