"""Reading the shipped corpus: monolingual text per language and English↔Indic pairs.

Layout (see `data/README.md`)::

    mono/<lang>.txt            training text, one segment per line
    mono/<lang>.valid.txt      held-out lines, never trained on
    parallel/en-<lang>.tsv     english<TAB>indic training pairs
    parallel/en-<lang>.test.tsv  held-out pairs (FLORES-200 devtest)

A "corpus" is a mapping from a name — a language code for the shipped data, the file stem for a
user's own text file — to its normalised lines.
"""

from dataclasses import dataclass
from pathlib import Path

from fedem.data.normalise import normalise
from fedem.errors import UserError
from fedem.languages import LANGUAGES, language

Corpus = dict[str, list[str]]


@dataclass(frozen=True)
class Pair:
    """One translation pair; `lang` is the non-English side's language code."""

    english: str
    other: str
    lang: str


def read_lines(path: Path) -> list[str]:
    """Normalised, non-empty lines of a UTF-8 text file."""
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line for line in map(normalise, text.splitlines()) if line]


def _lang_of(path: Path) -> str:
    """The language code a mono file is named after: `hi.txt`, `hi.valid.txt` → `hi`."""
    return path.name.split(".", 1)[0]


def load_mono(source: Path, split: str = "train", languages: list[str] | None = None) -> Corpus:
    """Load monolingual text from a folder of `<lang>.txt` files or from one text file.

    Args:
        source: a folder laid out like `data/mono`, or a single UTF-8 text file.
        split: "train" reads `<lang>.txt`, "valid" reads the held-out `<lang>.valid.txt`.
        languages: restrict to these codes (each must exist in the folder).
    """
    if source.is_file():
        return {_lang_of(source): read_lines(source)}
    if not source.is_dir():
        raise UserError(f"no such file or folder: {source}")
    suffix = ".txt" if split == "train" else f".{split}.txt"
    found = {
        _lang_of(p): p
        for p in sorted(source.glob(f"*{suffix}"))
        if _lang_of(p) in LANGUAGES and p.name == _lang_of(p) + suffix
    }
    wanted = languages if languages is not None else list(found)
    corpus: Corpus = {}
    for code in wanted:
        language(code)
        if code not in found:
            raise UserError(f"no {split} text for language {code!r} in {source} (expected {code}{suffix})")
        corpus[code] = read_lines(found[code])
    if not corpus:
        raise UserError(f"no <lang>{suffix} files for known languages in {source}")
    return corpus


def pair_language(path: Path) -> str:
    """The non-English language of `en-<lang>.tsv` / `en-<lang>.test.tsv`."""
    stem = path.name.split(".", 1)[0]
    if not stem.startswith("en-"):
        raise UserError(f"cannot tell the language of {path.name}: name pair files en-<lang>.tsv")
    return language(stem[3:]).code


def read_pairs(path: Path, lang: str | None = None) -> list[Pair]:
    """English<TAB>other pairs from a TSV file; a malformed line is an error naming its line number."""
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    code = lang or pair_language(path)
    pairs = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        fields = raw.split("\t")
        english, other = (normalise(f) for f in fields) if len(fields) == 2 else ("", "")
        if not english or not other:
            raise UserError(f"{path}:{number}: expected 'english<TAB>{code}' with both sides non-empty")
        pairs.append(Pair(english, other, code))
    if not pairs:
        raise UserError(f"{path} holds no pairs")
    return pairs


def test_pairs_path(folder: Path, lang: str) -> Path:
    """Where the held-out pairs for `lang` live in a `data/parallel`-style folder."""
    return folder / f"en-{language(lang).code}.test.tsv"
