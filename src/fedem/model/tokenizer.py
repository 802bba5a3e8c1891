"""Seshu's multilingual tokenizer: character-level BPE with byte fallback.

`train_tokenizer` is `fedem tokenizer train`: balance, train, save, and report fertility against
baselines. Why this shape (measured numbers in docs/tokenizer.md):
- Pre-tokenization keeps Unicode combining marks with their letters (`[\\p{L}\\p{M}]+`). The GPT-2
  regex (`?\\p{L}+`) cuts an Indic word at every vowel sign and virama, since those are `\\p{M}`, so
  merges can never form whole syllables — that one regex costs Indic text about 2× in tokens.
- BPE starts from characters, not bytes: an Indic character is 3 UTF-8 bytes, and a byte-level BPE
  spends thousands of merges just rebuilding characters. Byte fallback (`<0x00>`…`<0xFF>` in the
  vocabulary) means no character is ever unknown; it decodes back to the exact text.
- Languages are balanced by temperature sampling before training (`fedem.data.balance`).
- The tokenizer's normaliser is NFC only, which keeps conjuncts and vowel signs intact; callers clean
  text with `fedem.data.normalise` first.

Every encoding starts with BOS (`<s>`); training documents end with EOS (`</s>`).
"""

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fedem.data.balance import balance
from fedem.data.corpus import Corpus, load_mono, read_lines
from fedem.errors import UserError
from fedem.model.fertility import (
    FAIRNESS_TARGET,
    FertilityTable,
    TestPairs,
    count_bytes,
    fertility_table,
    load_test_pairs,
    table_json,
    tokenizer_counter,
    write_fertility,
)
from fedem.provenance import write_provenance

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]

# One pre-token per run of letters+marks, digits, other symbols, or whitespace; a single leading
# space stays attached to the word it precedes (as in GPT-2), so spacing round-trips exactly.
PRETOKEN_PATTERN = r" ?[\p{L}\p{M}]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+|\s+"

# GPT-2's pre-tokenizer regex, for comparison only: `\p{L}+` leaves out the marks (\p{M}), so vowel
# signs and viramas fall into the symbol branch and every Indic word is cut at each of them.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

RESERVED_TOKENS = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)


