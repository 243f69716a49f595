"""Fixtures: a fresh, migrated database per test on SQLite and on Postgres.

Postgres is reached at NEEDLE_TEST_POSTGRES_URL (default: postgres@127.0.0.1:5432). If it
is down the Postgres half of each test is skipped, unless NEEDLE_REQUIRE_POSTGRES=1
(as .ci/run sets), when it fails instead. Each Postgres test gets its own database,
cloned from a migrated template.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from app.db import make_engine, upgrade

PG_ADMIN_URL = os.environ.get("NEEDLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("NEEDLE_REQUIRE_POSTGRES") == "1"


def _pg_url(dbname: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


@pytest.fixture(scope="session")
def _pg_template():
    # pre-ping: a test that restarts Postgres (tests/test_workers.py) leaves dead pooled connections
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as c:
            c.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "no Postgres"
        if REQUIRE_PG:
            pytest.fail(f"Postgres is required (NEEDLE_REQUIRE_POSTGRES=1) but unreachable: {exc}")
        pytest.skip(f"Postgres unreachable at {PG_ADMIN_URL}")
    name = f"needle_tpl_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng = make_engine(_pg_url(name))
    upgrade(eng)
    eng.dispose()
    yield admin, name
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "template.sqlite"
    eng = make_engine(f"sqlite:///{path}")
    upgrade(eng)
    eng.dispose()
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """The URL of a fresh, migrated, empty database: once on SQLite, once on Postgres."""
    if request.param == "sqlite":
        path = tmp_path / "needle.sqlite"
        shutil.copy(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    admin, template = request.getfixturevalue("_pg_template")
    name = f"needle_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    url = _pg_url(name)
    yield url
    from app.db import engine_for

    engine_for(url).dispose()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class PgDatabases:
    """Fresh, migrated, empty Postgres databases, dropped at the end."""

    def __init__(self, admin, template: str):
        self.admin, self.template, self.names = admin, template, []

    def new(self) -> str:
        name = f"needle_t_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        self.names.append(name)
        return _pg_url(name)

    def drop_all(self) -> None:
        from app.db import engine_for

        for name in self.names:
            engine_for(_pg_url(name)).dispose()
            with self.admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_databases(request):
    """Make fresh Postgres databases (for what only Postgres does: several worker processes on one queue)."""
    dbs = PgDatabases(*request.getfixturevalue("_pg_template"))
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="module")
def pg_databases_module(request):
    dbs = PgDatabases(*request.getfixturevalue("_pg_template"))
    yield dbs
    dbs.drop_all()


@pytest.fixture
def engine(db_url):
    from app.db import engine_for

    return engine_for(db_url)


@pytest.fixture
def sqlite_url(tmp_path, _sqlite_template):
    """A fresh migrated SQLite database only (for tests where the backend does not matter)."""
    path = tmp_path / "needle.sqlite"
    shutil.copy(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember whether a test's body raised (failed or xfailed), for fixtures' teardown
    (tests/test_browser.py saves a screenshot of where a failed walk stopped)."""
    outcome = yield
    if outcome.get_result().when == "call":
        item.call_raised = call.excinfo is not None
