"""Tokenizer fairness: how many tokens each language pays for the same text.

Why measure it: a tokenizer that needs twice as many tokens for Odia as for English gives Odia half
the context window, doubles its generation cost and shows the model half as much Odia per training
step (Petrov et al. 2023, "Language model tokenizers introduce unfairness between languages").
Three numbers per language:

- tokens per character on held-out text (`mono/<lang>.valid.txt`): the fairness target compares
  this across languages (max/min ≤ 1.5);
- tokens per word (whitespace-separated): the usual "fertility"; it also reflects how long a
  language's words are (Malayalam and Tamil glue morphemes together), so it is context, not a target;
- premium: tokens for the FLORES-200 test sentences in a language ÷ tokens for their English side.
  The content is identical, so this is what a speaker actually pays relative to English.

The same measurements are run for comparison tokenizers (raw UTF-8 bytes, an English-only BPE, a
GPT-2-regex BPE), so every number in the report has a baseline beside it.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from fedem.data.corpus import Corpus, Pair, read_pairs, test_pairs_path
from fedem.languages import LANGUAGES
from fedem.provenance import write_json_atomic

FAIRNESS_TARGET = 1.5  # max/min tokens per character across languages
FERTILITY_JSON = "fertility.json"
FERTILITY_MD = "fertility.md"

TokenCounter = Callable[[list[str]], list[int]]
"""Tokens per line (no BOS/EOS), for a batch of lines."""

TestPairs = dict[str, list[Pair]]


def count_bytes(lines: list[str]) -> list[int]:
    """UTF-8 bytes per line: the token count of a byte-level model (MambaByte, ByT5)."""
    return [len(line.encode("utf-8")) for line in lines]


def tokenizer_counter(tokenizer: PreTrainedTokenizerFast) -> TokenCounter:
    """Count tokens with the Rust tokenizer directly (batched, no BOS), as a `TokenCounter`."""
    backend = tokenizer.backend_tokenizer

    def count(lines: list[str]) -> list[int]:
        return [len(encoding.ids) for encoding in backend.encode_batch(lines, add_special_tokens=False)]

    return count


@dataclass(frozen=True)
class LanguageFertility:
    """Token counts for one language; `premium` is None where no test pairs were measured."""

    chars: int
    words: int
    tokens: int
    premium: float | None = None

    @property
    def tokens_per_char(self) -> float:
        return self.tokens / self.chars

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / max(self.words, 1)


Measure = Callable[[LanguageFertility], float | None]


@dataclass(frozen=True)
class FertilityTable:
    """One tokenizer's measurements over every language, and the headline numbers derived from them."""

    name: str
    vocab_size: int
    languages: dict[str, LanguageFertility]

    def extremes(self) -> tuple[str, str]:
        """The languages with the most and the fewest tokens per character."""
        by_cost = sorted(self.languages, key=lambda lang: self.languages[lang].tokens_per_char)
        return by_cost[-1], by_cost[0]

    def max_min_ratio(self) -> float:
        """max/min tokens per character across languages: 1.0 is perfectly even."""
        highest, lowest = self.extremes()
        return self.languages[highest].tokens_per_char / self.languages[lowest].tokens_per_char

    def worst_premium(self) -> tuple[str, float] | None:
        """The language that pays the most relative to English, or None without test pairs."""
        premiums = {lang: row.premium for lang, row in self.languages.items() if row.premium is not None}
        if not premiums:
            return None
        lang = max(premiums, key=lambda code: premiums[code])
        return lang, premiums[lang]


def load_test_pairs(folder: Path, languages: Iterable[str]) -> TestPairs:
    """The held-out `en-<lang>.test.tsv` pairs for each language that has a file in `folder`."""
    found: TestPairs = {}
    for lang in languages:
        if lang == "en" or lang not in LANGUAGES:
            continue
        path = test_pairs_path(folder, lang)
        if path.is_file():
            found[lang] = read_pairs(path, lang)
    return found


def premium(count: TokenCounter, pairs: list[Pair]) -> float:
    """Total tokens of the non-English sides ÷ total tokens of the English sides.

    A ratio of totals rather than a mean of per-sentence ratios, so one very short sentence cannot
    dominate (the definition of Petrov et al. 2023).
    """
    english = sum(count([pair.english for pair in pairs]))
    other = sum(count([pair.other for pair in pairs]))
    return other / english


def measure_language(count: TokenCounter, lines: list[str], pairs: list[Pair] | None) -> LanguageFertility:
    """Characters, words and tokens of `lines`, plus the premium on `pairs` when given."""
    return LanguageFertility(
        chars=sum(map(len, lines)),
        words=sum(len(line.split()) for line in lines),
        tokens=sum(count(lines)),
        premium=premium(count, pairs) if pairs else None,
    )


