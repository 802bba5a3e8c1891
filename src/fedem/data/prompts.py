"""The prompt template for translation fine-tuning and evaluation.

One template, used both to train adapters and to score them, so that what an adapter learns is what
evaluation asks of it. A prompt names the source language, gives the sentence, and names the target
language; the model continues with a space, the translation and the end-of-sequence token::

    English: Where is the station?
    Hindi: स्टेशन कहाँ है?</s>

The loss is taken on the response (" स्टेशन कहाँ है?</s>") only, never on the prompt.
"""

from typing import Literal

from fedem.data.corpus import Pair
from fedem.languages import language

Direction = Literal["en-xx", "xx-en", "both"]

TEMPLATE = "{src_name}: {source}\n{tgt_name}:"


def translation_prompt(source: str, src_lang: str, tgt_lang: str) -> str:
    """The prompt asking to translate `source` from `src_lang` into `tgt_lang`."""
    return TEMPLATE.format(src_name=language(src_lang).name, source=source, tgt_name=language(tgt_lang).name)


def translation_examples(pair: Pair, direction: Direction) -> list[tuple[str, str]]:
    """(prompt, response) examples for one pair; the response starts with the space after ':'."""
    forward = (translation_prompt(pair.english, "en", pair.lang), " " + pair.other)
    backward = (translation_prompt(pair.other, pair.lang, "en"), " " + pair.english)
    if direction == "en-xx":
        return [forward]
    if direction == "xx-en":
        return [backward]
    return [forward, backward]
