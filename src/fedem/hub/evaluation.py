"""The evaluation worker: scores each submitted adapter version on held-out server data and decides.

Every adapter push creates a `pending` revision and a `queued` evaluation in one transaction. A worker
(`fedem hub evaluate`, or a thread of `fedem hub serve --eval-worker`) then, for each job:

1. **claims** it atomically — a conditional `UPDATE … SET state='running' WHERE state='queued'`, so two
   workers (threads or processes, SQLite or PostgreSQL) never take the same job;
2. **materialises** the candidate, its base release and the previous accepted version from the
   artifact store into a temporary folder (sha256-checked);
3. **screens** the candidate (`fedem.hub.screening`): a refused submission is rejected with the
   reason, and nothing is scored;
4. **scores** the base, the previous accepted version (if any, on the same base) and the candidate,
   each merged into the base: bits-per-byte and perplexity per language on `eval_data/mono/<lang>.txt`,
   and for a translation adapter chrF/BLEU on `eval_data/pairs/en-<lang>.tsv` (English → language);
5. **decides** with the gate (`fedem.hub.acceptance.decide`) and records the decision, the reason, the
   scores and an audit event in one commit; the revision becomes `accepted` (the new head, where the
   next lease starts) or `rejected` (kept, never the head).

An exception marks the job `failed` with the message and leaves the revision `pending` (a maintainer
can decide it by hand). The held-out data is read only here, never served. See docs/evaluation.md.
"""

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedem.data.corpus import Pair, load_mono, pair_language, read_pairs
from fedem.errors import UserError
from fedem.evaluate import score_lines, translate, translation_scores
from fedem.hub.acceptance import decide, task_metric
from fedem.hub.db import Database, migrate
from fedem.hub.leases import audit
from fedem.hub.models import Evaluation, Repo, Revision, utcnow
from fedem.hub.repos import head
from fedem.hub.screening import ScreeningError, delta_norm, screen
from fedem.hub.settings import HubSettings
from fedem.hub.store import ArtifactStore
from fedem.languages import LANGUAGES
from fedem.model.load import load_adapter, load_model, load_tokenizer
from fedem.provenance import PROVENANCE_FILE

log = logging.getLogger(__name__)

HISTORY = 20  # accepted versions whose ‖ΔW‖ the norm check compares with
SEED = 0
COPY_CHUNK = 1 << 20


