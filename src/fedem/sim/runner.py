"""The simulator: a real hub, real donor processes, the production policy objects, in one loop.

`simulate(cfg)`:

1. cuts the non-IID shards (`fedem.sim.shards`) and starts an embedded hub — `create_app` under
   uvicorn in a subprocess on a free 127.0.0.1 port, its root in `out/hub`, a maintainer and one
   donor user per client created in its database before start;
2. pushes the base as release `sim/base@v1` and a fresh LoRA adapter (B = 0, so ΔW = 0; the same
   initial A for every run below) as `sim/community@v1`, the first head;
3. per round: `plan = policy.configure(round, clients, head)`; each task runs as a separate donor
   process (`python -m fedem.sim.runner donor`, which is `fedem.client.donor.run_donor`: lease →
   pull → finetune → push). A sequential plan (relay) passes `sim/community` from donor to donor
   through leases. A parallel plan first copies the head into each client's own repo `sim/<client>`
   and runs the donors at once from it. The simulator pulls every pushed version, loads it as
   `AdapterWeights`, calls `policy.aggregate`, writes the aggregate as a peft adapter folder and
   pushes it to `sim/community` as the maintainer (with a lease);
4. decides every pending version: with `gate: accept`, through the maintainer decision endpoint —
   donors' versions are accepted (the next relay donor must start from them), an aggregate if
   `policy.accept(candidate, head)` says so; with `gate: hub`, the hub's own evaluation worker
   screens, scores and decides each version with its δ/ε gate and the simulator waits for it (a
   rejected version never becomes the head: the next donor continues from the last accepted one).
   Every decision and its reason is recorded in the report;
5. evaluates each head on held-out text (bpb per language) and FLORES pairs (chrF per direction),
   and the baselines: the base, each donor alone (its shard, steps_per_client × rounds steps) and
   centralised LoRA on the union of the shards (clients × steps_per_client × rounds steps), all from
   the same initial adapter, with the same training settings and the same held-out rows;
6. optionally (`release`) merges the accepted heads into base release v2 with
   `fedem.hub.release.release`, scores v2 like the heads, and (`prompt`) generates with it;
7. writes `report.json`, `report.md` and plots (`fedem.sim.report`) after every round.
"""

import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from fedem.client.hub_client import HubAPIError, HubClient
from fedem.errors import UserError
from fedem.policy import AdapterRef, AdapterWeights, ClientUpdate, Policy, make_policy
from fedem.provenance import weights_fingerprint, write_json_atomic, write_provenance
from fedem.sim.config import SimulateConfig
from fedem.sim.shards import Shard, write_shards

log = logging.getLogger(__name__)

BASE_REPO = "sim/base"
HEAD_REPO = "sim/community"
MAINTAINER = "sim-maintainer"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PUSHED = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "fedem.json")
BASE_SUFFIXES = (".json", ".safetensors", ".txt", ".model")

SERVER = """
import json, socket, sys
import uvicorn
from fedem.hub.app import create_app
from fedem.hub.settings import HubSettings
app = create_app(HubSettings(**json.loads(sys.argv[1])))
config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
uvicorn.Server(config).run(sockets=[socket.socket(fileno=int(sys.argv[2]))])
"""


# --- adapters as AdapterWeights ------------------------------------------------------------------


