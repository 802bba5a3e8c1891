"""The maturity plot: held-out bits-per-byte per language against release number, as SVG.

Drawn with matplotlib's object API (`Figure`, not pyplot), which keeps no global state, so request
threads can draw at once. SVG scales to any screen, a phone's included, and stays sharp.
"""

import io
from functools import lru_cache

from matplotlib.figure import Figure

from fedem.hub.dashboard.views import ReleaseView


def maturity_svg(repo: str, releases: list[ReleaseView]) -> str:
    """One line per language over the releases that have a score; an empty plot says so."""
    points = tuple((r.number, tuple(sorted(r.bpb.items()))) for r in releases if r.bpb)
    return _draw(repo, points)


@lru_cache(maxsize=32)  # the same releases draw the same picture; a new score is a new key
def _draw(repo: str, points: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]) -> str:
    figure = Figure(figsize=(6, 3.4), layout="constrained")  # large type: it shrinks on a phone
    axis = figure.add_subplot()
    languages = sorted({lang for _, scores in points for lang, _ in scores})
    for lang in languages:
        series = [(number, dict(scores)[lang]) for number, scores in points if lang in dict(scores)]
        axis.plot(*zip(*series, strict=True), marker="o", label=lang)
    axis.set(xlabel="release", ylabel="bits per byte (lower is better)", title=f"{repo}: held-out text")
    if points:
        axis.set_xticks([number for number, _ in points], [f"v{number}" for number, _ in points])
        axis.legend(ncol=min(len(languages), 6), fontsize=11)
    else:
        axis.text(0.5, 0.5, "no release scored yet", ha="center", va="center", transform=axis.transAxes)
    axis.grid(alpha=0.3)
    axis.tick_params(labelsize=11)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    return buffer.getvalue()