def worker_name() -> str:
    """`host:pid:thread`, recorded on each claimed job."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def claim_next(session: Session, worker: str | None = None) -> Evaluation | None:
    """Take the oldest queued job, or return None. The claim is a conditional UPDATE that only a
    still-queued row satisfies, so of two workers racing for a job exactly one gets it; the loser
    moves on to the next queued job."""
    worker = worker or worker_name()
    while True:
        ids = session.scalars(
            select(Evaluation.id).where(Evaluation.state == "queued").order_by(Evaluation.id).limit(8)
        ).all()
        session.rollback()  # end the read, so each claim below is its own short write
        if not ids:
            return None
        for job_id in ids:
            claimed = session.execute(
                update(Evaluation)
                .where(Evaluation.id == job_id, Evaluation.state == "queued")
                .values(state="running", started_at=utcnow(), worker=worker)
            )
            session.commit()
            if claimed.rowcount:  # type: ignore[attr-defined]
                return session.get(Evaluation, job_id, populate_existing=True)


def materialise(store: ArtifactStore, session: Session, revision: Revision, dest: Path) -> Path:
    """Copy a revision's files from the store into `dest` (checking each sha256); returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    for entry in revision.files:
        target = (dest / entry.path).resolve()
        if root not in target.parents:  # paths are checked at push time; never trust them twice
            raise ValueError(f"{revision.repo.name}@{revision.tag}: unsafe path {entry.path!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with store.open(entry.sha256) as source, target.open("wb") as out:
            while chunk := source.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != entry.sha256:
            raise ValueError(f"the store's copy of {entry.path} ({entry.sha256[:12]}…) is corrupt")
    return dest


# --- held-out data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """The server's held-out data: lines per language, and English→language pairs per language."""

    text: dict[str, list[str]]
    pairs: dict[str, list[Pair]]


def load_held_out(folder: Path, max_lines: int, max_pairs: int) -> HeldOut:
    """The first `max_lines` lines of each `mono/<lang>.txt` and `max_pairs` pairs of each
    `pairs/en-<lang>.tsv` (file order, so every evaluation sees the same data). The `data/` layout
    (`mono/<lang>.valid.txt`, `parallel/en-<lang>.test.tsv`) is read too."""
    mono = folder / "mono"
    if not mono.is_dir():
        raise UserError(f"the evaluation data {folder} has no mono/ folder of <lang>.txt files")
    # In the `data/` layout (mono/<lang>.valid.txt beside the training <lang>.txt) only the held-out
    # split may be read; a server-only folder of plain <lang>.txt files is held out as a whole.
    split = "valid" if any(mono.glob("*.valid.txt")) else "train"
    text = {code: lines[:max_lines] for code, lines in load_mono(mono, split=split).items()}
    pairs: dict[str, list[Pair]] = {}
    for folder_name, suffix in (("parallel", ".test.tsv"), ("pairs", ".tsv")):  # pairs/ wins
        for path in sorted((folder / folder_name).glob(f"en-*{suffix}")):
            code = path.name.removeprefix("en-").removesuffix(suffix)
            if code in LANGUAGES and code != "en" and path.name == f"en-{code}{suffix}":
                pairs[code] = read_pairs(path, code)[:max_pairs]
    return HeldOut(text=text, pairs=pairs)


def translation_language(repo_name: str, provenance: dict[str, Any]) -> str | None:
    """The target language of a translation adapter: from the repo's name (`…adapter-en-hi`), else
    from the adapter's `fedem.json` (`task: translate` with `pairs: …/en-hi.tsv`); None otherwise."""
    found = re.search(r"(?:^|[-_.])en-([a-z]{2,3})$", repo_name.rpartition("/")[2])
    if found and found.group(1) in LANGUAGES and found.group(1) != "en":
        return found.group(1)
    config = provenance.get("config")
    if isinstance(config, dict) and config.get("task") == "translate" and config.get("pairs"):
        with contextlib.suppress(UserError):
            return pair_language(Path(str(config["pairs"])))
    return None


def _provenance(folder: Path) -> dict[str, Any]:
    try:
        found = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


# --- scoring ---------------------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    """JSON-safe: a non-finite score is stored as null (PostgreSQL's JSON has no NaN or Infinity)."""
    return value if math.isfinite(value) else None


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    held: HeldOut,
    pair_lang: str | None,
    max_new_tokens: int,
) -> dict[str, dict[str, float | None]]:
    """`{bpb: {lang}, ppl: {lang}, chrf: {"en-xx"}, bleu: {"en-xx"}}` of one model."""
    scores: dict[str, dict[str, float | None]] = {"bpb": {}, "ppl": {}, "chrf": {}, "bleu": {}}
    for code, lines in held.text.items():
        score = score_lines(model, tokenizer, lines)
        scores["bpb"][code] = _finite(score.bits_per_byte)
        try:
            scores["ppl"][code] = _finite(score.perplexity)
        except OverflowError:
            scores["ppl"][code] = None
    if pair_lang is not None:
        pairs = held.pairs[pair_lang]
        sources = [pair.english for pair in pairs]
        hypotheses = translate(model, tokenizer, sources, "en", pair_lang, max_new_tokens)
        result = translation_scores(hypotheses, [pair.other for pair in pairs])
        scores["chrf"][f"en-{pair_lang}"] = result["chrf"]
        scores["bleu"][f"en-{pair_lang}"] = result["bleu"]
    return scores


