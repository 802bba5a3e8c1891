"""The acceptance gate for a submitted adapter version: a pure function of its evaluation scores.

`scores` is what the evaluation worker records: `{"candidate": S, "previous": S | None, "base": S}`
with each S = `{"bpb": {lang: x}, "ppl": {lang: x}, "chrf": {pair: x}, "bleu": {pair: x}}`.

- **Reference**: the adapter's previous accepted version, or the base release when there is none.
- **Task metric**: chrF (mean over the scored pairs, higher is better) when the candidate has chrF
  scores — a translation adapter — otherwise the mean bits-per-byte over the languages (lower is
  better). *Improvement* is `chrF(candidate) − chrF(reference)`, or `bpb(reference) − bpb(candidate)`.
- **Accept** when improvement ≥ δ and no language's bpb worsens by more than ε relative to the
  reference: `(bpb_cand[ℓ] − bpb_ref[ℓ]) / bpb_ref[ℓ] ≤ ε` for every ℓ. This is the greedy-soup rule —
  keep an ingredient only if it helps the target and costs no language more than ε.

Both comparisons get a 1e-9 tolerance, so a value exactly on δ or ε passes despite float rounding.
"""

import math
from collections.abc import Mapping
from typing import Any, Literal

Decision = Literal["accepted", "rejected"]
TOLERANCE = 1e-9


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


def _finite(name: str, values: Mapping[str, Any]) -> str | None:
    """The first entry that is not a finite number, described; None if all are."""
    for key, value in values.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"{name} {key} is {value!r}"
    return None


def task_metric(scores: Mapping[str, Any]) -> Literal["chrf", "bpb"]:
    """The metric that decides: chrF for a translation adapter (it has chrF scores), else bpb."""
    return "chrf" if scores["candidate"].get("chrf") else "bpb"


def decide(scores: Mapping[str, Any], delta: float, epsilon: float) -> tuple[Decision, str]:
    """Accept or reject a candidate by its scores (see the module docstring); returns the reason too.

    Raises ValueError when the scores cannot be compared (a language or pair missing on one side),
    which is the evaluator's fault, not the contributor's."""
    candidate: Mapping[str, Any] = scores["candidate"]
    previous: Mapping[str, Any] | None = scores.get("previous")
    reference: Mapping[str, Any] = previous if previous is not None else scores["base"]
    against = "the previous accepted version" if previous is not None else "the base"
    cand_bpb: Mapping[str, float] = candidate.get("bpb") or {}
    ref_bpb: Mapping[str, float] = reference.get("bpb") or {}
    if not ref_bpb:
        raise ValueError("no bits-per-byte scores to compare: the evaluation data has no mono text")
    if set(cand_bpb) != set(ref_bpb):
        raise ValueError(f"bpb scored on different languages: {sorted(cand_bpb)} vs {sorted(ref_bpb)}")
    metric = task_metric(scores)
    cand_task: Mapping[str, float] = (candidate.get("chrf") or {}) if metric == "chrf" else cand_bpb
    ref_task: Mapping[str, float] = (reference.get("chrf") or {}) if metric == "chrf" else ref_bpb
    if set(cand_task) != set(ref_task):
        raise ValueError(f"{metric} scored on different sets: {sorted(cand_task)} vs {sorted(ref_task)}")

    if _finite("bpb", ref_bpb) or min(ref_bpb.values()) <= 0:
        raise ValueError(f"the reference's bpb scores are not positive finite numbers: {dict(ref_bpb)}")
    for name, values in (("bpb", cand_bpb), (metric, cand_task)):
        broken = _finite(name, values)
        if broken:
            return "rejected", f"the candidate's {broken}: not a finite score"

    worst = max(ref_bpb, key=lambda lang: (cand_bpb[lang] - ref_bpb[lang]) / ref_bpb[lang])
    worsening = (cand_bpb[worst] - ref_bpb[worst]) / ref_bpb[worst]
    if worsening > epsilon + TOLERANCE:
        return "rejected", (
            f"bpb of {worst} worsens by {100 * worsening:.3f}% ({ref_bpb[worst]:.4f} → "
            f"{cand_bpb[worst]:.4f}) against {against}: more than ε = {100 * epsilon:g}%"
        )

    ref_value, cand_value = _mean(ref_task), _mean(cand_task)
    if metric == "chrf":
        improvement = cand_value - ref_value
        what = f"chrF ({', '.join(sorted(cand_task))})"
    else:
        improvement = ref_value - cand_value
        what = "mean bpb"
    change = f"{what} {ref_value:.4f} → {cand_value:.4f} (improvement {improvement:+.4f})"
    if improvement < delta - TOLERANCE:
        return "rejected", f"{change} against {against}: less than δ = {delta:g}"
    return "accepted", (
        f"{change} against {against}: at least δ = {delta:g}; no language's bpb worse by more than "
        f"ε = {100 * epsilon:g}% (worst: {worst} {100 * worsening:+.3f}%)"
    )
