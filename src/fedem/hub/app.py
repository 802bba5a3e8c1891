"""`create_app(settings)`: the hub as a FastAPI app. It only wires things together — routes live in
`routes/`, queries and invariants in `leases.py`/`repos.py`, artifact I/O in `store.py`."""

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from fedem import __version__
from fedem.hub.db import Database, migrate
from fedem.hub.errors import install_handlers
from fedem.hub.leases import expire_due
from fedem.hub.limits import BodySizeLimit, TokenBuckets
from fedem.hub.routes import dashboard, evaluations, files, hf, leases, repos, users
from fedem.hub.settings import HubSettings
from fedem.hub.store import ArtifactStore

log = logging.getLogger(__name__)


async def _sweep_forever(db: Database, every_s: float) -> None:
    """Free expired leases every `every_s` seconds (requests also check expiry themselves)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            with db.session() as session:
                expired = await run_in_threadpool(expire_due, session)
            if expired:
                log.info("sweeper: %d expired lease(s) freed", expired)
        except Exception:  # keep sweeping: one failed pass must not stop the loop
            log.exception("sweeper pass failed")


def _start_eval_worker(
    settings: HubSettings, db: Database, store: ArtifactStore
) -> tuple[threading.Thread, threading.Event]:
    """`serve --eval-worker`: the evaluation worker in a daemon thread (imports torch only then)."""
    from fedem.hub.evaluation import check_eval_data, run_worker

    check_eval_data(settings)  # unusable data stops the start-up, not every submission
    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker,
        kwargs={"settings": settings, "stop": stop, "db": db, "store": store},
        name="fedem-eval-worker",
        daemon=True,
    )
    thread.start()
    log.info("evaluation worker started", extra={"eval_data": str(settings.eval_data)})
    return thread, stop


def prepare(settings: HubSettings) -> None:
    """Once per hub start, before any request: migrate the schema and remove unfinished uploads.
    `fedem hub serve --workers N` calls it before forking, so no worker deletes another's upload."""
    settings.root.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    migrate(db.engine)
    db.engine.dispose()
    store = ArtifactStore(settings.artifact_url)
    cleaned = store.clean_temp()  # leftovers of uploads cut off by a crash: never visible, now gone
    if cleaned:
        log.info("removed %d unfinished upload(s) from %s", cleaned, store.temp_dir)


def create_app(settings: HubSettings, prepared: bool = False) -> FastAPI:
    """The app; `prepared=True` when `prepare(settings)` already ran (a worker of a multi-process hub)."""
    if not prepared:
        prepare(settings)
    db = Database(settings.database_url)
    store = ArtifactStore(settings.artifact_url)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_forever(db, settings.sweep_every_s))
        worker = _start_eval_worker(settings, db, store) if settings.eval_worker else None
        yield
        sweeper.cancel()
        if worker is not None:
            thread, stop = worker
            stop.set()
            await run_in_threadpool(thread.join, 10.0)  # mid-evaluation it finishes as a daemon
        db.engine.dispose()

    app = FastAPI(title="fedem hub", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db
    app.state.store = store
    app.state.rate_limits = TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
    install_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_json_bytes)
    if settings.cors_origins:  # no CORS headers at all unless origins are named (docs/security.md)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["ETag", "X-Repo-Commit", "X-Error-Code", "Retry-After"],
        )
    # hf last: its /{ns}/{name}/resolve/… is a catch-all
    for module in (repos, leases, users, files, evaluations, dashboard, hf):
        app.include_router(module.router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
