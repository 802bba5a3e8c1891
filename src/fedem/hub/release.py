"""Publishing base releases: merge the accepted adapter heads into the base (`fedem hub release`),
or continue pretraining it (`fedem hub cpt`), and push the result as base release vN+1.

This runs on a maintainer's machine, against the hub's API, with the same building blocks every
user has: `HubClient.pull`, `fedem.merge.merge`, `fedem.train.pretrain.pretrain`,
`fedem.evaluate.evaluate`, `HubClient.push`. Adapters are pinned to the base release they were
trained on: only heads trained on the current release are merged (ΔW is only meaningful on the
weights it was learned against); the others are listed as skipped and keep relaying on the new
base (see docs/federation.md).

Evaluation data is the hub's held-out folder in `data/` layout (`mono/<lang>.valid.txt`,
`parallel/en-<lang>.test.tsv`), so the model card compares vN+1 with vN on text no donor has.
"""

import logging
import shutil
from pathlib import Path
from typing import Any

from fedem.client.hub_client import HubClient
from fedem.config import validate
from fedem.evaluate import evaluate
from fedem.merge import merge
from fedem.train.config import PretrainConfig
from fedem.train.pretrain import pretrain

log = logging.getLogger(__name__)

MAX_LINES = 64
MAX_PAIRS = 16


