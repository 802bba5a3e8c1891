"""The hub under load: simulated donors lease, pull and push small adapters for a bounded time, then
the hub's invariants are checked in its database and store.

A real hub (`fedem hub serve`: SQLite, or `--db postgresql+psycopg://…` with `--workers N`) runs in
its own process on 127.0.0.1. This process is `--donors` (200) donors, coroutines on one event loop
sharing one `httpx.AsyncClient`, each with its own token. Each round a donor:

1. **lease**: leases a random one of `--adapters` (50) adapters; a 409 (taken) is timed as
   `lease_refused` and followed by a short random wait, as a real donor would;
2. **pull**: reads the adapter's log and downloads the newest version's weights (or the base's),
   checking the sha256 the log gives;
3. **push**: uploads a fresh small LoRA adapter (config + ~4 KB of safetensors: HEAD, PUT per file)
   and publishes it under the lease (POST), which ends the lease.

Afterwards, with the hub stopped, `fedem.hub.integrity` checks: every acknowledged push present with
its files and bytes (no lost version), one version per pushed lease and revision numbers 1..N (no
duplicate), at most one live lease per adapter, and no two donors ever holding one adapter's lease at
the same time (from their own clock). p50/p99 latency per operation, throughput and the checks go to
`<out>/hub_load.json` and `.md` (with machine and version information).

    python bench/hub_load.py                                  # 200 donors, 50 adapters, 60 s
    python bench/hub_load.py --db postgresql+psycopg://u@/hubdb?host=/run/pg --workers 4
    python bench/hub_load.py --quick --out /tmp/b             # 20 donors, 3 s: a smoke run
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save
from sqlalchemy import func, select

from fedem.client import HubClient
from fedem.hub.db import Database
from fedem.hub.integrity import (
    Acknowledged,
    Hold,
    check_acknowledged,
    check_history,
    check_store,
    overlapping_holds,
)
from fedem.hub.models import Repo, Revision
from fedem.hub.store import ArtifactStore
from hub_throughput import HUB_PACKAGES, REPO, Server, _cpu_seconds, _filesystem
from machine import machine_info, write_report

BASE = "load/base"
WEIGHTS = "adapter_model.safetensors"


def adapter_files(rng: np.random.Generator, rank: int = 4, width: int = 64) -> dict[str, bytes]:
    """A small LoRA adapter as peft saves it; random weights, so every push brings new blobs."""
    prefix = "base_model.model.backbone.layers.0.mixer.in_proj"
    tensors = {
        f"{prefix}.lora_A.weight": rng.standard_normal((rank, width), dtype=np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((2 * width, rank), dtype=np.float32),
    }
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["in_proj"]}
    return {"adapter_config.json": json.dumps(config).encode(), WEIGHTS: save(tensors)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Load:
    """What the donors saw: latencies per operation, answers, acknowledged pushes and lease holds."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.answers: dict[str, int] = defaultdict(int)
        self.acknowledged: list[Acknowledged] = []
        self.holds: list[Hold] = []
        self.errors: list[str] = []
        self.requests = 0

    async def count(self, _request: httpx.Request) -> None:
        self.requests += 1

    def timed(self, operation: str, t0: float) -> None:
        self.latency[operation].append(time.perf_counter() - t0)


def _check(response: httpx.Response, *expected: int) -> httpx.Response:
    if response.status_code not in expected:
        request = response.request
        raise RuntimeError(
            f"{request.method} {request.url.path}: {response.status_code} {response.text[:200]}"
        )
    return response


