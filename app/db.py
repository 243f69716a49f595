"""Engine and sessions for SQLite (the default) or Postgres, and the migration check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
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
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise NeedleError(
            f"NEEDLE_DATABASE_URL {url!r} is not a database URL.",
            hint="Use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.",
        ) from None
    if parsed.get_backend_name() == "sqlite":
        # the file (and its folder) is made by upgrade() only, so a mistyped path is an error elsewhere
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

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "migrations/ has no revisions"
    return head


def _sqlite_file(engine: Engine) -> Path | None:
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def _cannot_open(engine: Engine, exc: DatabaseError) -> NeedleError:
    reason = (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0]
    path = _sqlite_file(engine)
    if path is not None and not isinstance(exc, OperationalError):  # "file is not a database"
        return NeedleError(
            f"{str(path)!r} is not an SQLite database ({reason}).", status=503,
            hint="Point NEEDLE_DATABASE_URL at a Needle database, or at a new file and run `needle db upgrade`.",
        )
    return NeedleError(
        f"Cannot reach the database at {safe_url(engine)}: {reason}", status=503,
        hint="Check NEEDLE_DATABASE_URL and that you can read and write that file and its folder." if path is not None
        else "Check NEEDLE_DATABASE_URL and that the database server is running.",
    )


def connect(engine: Engine, *, create: bool = False) -> Connection:
    """A connection, or a NeedleError saying why there is none. Only `create` (upgrade) makes a
    missing SQLite file and its folder; otherwise a missing file is an error naming the path."""
    path = _sqlite_file(engine)
    if path is not None:
        if os.path.isdir(path):
            raise NeedleError(f"NEEDLE_DATABASE_URL names the folder {str(path)!r}, not a database file.",
                              status=503, hint=f"Name a file in it, e.g. sqlite:///{path / 'needle.sqlite'}.")
        if not create and not os.path.exists(path):
            raise NeedleError(
                f"There is no database at {str(path)!r}.", status=503,
                hint="Create it with `needle db upgrade` (or `needle demo`), or correct NEEDLE_DATABASE_URL.",
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NeedleError(
                f"Cannot make the folder {str(exc.filename or path.parent)!r} for the database: {exc.strerror or exc}.",
                status=503, hint="Check NEEDLE_DATABASE_URL: name a file in a folder you can write to.",
            ) from None
    try:
        return engine.connect()
    except DatabaseError as exc:
        raise _cannot_open(engine, exc) from None


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        with connect(engine) as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise _cannot_open(engine, exc) from None


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest schema (Alembic head), making an SQLite file that is not there."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with connect(engine, create=True) as conn, conn.begin():
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
