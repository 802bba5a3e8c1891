"""`fedem hub …`: run a hub, and push, pull and lease from the shell (docs/hub.md has examples).

`add_hub_parser` registers the subcommands on the main `fedem` parser; each handler takes the
parsed arguments and returns a JSON-able summary, which `fedem.cli.main` prints (`--json` for one
machine-readable line). Mistakes the user can fix — a bad token, an unknown repo, a hub that is not
running — become `UserError`s carrying the hub's own message; a hub-side failure (5xx) is not the
user's doing and keeps its traceback.
"""

import argparse
import contextlib
import json
import logging
import logging.config
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedem.errors import UserError

if TYPE_CHECKING:  # the heavy imports wait until a command runs, so `fedem --help` stays fast
    from fastapi import FastAPI

    from fedem.client.hub_client import HubClient
    from fedem.hub.db import Database
    from fedem.hub.settings import HubSettings

Handler = Callable[[argparse.Namespace], dict[str, Any]]

log = logging.getLogger("fedem.hub")

# `--workers N`: uvicorn starts each worker process by import string, so the settings travel as JSON
# in the environment, which the workers inherit.
SETTINGS_ENV = "FEDEM_HUB_SETTINGS"

_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line — time, level, logger, message, and any `extra=` fields — so a log
    shipper can index the hub's logs; uvicorn's access lines are split into method, path, status."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            entry.update(zip(("client", "method", "path", "http", "status"), record.args, strict=True))
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def json_logging(verbose: bool = False) -> dict[str, Any]:
    """The `logging.config` dict that sends every record (the hub's and uvicorn's) to stderr as JSON
    lines; uvicorn applies it again in each worker process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": "DEBUG" if verbose else "INFO"},
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_json_logging(verbose: bool = False) -> None:
    logging.config.dictConfig(json_logging(verbose))


def _settings(args: argparse.Namespace) -> "HubSettings":
    from pydantic import ValidationError

    from fedem.hub.settings import HubSettings

    given = {
        "db_url": getattr(args, "db", None),
        "store_url": getattr(args, "store", None),
        "lease_ttl_s": getattr(args, "lease_ttl", None),
        "sweep_every_s": getattr(args, "sweep_every", None),
        "max_file_bytes": getattr(args, "max_file_bytes", None),
        "rate_limit_per_s": getattr(args, "rate_limit", None),
        "rate_limit_burst": getattr(args, "rate_burst", None),
        "cors_origins": getattr(args, "cors_origin", None),
        "eval_data": getattr(args, "eval_data", None),
        "eval_worker": getattr(args, "eval_worker", None),
        "eval_poll_s": getattr(args, "poll", None),
        "accept_delta": getattr(args, "delta", None),
        "accept_epsilon": getattr(args, "epsilon", None),
    }
    try:
        return HubSettings(root=args.root, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        raise UserError(f"bad hub settings: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}") from None


def bootstrap_admin(db: "Database") -> str | None:
    """On a hub's first start (no users at all) create the maintainer `admin`; returns its token."""
    from sqlalchemy import func, select

    from fedem.hub.auth import create_user
    from fedem.hub.models import User

    with db.session() as session:
        if session.scalar(select(func.count()).select_from(User)):
            return None
        _user, token = create_user(session, "admin", "maintainer")
        session.commit()
        return token


def app_from_environment() -> "FastAPI":
    """The app factory each worker of `serve --workers N` calls (`prepare` ran in the parent)."""
    from fedem.hub.app import create_app
    from fedem.hub.settings import HubSettings

    return create_app(HubSettings.model_validate_json(os.environ[SETTINGS_ENV]), prepared=True)