def fertility_table(
    name: str, vocab_size: int, count: TokenCounter, text: Corpus, pairs: TestPairs
) -> FertilityTable:
    """Measure one tokenizer on every language of `text` (languages without text are skipped).

    English's premium is 1.0 by definition whenever any test pairs are measured.
    """
    rows: dict[str, LanguageFertility] = {}
    for lang, lines in text.items():
        if not any(lines):
            continue
        row = measure_language(count, lines, pairs.get(lang))
        if lang == "en" and pairs:
            row = LanguageFertility(row.chars, row.words, row.tokens, premium=1.0)
        rows[lang] = row
    return FertilityTable(name, vocab_size, rows)


def table_json(table: FertilityTable) -> dict[str, Any]:
    """A JSON-able form of one table, headline numbers first."""
    highest, lowest = table.extremes()
    worst = table.worst_premium()
    return {
        "vocab_size": table.vocab_size,
        "max_min_tokens_per_char": round(table.max_min_ratio(), 4),
        "most_tokens_per_char": highest,
        "fewest_tokens_per_char": lowest,
        "worst_premium": round(worst[1], 4) if worst else None,
        "worst_premium_language": worst[0] if worst else None,
        "languages": {
            lang: {
                "chars": row.chars,
                "words": row.words,
                "tokens": row.tokens,
                "tokens_per_char": round(row.tokens_per_char, 4),
                "tokens_per_word": round(row.tokens_per_word, 4),
                "premium": round(row.premium, 4) if row.premium is not None else None,
            }
            for lang, row in table.languages.items()
        },
    }


def report_json(tables: list[FertilityTable], sources: dict[str, str]) -> dict[str, Any]:
    """The whole report: where the text came from, the target, and one entry per tokenizer."""
    return {
        "target_max_min_tokens_per_char": FAIRNESS_TARGET,
        "sources": sources,
        "tokenizers": {table.name: table_json(table) for table in tables},
    }


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table padded so it also reads well in a terminal; column 1 left, the rest right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        first, *rest = cells
        padded = [first.ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join([":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
    return [line(header), rule, *(line(row) for row in rows)]


def _number(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "–"


def _summary_rows(tables: list[FertilityTable]) -> list[list[str]]:
    rows = []
    for table in tables:
        highest, lowest = table.extremes()
        worst = table.worst_premium()
        rows.append(
            [
                table.name,
                str(table.vocab_size),
                f"{table.max_min_ratio():.2f}",
                f"{highest} / {lowest}",
                f"{worst[1]:.2f} ({worst[0]})" if worst else "–",
            ]
        )
    return rows


def _per_language(tables: list[FertilityTable], value: Measure) -> list[list[str]]:
    languages = list(dict.fromkeys(lang for table in tables for lang in table.languages))
    return [
        [lang]
        + [_number(value(table.languages[lang])) if lang in table.languages else "–" for table in tables]
        for lang in languages
    ]


def render_markdown(tables: list[FertilityTable], sources: dict[str, str]) -> str:
    """The report as Markdown: a summary table, then one table per measure with a column per tokenizer."""
    names = [table.name for table in tables]
    summary_header = ["tokenizer", "vocab", "max/min tokens/char", "most / fewest", "worst premium"]
    lines = ["# Tokenizer fertility", ""]
    lines += [f"- {key}: {value}" for key, value in sources.items()]
    lines += [f"- target: max/min tokens per character ≤ {FAIRNESS_TARGET}", ""]
    lines += _markdown_table(summary_header, _summary_rows(tables))
    measures: list[tuple[str, Measure]] = [
        ("Tokens per character (held-out text)", lambda row: row.tokens_per_char),
        ("Tokens per word (held-out text)", lambda row: row.tokens_per_word),
        ("Premium: tokens ÷ tokens of the English side (FLORES-200 test pairs)", lambda row: row.premium),
    ]
    for title, value in measures:
        lines += ["", f"## {title}", ""]
        lines += _markdown_table(["lang", *names], _per_language(tables, value))
    return "\n".join(lines) + "\n"


def write_fertility(out: Path, tables: list[FertilityTable], sources: dict[str, str]) -> tuple[Path, Path]:
    """Write `fertility.json` and `fertility.md` into `out`; returns their paths."""
    json_path, md_path = out / FERTILITY_JSON, out / FERTILITY_MD
    write_json_atomic(json_path, report_json(tables, sources))
    md_path.write_text(render_markdown(tables, sources), encoding="utf-8")
    return json_path, md_path