@contextlib.contextmanager
def merged_model(base_dir: Path, adapter_dir: Path | None) -> Iterator[PreTrainedModel]:
    """The base, or the base with `adapter_dir` merged in (float32, eval mode); freed afterwards."""
    model = load_model(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = cast(PreTrainedModel, load_adapter(model, adapter_dir, base_dir).merge_and_unload())
    model.eval()
    try:
        yield model
    finally:
        del model
        gc.collect()


# --- one job ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    decision: str  # "accepted" | "rejected"
    reason: str
    scores: dict[str, Any]


def _history_norms(
    session: Session, store: ArtifactStore, repo: Repo, candidate: Revision, workdir: Path
) -> list[float]:
    """‖ΔW‖ of the adapter's newest accepted versions: recorded by their evaluation, else computed."""
    accepted = session.scalars(
        select(Revision)
        .where(Revision.repo_id == repo.id, Revision.status == "accepted", Revision.id != candidate.id)
        .order_by(Revision.number.desc())
        .limit(HISTORY)
    ).all()
    norms = []
    for revision in accepted:
        evaluation = session.scalar(select(Evaluation).where(Evaluation.revision_id == revision.id))
        recorded = (evaluation.scores.get("screening") or {}).get("delta_norm") if evaluation else None
        if isinstance(recorded, int | float):
            norms.append(float(recorded))
            continue
        with contextlib.suppress(ScreeningError):  # an accepted version that is no LoRA adds nothing
            norms.append(
                delta_norm(materialise(store, session, revision, workdir / f"history-{revision.tag}"))
            )
    return norms


def judge(
    session: Session, store: ArtifactStore, settings: HubSettings, revision: Revision, workdir: Path
) -> Outcome:
    """Screen, score and decide one adapter version (no database writes)."""
    if settings.eval_data is None:
        raise UserError("no evaluation data configured (eval_data)")
    held = load_held_out(settings.eval_data, settings.eval_max_lines, settings.eval_max_pairs)
    repo = revision.repo
    base = session.get(Revision, revision.base_id) if revision.base_id else None
    if base is None:
        reason = "the version names no base release to be evaluated on"
        return Outcome("rejected", f"screening: {reason}", {"screening": {"passed": False, "reason": reason}})
    base_label = f"{base.repo.name}@{base.tag}"
    base_dir = materialise(store, session, base, workdir / "base")
    candidate_dir = materialise(store, session, revision, workdir / "candidate")
    history = _history_norms(session, store, repo, revision, workdir)
    try:
        screened = screen(candidate_dir, base_dir, history, settings.max_delta_norm_ratio, base_label)
    except ScreeningError as err:
        refused = {"screening": {"passed": False, "reason": err.reason}}
        return Outcome("rejected", f"screening: {err.reason}", refused)

    notes = []
    previous = head(session, repo)
    previous_dir = None
    if previous is not None and previous.base_id != revision.base_id:
        notes.append(
            f"the previous accepted {previous.tag} is on another base release; compared with the base"
        )
        previous = None
    elif previous is not None:
        previous_dir = materialise(store, session, previous, workdir / "previous")
    pair_lang = translation_language(repo.name, _provenance(candidate_dir))
    if pair_lang is not None and pair_lang not in held.pairs:
        notes.append(f"no held-out pairs for en-{pair_lang}; the task metric is bpb")
        pair_lang = None

    tokenizer = load_tokenizer(base_dir)
    scored: dict[str, Any] = {}
    for role, adapter in (("base", None), ("previous", previous_dir), ("candidate", candidate_dir)):
        if role == "previous" and adapter is None:
            scored[role] = None
            continue
        torch.manual_seed(SEED)
        with merged_model(base_dir, adapter) as model:
            scored[role] = score_model(model, tokenizer, held, pair_lang, settings.eval_max_new_tokens)
    scores: dict[str, Any] = {
        **scored,
        "screening": {"passed": True, **screened.as_dict()},
        "task": {
            "metric": task_metric(scored),
            "pair": f"en-{pair_lang}" if pair_lang else None,
            "base": base_label,
            "previous": previous.tag if previous else None,
            "notes": notes,
        },
        "gate": {"delta": settings.accept_delta, "epsilon": settings.accept_epsilon},
    }
    decision, reason = decide(scored, settings.accept_delta, settings.accept_epsilon)
    if previous is not None:
        reason += f" (previous: {previous.tag})"
    return Outcome(decision, reason, scores)


def _finish(
    session: Session, evaluation: Evaluation, state: str, outcome: Outcome | None, error: str
) -> bool:
    """Record the result — only if this worker still owns the job (a maintainer may have decided it
    meanwhile) — with the revision's status and an audit event, in one commit."""
    values: dict[str, Any] = {"state": state, "finished_at": utcnow()}
    if outcome is not None:
        values |= {"decision": outcome.decision, "reason": outcome.reason, "scores": outcome.scores}
    else:
        values |= {"reason": error}
    owned = session.execute(
        update(Evaluation)
        .where(
            Evaluation.id == evaluation.id,
            Evaluation.state == "running",
            Evaluation.worker == evaluation.worker,
        )
        .values(**values)
    )
    if not owned.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        log.warning("evaluation %d was decided elsewhere meanwhile; result discarded", evaluation.id)
        return False
    revision = evaluation.revision
    if outcome is not None:
        revision.status = outcome.decision
    audit(
        session,
        None,
        "evaluation",
        revision.repo.name,
        tag=revision.tag,
        commit=revision.commit,
        state=state,
        decision=outcome.decision if outcome else None,
        reason=outcome.reason if outcome else error,
        worker=evaluation.worker,
    )
    session.commit()
    session.refresh(evaluation)
    return True


def evaluate_revision(
    session: Session, store: ArtifactStore, settings: HubSettings, evaluation: Evaluation
) -> Evaluation:
    """Run one claimed job to its end: `done` with a decision, or `failed` with the error."""
    revision = evaluation.revision
    label = f"{revision.repo.name}@{revision.tag}"
    log.info("evaluating %s", label, extra={"evaluation": evaluation.id, "worker": evaluation.worker})
    with tempfile.TemporaryDirectory(prefix="fedem-eval-") as workdir:
        try:
            outcome = judge(session, store, settings, revision, Path(workdir))
        except Exception as err:
            log.exception("evaluation of %s failed", label)
            session.rollback()
            message = f"{type(err).__name__}: {err}".strip()
            _finish(session, evaluation, "failed", None, message[:4000])
            return evaluation
    if _finish(session, evaluation, "done", outcome, ""):
        log.info("%s %s: %s", label, outcome.decision, outcome.reason)
    return evaluation


def check_eval_data(settings: HubSettings) -> HeldOut:
    """The held-out data, read once up front: a worker with unusable data refuses to start rather
    than failing every submission it takes."""
    if settings.eval_data is None or not settings.eval_data.is_dir():
        raise UserError(f"no such folder of evaluation data: {settings.eval_data}")
    return load_held_out(settings.eval_data, settings.eval_max_lines, settings.eval_max_pairs)


def summary(evaluation: Evaluation) -> dict[str, Any]:
    revision = evaluation.revision
    return {
        "repo": revision.repo.name,
        "tag": revision.tag,
        "commit": revision.commit,
        "state": evaluation.state,
        "decision": evaluation.decision,
        "reason": evaluation.reason,
    }


def run_worker(
    settings: HubSettings,
    once: bool = False,
    poll_s: float | None = None,
    stop: threading.Event | None = None,
    db: Database | None = None,
    store: ArtifactStore | None = None,
) -> list[dict[str, Any]]:
    """Evaluate queued jobs until `stop` is set — or, with `once`, until the queue is empty — and
    return a summary of each job done (`once` only; a long-running worker keeps none)."""
    poll_s = settings.eval_poll_s if poll_s is None else poll_s
    stop = stop or threading.Event()
    check_eval_data(settings)
    own_db = db is None
    database = db or Database(settings.database_url)
    if own_db:
        migrate(database.engine)
    artifacts = store or ArtifactStore(settings.artifact_url)
    name = worker_name()
    done: list[dict[str, Any]] = []
    try:
        while not stop.is_set():
            try:
                with database.session() as session:
                    job = claim_next(session, name)
                    if job is not None:
                        evaluate_revision(session, artifacts, settings, job)
                        if once:
                            done.append(summary(job))
            except Exception:
                if once:
                    raise
                log.exception("evaluation worker pass failed")
                job = None
            if job is None:
                if once:
                    break
                stop.wait(poll_s)
    finally:
        if own_db:
            database.engine.dispose()
    return done
