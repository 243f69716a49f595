"""Engine and sessions for SQLite (the default) or Postgres, and the migration check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.config import ROOT, Settings
from app.errors import NeedleError

MIGRATIONS = ROOT / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise NeedleError(
            f"NEEDLE_DATABASE_URL {url!r} is not a database URL.",
            hint="Use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.",
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise NeedleError(
            f"Database {parsed.get_backend_name()!r} is not supported.",
            hint="Use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.",
        )
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    return make_engine(url)


def get_engine(settings: Settings) -> Engine:
    return engine_for(settings.resolved_database_url())


@lru_cache(maxsize=16)
def _sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose work commits together at the end, or not at all."""
    session = _sessionmaker(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise NeedleError(
            f"Cannot reach the database at {safe_url(engine)}: {str(exc.orig).strip().splitlines()[0]}",
            status=503,
            hint="Check NEEDLE_DATABASE_URL and that the database server is running.",
        ) from None


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest schema (Alembic head)."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def require_migrated(engine: Engine) -> None:
    """Refuse to work on a database that is not at the newest schema."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no Needle schema" if current is None else f"is at schema {current}, not {head}"
        raise NeedleError(
            f"The database at {safe_url(engine)} {state}.",
            status=503,
            hint="Run `needle db upgrade` first.",
        )


def safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