async def donor(
    http: httpx.AsyncClient, token: str, adapters: list[str], seed: int, stop_at: float, load: Load
) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    rng, weights = random.Random(seed), np.random.default_rng(seed)
    while time.perf_counter() < stop_at:
        adapter = rng.choice(adapters)
        t0 = time.perf_counter()
        leased = await http.post(f"/api/adapters/{adapter}/lease", headers=auth)
        load.answers[str(leased.status_code)] += 1
        if leased.status_code in (409, 429):  # taken (or over the rate limit): wait a little, try another
            load.timed("lease_refused", t0)
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            continue
        lease = _check(leased, 201).json()
        load.timed("lease", t0)
        start = time.time()

        t0 = time.perf_counter()
        log = _check(await http.get(f"/api/repos/{adapter}/log"), 200).json()
        newest = log[0] if log else (_check(await http.get(f"/api/repos/{BASE}/log"), 200).json()[0])
        entry = next(f for f in newest["files"] if f["path"] == WEIGHTS)
        got = _check(await http.get(f"/{newest['repo']}/resolve/{newest['commit']}/{WEIGHTS}"), 200)
        if sha256(got.content) != entry["sha256"]:
            raise RuntimeError(f"{newest['repo']}@{newest['tag']}: downloaded bytes do not match the log")
        load.timed("pull", t0)

        t0 = time.perf_counter()
        files = adapter_files(weights)
        for data in files.values():
            if (await http.head(f"/api/blobs/{sha256(data)}")).status_code != 200:
                _check(await http.put(f"/api/blobs/{sha256(data)}", content=data, headers=auth), 200, 201)
        manifest = [{"path": p, "sha256": sha256(d), "size": len(d)} for p, d in files.items()]
        body = {"files": manifest, "lease_id": lease["lease_id"], "description": "load"}
        expires = datetime.fromisoformat(lease["expires_at"]).timestamp()
        load.holds.append(Hold(adapter, start, min(time.time(), expires)))
        pushed = _check(await http.post(f"/api/repos/{adapter}/revisions", json=body, headers=auth), 201)
        load.timed("push", t0)
        load.acknowledged.append(
            Acknowledged(adapter, pushed.json()["commit"], {p: sha256(d) for p, d in files.items()})
        )


async def run_donors(url: str, tokens: list[str], adapters: list[str], seconds: float) -> tuple[Load, float]:
    load = Load()
    # idle connections are dropped before uvicorn's 5 s keep-alive timeout would close them under us
    limits = httpx.Limits(max_connections=len(tokens), keepalive_expiry=2.0)
    hooks = {"request": [load.count]}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, event_hooks=hooks) as http:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(donor(http, t, adapters, i, t0 + seconds, load) for i, t in enumerate(tokens)),
            return_exceptions=True,
        )
        elapsed = time.perf_counter() - t0
    load.errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return load, elapsed


