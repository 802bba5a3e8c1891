"""The donor's turn in the adapter relay: `fedem client run` and `fedem client push --resume`.

One turn (`run_donor`): lease an adapter (or let the hub pick the open one that most needs work),
download the base release the lease names and the adapter's newest accepted version, continue
training it on local data until the steps are done or the lease is about to end, evaluate on a
held-out slice of that data, and push the new version with its metrics. docs/client.md is the
user's view; the reasons for the less obvious choices:

- **The lease is the clock.** A push after expiry is refused (410), so training stops early enough
  (`fedem.train.callbacks.Deadline`) to leave `margin_s` for the final evaluation, the save and the
  upload. The deadline is measured on this machine's clock from the moment the lease was asked
  for plus the lease's length, so a skewed clock on either side cannot make it late.
- **Work is never lost to the network.** Before pushing, the run folder gets `pending.json`: what to
  push, where, under which lease. A hub that is down or failing is retried for `hub_retry_s`; if it
  stays away the version waits on disk for `push_pending` (`fedem client push --resume`), which
  also takes a new lease when the old one ended and the adapter has not moved on meanwhile.
- **Leases are given back.** Ctrl-C or an error releases the lease (best effort), so an adapter is
  not blocked for hours by a donor who left; a crash that cannot release lets it expire. The one
  exception is a hub that cannot be reached at push time: releasing is impossible then, and the
  live lease is exactly what `push --resume` needs.
- **Nothing private is published.** The pushed `fedem.json` and `adapter_config.json` name the hub
  releases (`seshu/base@v3`, `repo@v2`) instead of local paths, which would show the donor's user
  name; the data file is named without its folder.
- **Relay across base releases.** An adapter is pinned to the base it was trained on; when the lease
  names a newer base release than the head was trained on, the head is continued on the new base
  (`FinetuneConfig.rebase`), and fedem.json records both bases.
"""

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedem.client.hub_client import HubAPIError, HubClient, TransferError, collect, sha256_file
from fedem.data.prompts import Direction
from fedem.errors import UserError
from fedem.languages import LANGUAGES, adapter_shape
from fedem.provenance import PROVENANCE_FILE, read_provenance, write_json_atomic

if TYPE_CHECKING:  # torch and transformers load when a run starts, so `fedem --help` stays fast
    from fedem.train.config import FinetuneConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_WORKDIR = Path("~/.cache/fedem/donor")
PENDING = "pending.json"
UPLOAD = "upload"
# what a pushed version holds: the adapter, its provenance and its training curve — not the
# tokenizer (the base release has it), not checkpoints (optimizer state, many times the adapter)
PUSHED_FILES = ("adapter_model.safetensors", "adapter_config.json", PROVENANCE_FILE, "metrics.jsonl")
BACKOFF_CAP_S = 60.0


class DonorRun(BaseModel):
    """One `fedem client run`. Frozen; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub: str
    token: str = Field(repr=False)
    adapter: str | None = Field(default=None, description="namespace/name; None: the hub picks")
    task: Literal["translate", "lm"] = "translate"
    data: Path = Field(description="translation pairs (english<TAB>other) or text, one example a line")
    direction: Direction = "en-xx"
    lang: str | None = Field(default=None, description="the data's language, if its file name does not say")
    workdir: Path = DEFAULT_WORKDIR
    wait: bool = Field(default=False, description="wait (with backoff) while the adapter is leased")
    wait_max_s: float = Field(default=3600.0, ge=0)
    margin_s: float = Field(default=300.0, ge=0, description="kept free before the lease ends")
    max_steps: int | None = Field(default=None, gt=0)
    eval_size: int = Field(default=64, gt=0, description="examples held out to evaluate the new version")
    max_length: int = Field(default=256, gt=8)
    train: dict[str, Any] = Field(default_factory=dict, description="TrainSettings overrides")
    hub_retry_s: float = Field(default=600.0, ge=0, description="how long a down hub is retried")
    backoff_s: float = Field(default=2.0, gt=0, description="first pause of a retry; doubles up to 60 s")

    @field_validator("workdir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("lang")
    @classmethod
    def _known(cls, code: str | None) -> str | None:
        if code is not None and code not in LANGUAGES:
            raise ValueError(f"unknown language code {code!r}; known: {', '.join(LANGUAGES)}")
        return code


class HubUnreachable(Exception):
    """The hub stayed down (no connection, or 5xx answers) for the whole retry budget."""


@dataclass
class Turn:
    """The live state of one turn: which lease is ours right now (a re-lease replaces it)."""

    lease_id: str
    keep_lease: bool = False  # True when the hub vanished at push time: the lease is what resume needs


# --- matching data and adapters ------------------------------------------------------------------


def data_language(cfg: DonorRun) -> str | None:
    """The data's language: `lang`, else the file name (`en-hi.tsv`, `hi.txt`), else the adapter name."""
    if cfg.lang:
        return cfg.lang
    stem = cfg.data.name.split(".", 1)[0]
    if cfg.task == "translate" and stem.startswith("en-") and stem[3:] in LANGUAGES:
        return stem[3:]
    if cfg.task == "lm" and cfg.data.is_file() and stem in LANGUAGES:
        return stem
    return adapter_shape(cfg.adapter)[1] if cfg.adapter else None


