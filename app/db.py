"""Engine and sessions for SQLite (the default) or Postgres, and the migration check."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.config import ROOT, Settings
from app.errors import NeedleError

MIGRATIONS = ROOT / "migrations"
SQLITE_BUSY, SQLITE_READONLY, SQLITE_FULL, SQLITE_CANTOPEN = 5, 8, 13, 14  # SQLite's primary result codes
PG_READ_ONLY, PG_DISK_FULL = "25006", "53100"  # SQLSTATEs read_only_sql_transaction, disk_full
UPGRADE_LOCK = 0x6E65_6564  # the Postgres advisory lock `needle db upgrade` holds while it migrates


class StorageError(NeedleError):
    """The database is there but cannot store anything: its disk is full, or it is read-only.
    Waiting does not mend it (workers/worker.py retries only a database that went away)."""


def _reason(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _sqlite_code(exc: BaseException | None) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None  # an extended code's low byte is its primary code


def _storage_error(context) -> StorageError | None:
    """The engines' handle_error hook: a full disk or a read-only database becomes a StorageError
    naming the cause, wherever the statement was (a command, a worker's job, a page)."""
    exc = context.original_exception
    code, state = _sqlite_code(exc), getattr(exc, "sqlstate", None)
    full, read_only = code == SQLITE_FULL or state == PG_DISK_FULL, code == SQLITE_READONLY or state == PG_READ_ONLY
    if not (full or read_only):
        return None
    where, path = safe_url(context.engine), _sqlite_file(context.engine)
    if full:
        disk = f"the disk that holds {path}" if path is not None else "the database server's disk"
        return StorageError(f"The database at {where} is full: {_reason(exc)}.", status=507,
                            hint=f"Free space on {disk}, then run the command again; what is stored is kept.")
    return StorageError(
        f"The database at {where} is read-only: {_reason(exc)}.", status=503,
        hint=f"Make {path} and its folder writable for this user (chmod u+w; chattr -i if it is immutable), "
        "or point NEEDLE_DATABASE_URL at a database you can write." if path is not None
        else "Point NEEDLE_DATABASE_URL at a database you can write (the primary server, not a read-only "
        "replica), or turn off default_transaction_read_only for it.",
    )


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
    elif parsed.get_backend_name() == "postgresql":
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    else:
        raise NeedleError(
            f"Database {parsed.get_backend_name()!r} is not supported.",
            hint="Use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB.",
        )
    event.listen(engine, "handle_error", _storage_error)
    return engine


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
    reason = _reason(exc.orig)
    path = _sqlite_file(engine)
    if path is not None and not isinstance(exc, OperationalError):  # "file is not a database"
        return NeedleError(
            f"{str(path)!r} is not an SQLite database ({reason}).", status=503,
            hint="Point NEEDLE_DATABASE_URL at a Needle database, or at a new file and run `needle db upgrade`.",
        )
    if path is not None and _sqlite_code(exc.orig) == SQLITE_CANTOPEN:
        return NeedleError(
            f"Cannot open the SQLite database {str(path)!r}: {reason}.", status=503,
            hint=f"SQLite reads and writes that file and makes {path.name}-wal and {path.name}-shm beside it: "
            "make the file and its folder writable for this user, or point NEEDLE_DATABASE_URL elsewhere.",
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


def known_revision(revision: str) -> bool:
    """Whether `revision` is one of this Needle's migrations (else a newer Needle wrote the database)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()
    return revision in {script.revision for script in scripts}


def newer_schema(engine: Engine, revision: str) -> NeedleError:
    return NeedleError(
        f"The database at {safe_url(engine)} was written by a newer Needle (revision {revision}).", status=503,
        hint="Upgrade Needle to the version that wrote it (this one knows the schemas up to "
        f"{head_revision()}), or point NEEDLE_DATABASE_URL at another database.",
    )


def _revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current_revision(engine: Engine) -> str | None:
    try:
        with connect(engine) as conn:
            return _revision(conn)
    except OperationalError as exc:
        raise _cannot_open(engine, exc) from None


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest schema (Alembic head), making an SQLite file that is not
    there. One upgrade at a time: a second waits for the first, then finds the schema it made."""
    from alembic import command

    with connect(engine, create=True) as conn:
        if _known_revision_of(engine, conn) == head_revision():
            return  # nothing to write (a read-only database at the newest schema is fine)
        conn.rollback()  # end that read's transaction: the migration's begins with the lock
        with conn.begin():
            _lock_for_upgrade(engine, conn)
            _known_revision_of(engine, conn)  # again under the lock: another upgrade may have just moved it
            cfg = alembic_config(engine.url.render_as_string(hide_password=False))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


def _known_revision_of(engine: Engine, conn: Connection) -> str | None:
    """The database's revision; a NeedleError if a newer Needle wrote it."""
    current = _revision(conn)
    if current is not None and not known_revision(current):
        raise newer_schema(engine, current)
    return current


def _lock_for_upgrade(engine: Engine, conn: Connection) -> None:
    """Wait for an upgrade in progress to end: SQLite's write lock, taken before any read (for up
    to the busy timeout), or a Postgres advisory lock, held until the transaction ends."""
    try:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN EXCLUSIVE")  # pysqlite has not begun a transaction: this begins it
        else:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": UPGRADE_LOCK})
    except OperationalError as exc:
        if _sqlite_code(exc.orig) != SQLITE_BUSY:
            raise
        raise NeedleError(
            f"The database at {safe_url(engine)} is locked by another process (another `needle db upgrade`, "
            f"or a long write): {_reason(exc.orig)}.", status=503,
            hint="Run `needle db upgrade` again when that process has finished.",
        ) from None


def require_migrated(engine: Engine) -> None:
    """Refuse to work on a database that is not at the newest schema."""
    current, head = current_revision(engine), head_revision()
    if current is not None and current != head and not known_revision(current):
        raise newer_schema(engine, current)
    if current != head:
        state = "has no Needle schema" if current is None else f"is at schema {current}, not {head}"
        raise NeedleError(
            f"The database at {safe_url(engine)} {state}.",
            status=503,
            hint="Run `needle db upgrade` first.",
        )


def safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
