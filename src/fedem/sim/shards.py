"""Non-IID shards: each simulated donor's own `en-<lang>.tsv`, cut deterministically from the shipped pairs.

Client i holds language `languages[i mod L]`. The clients that share a language split its file into
equal contiguous blocks and each takes the first `examples_per_client` pairs of its own block. The
files in data/parallel are ordered by source (FLORES, NTREX, TICO-19, Tatoeba), so contiguous blocks
are skewed by domain as well as by language: the non-IID-ness a real community has. Shards are
disjoint; the held-out FLORES devtest pairs (`en-<lang>.test.tsv`) are separate files and never cut.
"""

from dataclasses import dataclass
from pathlib import Path

from fedem.data.corpus import read_pairs
from fedem.errors import UserError


@dataclass(frozen=True)
class Shard:
    """One client's data: the file it trains on, its language and the lines of the source it holds."""

    client: str
    lang: str
    path: Path
    source: Path
    start: int  # first pair taken (0-based, among the source's pairs)
    size: int

    def as_dict(self) -> dict[str, object]:
        return {
            "client": self.client,
            "lang": self.lang,
            "path": str(self.path),
            "source": str(self.source),
            "pairs": f"{self.start}–{self.start + self.size - 1}",
            "size": self.size,
        }


def plan_shards(
    clients: list[str], languages: list[str], counts: dict[str, int], per_client: int
) -> list[tuple[str, str, int, int]]:
    """(client, lang, start, size) per client: disjoint contiguous blocks of each language's
    `counts[lang]` pairs, at most `per_client` pairs each. Pure (no files), for the tests."""
    sharing: dict[str, list[str]] = {}
    for index, client in enumerate(clients):
        sharing.setdefault(languages[index % len(languages)], []).append(client)
    plan = []
    for index, client in enumerate(clients):
        lang = languages[index % len(languages)]
        group = sharing[lang]
        block = counts[lang] // len(group)
        if block < 1:
            raise UserError(f"{counts[lang]} {lang} pairs cannot be split among {len(group)} clients")
        plan.append((client, lang, group.index(client) * block, min(per_client, block)))
    return plan


def write_shards(
    clients: list[str], languages: list[str], pairs_dir: Path, per_client: int, out: Path
) -> list[Shard]:
    """Write `out/<client>/en-<lang>.tsv` for every client; returns the shards in client order."""
    sources = {lang: pairs_dir / f"en-{lang}.tsv" for lang in dict.fromkeys(languages)}
    pairs = {lang: read_pairs(path, lang) for lang, path in sources.items()}
    shards = []
    for client, lang, start, size in plan_shards(
        clients, languages, {k: len(v) for k, v in pairs.items()}, per_client
    ):
        path = out / client / f"en-{lang}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"{p.english}\t{p.other}" for p in pairs[lang][start : start + size]]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        shards.append(Shard(client, lang, path, sources[lang], start, size))
    return shards