def fits(name: str, task: str, lang: str | None) -> bool:
    """Whether data of `task`/`lang` can train adapter `name` (names outside the convention: unknown,
    so only an explicitly named adapter may be one)."""
    shape_task, shape_lang = adapter_shape(name)
    return shape_task == task and (lang is None or shape_lang == lang)


def _check_fit(cfg: DonorRun, lang: str | None) -> None:
    assert cfg.adapter is not None
    shape_task, shape_lang = adapter_shape(cfg.adapter)
    if shape_task is not None and shape_task != cfg.task:
        raise UserError(f"{cfg.adapter} is a {shape_task} adapter, but --task is {cfg.task}")
    if shape_lang is not None and lang is not None and shape_lang != lang:
        raise UserError(
            f"{cfg.adapter} is for {LANGUAGES[shape_lang].name}, but {cfg.data.name} is "
            f"{LANGUAGES[lang].name}; pass --lang if the file name misleads"
        )


# --- talking to a hub that may come and go -------------------------------------------------------


def _backoff(attempt: int, first_s: float) -> float:
    """Exponential backoff with jitter: donors retrying together do not arrive together."""
    return min(BACKOFF_CAP_S, first_s * 2 ** min(attempt, 30)) * random.uniform(0.5, 1.0)


def _transient(err: BaseException, idempotent: bool) -> bool:
    """Worth retrying: the hub was not reached at all, or (for calls safe to repeat) the connection
    broke or the hub failed (5xx). A lease request is not safe to repeat once it may have arrived:
    its answer could be lost after the hub granted it, and the retry would meet our own lease."""
    if isinstance(err, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    if not idempotent:
        return False
    return isinstance(err, httpx.TransportError) or (isinstance(err, HubAPIError) and err.status >= 500)


def with_retry(
    call: Callable[[], T], budget_s: float, first_s: float, what: str, idempotent: bool = True
) -> T:
    """`call()`, retried while the hub is unreachable or failing (5xx) for up to `budget_s` seconds;
    raises `HubUnreachable` after that. Every other error (a 4xx answer) is raised at once.
    A push counts as idempotent: if a lost answer hid a successful push, the retry is refused
    (the lease has ended) and `push_run` finds the version on the hub by its files."""
    give_up = time.monotonic() + budget_s
    for attempt in range(1_000_000):
        try:
            return call()
        except (httpx.TransportError, HubAPIError) as err:
            if not _transient(err, idempotent):
                raise
            pause = _backoff(attempt, first_s)
            if time.monotonic() + pause > give_up:
                raise HubUnreachable(f"{what}: {err}") from err
            log.warning("%s failed (%s); retrying in %.0f s", what, err, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _user_error(err: HubAPIError) -> UserError:
    return UserError(f"{err.message} ({err.code})")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _release_quietly(client: HubClient, lease_id: str) -> None:
    """Give the lease back if the hub answers; never raise (we are already handling an error)."""
    try:
        client.release(lease_id)
        log.info("released lease %s", lease_id)
    except (httpx.HTTPError, HubAPIError) as err:
        log.warning("could not release lease %s (%s); it ends by itself when it expires", lease_id, err)


def take_lease(client: HubClient, cfg: DonorRun, among: list[str] | None) -> tuple[dict[str, Any], datetime]:
    """Lease `cfg.adapter` (or the open adapter that most needs work, among `among`), waiting with
    backoff while it is taken if `cfg.wait`. Returns the lease and its end on the local clock."""
    adapter = cfg.adapter
    ask = partial(client.lease, adapter) if adapter else partial(client.lease_any, among)
    started = time.monotonic()
    for attempt in range(1_000_000):
        asked = datetime.now(UTC)
        try:
            lease = with_retry(ask, cfg.hub_retry_s, cfg.backoff_s, "leasing", idempotent=False)
        except HubAPIError as err:
            busy = (err.status, err.code) in ((409, "leased"), (404, "no_open_adapter"))
            if not busy:
                raise _user_error(err) from None
            if err.code == "leased":
                body = err.body if isinstance(err.body, dict) else {}
                why = f"{cfg.adapter} is leased by {body.get('holder')} until {body.get('expires_at')}"
            else:
                why = "no adapter that fits your data is open (all leased, or none has a base release)"
            waited = time.monotonic() - started
            if not cfg.wait:
                raise UserError(f"{why}; pass --wait to wait for it") from None
            if waited >= cfg.wait_max_s:
                raise UserError(f"{why}; gave up after waiting {waited:.0f} s") from None
            pause = min(_backoff(attempt, cfg.backoff_s), cfg.wait_max_s - waited)
            log.info("%s; trying again in %.0f s", why, pause)
            time.sleep(max(pause, 0.0))
            continue
        length = _parse_time(lease["expires_at"]) - _parse_time(lease["started_at"])
        return lease, asked + length
    raise AssertionError("unreachable")


def fetch(client: HubClient, ref: str, cache: Path, cfg: DonorRun) -> tuple[Path, dict[str, Any]]:
    """Download `repo@tag` into `cache/<repo>/<commit>` (files already there with the right sha256 are
    kept; an interrupted file resumes from its `.part`); returns the folder and the log entry."""
    repo, _, tag = ref.partition("@")
    info = with_retry(lambda: client.revision(repo, tag or "main"), cfg.hub_retry_s, cfg.backoff_s, ref)
    dest = cache / repo / info["commit"]
    try:
        done = with_retry(
            lambda: client.pull(repo, info["commit"], dest), cfg.hub_retry_s, cfg.backoff_s, ref
        )
    except TransferError as err:
        raise UserError(str(err)) from None
    log.info("%s: %d file(s) downloaded, %d cached in %s", ref, len(done.moved), len(done.reused), dest)
    return dest, info


# --- one turn ------------------------------------------------------------------------------------


def _finetune_config(
    cfg: DonorRun, base: Path, init: Path | None, rebase: bool, parent: str | None, out: Path
) -> "FinetuneConfig":
    from fedem.config import validate
    from fedem.train.config import FinetuneConfig

    default_train = FinetuneConfig.model_fields["train"].default.model_dump()
    train = {**default_train, **cfg.train, **({"max_steps": cfg.max_steps} if cfg.max_steps else {})}
    data: dict[str, Any] = {
        "base": base,
        "task": cfg.task,
        "direction": cfg.direction,
        "init": init,
        "rebase": rebase,
        "parent": parent,
        "max_length": cfg.max_length,
        "eval_size": cfg.eval_size,
        "train": train,
        "out": out,
        ("pairs" if cfg.task == "translate" else "data"): cfg.data,
    }
    if cfg.task == "translate":
        data["lang"] = data_language(cfg)
    return validate(FinetuneConfig, data, source="client run")


def stage_upload(out: Path, base_ref: str, parent: str | None, repo: str) -> Path:
    """Copy what a version publishes into `out/upload`, with local paths replaced by hub names."""
    upload = out / UPLOAD
    shutil.rmtree(upload, ignore_errors=True)
    upload.mkdir(parents=True)
    for name in PUSHED_FILES:
        if (out / name).is_file():
            shutil.copyfile(out / name, upload / name)
    provenance = read_provenance(out)
    config = provenance.get("config", {})
    for key in ("pairs", "data"):
        if config.get(key):
            config[key] = Path(config[key]).name
    config.update(base=base_ref, init=parent, out=repo)
    write_json_atomic(upload / PROVENANCE_FILE, {**provenance, "config": config, "base_release": base_ref})
    adapter_config = json.loads((upload / "adapter_config.json").read_text(encoding="utf-8"))
    base_repo, _, base_tag = base_ref.partition("@")
    adapter_config.update(base_model_name_or_path=base_repo, revision=base_tag or None)
    write_json_atomic(upload / "adapter_config.json", adapter_config)
    return upload


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: a diverged run reports null rather than breaking the push."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def run_donor(cfg: DonorRun, callbacks: tuple[Any, ...] = ()) -> dict[str, Any]:
    """One turn in the relay (lease → download → train → evaluate → push); returns a JSON-able
    summary of what was contributed. `callbacks` are extra Trainer callbacks (tests use them)."""
    if not cfg.data.exists():
        raise UserError(f"no such file or folder: {cfg.data}")
    lang = data_language(cfg)
    if cfg.adapter is not None:
        _check_fit(cfg, lang)
    if cfg.task == "translate" and lang is None:
        raise UserError(f"which language is {cfg.data.name}? name it en-<lang>.tsv or pass --lang")
    with HubClient(cfg.hub, cfg.token) as client:
        try:
            among = None
            if cfg.adapter is None:
                repos = with_retry(client.repos, cfg.hub_retry_s, cfg.backoff_s, "listing adapters")
                among = [
                    r["name"] for r in repos if r["kind"] == "adapter" and fits(r["name"], cfg.task, lang)
                ]
            lease, deadline = take_lease(client, cfg, among)
        except HubUnreachable as err:
            raise UserError(f"cannot reach the hub at {cfg.hub} ({err})") from None
        except httpx.TransportError as err:
            raise UserError(
                f"lost the connection to {cfg.hub} while leasing ({err}); if the lease was granted "
                "it expires by itself — run again"
            ) from None
        repo = lease["repo"]
        log.info(
            "leased %s (from %s, on %s) until %s",
            repo,
            lease["from_revision"] or "scratch",
            lease["base"],
            lease["expires_at"],
        )
        turn = Turn(lease["lease_id"])
        try:
            return _turn(client, cfg, lease, deadline, turn, callbacks)
        except BaseException:
            if not turn.keep_lease:
                _release_quietly(client, turn.lease_id)
            raise


def _turn(
    client: HubClient,
    cfg: DonorRun,
    lease: dict[str, Any],
    deadline: datetime,
    turn: Turn,
    callbacks: tuple[Any, ...],
) -> dict[str, Any]:
    """Everything after the lease: the caller releases it if this raises."""
    from fedem.train.callbacks import Deadline
    from fedem.train.finetune import finetune

    repo = lease["repo"]
    if lease["base"] is None:
        raise UserError(f"{repo} has no base release to train on yet")
    cache = cfg.workdir / "cache"
    try:
        base_dir, _ = fetch(client, lease["base"], cache, cfg)
        init_dir, parent, rebase = None, None, False
        if lease["from_revision"]:
            parent = f"{repo}@{lease['from_revision']}"
            init_dir, head = fetch(client, parent, cache, cfg)
            rebase = head["base"] != lease["base"]
            recorded_task = read_provenance(init_dir).get("config", {}).get("task")
            if recorded_task not in (None, cfg.task):
                raise UserError(f"{parent} was trained for task {recorded_task!r}, not {cfg.task!r}")
    except HubUnreachable as err:
        raise UserError(f"the hub at {cfg.hub} went away while downloading ({err}); run again") from None
    except HubAPIError as err:
        raise _user_error(err) from None
    if rebase:
        log.info("%s was trained on %s; continuing it on %s", parent, head["base"], lease["base"])
    out = cfg.workdir / "runs" / lease["lease_id"]
    ft_cfg = _finetune_config(cfg, base_dir, init_dir, rebase, parent, out)
    stopper = Deadline(deadline, cfg.margin_s)
    if stopper.seconds_left <= 0:
        raise UserError(
            f"the lease on {repo} ends at {lease['expires_at']}: no time left to train before the "
            f"{cfg.margin_s:.0f} s safety margin (--margin)"
        )
    trained = finetune(ft_cfg, callbacks=[stopper, *callbacks])
    metrics = _clean_metrics(
        {
            **trained["metrics"],
            "train_examples": trained["train_examples"],
            "eval_examples": trained["eval_examples"],
            "steps": trained["steps"],
            "stopped_early": stopper.stopped_early,
            "task": cfg.task,
            "language": data_language(cfg),
        }
    )
    noun = "translation examples" if cfg.task == "translate" else "lines"
    pending = {
        "hub": cfg.hub,
        "repo": repo,
        "lease_id": turn.lease_id,
        "from_revision": lease["from_revision"],
        "base": lease["base"],
        "parent": parent,
        "rebased": rebase,
        "description": f"{trained['train_examples']} {noun} from {cfg.data.name}, {trained['steps']} steps",
        "metrics": metrics,
        "out": str(out),
        "created_at": datetime.now(UTC).isoformat(),
    }
    stage_upload(out, lease["base"], parent, repo)
    write_json_atomic(out / PENDING, pending)
    try:
        pushed = push_run(client, out, cfg.hub_retry_s, cfg.backoff_s, turn=turn)
    except HubUnreachable as err:
        turn.keep_lease = True
        raise UserError(
            f"the hub at {cfg.hub} did not answer for {cfg.hub_retry_s:.0f} s ({err}). Your version is "
            f"kept in {out} and your lease lasts until {lease['expires_at']}: push it with "
            "`fedem client push --resume`"
        ) from None
    return {
        **pushed,
        "steps": trained["steps"],
        "max_steps": ft_cfg.train.max_steps,
        "stopped_early": stopper.stopped_early,
        "train_examples": trained["train_examples"],
        "eval_examples": trained["eval_examples"],
        "rebased": rebase,
        "expires_at": lease["expires_at"],
    }


# --- pushing (now, or later with --resume) -------------------------------------------------------


def _landed(client: HubClient, repo: str, upload: Path) -> dict[str, Any] | None:
    """The revision holding exactly these files, if an earlier attempt's push got through (its answer
    may have been lost with the connection)."""
    wanted = {rel: sha256_file(path)[0] for rel, path in collect(upload)}
    for entry in client.log(repo):
        if {f["path"]: f["sha256"] for f in entry["files"]} == wanted:
            return entry
    return None


def _relet(client: HubClient, out: Path, pending: dict[str, Any]) -> str:
    """A new lease for a version whose lease ended before it was pushed — only if the adapter is
    exactly where it was (same head, same base), so pushing cannot overwrite someone's newer work."""
    repo = pending["repo"]
    try:
        lease = client.lease(repo)
    except HubAPIError as err:
        if err.code == "leased":
            body = err.body if isinstance(err.body, dict) else {}
            raise UserError(
                f"your lease ended and {repo} is now leased by {body.get('holder')} until "
                f"{body.get('expires_at')}. Your version is kept in {out}; run `fedem client push "
                "--resume` after that (it is pushed only if nobody pushed meanwhile)"
            ) from None
        raise _user_error(err) from None
    if (lease["from_revision"], lease["base"]) != (pending["from_revision"], pending["base"]):
        _release_quietly(client, lease["lease_id"])
        raise UserError(
            f"{repo} moved on while your version waited: it is now at {lease['from_revision']} on "
            f"{lease['base']}, and yours continues {pending['from_revision'] or 'nothing'} on "
            f"{pending['base']}. Pushing it would discard that work, so it was not pushed; it stays "
            f"in {out} (delete the folder, or train again with `fedem client run`)"
        )
    log.info("took a new lease %s on %s (the old one ended)", lease["lease_id"], repo)
    pending["lease_id"] = lease["lease_id"]
    write_json_atomic(out / PENDING, pending)
    return str(lease["lease_id"])


def push_run(
    client: HubClient, out: Path, retry_s: float, backoff_s: float, turn: Turn | None = None
) -> dict[str, Any]:
    """Push the version waiting in `out` (its `pending.json` says what and where), retrying a hub that
    is down; if its lease ended, re-lease once (see `_relet`). Removes `pending.json` when done."""
    pending: dict[str, Any] = json.loads((out / PENDING).read_text(encoding="utf-8"))
    repo, upload = pending["repo"], out / UPLOAD
    relet = False
    while True:
        lease_id = pending["lease_id"]
        try:
            push = partial(
                client.push,
                repo,
                upload,
                description=pending["description"],
                metrics=pending["metrics"],
                lease_id=lease_id,
                base=pending["base"],
            )
            done = with_retry(push, retry_s, backoff_s, f"pushing {repo}")
            revision, uploaded = done.revision, done.bytes
            break
        except HubAPIError as err:
            lease_gone = err.status == 410 or err.code in ("lease_ended", "lease_required", "lease_not_found")
            if not lease_gone:
                raise UserError(
                    f"the hub refused the push: {err.message} ({err.code}); kept in {out}"
                ) from None
            landed = with_retry(partial(_landed, client, repo, upload), retry_s, backoff_s, f"reading {repo}")
            if landed is not None:  # an earlier attempt got through; its answer was lost
                revision, uploaded = landed, 0
                break
            if relet:
                raise UserError(
                    f"the hub refused the push: {err.message} ({err.code}); kept in {out}"
                ) from None
            relet = True
            log.warning("lease %s on %s ended before the push (%s)", lease_id, repo, err.code)
            new_id = _relet(client, out, pending)
            if turn is not None:
                turn.lease_id = new_id
    (out / PENDING).unlink()
    log.info("pushed %s %s (%s)", repo, revision["tag"], revision.get("status", "accepted"))
    return {
        "adapter": repo,
        "version": revision["tag"],
        "commit": revision["commit"],
        "status": revision.get("status"),
        "parent": revision.get("parent"),
        "base": revision.get("base"),
        "description": pending["description"],
        "metrics": pending["metrics"],
        "uploaded_bytes": uploaded,
        "lease_id": pending["lease_id"],
        "out": str(out),
    }


def pending_runs(workdir: Path) -> list[Path]:
    """Run folders with a version trained but not yet pushed, oldest first."""
    found = (workdir.expanduser() / "runs").glob(f"*/{PENDING}")
    return [p.parent for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def push_pending(
    workdir: Path,
    token: str,
    hub: str | None = None,
    retry_s: float = 60.0,
    backoff_s: float = 2.0,
) -> dict[str, Any]:
    """Push every version waiting in `workdir` (`fedem client push --resume`).

    Each goes to the hub it was trained for (or `hub`, if given: the same hub at a new address).
    A run that cannot be pushed now stays on disk with the reason; the others still go.
    """
    pushed, kept = [], []
    for out in pending_runs(workdir):
        pending = json.loads((out / PENDING).read_text(encoding="utf-8"))
        url = hub or pending["hub"]
        with HubClient(url, token) as client:
            try:
                pushed.append(push_run(client, out, retry_s, backoff_s))
            except UserError as err:
                kept.append({"out": str(out), "repo": pending["repo"], "reason": str(err)})
            except (HubUnreachable, httpx.HTTPError, HubAPIError) as err:
                reason = f"hub {url} unreachable or failing: {err}"
                kept.append({"out": str(out), "repo": pending["repo"], "reason": reason})
    return {"workdir": str(workdir.expanduser()), "pushed": pushed, "kept": kept}