def _accepted_heads(
    client: HubClient, base_repo: str, base_tag: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Newest accepted version of each adapter on `base_repo`; those pinned to another release are skipped."""
    heads, skipped = [], []
    for repo in client.repos():
        if repo["kind"] != "adapter" or repo["base_repo"] != base_repo or repo["head"] is None:
            continue
        head = next(r for r in client.log(repo["name"]) if r["tag"] == repo["head"])
        if head["base"] == f"{base_repo}@{base_tag}":
            heads.append(head)
        else:
            skipped.append(f"{repo['name']}@{head['tag']} (trained on {head['base']})")
    return heads, skipped


def _credits(client: HubClient, heads: list[dict[str, Any]], base: str) -> list[str]:
    """Everyone whose accepted version on `base` went into a merged head — in a relay that is every
    donor since the last release, not only the one who pushed the head."""
    names = set()
    for head in heads:
        newest = int(head["tag"][1:])
        for version in client.log(head["repo"]):
            if (
                version["status"] == "accepted"
                and version["base"] == base
                and int(version["tag"][1:]) <= newest
            ):
                names.add(version["contributor"])
    return sorted(names)


def _score(model_dir: Path, eval_data: Path | None, out: Path) -> dict[str, Any] | None:
    if eval_data is None:
        return None
    pairs = eval_data / "parallel"
    return evaluate(
        model_dir,
        out,
        mono=eval_data / "mono",
        pairs=pairs if pairs.is_dir() else None,
        max_lines=MAX_LINES,
        max_pairs=MAX_PAIRS,
    )


def _table(before: dict[str, Any] | None, after: dict[str, Any] | None, old: str, new: str) -> list[str]:
    """Markdown rows: bits-per-byte per language and chrF per direction, old release against new."""
    if before is None or after is None:
        return ["(no evaluation data given)"]
    rows = [f"| metric | {old} | {new} |", "|---|---|---|"]
    for lang, scores in after["language_modelling"].items():
        rows.append(f"| bpb {lang} | {before['language_modelling'][lang]['bpb']:.4f} | {scores['bpb']:.4f} |")
    for pair, scores in after.get("translation", {}).items():
        rows.append(f"| chrF {pair} | {before['translation'][pair]['chrf']:.2f} | {scores['chrf']:.2f} |")
    return rows


def _card(title: str, lines: list[str], table: list[str]) -> str:
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [seshu, mamba2, fedem]",
            "---",
            "",
            f"# {title}",
            "",
            *lines,
            "",
            "## Evaluation against the previous release",
            "",
            *table,
            "",
        ]
    )


def release_metrics(results: dict[str, Any] | None) -> dict[str, Any]:
    """What a release records of its evaluation: the summary, bits-per-byte per language and chrF per
    direction — the dashboard's maturity plot reads `bpb` (docs/dashboard.md)."""
    if results is None:
        return {}
    return {
        "summary": results["summary"],
        "bpb": {lang: s["bpb"] for lang, s in results.get("language_modelling", {}).items()},
        "chrf": {pair: s["chrf"] for pair, s in results.get("translation", {}).items()},
    }


def _publish(
    client: HubClient, base_repo: str, folder: Path, card: str, description: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    (folder / "README.md").write_text(card, encoding="utf-8")
    transfer = client.push(base_repo, folder, description=description, metrics=metrics)
    return {"release": f"{base_repo}@{transfer.revision['tag']}", "commit": transfer.revision["commit"]}


def release(
    client: HubClient,
    base_repo: str,
    workdir: Path,
    method: str = "ties",
    density: float | None = 0.5,
    eval_data: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Merge every accepted adapter head trained on the current release into it; publish vN+1."""
    current = client.revision(base_repo, "main")
    heads, skipped = _accepted_heads(client, base_repo, current["tag"])
    if not heads:
        return {
            "release": None,
            "reason": "no accepted adapter trained on the current release",
            "skipped": skipped,
        }
    base_dir = workdir / "base" / current["commit"]
    client.pull(base_repo, current["commit"], base_dir)
    adapter_dirs = []
    for head in heads:
        folder = workdir / "adapters" / head["commit"]
        client.pull(head["repo"], head["commit"], folder)
        adapter_dirs.append(folder)
    merged = workdir / f"release-{current['commit'][:12]}-{method}"
    uses_density = method in ("ties", "dare_linear", "dare_ties")
    merge(base_dir, adapter_dirs, method, merged, density=density if uses_density else None, seed=seed)
    before = _score(base_dir, eval_data, workdir / "eval-before")
    after = _score(merged, eval_data, workdir / "eval-after")
    credits = _credits(client, heads, f"{base_repo}@{current['tag']}")
    lines = [
        f"Base release after `{base_repo}@{current['tag']}`, merging {len(heads)} accepted adapter(s) "
        f"with `{method}`" + (f" (density {density})." if uses_density else "."),
        "",
        *(f"- `{h['repo']}@{h['tag']}` by {h['contributor']} — {h['description']}" for h in heads),
        "",
        f"Contributors credited: {', '.join(credits)}.",
        *([f"Skipped (pinned to another release): {', '.join(skipped)}."] if skipped else []),
    ]
    card = _card(f"{base_repo} — merged release", lines, _table(before, after, current["tag"], "new"))
    published = _publish(
        client, base_repo, merged, card, f"merge of {len(heads)} adapters ({method})", release_metrics(after)
    )
    return {
        **published,
        "merged": [f"{h['repo']}@{h['tag']}" for h in heads],
        "skipped": skipped,
        "credits": credits,
        "before": before and before["summary"],
        "after": after and after["summary"],
    }


def continue_pretraining(
    client: HubClient,
    base_repo: str,
    data: Path,
    workdir: Path,
    max_steps: int,
    eval_data: Path | None = None,
) -> dict[str, Any]:
    """Continue pretraining the current release on `data` and publish it as vN+1."""
    current = client.revision(base_repo, "main")
    base_dir = workdir / "base" / current["commit"]
    client.pull(base_repo, current["commit"], base_dir)
    out = workdir / f"cpt-{current['commit'][:12]}"
    cfg = validate(
        PretrainConfig,
        {
            "init_from": str(base_dir),
            "data": {"mono": str(data)},
            "out": str(out),
            "train": {
                "max_steps": max_steps,
                "save_every": max_steps,
                "eval_every": max_steps,
                "warmup_steps": 0,
            },
        },
    )
    trained = pretrain(cfg)
    for checkpoint in out.glob("checkpoint-*"):  # optimizer state stays local; the release is the model
        shutil.rmtree(checkpoint)
    before = _score(base_dir, eval_data, workdir / "eval-before")
    after = _score(out, eval_data, workdir / "eval-after")
    lines = [
        f"`{base_repo}@{current['tag']}` continued pretraining for {trained['steps']} steps on `{data.name}`."
    ]
    card = _card(f"{base_repo} — continued pretraining", lines, _table(before, after, current["tag"], "new"))
    published = _publish(
        client,
        base_repo,
        out,
        card,
        f"continued pretraining on {data.name}",
        release_metrics(after),
    )
    return {
        **published,
        "steps": trained["steps"],
        "before": before and before["summary"],
        "after": after and after["summary"],
    }