def run_hub(
    settings: "HubSettings",
    workers: int = 1,
    sockets: list[socket.socket] | None = None,
    prepared: bool = False,
    **uvicorn: Any,
) -> None:
    """Serve the hub with uvicorn in this process, or in `workers` processes sharing one listening
    socket (`sockets`, or one bound from `host`/`port`/`fd` in `uvicorn`).

    The schema migration and the removal of unfinished uploads run once, here (or already by the
    caller: `prepared`), before any worker starts: a worker doing them would race the others'
    migrations and delete their uploads in flight. Several workers are safe because the invariants
    live in the database (docs/reliability.md): the one-live-lease index, unique revision numbers,
    and conditional updates for lease ends and evaluation claims."""
    import uvicorn as server

    from fedem.hub.app import create_app, prepare

    if not prepared:
        prepare(settings)
    if workers == 1:
        server.Server(server.Config(create_app(settings, prepared=True), **uvicorn)).run(sockets=sockets)
        return
    from uvicorn.supervisors import Multiprocess

    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    config = server.Config(f"{__name__}:app_from_environment", factory=True, workers=workers, **uvicorn)
    Multiprocess(config, sockets=sockets or [config.bind_socket()]).run()


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.hub.app import prepare
    from fedem.hub.db import Database

    configure_json_logging(args.verbose)
    settings = _settings(args)
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.workers > 1 and settings.eval_worker:
        raise UserError("--eval-worker needs a single process: run `fedem hub evaluate` beside the workers")
    prepare(settings)
    db = Database(settings.database_url)
    token = bootstrap_admin(db)
    db.engine.dispose()
    if token:
        # stdout, once: the only time this token exists in clear (the database keeps its hash)
        print(f"first start: created maintainer 'admin' with token {token}", flush=True)  # noqa: T201
    where = {"url": f"http://{args.host}:{args.port}", "root": str(settings.root), "workers": args.workers}
    log.info("hub starting", extra=where)
    run_hub(
        settings,
        args.workers,
        prepared=True,
        host=args.host,
        port=args.port,
        log_config=json_logging(args.verbose),
        log_level="debug" if args.verbose else "info",
    )
    return {"status": "stopped", "root": str(settings.root)}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation worker against the hub's database and store (no running hub needed)."""
    configure_json_logging(args.verbose)
    settings = _settings(args)
    if not settings.eval_data or not settings.eval_data.is_dir():
        raise UserError(f"no such folder of evaluation data: {settings.eval_data}")
    if settings.db_url is None and not (settings.root / "hub.db").is_file():
        raise UserError(
            f"no hub database in {settings.root}: pass the hub's --root (and --db, if it has one)"
        )

    from fedem.hub.evaluation import run_worker  # torch and transformers: only once the inputs are right

    done = run_worker(settings, once=args.once)
    decided = {d: sum(1 for job in done if job["decision"] == d) for d in ("accepted", "rejected")}
    return {"root": str(settings.root), "evaluated": len(done), **decided, "jobs": done}


def cmd_user_add(args: argparse.Namespace) -> dict[str, Any]:
    """Add a contributor straight in the hub's database (no running hub or token needed)."""
    from fedem.hub.auth import create_user
    from fedem.hub.db import Database, migrate
    from fedem.hub.errors import HubError

    settings = _settings(args)
    settings.root.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    try:
        migrate(db.engine)
        with db.session() as session:
            user, token = create_user(session, args.name, args.role)
            session.commit()
            return {"name": user.name, "role": user.role, "pseudonym": user.pseudonym, "token": token}
    except HubError as err:
        raise UserError(err.message) from None
    finally:
        db.engine.dispose()


@contextlib.contextmanager
def _hub(args: argparse.Namespace, token_needed: bool = False) -> Iterator["HubClient"]:
    """A client for `--hub`/`FEDEM_HUB` with `--token`/`FEDEM_TOKEN`, turning the hub's 4xx answers and
    an unreachable hub into `UserError`s."""
    import httpx

    from fedem.client.hub_client import HubAPIError, HubClient, TransferError

    url = getattr(args, "hub", None) or os.environ.get("FEDEM_HUB")
    token = getattr(args, "token", None) or os.environ.get("FEDEM_TOKEN")
    if not url:
        raise UserError("which hub? pass --hub URL or set FEDEM_HUB")
    if token_needed and not token:
        raise UserError("this needs your token: pass --token or set FEDEM_TOKEN")
    client = HubClient(url, token)
    try:
        yield client
    except HubAPIError as err:
        if 400 <= err.status < 500:
            raise UserError(f"{err.message} ({err.code})") from None
        raise
    except (httpx.ConnectError, httpx.ConnectTimeout):
        raise UserError(f"cannot reach hub at {url}") from None
    except httpx.TransportError as err:
        raise UserError(f"lost the connection to the hub at {url}: {err}") from None
    except TransferError as err:
        raise UserError(str(err)) from None
    finally:
        client.close()


def cmd_whoami(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args, token_needed=True) as hub:
        return hub.whoami()


def cmd_repo_create(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args, token_needed=True) as hub:
        return hub.create_repo(args.name, args.kind, args.base_repo)


def cmd_ls(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args) as hub:
        repos = hub.repos()
    shown = ("kind", "head", "revisions", "base_repo")
    return {"hub": hub.url, "repos": {r["name"]: {k: r[k] for k in shown} for r in repos}}


def cmd_log(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args) as hub:
        entries = hub.log(args.repo)
    shown = ("commit", "parent", "base", "contributor", "status", "description", "metrics", "created_at")
    revisions = {e["tag"]: {k: e[k] for k in shown} | {"files": len(e["files"])} for e in entries}
    return {"repo": args.repo, "revisions": revisions}


