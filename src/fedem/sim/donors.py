"""Donor turns as separate processes: `python -m fedem.sim.donors donor` reads a `DonorRun` as JSON on
stdin and runs `fedem.client.donor.run_donor` (lease → pull → finetune → push), the code behind
`fedem client run`.
"""

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedem.errors import UserError
from fedem.sim.config import SimulateConfig
from fedem.sim.embedded import EmbeddedHub
from fedem.sim.shards import Shard

log = logging.getLogger(__name__)


@dataclass
class DonorJob:
    """One donor turn to run as a separate process."""

    client: str
    repo: str
    steps: int
    shard: Shard
    workdir: Path
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0


def donor_payload(cfg: SimulateConfig, hub: EmbeddedHub, job: DonorJob) -> dict[str, Any]:
    """The `fedem.client.donor.DonorRun` of one job, as JSON data."""
    return {
        "hub": hub.url,
        "token": hub.tokens[job.client],
        "adapter": job.repo,
        "task": "translate",
        "data": str(job.shard.path),
        "lang": job.shard.lang,
        "workdir": str(job.workdir),
        "max_steps": job.steps,
        "eval_size": cfg.eval_size,
        "max_length": cfg.max_length,
        "train": cfg.train_settings,
        "margin_s": 0.0,
        "hub_retry_s": 60.0,
        "backoff_s": 0.5,
    }


def run_donors(cfg: SimulateConfig, hub: EmbeddedHub, jobs: list[DonorJob], concurrent: int) -> None:
    """Run the jobs as `python -m fedem.sim.donors donor` processes, at most `concurrent` at once;
    each job's `result` is its process's JSON summary. A failed process fails the simulation."""
    threads = max(1, (os.cpu_count() or 1) // max(1, min(concurrent, len(jobs))))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    waiting, running = list(jobs), list[DonorJob]()
    while waiting or running:
        while waiting and len(running) < concurrent:
            job = waiting.pop(0)
            job.log_file.parent.mkdir(parents=True, exist_ok=True)
            payload = json.dumps(donor_payload(cfg, hub, job))
            with job.log_file.open("wb") as sink:
                job.proc = subprocess.Popen(
                    [sys.executable, "-m", "fedem.sim.donors", "donor"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=sink,
                    env=env,
                )
            assert job.proc.stdin is not None
            job.proc.stdin.write(payload.encode())
            job.proc.stdin.close()
            job.started = time.monotonic()
            running.append(job)
            log.info("donor %s: %d steps on %s (pid %d)", job.client, job.steps, job.repo, job.proc.pid)
        for job in list(running):
            assert job.proc is not None
            if job.proc.poll() is None:
                if time.monotonic() - job.started > cfg.client_timeout_s:
                    job.proc.kill()
                    job.proc.wait()
                    raise RuntimeError(f"donor {job.client} ran past {cfg.client_timeout_s:.0f} s")
                continue
            running.remove(job)
            assert job.proc.stdout is not None
            out = job.proc.stdout.read().decode()
            if job.proc.returncode != 0:
                tail = job.log_file.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"donor {job.client} failed ({job.proc.returncode}):\n{tail}")
            job.result = json.loads(out.strip().splitlines()[-1])
        time.sleep(0.1)


def donor_main() -> int:
    """`python -m fedem.sim.donors donor`: one `run_donor` turn from the JSON `DonorRun` on stdin; its
    summary is the last line of stdout."""
    from fedem.client.donor import DonorRun, run_donor

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    cfg = DonorRun.model_validate_json(sys.stdin.read())
    try:
        summary = run_donor(cfg)
    except UserError as err:
        sys.stderr.write(f"fedem: error: {err}\n")
        return 2
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["donor"]:
        sys.exit(donor_main())
    sys.stderr.write("usage: python -m fedem.sim.donors donor  (a DonorRun as JSON on stdin)\n")
    sys.exit(2)
