"""A model or a database the `needle` command cannot use: one clear line that names the cause,
never "a bug in Needle", a traceback, an endless retry or a huge allocation. A config.json
without its sizes, a full disk, a read-only database, two upgrades at once, and a database
written by a newer Needle. Real processes or `needle.cli.main` in this process, real SQLite and
Postgres, tiny real models."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from app.config import get_settings
from app.db import alembic_config, engine_for, head_revision
from tests.live_server import cli_runner
from tests.test_cli import _assert_clear_error, dump, needle
from tests.tinymodels import build_tiny

NEWER = "9f2e1c0a7b3d"  # a revision no migration of this Needle has


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return build_tiny("gpt2", tmp_path_factory.mktemp("errors") / "gpt2")


@pytest.fixture
def run(monkeypatch, capsys):
    """run(db_url, *args) -> (exit code, stdout, stderr) of needle.cli.main in this process."""

    def run(db_url: str, *args: str) -> tuple[int, str, str]:
        return cli_runner(monkeypatch, capsys, db_url)(*args)

    yield run
    get_settings.cache_clear()


def _clear(code: int, out: str, err: str, *phrases: str) -> None:
    """A clear error of main() run in this process (as _assert_clear_error for a process)."""
    _assert_clear_error(subprocess.CompletedProcess([], code, out, err), *phrases)


def _without(folder: Path, *fields: str) -> Path:
    config = json.loads((folder / "config.json").read_text())
    for field in fields:
        del config[field]
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


# ---------------------------------------------------------------- a config.json without its sizes


def _address_space(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_config_without_its_sizes_is_refused_before_loading(sqlite_url, tmp_path):
    """transformers fills a size missing from config.json with its default model's: a Llama
    without hidden_size, num_hidden_layers and intermediate_size is a 7-billion-parameter model
    (tens of GB). The refusal names the fields and the file, and comes before anything is
    allocated. The process runs with 4 GiB of address space (a tiny model indexes in well under
    2 GiB), so that code which builds the big model fails here instead of taking the machine's memory."""
    config = _without(build_tiny("llama", tmp_path / "llama"), "hidden_size", "num_hidden_layers", "intermediate_size")
    before = dump(sqlite_url)
    env = {**os.environ, "NEEDLE_DATABASE_URL": sqlite_url}
    proc = subprocess.run([sys.executable, "-m", "needle.cli", "index", str(config.parent), "--name", "big",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=_address_space(4 * 2**30))
    _assert_clear_error(proc, str(config), "hidden_size", "num_hidden_layers", "intermediate_size")
    assert dump(sqlite_url) == before


@pytest.mark.parametrize(("family", "field"), [("gpt2", "n_embd"), ("gptj", "n_layer"), ("opt", "ffn_dim"),
                                               ("gpt_neox", "intermediate_size"), ("qwen2", "vocab_size")])
def test_each_family_names_the_size_its_config_lacks(family, field, sqlite_url, tmp_path, run):
    """Each family's size fields, under the names its config.json uses (GPT-2's n_embd for hidden_size)."""
    config = _without(build_tiny(family, tmp_path / family), field)
    code, out, err = run(sqlite_url, "index", str(config.parent), "--name", "x", "--device", "cpu")
    _clear(code, out, err, str(config), field)


# ---------------------------------------------------------------- a full disk

# `needle ARGS` on a database that may not grow past PAGES pages (SQLite's max_page_count, set on
# each connection): SQLite's own "database or disk is full", as on a full disk
LIMITED = """
import sys
from sqlalchemy import event
from app.db import engine_for
from needle.cli import main
url, pages = sys.argv[1], int(sys.argv[2])
event.listen(engine_for(url), "connect", lambda conn, _: conn.execute(f"PRAGMA max_page_count={pages}"))
sys.exit(main(sys.argv[3:]))
"""


def _page_count(url: str) -> int:
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as c:
        return c.execute("PRAGMA page_count").fetchone()[0]


def _jobs(url: str) -> list[tuple[str, str]]:
    with engine_for(url).connect() as c:
        return sorted(map(tuple, c.execute(text("select stage, state from jobs")).fetchall()))


def _index_stops_on_a_full_database(proc: subprocess.CompletedProcess, url: str) -> None:
    """The index run stops with the cause named, no retrying; its model is registered and its
    jobs wait in the queue, the one in hand given back."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr, proc.stderr
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))  # after the progress bar
    assert " is full: " in error, proc.stderr
    assert "retrying" not in proc.stderr and "unreachable" not in proc.stderr, proc.stderr
    jobs = _jobs(url)
    assert jobs and all(state == "queued" for _, state in jobs), jobs


def test_a_full_sqlite_database_stops_index_with_a_clear_error(sqlite_url, gpt2):
    """Room for the model's registration but not for its neurons: the worker's write fails with
    SQLITE_FULL, a cause that waiting does not mend."""
    pages = _page_count(sqlite_url) + 24
    env = {**os.environ, "NEEDLE_DATABASE_URL": sqlite_url}
    try:
        proc = subprocess.run([sys.executable, "-c", LIMITED, sqlite_url, str(pages), "index", str(gpt2),
                               "--name", "full"], capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"needle index kept retrying on a full database: {(exc.stderr or b'')[-2000:]!r}")
    _index_stops_on_a_full_database(proc, sqlite_url)
    # with room again, the same command finishes the queued jobs
    again = needle("index", str(gpt2), "--name", "full", db_url=sqlite_url)
    assert again.returncode == 0, again.stderr
    assert {state for _, state in _jobs(sqlite_url)} == {"done"}


@contextlib.contextmanager
def _small_tablespace(admin, size: str):
    """A Postgres tablespace on a tmpfs of `size` (a real full disk for what is stored there): its name.
    Needs root (to mount) and the server on this machine."""
    with admin.connect() as c:
        data = Path(c.execute(text("show data_directory")).scalar_one())
    if os.geteuid() != 0 or not data.exists():
        pytest.skip("a small tablespace needs root and the Postgres server on this machine")
    folder = Path(tempfile.mkdtemp(prefix="needle-tablespace-"))
    folder.chmod(0o755)
    owner = data.stat()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},uid={owner.st_uid},gid={owner.st_gid},mode=0700",
                            "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    name = f"needle_small_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as c:
            c.execute(text(f"CREATE TABLESPACE {name} LOCATION '{folder}'"))
        yield name
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP TABLESPACE IF EXISTS {name}"))
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()


def test_a_full_postgres_disk_stops_index_with_a_clear_error(pg_databases, gpt2):
    """The neurons table on a 64 kB disk: Postgres's disk_full (SQLSTATE 53100) when the worker stores them."""
    url = pg_databases.new()
    with _small_tablespace(pg_databases.admin, "64k") as tablespace:
        try:
            with engine_for(url).begin() as c:
                c.execute(text(f"ALTER TABLE neurons SET TABLESPACE {tablespace}"))
            try:
                proc = needle("index", str(gpt2), "--name", "full", db_url=url, timeout=180)
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"needle index kept retrying on a full disk: {(exc.stderr or b'')[-2000:]!r}")
            _index_stops_on_a_full_database(proc, url)
        finally:
            engine_for(url).dispose()
            with pg_databases.admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))