def cmd_push(args: argparse.Namespace) -> dict[str, Any]:
    metrics = None
    if args.metrics_json is not None:
        try:
            metrics = json.loads(Path(args.metrics_json).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read metrics from {args.metrics_json}: {err}") from None
        if not isinstance(metrics, dict):
            raise UserError(f"{args.metrics_json} must hold a JSON object")
    with _hub(args, token_needed=True) as hub:
        done = hub.push(
            args.repo, args.folder, args.description, metrics, args.lease, args.base, args.include
        )
    rev = done.revision
    return {
        "repo": rev["repo"],
        "tag": rev["tag"],
        "commit": rev["commit"],
        "base": rev["base"],
        "uploaded": done.moved,
        "already_on_hub": done.reused,
        "bytes_uploaded": done.bytes,
    }


def cmd_pull(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args) as hub:
        done = hub.pull(args.repo, args.revision, args.out)
    rev = done.revision
    return {
        "repo": rev["repo"],
        "tag": rev["tag"],
        "commit": rev["commit"],
        "out": str(args.out),
        "downloaded": done.moved,
        "already_here": done.reused,
        "bytes_downloaded": done.bytes,
    }


def cmd_lease(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args, token_needed=True) as hub:
        return hub.lease(args.adapter)


def cmd_unlease(args: argparse.Namespace) -> dict[str, Any]:
    with _hub(args, token_needed=True) as hub:
        return hub.release(args.lease_id)


def parse_every(text: str) -> float:
    """`30m`, `6h`, `1d` (or plain seconds) → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise UserError(f"--every takes a duration like 30m, 6h or 1d, not {text!r}") from None
    if seconds <= 0:
        raise UserError("--every must be positive")
    return seconds


def _scheduled(args: argparse.Namespace, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `job` once, or forever every `--every` (each run's summary is logged)."""
    if args.every is None:
        return job()
    interval = parse_every(args.every)
    while True:
        log.info("scheduled run: %s", json.dumps(job(), default=str))
        time.sleep(interval)


def cmd_release_base(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.hub.release import release

    with _hub(args, token_needed=True) as hub:
        return _scheduled(
            args,
            lambda: release(
                hub,
                args.base_repo,
                args.workdir,
                method=args.method,
                density=args.density,
                eval_data=args.eval_data,
                seed=args.seed,
            ),
        )


def cmd_cpt(args: argparse.Namespace) -> dict[str, Any]:
    from fedem.hub.release import continue_pretraining

    with _hub(args, token_needed=True) as hub:
        return _scheduled(
            args,
            lambda: continue_pretraining(
                hub,
                args.base_repo,
                args.data,
                args.workdir,
                args.max_steps,
                eval_data=args.eval_data,
            ),
        )


def _add_gate_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """The evaluation data and the acceptance gate (docs/evaluation.md)."""
    parser.add_argument(
        "--eval-data",
        type=Path,
        required=required,
        metavar="DIR",
        help="server-only held-out data: mono/<lang>.txt and pairs/en-<lang>.tsv",
    )
    parser.add_argument(
        "--delta", type=float, help="minimum improvement of the task metric (chrF, or mean bpb; default 0)"
    )
    parser.add_argument(
        "--epsilon", type=float, help="largest relative bpb worsening in any language (default 0.02)"
    )


def add_hub_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `fedem hub ACTION …` on the main parser's subcommands."""
    from fedem.cli import _add_common  # here, not at the top: fedem.cli imports this module

    hub = commands.add_parser("hub", help="run a hub; push, pull and lease artifacts on one")
    actions = hub.add_subparsers(dest="hub_command", required=True, metavar="ACTION")

    def action(
        parent: "argparse._SubParsersAction[argparse.ArgumentParser]",
        name: str,
        handler: Handler,
        help: str,
        remote: bool = True,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help)
        if remote:
            parser.add_argument("--hub", help="hub URL (default: $FEDEM_HUB)")
            parser.add_argument("--token", help="your token (default: $FEDEM_TOKEN)")
        _add_common(parser)
        parser.set_defaults(handler=handler)
        return parser

    serve = action(actions, "serve", cmd_serve, "run the hub (JSON logs on stderr)", remote=False)
    serve.add_argument("--root", type=Path, required=True, help="folder for hub.db and blobs/ (created)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes on one port (default 1; more want a PostgreSQL --db, docs/reliability.md)",
    )
    serve.add_argument("--db", help="database URL, e.g. postgresql+psycopg://… (default: <root>/hub.db)")
    serve.add_argument(
        "--store", help="fsspec URL for blobs, e.g. s3://bucket/prefix (default: <root>/blobs)"
    )
    serve.add_argument("--lease-ttl", type=int, metavar="SECONDS", help="lease lifetime (default 3 h)")
    serve.add_argument(
        "--sweep-every", type=float, metavar="SECONDS", help="expired-lease sweep (default 300)"
    )
    serve.add_argument(
        "--max-file-bytes", type=int, metavar="N", help="largest artifact accepted (default 4 GiB)"
    )
    serve.add_argument(
        "--rate-limit", type=float, metavar="PER_S", help="requests per second per token (default 20)"
    )
    serve.add_argument(
        "--rate-burst", type=int, metavar="N", help="requests a token may save up (default 200)"
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="URL",
        help="allow browser calls from this origin (repeatable; default: none, CORS off)",
    )
    serve.add_argument(
        "--eval-worker",
        action="store_true",
        default=None,
        help="also evaluate submitted adapters in this process (needs --eval-data)",
    )
    _add_gate_options(serve)

    evaluate = action(
        actions,
        "evaluate",
        cmd_evaluate,
        "evaluate submitted adapter versions on held-out server data, then accept or reject them",
        remote=False,
    )
    evaluate.add_argument("--root", type=Path, required=True, help="the hub's --root")
    evaluate.add_argument("--db", help="the hub's --db URL, if it has one")
    evaluate.add_argument("--store", help="the hub's --store URL, if it has one")
    evaluate.add_argument(
        "--once", action="store_true", help="evaluate what is queued, then exit (default: keep polling)"
    )
    evaluate.add_argument("--poll", type=float, metavar="SECONDS", help="idle wait between polls (default 5)")
    _add_gate_options(evaluate, required=True)

    users = actions.add_parser("user", help="manage contributors")
    user_add = action(
        users.add_subparsers(dest="user_command", required=True, metavar="ACTION"),
        "add",
        cmd_user_add,
        "add a contributor directly in the hub database; prints the token once",
        remote=False,
    )
    user_add.add_argument("name")
    user_add.add_argument("--role", choices=["donor", "maintainer"], required=True)
    user_add.add_argument("--root", type=Path, required=True, help="the hub's --root")
    user_add.add_argument("--db", help="the hub's --db URL, if it has one")

    repos = actions.add_parser("repo", help="manage repos")
    create = action(
        repos.add_subparsers(dest="repo_command", required=True, metavar="ACTION"),
        "create",
        cmd_repo_create,
        "create a repo (maintainers)",
    )
    create.add_argument("name", help="namespace/name")
    create.add_argument("--kind", choices=["model", "adapter", "dataset"], required=True)
    create.add_argument("--base-repo", help="an adapter's base model repo")

    push = action(actions, "push", cmd_push, "upload a folder as a new revision")
    push.add_argument("repo")
    push.add_argument("folder", type=Path)
    push.add_argument("--lease", help="your lease id (adapter repos)")
    push.add_argument("--base", help="base release trained on, as repo@tag")
    push.add_argument("--description", default="")
    push.add_argument("--metrics-json", type=Path, metavar="FILE", help="a JSON object of evaluation results")
    push.add_argument("--include", nargs="+", metavar="GLOB", help="only files matching these globs")

    pull = action(actions, "pull", cmd_pull, "download a revision (resumes, verifies sha256)")
    pull.add_argument("repo")
    pull.add_argument("--revision", default="main", help="vN, a commit id, or main (the newest accepted)")
    pull.add_argument("--out", type=Path, required=True)

    action(actions, "ls", cmd_ls, "list repos")
    action(actions, "log", cmd_log, "a repo's revisions, newest first").add_argument("repo")
    action(actions, "lease", cmd_lease, "lease an adapter for training").add_argument("adapter")
    action(actions, "unlease", cmd_unlease, "give a lease back without pushing").add_argument("lease_id")

    for name, handler, help_text in (
        ("release", cmd_release_base, "merge the accepted adapter heads into the base; publish vN+1"),
        ("cpt", cmd_cpt, "continue pretraining the base on new text; publish vN+1"),
    ):
        publish = action(actions, name, handler, help_text)
        publish.add_argument("--base-repo", default="seshu/base")
        publish.add_argument("--workdir", type=Path, default=Path("runs/hub-releases"))
        publish.add_argument("--eval-data", type=Path, help="held-out folder (mono/, parallel/) for the card")
        publish.add_argument("--every", help="repeat on a schedule: 30m, 6h, 1d")
        if name == "release":
            publish.add_argument(
                "--method",
                default="ties",
                choices=["ties", "dare_ties", "dare_linear", "linear", "task_arithmetic"],
            )
            publish.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of ΔW kept")
            publish.add_argument("--seed", type=int, default=0)
        else:
            publish.add_argument("--data", type=Path, required=True, help="text file or folder of <lang>.txt")
            publish.add_argument("--max-steps", type=int, default=200)
    action(actions, "whoami", cmd_whoami, "the user behind your token")