def adapter_scale(config: dict[str, Any]) -> float:
    """α/r, or α/√r with rsLoRA; adapters with per-module ranks or alphas are refused."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("the simulator needs one rank and alpha for all modules (no rank/alpha patterns)")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def load_weights(folder: Path) -> AdapterWeights:
    """A peft LoRA folder (adapter_model.safetensors + adapter_config.json) as `AdapterWeights`."""
    from safetensors.torch import load_file

    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    factors = {}
    for key, a in tensors.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"):
            module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
            b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
            factors[module] = (a.float(), b.float())
    if not factors:
        raise UserError(f"{folder}: no LoRA factors in {ADAPTER_WEIGHTS}")
    return AdapterWeights(factors, adapter_scale(config))


def save_weights(
    weights: AdapterWeights, template: Path, out: Path, provenance: dict[str, Any], base_sha256: str
) -> Path:
    """Write `weights` as a peft adapter folder: the factors under peft's key names, the adapter
    config of `template` (same rank, alpha, targets), and fedem.json with the base's fingerprint."""
    from safetensors.torch import save_file

    template_scale = adapter_scale(json.loads((template / ADAPTER_CONFIG).read_text(encoding="utf-8")))
    if not math.isclose(template_scale, weights.scale):
        raise ValueError(f"scale {weights.scale} differs from the template's {template_scale}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in sorted(weights.factors.items()):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.float().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(template / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    write_provenance(out, "simulate", provenance, base_sha256=base_sha256)
    return out


# --- the embedded hub ----------------------------------------------------------------------------


@dataclass
class EmbeddedHub:
    """A hub server subprocess on 127.0.0.1 and the tokens of its users."""

    root: Path
    tokens: dict[str, str]
    sock: socket.socket
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


@contextmanager
def embedded_hub(
    root: Path, donors: Sequence[str], log_file: Path, extra: dict[str, Any] | None = None
) -> Iterator[EmbeddedHub]:
    """Start a fresh hub in `root` (which must not hold one) with `MAINTAINER` and `donors`; stop it after.
    `extra` holds further `HubSettings` (e.g. the evaluation worker's), so the hub is the sim config's.

    This process binds the socket and hands it to the server, so the port is chosen race-free."""
    from fedem.hub.auth import create_user
    from fedem.hub.db import Database, migrate
    from fedem.hub.settings import HubSettings

    if (root / "hub.db").exists():
        raise UserError(f"{root} already holds a hub: simulate into a fresh --out")
    root.mkdir(parents=True, exist_ok=True)
    settings = {"root": str(root), **(extra or {})}
    database = Database(HubSettings(**settings).database_url)
    migrate(database.engine)
    tokens: dict[str, str] = {}
    with database.session() as session:
        for name, role in [(MAINTAINER, "maintainer"), *((d, "donor") for d in donors)]:
            tokens[name] = create_user(session, name, role)[1]  # type: ignore[arg-type]
        session.commit()
    database.engine.dispose()
    sock = socket.create_server(("127.0.0.1", 0))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as sink:
        args = [sys.executable, "-c", SERVER, json.dumps(settings), str(sock.fileno())]
        proc = subprocess.Popen(args, pass_fds=[sock.fileno()], stdout=sink, stderr=subprocess.STDOUT)
    hub = EmbeddedHub(root, tokens, sock, proc)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the embedded hub exited with {proc.returncode}; see {log_file}")
            try:
                if httpx.get(f"{hub.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the embedded hub did not start in 120 s; see {log_file}")
            time.sleep(0.2)
        log.info("hub at %s (root %s)", hub.url, root)
        yield hub
    finally:
        hub.stop()


def decide(client: HubClient, revision: dict[str, Any], accept: bool, reason: str) -> dict[str, Any]:
    """Settle a pending adapter version through the maintainer decision endpoint; a version the hub
    accepted at once (a hub without an evaluation queue) is recorded as such."""
    record = {"repo": revision["repo"], "version": revision["tag"], "commit": revision["commit"]}
    if revision.get("status", "accepted") != "pending":
        return {**record, "decision": revision.get("status", "accepted"), "reason": "accepted by the hub"}
    decision = "accepted" if accept else "rejected"
    response = client.http.post(
        f"/api/evaluations/{revision['commit']}/decision", json={"decision": decision, "reason": reason}
    )
    if response.status_code >= 400:
        raise HubAPIError(response.status_code, "decision_failed", response.text[:300])
    return {**record, "decision": decision, "reason": reason}


def hub_settings(cfg: SimulateConfig, staged: Path | None) -> dict[str, Any]:
    """The embedded hub's extra `HubSettings`: none with gate "accept"; with gate "hub", the evaluation
    worker on `staged` data, the sim's δ/ε gate and the sim's eval limits (so the worker's and the
    report's numbers are measured alike)."""
    if cfg.gate != "hub" or staged is None:
        return {}
    return {
        "eval_worker": True,
        "eval_data": str(staged.resolve()),
        "eval_poll_s": 0.5,
        "accept_delta": cfg.accept_delta,
        "accept_epsilon": cfg.accept_epsilon,
        "eval_max_lines": cfg.eval.max_lines,
        "eval_max_pairs": cfg.eval.max_pairs,
        "eval_max_new_tokens": cfg.eval.max_new_tokens,
    }


def stage_eval_data(source: Path, languages: Sequence[str], dest: Path) -> Path:
    """`source`'s `mono/<lang>.valid.txt` and `parallel/en-<lang>.test.tsv` of `languages` only (links):
    the worker scores every language it finds, and a training `<lang>.txt` beside them would make it
    read that instead of the held-out file."""
    for code in languages:
        valid = source / "mono" / f"{code}.valid.txt"
        if not valid.is_file():
            raise UserError(f"eval_data {source}: no held-out text {valid}")
        (dest / "mono").mkdir(parents=True, exist_ok=True)
        (dest / "mono" / valid.name).symlink_to(valid.resolve())
        test = source / "parallel" / f"en-{code}.test.tsv"
        if code != "en" and test.is_file():
            (dest / "parallel").mkdir(parents=True, exist_ok=True)
            (dest / "parallel" / test.name).symlink_to(test.resolve())
    return dest


def await_decision(client: HubClient, revision: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """gate "hub": wait until the hub's worker has decided a pushed version (polling its evaluation as
    the maintainer), so the next lease starts from what the gate accepted; a failed evaluation leaves
    the version pending, which is never the head, and is recorded as `failed`."""
    record = {"repo": revision["repo"], "version": revision["tag"], "commit": revision["commit"]}
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.http.get(f"/api/evaluations/{revision['commit']}")
        if response.status_code >= 400:
            raise HubAPIError(response.status_code, "evaluation_failed", response.text[:300])
        found = response.json()
        if found["state"] in ("done", "failed"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{revision['repo']}@{revision['tag']}: no decision in {timeout_s:.0f} s")
        time.sleep(0.5)
    decision = found["decision"] if found["state"] == "done" else "failed"
    return {**record, "decision": decision, "reason": found["reason"], "by": "hub worker"}


def push_adapter(
    client: HubClient, repo: str, folder: Path, base: str, description: str, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Push an adapter folder as the maintainer: lease, push (ends the lease); returns the revision."""
    lease = client.lease(repo)
    try:
        done = client.push(
            repo, folder, description, metrics, lease_id=lease["lease_id"], base=base, include=list(PUSHED)
        )
    except BaseException:
        client.release(lease["lease_id"])
        raise
    return done.revision


def version_of(tag: str) -> int:
    """`v3` → 3."""
    return int(tag.lstrip("v"))


# --- donor processes -----------------------------------------------------------------------------


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
    """Run the jobs as `python -m fedem.sim.runner donor` processes, at most `concurrent` at once;
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
                    [sys.executable, "-m", "fedem.sim.runner", "donor"],
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
    """`python -m fedem.sim.runner donor`: one `run_donor` turn from the JSON `DonorRun` on stdin; its
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


# --- training and evaluation in this process -----------------------------------------------------


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`evaluate`'s results as {"bpb/hi": …, "chrf/en-hi": …, "mean_bpb": …, "mean_chrf": …}."""
    flat = {f"bpb/{code}": float(v["bpb"]) for code, v in results.get("language_modelling", {}).items()}
    flat.update({f"chrf/{d}": float(v["chrf"]) for d, v in results.get("translation", {}).items()})
    for key in ("mean_bpb", "mean_chrf"):
        if key in results.get("summary", {}):
            flat[key] = float(results["summary"][key])
    return flat


def score(
    cfg: SimulateConfig, adapter: Path | None, out: Path, model: Path | None = None
) -> dict[str, float]:
    """Held-out bpb per language and chrF per direction of the base, or `model` (+ `adapter`)."""
    from fedem.evaluate import evaluate

    results = evaluate(
        model or cfg.base,
        out,
        adapter=adapter,
        mono=cfg.eval.mono,
        pairs=cfg.eval.pairs,
        languages=cfg.eval_languages,
        max_lines=cfg.eval.max_lines,
        max_pairs=cfg.eval.max_pairs,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    return flat_metrics(results)


def finetune_config(cfg: SimulateConfig, shard: Shard, init: Path, steps: int, out: Path) -> Any:
    """The `FinetuneConfig` a donor would build for `shard` (same split, settings and initial adapter)."""
    from fedem.config import validate
    from fedem.train.config import FinetuneConfig

    data = {
        "base": cfg.base,
        "task": "translate",
        "pairs": shard.path,
        "lang": shard.lang,
        "init": init,
        "max_length": cfg.max_length,
        "eval_size": cfg.eval_size,
        "lora": cfg.lora.model_dump(),
        "train": {**cfg.train_settings, "max_steps": steps},
        "out": out,
    }
    return validate(FinetuneConfig, data, source="simulate")


def initial_adapter(cfg: SimulateConfig, shard: Shard, out: Path, base_sha256: str) -> Path:
    """A fresh LoRA adapter with `cfg.lora` (A random from `cfg.seed`, B = 0: ΔW = 0), saved in `out`."""
    import torch

    from fedem.config import to_plain
    from fedem.train.finetune import adapter_model

    ft = finetune_config(cfg, shard, out, 1, out).model_copy(update={"init": None})
    torch.manual_seed(cfg.seed)
    model = adapter_model(ft)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    config = {"task": "translate", "lora": to_plain(cfg.lora), "seed": cfg.seed}
    write_provenance(out, "simulate-init", config, base_sha256=base_sha256)
    return out


def train_alone(cfg: SimulateConfig, shard: Shard, init: Path, out: Path) -> dict[str, Any]:
    """Baseline (b): the donor alone, on its shard, for steps_per_client × rounds steps."""
    from fedem.train.finetune import finetune

    return finetune(finetune_config(cfg, shard, init, cfg.steps_per_client * cfg.rounds, out))


def train_centralised(cfg: SimulateConfig, shards: list[Shard], init: Path, out: Path) -> dict[str, Any]:
    """Baseline (c): one LoRA on the union of the shards' training rows, clients × steps_per_client ×
    rounds steps. Each shard is split exactly as its donor splits it, so the union holds precisely the
    rows the donors train on, and none they hold out. (`FinetuneConfig` takes one pairs file, and a
    union of languages is not one `en-<lang>.tsv`, so this assembles `finetune`'s steps itself.)"""
    import torch

    from fedem.config import to_plain
    from fedem.data.packing import Examples, pad_batch
    from fedem.model.load import load_tokenizer
    from fedem.train.finetune import adapter_model, response_bits_per_byte, split_rows, translation_rows
    from fedem.train.trainer import run_training

    steps = cfg.clients * cfg.steps_per_client * cfg.rounds
    configs = [finetune_config(cfg, shard, init, steps, out) for shard in shards]
    tokenizer = load_tokenizer(cfg.base)
    train_rows: list[tuple[list[int], list[int]]] = []
    eval_rows: list[tuple[list[int], list[int]]] = []
    for ft in configs:
        train_set, eval_set = split_rows(translation_rows(ft, tokenizer), ft.eval_size, ft.train.seed)
        train_rows += train_set.rows
        eval_rows += eval_set.rows if eval_set is not None else []
    random.Random(cfg.seed).shuffle(train_rows)
    ft = configs[0]
    torch.manual_seed(ft.train.seed)
    model = adapter_model(ft)
    provenance = {**to_plain(ft), "pairs": [str(s.path) for s in shards]}
    write_provenance(out, "simulate-centralised", provenance, base_sha256=weights_fingerprint(cfg.base))
    train_set, eval_set = Examples(train_rows), Examples(eval_rows)
    trainer = run_training(
        model,
        tokenizer,
        train_set,
        eval_set,
        ft.train,
        out,
        collator=partial(pad_batch, pad_id=tokenizer.pad_token_id),
    )
    return {
        "out": str(out),
        "steps": trainer.state.global_step,
        "train_examples": len(train_set),
        "metrics": {"eval_bpb": response_bits_per_byte(model, tokenizer, eval_set, ft.train.batch_size)},
    }


# --- the simulation ------------------------------------------------------------------------------


def stage_base(base: Path, dest: Path) -> Path:
    """The base's top-level weights, config and tokenizer files (symlinked): what a release holds."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(base.iterdir()):
        if path.is_file() and path.suffix in BASE_SUFFIXES:
            (dest / path.name).symlink_to(path.resolve())
    return dest


def publish_adapter_config(folder: Path, base_ref: str) -> None:
    """Name the hub's base release in adapter_config.json instead of a local path (as donors do)."""
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    repo, _, tag = base_ref.partition("@")
    config.update(base_model_name_or_path=repo, revision=tag or None)
    write_json_atomic(path, config)


@dataclass
class Head:
    """The community adapter as it stands: its hub version, local folder, weights and metrics."""

    ref: AdapterRef
    folder: Path
    weights: AdapterWeights
    metrics: dict[str, float]


class Simulation:
    """The state of one `fedem simulate` run; `run()` does everything and returns the report data."""

    def __init__(self, cfg: SimulateConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.policy: Policy = make_policy(
            cfg.policy, steps_per_client=cfg.steps_per_client, **cfg.policy_options
        )
        self.clients = cfg.client_names
        self.report: dict[str, Any] = {
            "config": cfg.model_dump(mode="json"),
            "policy": {"name": cfg.policy, "repr": repr(self.policy)},
            "eval_languages": cfg.eval_languages,
            "shards": [],
            "baselines": {},
            "rounds": [],
            "decisions": [],
        }
        self.base_ref = f"{BASE_REPO}@v1"

    def write(self) -> dict[str, Any]:
        from fedem.sim.report import write_report

        return write_report(self.out, self.report)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if not (cfg.base / "config.json").is_file():
            raise UserError(f"{cfg.base} is not a checkpoint folder (config.json missing)")
        self.started = time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        languages = [cfg.client_language(i) for i in range(cfg.clients)]
        shards = write_shards(
            self.clients, languages, cfg.pairs_dir, cfg.examples_per_client, self.out / "shards"
        )
        self.report["shards"] = [s.as_dict() for s in shards]
        self.shards = {s.client: s for s in shards}
        # the hub's worker and the release are scored on the eval languages' held-out files only
        self.eval_data: Path | None = None
        if cfg.gate == "hub" or cfg.release:
            self.eval_data = stage_eval_data(cfg.eval_data, cfg.eval_languages, self.out / "hub-eval-data")
        base_sha256 = weights_fingerprint(cfg.base)
        init = initial_adapter(cfg, shards[0], self.out / "adapters" / "init", base_sha256)
        publish_adapter_config(init, self.base_ref)
        base_metrics: dict[str, float] = {}
        if "base" in cfg.baselines:
            base_metrics = score(cfg, None, self.out / "eval" / "base")
            self.report["baselines"]["base"] = {"metrics": base_metrics, "steps": 0}
        self.federate(init, base_metrics, base_sha256)
        self.run_baselines(shards, init)
        self.report["elapsed_s"] = round_s(time.monotonic() - self.started)
        return self.write()

    def federate(self, init: Path, base_metrics: dict[str, float], base_sha256: str) -> None:
        """The hub's part: rounds, then (if asked) release v2 and generation, while the hub is up."""
        cfg = self.cfg
        extra = hub_settings(cfg, self.eval_data)
        with embedded_hub(self.out / "hub", self.clients, self.out / "logs" / "hub.log", extra) as hub:
            self.report["hub"] = {"url": hub.url, "gate": cfg.gate, **extra}
            with HubClient(hub.url, hub.tokens[MAINTAINER]) as client:
                head = self.set_up_hub(client, init, base_metrics)
                for round in range(cfg.rounds):
                    head = self.run_round(round, hub, client, head, base_sha256)
                    self.report["elapsed_s"] = round_s(time.monotonic() - self.started)
                    self.write()
                v2 = self.publish_release(client, base_metrics) if cfg.release else None
                if cfg.prompt is not None:
                    self.generate_text(v2, head)
                self.write()

    def run_baselines(self, shards: list[Shard], init: Path) -> None:
        """Each donor alone and centralised training, from the same initial adapter (see `simulate`)."""
        cfg = self.cfg
        if "alone" in cfg.baselines:
            alone = {}
            for shard in shards:
                folder = self.out / "baselines" / f"alone-{shard.client}"
                trained = train_alone(cfg, shard, init, folder)
                metrics = score(cfg, folder, self.out / "eval" / f"alone-{shard.client}")
                alone[shard.client] = {"lang": shard.lang, "steps": trained["steps"], "metrics": metrics}
            self.report["baselines"]["alone"] = alone
            self.write()
        if "centralised" in cfg.baselines:
            folder = self.out / "baselines" / "centralised"
            trained = train_centralised(cfg, shards, init, folder)
            metrics = score(cfg, folder, self.out / "eval" / "centralised")
            self.report["baselines"]["centralised"] = {
                "steps": trained["steps"],
                "train_examples": trained["train_examples"],
                "metrics": metrics,
            }

    def set_up_hub(self, client: HubClient, init: Path, base_metrics: dict[str, float]) -> Head:
        """Repos, the base release and the initial head; returns the head."""
        client.create_repo(BASE_REPO, "model")
        staged = stage_base(self.cfg.base, self.out / "hub-stage" / "base")
        release = client.push(BASE_REPO, staged, "the simulation's base").revision
        assert release["tag"] == "v1", release
        repos = [HEAD_REPO] + ([] if self.policy_is_sequential() else [f"sim/{c}" for c in self.clients])
        for repo in repos:
            client.create_repo(repo, "adapter", base_repo=BASE_REPO)
        revision = push_adapter(client, HEAD_REPO, init, self.base_ref, "fresh adapter (ΔW = 0)", {})
        self.report["decisions"].append(
            {"round": None, **decide(client, revision, True, "the initial adapter (B = 0)")}
        )
        ref = AdapterRef(HEAD_REPO, version_of(revision["tag"]))
        return Head(ref, init, load_weights(init), base_metrics)

    def policy_is_sequential(self) -> bool:
        return self.policy.configure(0, self.clients, AdapterRef(HEAD_REPO, 1)).sequential

    def pull(self, client: HubClient, repo: str, tag: str, dest: Path) -> Path:
        client.pull(repo, tag, dest)
        return dest

    def settle(
        self, client: HubClient, revision: dict[str, Any], accept: bool, reason: str, where: dict[str, Any]
    ) -> dict[str, Any]:
        """Decide a pushed version and record it: with gate "hub" the hub's worker decides (the
        simulator waits for it); otherwise the simulator decides `accept` itself, with `reason`."""
        if self.cfg.gate == "hub":
            decision = await_decision(client, revision, self.cfg.gate_timeout_s)
        else:
            decision = decide(client, revision, accept, reason)
        self.report["decisions"].append({**where, **decision})
        return decision

    def donor_job(self, round: int, client_name: str, repo: str, steps: int) -> DonorJob:
        return DonorJob(
            client=client_name,
            repo=repo,
            steps=steps,
            shard=self.shards[client_name],
            workdir=self.out / "clients" / client_name,
            log_file=self.out / "logs" / f"round-{round:02d}-{client_name}.log",
        )

    def collect(
        self, round: int, client: HubClient, done: DonorJob, start: AdapterRef, turns: list[dict[str, Any]]
    ) -> tuple[ClientUpdate, Path] | None:
        """Settle a donor's version, record the turn and pull the version; None when it was not accepted:
        a rejected version never becomes the head, so it is no update to aggregate."""
        revision = client.revision(done.repo, done.result["version"])
        reason = f"simulation round {round}: donor version"
        decision = self.settle(client, revision, True, reason, {"round": round, "client": done.client})
        metrics = done.result.get("metrics", {})
        turns.append(
            {
                "client": done.client,
                "repo": done.repo,
                "version": done.result["version"],
                "start": f"{start.repo}@v{start.version}",
                "steps": done.result.get("steps"),
                "train_examples": metrics.get("train_examples"),
                "donor_eval_bpb": metrics.get("eval_bpb"),
                "decision": decision["decision"],
                "seconds": round_s(time.monotonic() - done.started),
            }
        )
        if decision["decision"] != "accepted":
            return None
        dest = self.pull(client, done.repo, done.result["version"], self.round_dir(round) / done.client)
        update = ClientUpdate(
            client=done.client,
            start=start,
            result=load_weights(dest),
            num_examples=int(metrics.get("train_examples", 0)),
            metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        )
        return update, dest

    def round_dir(self, round: int) -> Path:
        return self.out / "rounds" / f"round-{round:02d}"

    def relay_turns(
        self, round: int, hub: EmbeddedHub, client: HubClient, head: Head, tasks: Sequence[Any], turns: list
    ) -> tuple[list[ClientUpdate], Path]:
        """Donors one after another on `HEAD_REPO`. A lease starts from the newest accepted version, so
        after a rejection the next donor continues from the last accepted one, as a real hub does."""
        start, folder, updates = head.ref, head.folder, []
        for task in tasks:
            done = self.donor_job(round, task.client, HEAD_REPO, task.steps)
            run_donors(self.cfg, hub, [done], 1)
            got = self.collect(round, client, done, start, turns)
            if got is not None:
                updates.append(got[0])
                folder = got[1]
                start = AdapterRef(HEAD_REPO, version_of(done.result["version"]))
        return updates, folder

    def parallel_turns(
        self, round: int, hub: EmbeddedHub, client: HubClient, head: Head, tasks: Sequence[Any], turns: list
    ) -> list[ClientUpdate]:
        """Copy the head into each client's repo (the maintainer accepts the copy: it is the head
        already), run the donors at once from it, and collect the accepted versions."""
        jobs = []
        for task in tasks:
            repo = f"sim/{task.client}"
            described = f"head {head.ref.repo}@v{head.ref.version}"
            revision = push_adapter(client, repo, head.folder, self.base_ref, described, {})
            decision = decide(client, revision, True, f"round {round}: the head, to start from")
            self.report["decisions"].append({"round": round, "client": task.client, **decision})
            jobs.append(self.donor_job(round, task.client, repo, task.steps))
        run_donors(self.cfg, hub, jobs, self.cfg.max_concurrent_clients)
        updates = []
        for done, task in zip(jobs, tasks, strict=True):
            got = self.collect(round, client, done, task.start, turns)
            if got is not None:
                updates.append(got[0])
        return updates

    def run_round(
        self, round: int, hub: EmbeddedHub, client: HubClient, head: Head, base_sha256: str
    ) -> Head:
        """One round: the plan's donor turns, then the policy's aggregate of the accepted versions."""
        plan = self.policy.configure(round, self.clients, head.ref)
        began = time.monotonic()
        turns: list[dict[str, Any]] = []
        entry: dict[str, Any] = {"round": round, "sequential": plan.sequential, "turns": turns}
        if plan.sequential:
            updates, last_folder = self.relay_turns(round, hub, client, head, plan.tasks, turns)
        else:
            updates, last_folder = (
                self.parallel_turns(round, hub, client, head, plan.tasks, turns),
                head.folder,
            )
        if not updates:
            note = "no version was accepted: the head stays"
            entry.update(contributors=[], weights={}, note=note, projection_error=None, decision="none")
            entry.update(head=f"{HEAD_REPO}@v{head.ref.version}", metrics=head.metrics)
            new = head
        else:
            aggregate = self.policy.aggregate(round, head.weights, updates)
            entry.update(
                contributors=list(aggregate.contributors),
                weights=dict(aggregate.weights),
                note=aggregate.note,
                projection_error=aggregate.projection_error,
            )
            if plan.sequential and aggregate.adapter is updates[-1].result:
                # the relay's head is the last accepted donor version, the hub's head already
                last = [t for t in turns if t["decision"] == "accepted"][-1]
                ref = AdapterRef(HEAD_REPO, version_of(str(last["version"])))
                metrics = score(self.cfg, last_folder, self.out / "eval" / f"round-{round:02d}")
                new = Head(ref, last_folder, aggregate.adapter, metrics)
                entry.update(head=f"{HEAD_REPO}@v{ref.version}", decision="accepted", metrics=metrics)
            else:
                new = self.push_aggregate(round, client, head, aggregate, base_sha256, entry)
        refused = [
            f"{t['client']} ({t['version']}: {t['decision']})" for t in turns if t["decision"] != "accepted"
        ]
        if refused:  # the round's story includes the versions the gate kept out
            entry["note"] = f"{entry['note']}; not accepted: {', '.join(refused)}"
        entry["seconds"] = round_s(time.monotonic() - began)
        self.report["rounds"].append(entry)
        log.info("round %d: head %s, %s", round, entry["head"], entry["note"])
        return new

    def push_aggregate(
        self, round: int, client: HubClient, head: Head, aggregate: Any, base_sha256: str, entry: dict
    ) -> Head:
        """Write, score and push the aggregate; it becomes the head if accepted (by the policy's
        `accept`, or by the hub's gate)."""
        cfg, target = self.cfg, self.round_dir(round) / "aggregate"
        provenance = {
            "task": "translate",
            "policy": cfg.policy,
            "round": round,
            "contributors": list(aggregate.contributors),
            "weights": dict(aggregate.weights),
            "note": aggregate.note,
        }
        save_weights(aggregate.adapter, head.folder, target, provenance, base_sha256)
        metrics = score(cfg, target, self.out / "eval" / f"round-{round:02d}")
        pushed_metrics = {k.replace("/", "_"): v for k, v in metrics.items()}
        note = f"round {round}: {aggregate.note}"[:500]
        revision = push_adapter(client, HEAD_REPO, target, self.base_ref, note, pushed_metrics)
        accept = self.policy.accept(metrics, head.metrics)
        reason = f"policy {cfg.policy}.accept: {'yes' if accept else 'no'} (candidate vs head metrics)"
        decision = self.settle(client, revision, accept, reason, {"round": round, "client": None})
        new = head
        if decision["decision"] == "accepted":
            new = Head(AdapterRef(HEAD_REPO, version_of(revision["tag"])), target, aggregate.adapter, metrics)
        entry.update(
            head=f"{HEAD_REPO}@v{new.ref.version}",
            decision=decision["decision"],
            candidate_metrics=metrics,
            metrics=new.metrics,
        )
        return new

    def publish_release(self, client: HubClient, base_metrics: dict[str, float]) -> Path | None:
        """Base release v2 the way a maintainer makes one (`fedem.hub.release.release`: the accepted
        heads merged into v1, a model card crediting their donors), pulled back from the hub and scored
        like every head, so v1 and v2 are compared on the same held-out rows. Returns v2's folder."""
        from fedem.hub.release import release

        cfg, workdir = self.cfg, self.out / "release"
        assert cfg.release is not None
        result = release(
            client, BASE_REPO, workdir, cfg.release, cfg.release_density, self.eval_data, cfg.seed
        )
        entry: dict[str, Any] = {"method": cfg.release, "density": cfg.release_density, **result}
        self.report["release"] = entry
        if not result.get("release"):
            return None
        v2 = self.pull(client, BASE_REPO, result["commit"], workdir / "v2")
        entry["card"] = str(v2 / "README.md")
        entry["v1_metrics"] = base_metrics or score(cfg, None, self.out / "eval" / "base")
        entry["metrics"] = score(cfg, None, self.out / "eval" / "release", model=v2)
        return v2

    def generate_text(self, model_dir: Path | None, head: Head) -> None:
        """Greedy text from `prompt` with v2, or (no release) the base with the final head merged in."""
        from fedem.generate import decoding_config, generate, load_for_inference

        cfg = self.cfg
        assert cfg.prompt is not None
        adapter = None if model_dir is not None else head.folder
        model, tokenizer = load_for_inference(model_dir or cfg.base, adapter)
        decoding = decoding_config(max_new_tokens=32, repetition_penalty=1.3)
        text = generate(model, tokenizer, cfg.prompt, decoding)
        label = (
            self.report.get("release", {}).get("release")
            if model_dir
            else f"base + {HEAD_REPO}@v{head.ref.version}"
        )
        self.report["generation"] = {
            "model": label,
            "prompt": cfg.prompt,
            "text": text,
            "max_new_tokens": 32,
            "repetition_penalty": 1.3,
        }


def round_s(seconds: float) -> float:
    return float(f"{seconds:.1f}")


def simulate(cfg: SimulateConfig) -> dict[str, Any]:
    """Run the whole simulation `cfg` describes; returns the JSON-able summary `write_report` gives."""
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise UserError(f"{cfg.out} is not empty: simulate into a fresh --out")
    summary = Simulation(cfg).run()
    log.info("report: %s", cfg.out / "report.md")
    return summary


if __name__ == "__main__":
    if sys.argv[1:] == ["donor"]:
        sys.exit(donor_main())
    sys.stderr.write("usage: python -m fedem.sim.runner donor  (a DonorRun as JSON on stdin)\n")
    sys.exit(2)
