"""Database engine, sessions and schema migrations (Alembic, run on start-up)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
# Connections per hub process: 10 kept, and no cap on more. A cap deadlocked under load while a request's
# session held its connection from the token check until the request ended, and its route waited for
# one of FastAPI's 40 threads that all waited for a connection (bench/hub_load.py: caps of 15 and 40
# turned 200 concurrent donors into 30 s pool timeouts). The token check now ends its transaction
# (auth.current_user); the cap stays off until the load bench is re-run with one. So a server database
# needs `max_connections` ≥ the requests in flight across all workers (docs/reliability.md).
POOL_SIZE, POOL_OVERFLOW = 10, -1
# Any fixed number: the PostgreSQL advisory lock that serialises concurrent migrations.
MIGRATION_LOCK = 0x6665_6465_6D


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL (readers never block the writer) and enforced foreign keys."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent). On PostgreSQL an advisory lock
    makes hub processes that start together migrate one after the other, not race to create tables."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Database:
    """The engine and a session factory; one per app, so every test can have its own."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session