# ---------------------------------------------------------------- a read-only database


@contextlib.contextmanager
def _write_protected(path: Path):
    """`path` (a file or a folder) write-protected: chmod a-w, and for root, whom chmod does not
    stop, the immutable attribute (chattr +i)."""
    mode = path.stat().st_mode
    path.chmod(mode & ~0o222)
    immutable = os.geteuid() == 0
    if immutable and (not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode != 0):
        path.chmod(mode)
        pytest.skip("root writes past chmod, and chattr +i is not available here")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


@contextlib.contextmanager
def _read_only(url: str):
    """The database at `url` read-only: a write-protected SQLite file, or a Postgres database
    whose transactions are read-only (as on a hot standby)."""
    engine = engine_for(url)
    engine.dispose()
    if engine.dialect.name == "sqlite":
        with _write_protected(Path(engine.url.database)):
            yield
    else:
        name = url.rsplit("/", 1)[1]
        with engine.begin() as c:
            c.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
        engine.dispose()  # the setting holds for connections made after it
        try:
            yield
        finally:
            engine.dispose()
            with engine.begin() as c:
                c.execute(text("SET TRANSACTION READ WRITE"))
                c.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off'))
    engine.dispose()  # no connection opened read-only is used after


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    cfg = alembic_config(url)
    with engine_for(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_a_read_only_database_is_a_clear_error(db_url, gpt2, run):
    """Writing (index, db upgrade) names the cause; reading (jobs) still works; nothing changes."""
    before = dump(db_url)
    with _read_only(db_url):
        code, out, err = run(db_url, "index", str(gpt2), "--name", "x", "--queue")
        _clear(code, out, err, "read-only")
        code, out, err = run(db_url, "jobs")
        assert code == 0 and "No jobs" in out, err
        code, out, err = run(db_url, "db", "upgrade")  # at the newest schema already: nothing to write
        assert code == 0 and "(head)" in out, err
        assert dump(db_url) == before
    _downgrade(db_url, "0006")
    with _read_only(db_url):
        code, out, err = run(db_url, "db", "upgrade")
        _clear(code, out, err, "read-only")
    code, out, err = run(db_url, "db", "current")
    assert code == 0 and "schema 0006" in out, out + err


def test_a_database_in_a_read_only_folder_names_the_folder(sqlite_url, run):
    """SQLite keeps NAME-wal and NAME-shm beside the database: a folder it cannot write is the cause."""
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    engine_for(sqlite_url).dispose()
    with _write_protected(path.parent):
        for args in (["jobs"], ["db", "current"]):
            code, out, err = run(sqlite_url, *args)
            _clear(code, out, err, str(path), "needle.sqlite-wal", "folder")
            assert "cannot reach" not in err.lower()
    engine_for(sqlite_url).dispose()


# ---------------------------------------------------------------- two upgrades at once


def _sleeping(pid: int) -> bool:
    """Whether process pid sleeps in nanosleep: SQLite's busy handler waiting for a lock (the
    command does not sleep otherwise)."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except OSError:
        return False
    return "nanosleep" in wchan or syscall in ("35", "230")  # x86-64 nanosleep, clock_nanosleep


def _waiting_locks(url: str) -> int:
    name = url.rsplit("/", 1)[1]
    with engine_for(url).connect() as c:
        return c.execute(text("select count(*) from pg_locks where not granted and database = "
                              "(select oid from pg_database where datname = :name)"), {"name": name}).scalar_one()


def _wait_until(check, procs) -> None:
    """Wait for check() while the processes run (the deadline only keeps a broken run from hanging)."""
    deadline = time.monotonic() + 300
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"an upgrade ended before the other started waiting: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail("the two upgrades did not both come to wait for the database")
        time.sleep(0.05)


def test_two_upgrades_at_once(db_url):
    """Two `needle db upgrade` of a database one migration behind, both started while the
    database is held (SQLite: its write lock; Postgres: a read of the table the migration alters)
    and both waiting before it is let go: the second waits for the first, then finds nothing to do."""
    if db_url.startswith("sqlite") and not Path("/proc/self/wchan").exists():
        pytest.skip("needs /proc to see that both processes wait")
    _downgrade(db_url, "0006")
    engine = engine_for(db_url)
    env = {**os.environ, "NEEDLE_DATABASE_URL": db_url}
    args = [sys.executable, "-m", "needle.cli", "db", "upgrade"]
    if engine.dialect.name == "sqlite":
        holder = sqlite3.connect(engine.url.database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    else:
        holder = engine.connect()
        holder.execute(text("LOCK TABLE text_runs IN ACCESS SHARE MODE"))
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        if engine.dialect.name == "sqlite":
            _wait_until(lambda: all(_sleeping(p.pid) for p in procs), procs)
        else:
            _wait_until(lambda: _waiting_locks(db_url) == 2, procs)
    finally:
        holder.rollback() if engine.dialect.name == "sqlite" else holder.commit()
        holder.close()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "unexpected" not in err, err
        assert f"schema {head_revision()} (head)" in out
    with engine.connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar_one() == head_revision()


# ---------------------------------------------------------------- a database from a newer Needle


def test_a_database_written_by_a_newer_needle(db_url, run):
    """A revision this Needle does not know: it says so, and does not advise `needle db upgrade`."""
    with engine_for(db_url).begin() as c:
        c.execute(text("update alembic_version set version_num = :v"), {"v": NEWER})
    before = dump(db_url)
    for args in (["db", "upgrade"], ["jobs"], ["serve", "--port", "8765"]):
        code, out, err = run(db_url, *args)
        _clear(code, out, err, f"written by a newer Needle (revision {NEWER})", "upgrade Needle")
        assert "db upgrade" not in out + err
    code, out, err = run(db_url, "db", "current")
    assert code == 0, err
    assert f"schema {NEWER}" in out and "newer Needle" in out and "db upgrade" not in out
    assert dump(db_url) == before
    with engine_for(db_url).connect() as c:
        assert c.execute(text("select version_num from alembic_version")).scalar_one() == NEWER