def invariants(db_url: str, blobs: Path, load: Load) -> dict[str, Any]:
    database = Database(db_url)
    store = ArtifactStore(str(blobs))
    with database.session() as session:
        checks = {
            "store": check_store(session, store),
            "history": check_history(session),
            "acknowledged": check_acknowledged(session, store, load.acknowledged),
            "holds": overlapping_holds(load.holds),
        }
        adapter_versions = select(func.count()).select_from(Revision).join(Revision.repo)
        versions = session.scalar(adapter_versions.where(Repo.kind == "adapter")) or 0
    database.engine.dispose()
    # no request failed, so no push has an unknown outcome: the versions are exactly the acknowledged
    if not load.errors and versions != len(load.acknowledged):
        checks["history"].append(f"{versions} adapter versions, {len(load.acknowledged)} acknowledged")
    return {"versions": versions, "problems": checks, "ok": not any(checks.values())}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def markdown(report: dict[str, Any]) -> str:
    m, s, t, inv = report["machine"], report["settings"], report["throughput"], report["invariants"]
    backend = f"{s['database']}, {s['workers']} worker process{'es' if s['workers'] > 1 else ''}"
    lines = [
        "# Hub under load",
        "",
        f"`fedem hub serve` ({backend}, local blob folder) on 127.0.0.1; {s['donors']} simulated donors "
        f"(coroutines sharing one `httpx.AsyncClient`, one token each) in the bench process on the same "
        f"machine, leasing one of {s['adapters']} adapters, pulling its newest version and pushing a new "
        f"one, for {t['seconds']:.0f} s. Machine: {m['cpu']}, {m['cores_usable']} usable cores, "
        f"{m['memory_gib']} GiB; Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + f"; {m['date']}; load average {m['load_average_start'][0]:.2f} at start, "
        f"{m['load_average_end'][0]:.2f} at end.{' Quick (smoke) run.' if s['quick'] else ''}",
        "",
        "| operation | count | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, row in report["operations"].items():
        lines.append(f"| {name} | {row['count']:,} | {row['p50_ms']:,.1f} | {row['p99_ms']:,.1f} |")
    lines += [
        "",
        f"Throughput: **{t['pushes_per_s']:,.1f} pushed versions/s** ({t['pushes']:,} in all), "
        f"{t['requests_per_s']:,.0f} requests/s; lease answers {dict(report['answers'])}. "
        f"Hub CPU {t['hub_cpu_s']:.1f} s (parent process only with several workers), bench CPU "
        f"{t['bench_cpu_s']:.1f} s. Failed donors: {len(report['errors'])}.",
        "",
        f"Invariants ({inv['versions']:,} adapter versions in the database): "
        + ("**all hold**" if inv["ok"] else "**VIOLATED**")
        + " — every acknowledged push present with its files and bytes; one version per pushed lease, "
        "numbers 1..N; at most one live lease per adapter; no two donors holding one lease at once.",
    ]
    lines += [f"- {area}: {p}" for area, problems in inv["problems"].items() for p in problems[:20]]
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--donors", type=int, default=200)
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the donors run")
    parser.add_argument("--workers", type=int, default=1, help="hub worker processes")
    parser.add_argument("--db", help="an empty database for the hub (default: SQLite in the hub's root)")
    parser.add_argument("--quick", action="store_true", help="20 donors, 5 adapters, 3 s: a smoke run")
    parser.add_argument("--tmp", type=Path, help="folder for the hub (default: system tmp)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="hub_load", help="results file names: <out>/<name>.json, .md")
    args = parser.parse_args(argv)
    if args.quick:
        args.donors, args.adapters, args.seconds = 20, 5, 3.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedem-hub-load-", dir=args.tmp) as tmp:
        work = Path(tmp)
        packages = (*HUB_PACKAGES, "psycopg") if args.db else HUB_PACKAGES
        machine = machine_info(packages, tmp=str(work), tmp_filesystem=_filesystem(work))
        options = ["--workers", str(args.workers)] + (["--db", args.db] if args.db else [])
        server = Server(work / "hub", work / "hub.log", 1 << 30, *options)
        db_url = args.db or f"sqlite:///{work / 'hub' / 'hub.db'}"
        try:
            with HubClient(server.url, server.token, timeout=120) as admin:
                admin.create_repo(BASE, "model")
                base = work / "base"
                base.mkdir()
                for path, data in adapter_files(np.random.default_rng(10**9)).items():
                    (base / path).write_bytes(data)
                admin.push(BASE, base)
                adapters = [f"load/adapter-{i}" for i in range(args.adapters)]
                for name in adapters:
                    admin.create_repo(name, "adapter", base_repo=BASE)
                tokens = [admin.add_user(f"donor{i}", "donor")["token"] for i in range(args.donors)]
            hub_cpu, bench_cpu = _cpu_seconds(server.proc.pid), time.process_time()
            load, seconds = asyncio.run(run_donors(server.url, tokens, adapters, args.seconds))
            hub_cpu, bench_cpu = _cpu_seconds(server.proc.pid) - hub_cpu, time.process_time() - bench_cpu
            if load.errors:
                print(server.log_tail(), file=sys.stderr)
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
        checked = invariants(db_url, work / "hub" / "blobs", load)
    machine["load_average_end"] = list(os.getloadavg())
    report = {
        "machine": machine,
        "settings": {
            "quick": args.quick,
            "donors": args.donors,
            "adapters": args.adapters,
            "seconds": args.seconds,
            "workers": args.workers,
            "database": "PostgreSQL" if args.db else "SQLite",
        },
        "operations": {
            name: {"count": len(v), "p50_ms": percentile(v, 0.5), "p99_ms": percentile(v, 0.99)}
            for name, v in sorted(load.latency.items())
        },
        "answers": dict(load.answers),
        "throughput": {
            "seconds": seconds,
            "pushes": len(load.acknowledged),
            "pushes_per_s": len(load.acknowledged) / seconds,
            "requests": load.requests,
            "requests_per_s": load.requests / seconds,
            "hub_cpu_s": hub_cpu,
            "bench_cpu_s": bench_cpu,
        },
        "errors": load.errors,
        "invariants": checked,
        "command": "python bench/hub_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_report(args.out, args.name, report, markdown(report))
    print(markdown(report))
    if load.errors or not checked["ok"]:
        sys.exit(1)
    return report


if __name__ == "__main__":
    main()