def _pipeline(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def train_bpe(corpus: Corpus, vocab_size: int, pattern: str = PRETOKEN_PATTERN) -> PreTrainedTokenizerFast:
    """Train a byte-fallback BPE of `vocab_size` tokens (specials and byte tokens included).

    Args:
        corpus: lines per language, already balanced as the caller wants.
        vocab_size: final vocabulary size; must leave room beyond the 260 special and byte tokens.
        pattern: the pre-tokenizer regex (the default keeps marks with letters; tests and the
            fairness report pass the GPT-2 style pattern for comparison).
    """
    if vocab_size <= RESERVED_TOKENS:
        raise ValueError(f"vocab_size must exceed {RESERVED_TOKENS} (special + byte tokens)")
    draft = _pipeline(models.BPE(unk_token=UNK))
    draft.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    draft.train_from_iterator((line for lines in corpus.values() for line in lines), trainer=trainer)

    # Rebuild with the byte tokens as ordinary vocabulary right after the specials (ids 4–259, as in
    # Llama's tokenizer), so `skip_special_tokens` never drops a byte a character decodes from.
    learned = sorted(draft.get_vocab().items(), key=lambda item: item[1])
    ordered = SPECIAL_TOKENS + BYTE_TOKENS + [tok for tok, _ in learned if tok not in SPECIAL_TOKENS]
    vocab = {token: index for index, token in enumerate(ordered)}
    merges = _merges(draft)
    tokenizer = _pipeline(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = vocab[BOS]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def _merges(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The merge list of a trained BPE.

    `models.BPE` has no getter for its merges, so read them back from the serialised tokenizer: pairs
    since tokenizers 0.20, "left right" strings before.
    """
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [(m[0], m[1]) if isinstance(m, list) else _split_merge(m) for m in merges]


def _split_merge(merge: str) -> tuple[str, str]:
    left, right = merge.split(" ", 1)
    return left, right


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """Save in the HF layout that `AutoTokenizer.from_pretrained(out)` loads."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def train_tokenizer(
    data: Path,
    out: Path,
    vocab_size: int = 16000,
    temperature: float = 3.0,
    languages: list[str] | None = None,
    pairs: Path | None = None,
    seed: int = 0,
    compare: bool = True,
) -> dict[str, Any]:
    """`fedem tokenizer train`: train on temperature-balanced text, save, and report fertility.

    Args:
        data: a `data/mono`-style folder of `<lang>.txt` (fertility is measured on the held-out
            `<lang>.valid.txt` beside them, or on the training text where there is none), or one file.
        out: folder for the tokenizer (what `AutoTokenizer.from_pretrained` loads), `fertility.json`,
            `fertility.md` and the provenance `fedem.json`.
        vocab_size: final vocabulary size, the 260 special and byte tokens included.
        temperature: T in p_l ∝ n_l^(1/T); 1 keeps the natural proportions, larger T lifts small languages.
        languages: restrict to these codes; default every known language found in `data`.
        pairs: folder holding `en-<lang>.test.tsv` for the premium; default the `parallel` folder
            beside `data`. Without test pairs the premium is left out.
        seed: seed of the balancing resample.
        compare: also measure raw bytes, an English-only BPE and a GPT-2-regex BPE (two more trainings).

    Returns:
        A JSON-able summary: the files written, the trained vocabulary size, max/min tokens per
        character against the target, the worst premium, and the same headline numbers per baseline.
    """
    _check_arguments(vocab_size, temperature, out)
    corpus = load_mono(data, languages=languages)
    pairs_dir = _pairs_folder(data, pairs)
    balanced = balance(corpus, temperature, seed=seed)
    log.info("training a %d-token BPE on %s (temperature %g)", vocab_size, ", ".join(balanced), temperature)
    tokenizer = train_bpe(balanced, vocab_size)
    save_tokenizer(tokenizer, out)

    text, text_source = _held_out(data, corpus)
    test_pairs = load_test_pairs(pairs_dir, corpus) if pairs_dir else {}
    tables = [_bpe_table("seshu", tokenizer, text, test_pairs)]
    if compare:
        tables += _baseline_tables(corpus, balanced, vocab_size, text, test_pairs)
    sources = {"text": text_source, "premium pairs": _pairs_source(pairs_dir, test_pairs)}
    fertility_json, fertility_md = write_fertility(out, tables, sources)

    config = {
        "data": str(data),
        "out": str(out),
        "vocab_size": vocab_size,
        "temperature": temperature,
        "languages": list(corpus),
        "pairs": str(pairs_dir) if pairs_dir else None,
        "seed": seed,
        "compare": compare,
    }
    provenance = write_provenance(out, "tokenizer train", config, trained_vocab_size=len(tokenizer))
    files = {
        "tokenizer": out / "tokenizer.json",
        "fertility_json": fertility_json,
        "fertility_md": fertility_md,
        "provenance": provenance,
    }
    return _summary(out, files, tables)


def _check_arguments(vocab_size: int, temperature: float, out: Path) -> None:
    if vocab_size <= RESERVED_TOKENS:
        raise UserError(
            f"vocab size {vocab_size} is too small: the {RESERVED_TOKENS} special and byte tokens come "
            f"first, so ask for more than {RESERVED_TOKENS} (16000 is the default)"
        )
    if temperature <= 0:
        raise UserError(f"temperature must be positive (got {temperature})")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder")


def _pairs_folder(data: Path, pairs: Path | None) -> Path | None:
    """The folder of test pairs: the one given, else `parallel/` beside the mono folder if it exists."""
    if pairs is not None:
        if not pairs.is_dir():
            raise UserError(f"no such pairs folder: {pairs}")
        return pairs
    beside = (data if data.is_dir() else data.parent).parent / "parallel"
    return beside if beside.is_dir() else None


def _held_out(data: Path, corpus: Corpus) -> tuple[Corpus, str]:
    """Text to measure on: `<lang>.valid.txt` beside the training text, else the training text itself."""
    folder = data if data.is_dir() else data.parent
    text: Corpus = {}
    unheld: list[str] = []
    for lang, lines in corpus.items():
        path = folder / f"{lang}.valid.txt"
        valid = read_lines(path) if path.is_file() and path.resolve() != data.resolve() else []
        text[lang] = valid or lines
        if not valid:
            unheld.append(lang)
    source = f"held-out {folder}/<lang>.valid.txt"
    if unheld:
        log.warning("no held-out text for %s: measuring fertility on training text", ", ".join(unheld))
        source += f" (training text for {', '.join(unheld)})"
    return text, source


def _pairs_source(pairs_dir: Path | None, test_pairs: TestPairs) -> str:
    if not test_pairs:
        log.info("no en-<lang>.test.tsv pairs found: the report has no premium")
        return "none (premium not measured)"
    return f"{pairs_dir}/en-<lang>.test.tsv ({', '.join(test_pairs)})"


def _baseline_tables(
    corpus: Corpus, balanced: Corpus, vocab_size: int, text: Corpus, test_pairs: TestPairs
) -> list[FertilityTable]:
    """Raw UTF-8 bytes, an English-only BPE and a GPT-2-regex BPE, measured on the same text."""
    log.info("training the comparison BPEs (English-only, GPT-2 regex)")
    tables = [fertility_table("bytes", 256, count_bytes, text, test_pairs)]
    if "en" in corpus:
        english = train_bpe({"en": corpus["en"]}, vocab_size)
        tables.append(_bpe_table("english-only", english, text, test_pairs))
    else:
        log.warning("no English text: the English-only baseline is left out")
    gpt2 = train_bpe(balanced, vocab_size, pattern=GPT2_PATTERN)
    tables.append(_bpe_table("gpt2-regex", gpt2, text, test_pairs))
    return tables


def _bpe_table(
    name: str, tokenizer: PreTrainedTokenizerFast, text: Corpus, test_pairs: TestPairs
) -> FertilityTable:
    return fertility_table(name, len(tokenizer), tokenizer_counter(tokenizer), text, test_pairs)


def _headline(table: FertilityTable) -> dict[str, Any]:
    return {key: value for key, value in table_json(table).items() if key != "languages"}


def _summary(out: Path, files: dict[str, Path], tables: list[FertilityTable]) -> dict[str, Any]:
    """Headline numbers of our tokenizer and the baselines (per-language rows stay in fertility.json)."""
    ours, *baselines = tables
    return {
        "out": str(out),
        "files": {name: str(path) for name, path in files.items()},
        "languages": list(ours.languages),
        **_headline(ours),
        "target_max_min_tokens_per_char": FAIRNESS_TARGET,
        "target_met": ours.max_min_ratio() <= FAIRNESS_TARGET,
        "baselines": {table.name: _headline(table) for table in baselines},
    }
