"""Seshu's multilingual tokenizer: character-level BPE with byte fallback.

Why this shape (numbers in docs/design.md):
- Pre-tokenization keeps Unicode combining marks with their letters (`[\\p{L}\\p{M}]+`). The GPT-2
  regex (`?\\p{L}+`) cuts an Indic word at every vowel sign and virama, since those are `\\p{M}`, so
  merges can never form whole syllables — that one regex costs Indic text about 2× in tokens.
- BPE starts from characters, not bytes: an Indic character is 3 UTF-8 bytes, and a byte-level BPE
  spends thousands of merges just rebuilding characters. Byte fallback (`<0x00>`…`<0xFF>` in the
  vocabulary) means no character is ever unknown; it decodes back to the exact text.
- Languages are balanced by temperature sampling before training (`fedem.data.balance`).
- The normaliser is NFC only (`fedem.data.normalise`), which keeps conjuncts and vowel signs intact.

Every encoding starts with BOS (`<s>`); training documents end with EOS (`</s>`).
"""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fedem.data.corpus import Corpus

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]

# One pre-token per run of letters+marks, digits, other symbols, or whitespace; a single leading
# space stays attached to the word it precedes (as in GPT-2), so spacing round-trips exactly.
PRETOKEN_PATTERN = r" ?[\p{L}\p{M}]+| ?\p{N}+| ?[^\s\p{L}\p{M}\p{N}]+|\s+"


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
    reserved = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed {reserved} (special + byte tokens)")
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
    """The merge list of a trained BPE, read back from its JSON form."""
    import json

    model = json.loads(tokenizer.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """Save in the HF layout that `AutoTokenizer.from_pretrained(out)` loads."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out
