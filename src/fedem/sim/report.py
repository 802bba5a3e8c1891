"""The simulation report: `report.json`, `report.md` and per-round plots against the baselines.

Metrics are held-out bits per byte per language (`bpb/<lang>`, lower is better) and chrF per
translation direction (`chrf/en-<lang>`, higher is better), with their unweighted means. The
baselines are the base, each donor alone (the "alone" column of a metric is the mean over the donors
whose language it is, or over all donors for a language none holds, e.g. English) and centralised
LoRA on the union of the donors' data. The report states, metric by metric, how far the federation's
last head is from centralised training — the number a federation has to justify.
"""

import math
from pathlib import Path
from typing import Any

from fedem.provenance import write_json_atomic

LOWER_IS_BETTER = ("bpb/", "mean_bpb")


def lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER)


def metric_language(metric: str) -> str | None:
    """`bpb/hi` → hi, `chrf/en-hi` → hi, means → None."""
    if metric.startswith("bpb/"):
        return metric[4:]
    if metric.startswith("chrf/"):
        src, _, tgt = metric[5:].partition("-")
        return tgt if src == "en" else src
    return None


def metric_order(metrics: list[str]) -> list[str]:
    """bpb per language, mean bpb, chrF per direction, mean chrF."""

    def key(name: str) -> tuple[int, str]:
        rank = {"bpb/": 0, "mean_bpb": 1, "chrf/": 2, "mean_chrf": 3}
        return next((r for p, r in rank.items() if name.startswith(p)), 4), name

    return sorted(set(metrics), key=key)


def alone_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The "each donor alone" baseline as one number per metric (see the module docstring)."""
    alone: dict[str, dict[str, Any]] = report.get("baselines", {}).get("alone", {})
    if not alone:
        return {}
    names = {m for entry in alone.values() for m in entry["metrics"]}
    result = {}
    for metric in names:
        lang = metric_language(metric)
        having = [e for e in alone.values() if metric in e["metrics"]]
        own = [e["metrics"][metric] for e in having if e.get("lang") == lang]
        values = own or [e["metrics"][metric] for e in having]
        result[metric] = sum(values) / len(values)
    return result


def columns(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Column label → metrics: the baselines, then one column per round's head."""
    baselines = report.get("baselines", {})
    cols: dict[str, dict[str, float]] = {}
    if "base" in baselines:
        cols["base"] = baselines["base"]["metrics"]
    if baselines.get("alone"):
        cols["alone"] = alone_metrics(report)
    if "centralised" in baselines:
        cols["centralised"] = baselines["centralised"]["metrics"]
    policy = report["policy"]["name"]
    for entry in report.get("rounds", []):
        cols[f"{policy} r{entry['round']}"] = entry["metrics"]
    if report.get("release", {}).get("metrics"):
        cols["release v2"] = report["release"]["metrics"]
    return cols


def _fmt(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.4f}" if lower_is_better(metric) else f"{value:.2f}"


def gap_line(policy: str, metric: str, value: float, reference: float, against: str = "centralised") -> str:
    """One sentence: how much better or worse `value` is than `reference` on `metric`."""
    unit = "bpb" if lower_is_better(metric) else "chrF"
    where = metric.split("/", 1)[1] if "/" in metric else "the mean"
    worse_by = value - reference if lower_is_better(metric) else reference - value
    relative = f" ({100 * worse_by / abs(reference):+.2f}%)" if reference else ""
    if abs(worse_by) < 1e-12:
        return f"{policy} matches {against} on {where} ({unit} {_fmt(metric, value)})"
    word = "worse" if worse_by > 0 else "better"
    digits = 4 if unit == "bpb" else 2
    return f"{policy} is {abs(worse_by):.{digits}f} {unit} {word} than {against} on {where}{relative}"


