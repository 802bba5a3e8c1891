"""The simulator: a real hub, real donor processes, the production policy objects, in one loop.

`simulate(cfg)`:

1. cuts the non-IID shards (`fedem.sim.shards`) and starts an embedded hub — `create_app` under
   uvicorn in a subprocess on a free 127.0.0.1 port, its root in `out/hub`, a maintainer and one
   donor user per client created in its database before start;
2. pushes the base as release `sim/base@v1` and a fresh LoRA adapter (B = 0, so ΔW = 0; the same
   initial A for every run below) as `sim/community@v1`, the first head;
3. per round: `plan = policy.configure(round, clients, head)`; each task runs as a separate donor
   process (`python -m fedem.sim.donors donor`, which is `fedem.client.donor.run_donor`: lease →
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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedem.client.hub_client import HubClient
from fedem.errors import UserError
from fedem.policy import AdapterRef, AdapterWeights, ClientUpdate, Policy, make_policy
from fedem.provenance import weights_fingerprint
from fedem.sim.adapters import load_weights, publish_adapter_config, save_weights
from fedem.sim.baselines import initial_adapter, score, train_alone, train_centralised
from fedem.sim.config import SimulateConfig
from fedem.sim.donors import DonorJob, run_donors
from fedem.sim.embedded import (
    BASE_REPO,
    HEAD_REPO,
    MAINTAINER,
    EmbeddedHub,
    await_decision,
    decide,
    embedded_hub,
    hub_settings,
    push_adapter,
    stage_base,
    stage_eval_data,
    version_of,
)
from fedem.sim.shards import Shard, write_shards

log = logging.getLogger(__name__)


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
