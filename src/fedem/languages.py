"""The languages Seshu is trained on: ISO 639-1 code → English name and script.

Scripts matter for tokenizer fairness (tokens per character is compared across scripts) and for
checking that a parallel pair's Indic side is in the expected script.
"""

from dataclasses import dataclass

from fedem.errors import UserError


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    script: str


LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in (
        Language("en", "English", "Latin"),
        Language("hi", "Hindi", "Devanagari"),
        Language("bn", "Bengali", "Bengali"),
        Language("ta", "Tamil", "Tamil"),
        Language("te", "Telugu", "Telugu"),
        Language("mr", "Marathi", "Devanagari"),
        Language("gu", "Gujarati", "Gujarati"),
        Language("kn", "Kannada", "Kannada"),
        Language("ml", "Malayalam", "Malayalam"),
        Language("pa", "Punjabi", "Gurmukhi"),
        Language("or", "Odia", "Oriya"),
        Language("as", "Assamese", "Bengali"),
    )
}


def language(code: str) -> Language:
    """Look up a language by code, with an error that lists the known codes."""
    try:
        return LANGUAGES[code]
    except KeyError:
        known = " ".join(LANGUAGES)
        raise UserError(f"unknown language code {code!r}; known codes: {known}") from None


def adapter_shape(name: str) -> tuple[str | None, str | None]:
    """(task, language) an adapter's name announces: `…-en-hi` is translation into Hindi, `…-hi` is
    Hindi text; (None, None) for names outside that convention."""
    parts = name.rsplit("/", 1)[-1].split("-")
    code = parts[-1] if parts[-1] in LANGUAGES else None
    if code is None:
        return None, None
    if len(parts) >= 2 and parts[-2] == "en" and code != "en":
        return "translate", code
    return "lm", code
