"""Text normalisation shared by the tokenizer, training data and evaluation.

NFC (canonical composition) is the only Unicode normal form that is safe for Indic scripts: NFKC's
compatibility mappings rewrite some characters, and NFD splits nukta forms apart. Conjuncts (virama
sequences), vowel signs and ZWJ/ZWNJ — which change how a conjunct is drawn — are kept as they are.
The rest mirrors how `data/` was cleaned: control characters, BOMs and soft hyphens go, runs of
whitespace become one space.
"""

import re
import unicodedata

# Cc (controls) except TAB/LF, which the whitespace rule handles; BOM; soft hyphen.
_DROP = re.compile("[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\ufeff\u00ad]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Return `text` in NFC with control characters removed and whitespace collapsed."""
    text = unicodedata.normalize("NFC", text)
    text = _DROP.sub("", text)
    return _SPACE.sub(" ", text).strip()
