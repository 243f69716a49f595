"""Bad or awkward input to the `needle` command: one clear line, never "a bug in Needle".
A JSON line nested too deeply, stdout closed by its reader, the same folder named two ways,
a re-run that waits for a dead worker's job, and a large feature file checked line by line.
Real processes or `needle.cli.main` in this process, real databases, tiny real models."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy import update

from app import queries
from app.config import Settings
from app.db import engine_for, session_scope
from app.schema import Job, Model
from needle.cli import index_model
from tests.live_server import needle_in_process
from tests.tinymodels import build_tiny

NESTED = "[" * 100_000  # json.loads raises RecursionError on it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny("gpt2", tmp_path_factory.mktemp("inputs") / "gpt2")




def assert_one_clear_error(proc, *phrases: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr and "a bug" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), (phrase, proc.stderr)


def stored_models(db_url: str) -> list[str]:
    with session_scope(engine_for(db_url)) as s:
        return [m.name for m in queries.list_models(s)]


# ---------------------------------------------------------------- a JSON line nested too deeply


def test_a_feature_line_nested_too_deeply_names_the_file_and_line(model_dir, sqlite_url, tmp_path, capsys, monkeypatch):
    path = tmp_path / "deep.jsonl"
    ok = {"feature": "dog", "text": "a dog", "label": 1}
    path.write_text(json.dumps(ok) + "\n" + NESTED + "\n", encoding="utf-8")
    proc = needle_in_process("index", str(model_dir), "--name", "deep", "--features", str(path), db_url=sqlite_url,
                    capsys=capsys, monkeypatch=monkeypatch)
    assert_one_clear_error(proc, f"{path} line 2", "nested too deeply")
    assert stored_models(sqlite_url) == []


def test_a_field_nested_too_deeply_in_a_feature_line(model_dir, sqlite_url, tmp_path, capsys, monkeypatch):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"feature": "dog", "text": "a dog", "label": ' + NESTED + "\n", encoding="utf-8")
    proc = needle_in_process("index", str(model_dir), "--name", "deep", "--features", str(path), db_url=sqlite_url,
                    capsys=capsys, monkeypatch=monkeypatch)
    assert_one_clear_error(proc, f"{path} line 1", "nested too deeply")


def test_a_corpus_line_nested_too_deeply_names_the_file_and_line(model_dir, sqlite_url, tmp_path, capsys, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text(NESTED + "\n", encoding="utf-8")
    proc = needle_in_process("index", str(model_dir), "--name", "deep", "--corpus", str(path), db_url=sqlite_url,
                    capsys=capsys, monkeypatch=monkeypatch)
    assert_one_clear_error(proc, f"line 1 of {path}", "nested too deeply")
    assert stored_models(sqlite_url) == []


def test_a_corpus_line_nested_too_deeply_fails_its_job_clearly(model_dir, sqlite_url, tmp_path, capsys, monkeypatch):
    """index reads the corpus only up to its first window before it stores anything; the examples
    job reads the rest and fails on the deep line with the same clear message, at once."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join([json.dumps({"text": "the dog sat " * 2000}), "", NESTED]) + "\n", encoding="utf-8")
    proc = needle_in_process("index", str(model_dir), "--name", "deep", "--corpus", str(path), "--context", "8",
                    db_url=sqlite_url, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_clear_error(proc, "examples", f"line 3 of {path}", "nested too deeply")


def test_a_config_json_nested_too_deeply(sqlite_url, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(NESTED, encoding="utf-8")
    proc = needle_in_process("index", str(folder), "--name", "deep", db_url=sqlite_url, capsys=capsys, monkeypatch=monkeypatch)
    assert_one_clear_error(proc, f"config.json of {folder}", "nested too deeply")


# ---------------------------------------------------------------- stdout closed by its reader


@pytest.mark.parametrize("args", [["jobs"], ["jobs", "--json"], ["db", "current"]])
def test_a_closed_stdout_ends_quietly(sqlite_url, args):
    """`needle jobs | head -1`: once head has exited, every write to the pipe fails with EPIPE.
    Here the pipe's reading end is closed before the command starts, so the first write fails,
    as it does under head however many jobs there are. Exit status 141 (128 + SIGPIPE) is what
    the shell reports for a coreutils command stopped the same way; nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        env = {**os.environ, "NEEDLE_DATABASE_URL": sqlite_url}
        proc = subprocess.run([sys.executable, "-m", "needle.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


# ---------------------------------------------------------------- one folder, two names


def test_a_folder_given_relative_then_absolute_is_the_same_model(model_dir, sqlite_url, tmp_path, capsys, monkeypatch):
    """The model folder and the corpus, given relative to the working folder, then absolute."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The dog sat on the mat. " * 40, encoding="utf-8")
    monkeypatch.chdir(model_dir.parent)
    relative = ["index", model_dir.name, "--name", "kept", "--corpus", os.path.relpath(corpus), "--context", "8",
                "--tokens", "64"]
    proc = needle_in_process(*relative, db_url=sqlite_url, capsys=capsys, monkeypatch=monkeypatch)
    assert proc.returncode == 0, proc.stderr
    absolute = ["index", str(model_dir), "--name", "kept", "--corpus", str(corpus), "--context", "8", "--tokens", "64"]
    proc = needle_in_process(*absolute, db_url=sqlite_url, capsys=capsys, monkeypatch=monkeypatch)
    assert proc.returncode == 0, proc.stderr
    with session_scope(engine_for(sqlite_url)) as s:
        assert queries.get_model(s, "kept").source == str(model_dir.resolve())  # loadable from any folder
        s.execute(update(Model).values(source=model_dir.name))  # as a relative name was stored before
    proc = needle_in_process(*absolute, db_url=sqlite_url, capsys=capsys, monkeypatch=monkeypatch)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- waiting for a dead worker's job


def test_a_rerun_says_which_job_of_a_dead_worker_it_waits_for(model_dir, db_url):
    """Another worker holds a job of the model, heartbeating, when `needle index` is run again; it
    stops (killed) once the re-run has said which job it waits for, who holds it and for how long
    at most without a heartbeat. The re-run then takes the job over and finishes."""
    index_model(Settings(database_url=db_url), str(model_dir), "kept", quiet=True)
    engine = engine_for(db_url)
    ghost = "gone-host:4242:1"
    with session_scope(engine) as s:
        model = queries.get_model(s, "kept")
        job = next(j for j in queries.jobs_for_model(s, model.id) if j.stage == "decode")
        job_id, key = job.id, job.key
        s.execute(update(Job).where(Job.id == job_id).values(state="running", worker=ghost, attempts=1,
                                                            heartbeat_at=queries.utcnow()))
    killed = threading.Event()

    def beat():  # the other worker's heartbeats, until it is killed
        while not killed.wait(0.2):
            with session_scope(engine) as s:
                queries.heartbeat(s, job_id, ghost)

    beats = threading.Thread(target=beat, daemon=True)
    beats.start()
    give_up = threading.Timer(120, killed.set)  # without the line, the re-run still ends once the beats stop
    give_up.start()
    env = {**os.environ, "NEEDLE_DATABASE_URL": db_url, "NEEDLE_STALE_SECONDS": "5"}
    proc = subprocess.Popen([sys.executable, "-m", "needle.cli", "index", str(model_dir), "--name", "kept"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if f"waiting for job {job_id} " in line:
                break
        killed.set()
        rest = proc.communicate(timeout=300)[1]
    finally:
        killed.set()
        give_up.cancel()
        if proc.poll() is None:
            proc.kill()
        beats.join()
    line = seen[-1]
    assert f"waiting for job {job_id} " in line, "".join(seen)
    assert f"(kept decode {key}), claimed by worker {ghost} whose last heartbeat was " in line
    assert "s ago; a job goes back to the queue after 5 s without one (NEEDLE_STALE_SECONDS)" in line
    assert proc.returncode == 0, rest
    with session_scope(engine) as s:
        assert queries.get_job(s, job_id).state == "done"


# ---------------------------------------------------------------- a large feature file


def _feature_file(path: Path, lines: int) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(json.dumps({"feature": "dog", "text": f"the dog {i}" if i % 2 else f"a cat {i}",
                                "label": i % 2}) + "\n")
            f.write(json.dumps({"feature": "dog_token", "text": f"a dog {i}", "spans": [[2, 5]]}) + "\n")
    return str(path)


def _index_peak(model_dir: Path, db_url: str, name: str, features: str) -> int:
    """The most memory Python held while `needle index --queue` loaded the model and checked the file."""
    gc.collect()
    tracemalloc.start()
    try:
        index_model(Settings(database_url=db_url), str(model_dir), name, features=[features], queue_only=True,
                    clamp=False, quiet=True)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_feature_file_is_checked_line_by_line(model_dir, sqlite_url, tmp_path):
    """Checking a feature file before anything is stored holds a batch of lines at a time: the
    peak for 20 times the lines grows by far less than a Python object per line (a list of the
    lines, of parsed rows or of their tokens would add tens of megabytes). Memory, not time."""
    small = _feature_file(tmp_path / "small.jsonl", 2_000)
    large = _feature_file(tmp_path / "large.jsonl", 40_000)
    _index_peak(model_dir, sqlite_url, "warm", small)  # imports and caches filled once
    peak_small = _index_peak(model_dir, sqlite_url, "small", small)
    peak_large = _index_peak(model_dir, sqlite_url, "large", large)
    extra_lines = 2 * (40_000 - 2_000)
    assert peak_large - peak_small < 16 * extra_lines, (peak_small, peak_large)  # before: ~150 MB more