def gaps(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per metric, the last head against centralised: value, reference, `worse_by` (> 0: federation
    loses, in the metric's unit) and its share of the reference."""
    rounds = report.get("rounds", [])
    central = report.get("baselines", {}).get("centralised", {}).get("metrics")
    if not rounds or not central:
        return []
    policy, last = report["policy"]["name"], rounds[-1]["metrics"]
    result = []
    for metric in metric_order([m for m in last if m in central]):
        value, reference = last[metric], central[metric]
        worse_by = value - reference if lower_is_better(metric) else reference - value
        result.append(
            {
                "metric": metric,
                "federated": value,
                "centralised": reference,
                "worse_by": worse_by,
                "relative": worse_by / abs(reference) if reference else None,
                "text": gap_line(policy, metric, value, reference),
            }
        )
    return result


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown (see the module docstring)."""
    cfg, policy = report["config"], report["policy"]["name"]
    lines = [
        f"# Simulated federation: {policy}",
        "",
        f"{cfg['clients']} clients, {cfg['rounds']} round(s), {cfg['steps_per_client']} steps per client "
        f"per round; policy `{report['policy']['repr']}`. Held-out data: the first "
        f"{cfg['eval']['max_lines']} lines of `<lang>.valid.txt` (bits per byte, lower is better) and "
        f"{cfg['eval']['max_pairs']} FLORES devtest pairs per language (chrF en→xx, higher is better).",
        "",
        "Baselines: **base** (no adapter); **alone**: each donor trains on its own shard for "
        f"{cfg['steps_per_client'] * cfg['rounds']} steps (a metric's column is the mean over the donors "
        "of its language, or over all donors for a language none holds); **centralised**: one LoRA on the "
        f"union of all shards for {cfg['clients'] * cfg['steps_per_client'] * cfg['rounds']} steps, the "
        "federation's total. All start from the same initial adapter and hold out the same rows.",
        "",
        gate_line(cfg),
        "",
    ]
    found = gaps(report)
    if found:
        losses = [g for g in found if g["worse_by"] > 1e-12]
        lines += ["## Federation against centralised training", ""]
        lines.append(
            f"After the last round, {policy} loses to centralised training on {len(losses)} of "
            f"{len(found)} metrics:"
        )
        lines += [""] + [f"- {g['text']}" for g in found] + [""]
    cols = columns(report)
    if cols:
        metrics = metric_order([m for values in cols.values() for m in values])
        lines += ["## Metrics per round", ""]
        lines.append("| metric | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for metric in metrics:
            cells = [_fmt(metric, values.get(metric)) for values in cols.values()]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("rounds"):
        lines += ["## Rounds", "", "| round | head | decision | contributors | note | seconds |"]
        lines.append("|---|---|---|---|---|---|")
        for entry in report["rounds"]:
            weights = entry["weights"]
            who = ", ".join(f"{c} ({weights[c]:.2f})" if c in weights else c for c in entry["contributors"])
            note = str(entry["note"]).replace("|", "\\|")
            lines.append(
                f"| {entry['round']} | {entry['head']} | {entry['decision']} | {who} | {note} | "
                f"{entry['seconds']} |"
            )
        lines.append("")
    lines += release_lines(report) + generation_lines(report)
    if report.get("shards"):
        lines += ["## Shards", "", "| client | language | pairs of the source | size |", "|---|---|---|---|"]
        for shard in report["shards"]:
            source = Path(shard["source"]).name
            cells = [shard["client"], shard["lang"], f"{source} {shard['pairs']}", str(shard["size"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("decisions"):
        lines += ["## Hub decisions", "", "| round | client | version | decision | reason |"]
        lines.append("|---|---|---|---|---|")
        for d in report["decisions"]:
            round_ = "init" if d.get("round") is None else d["round"]
            lines.append(
                f"| {round_} | {d.get('client') or 'maintainer'} | {d['repo']}@{d['version']} | "
                f"{d['decision']} | {d['reason']} |"
            )
        lines.append("")
    lines += [f"Plots: {', '.join(f'`{name}`' for name in PLOTS)}.", ""]
    return "\n".join(lines)


def gate_line(cfg: dict[str, Any]) -> str:
    """Who decided the pushed versions: the report is only as blind as its gate."""
    if cfg.get("gate") == "hub":
        return (
            f"Gate: the hub's evaluation worker decided every donor version blind (δ = "
            f"{cfg['accept_delta']}, ε = {cfg['accept_epsilon']}); a rejected version never became the "
            "head, so the next donor continued from the last accepted one."
        )
    return "Gate: none — the simulator accepted every donor version itself (`gate: accept`)."


def release_lines(report: dict[str, Any]) -> list[str]:
    """The release section: what was merged into v2, who is credited, and v1 against v2."""
    rel = report.get("release")
    if not rel:
        return []
    if not rel.get("release"):
        return ["## Release", "", f"No release: {rel.get('reason', 'nothing to merge')}.", ""]
    lines = ["## Release", "", f"`{rel['release']}`: `{rel['method']}` merge of "]
    lines[-1] += ", ".join(f"`{m}`" for m in rel["merged"]) + f"; credits: {', '.join(rel['credits'])}."
    if rel.get("skipped"):
        lines.append(f"Skipped (pinned to another release): {', '.join(rel['skipped'])}.")
    lines += [f"Model card: `{rel.get('card')}`.", ""]
    v1, v2 = rel.get("v1_metrics", {}), rel.get("metrics", {})
    if v2:
        lines += ["| metric | v1 | v2 |", "|---|---|---|"]
        for metric in metric_order(list(v2)):
            lines.append(f"| {metric} | {_fmt(metric, v1.get(metric))} | {_fmt(metric, v2[metric])} |")
        lines.append("")
    return lines


def generation_lines(report: dict[str, Any]) -> list[str]:
    gen = report.get("generation")
    if not gen:
        return []
    settings = f"greedy, repetition penalty {gen['repetition_penalty']}, ≤ {gen['max_new_tokens']} tokens"
    return [
        "## Generation",
        "",
        f"`{gen['model']}` ({settings}):",
        "",
        "```",
        gen["prompt"] + gen["text"],
        "```",
        "",
    ]


PLOTS = ("bpb.png", "chrf.png")


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per metric kind, a panel per language: the head per round, the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report.get("rounds", [])
    baselines = report.get("baselines", {})
    reference = {
        "base": baselines.get("base", {}).get("metrics", {}),
        "alone": alone_metrics(report),
        "centralised": baselines.get("centralised", {}).get("metrics", {}),
        "release v2": report.get("release", {}).get("metrics", {}),
    }
    styles = {
        "base": ("grey", ":"),
        "alone": ("tab:orange", "--"),
        "centralised": ("tab:green", "--"),
        "release v2": ("tab:purple", "-."),
    }
    written = []
    for name, prefix, label in (("bpb.png", "bpb/", "bits per byte"), ("chrf.png", "chrf/", "chrF")):
        every = [m for entry in rounds for m in entry["metrics"]] + [m for r in reference.values() for m in r]
        metrics = metric_order([m for m in every if m.startswith(prefix)])
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            xs = [e["round"] for e in rounds if metric in e["metrics"]]
            ys = [e["metrics"][metric] for e in rounds if metric in e["metrics"]]
            if xs:
                ax.plot(xs, ys, marker="o", color="tab:blue", label=report["policy"]["name"])
            for kind, values in reference.items():
                if metric in values:
                    color, style = styles[kind]
                    ax.axhline(values[metric], color=color, linestyle=style, label=kind)
            ax.set_title(metric)
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            if xs:
                ax.set_xticks(xs)
        axes[0][0].legend(fontsize="small")
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_report(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write report.json, report.md and the plots into `out`; returns the command's JSON summary."""
    out.mkdir(parents=True, exist_ok=True)
    full = {**report, "gaps": gaps(report)}
    write_json_atomic(out / "report.json", full)
    tmp = out / ".report.md.tmp"
    tmp.write_text(markdown(report), encoding="utf-8")
    tmp.replace(out / "report.md")
    plots = plot(report, out)
    rounds = report.get("rounds", [])
    return {
        "out": str(out),
        "report": str(out / "report.md"),
        "plots": [str(p) for p in plots],
        "policy": report["policy"]["name"],
        "rounds": len(rounds),
        "head": rounds[-1]["head"] if rounds else None,
        "final": rounds[-1]["metrics"] if rounds else {},
        "gaps": [g["text"] for g in full["gaps"]],
        "release": report.get("release", {}).get("release"),
        "generation": report.get("generation", {}).get("text"),
        "elapsed_s": report.get("elapsed_s"),
    }
