"""The store: migrations and the job queue, on SQLite and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest

from app import queries
from app.db import (
    current_revision,
    head_revision,
    make_engine,
    require_migrated,
    session_scope,
)
from app.errors import NeedleError


def _model(session):
    return queries.save_model(
        session, "m", source="x", family="gpt2", architecture="GPT2LMHeadModel", n_layers=2, d_model=4,
        d_mlp=8, vocab_size=10, device="cpu", dtype="float32", decode_norm="none", info={},
    )


def test_fresh_database_is_at_head(engine):
    assert current_revision(engine) == head_revision()
    require_migrated(engine)


def test_unmigrated_database_is_refused_naming_the_command(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(NeedleError) as err:
        require_migrated(eng)
    assert "needle db upgrade" in str(err.value)


def test_alembic_by_hand_makes_the_sqlite_folder_as_needle_db_upgrade_does(tmp_path, repo_root):
    """`alembic upgrade head` run by hand in the project, on NEEDLE_DATABASE_URL naming an SQLite
    file in folders that are not there yet: it makes them, and the database is at head."""
    path = tmp_path / "not" / "yet" / "needle.sqlite"
    env = {**os.environ, "NEEDLE_DATABASE_URL": f"sqlite:///{path}"}
    proc = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], check=False, cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert path.is_file()
    assert current_revision(make_engine(f"sqlite:///{path}")) == head_revision()


def test_jobs_wait_for_required_stage_and_claim_once(engine):
    with session_scope(engine) as s:
        m = _model(s)
        queries.enqueue_job(s, m.id, "decode", "layers:0-1", {"layers": [0, 1]})
        queries.enqueue_job(s, m.id, "search_index", "all", {}, requires_stage="decode")
    with session_scope(engine) as s:
        job = queries.claim_job(s, "w1")
        assert job.stage == "decode" and job.attempts == 1
    with session_scope(engine) as s:
        # decode is running, so search_index must wait
        assert queries.claim_job(s, "w2") is None
    with session_scope(engine) as s:
        assert queries.finish_job(s, job.id, "w1")
    with session_scope(engine) as s:
        nxt = queries.claim_job(s, "w2")
        assert nxt.stage == "search_index"


def test_a_live_request_is_claimed_before_queued_indexing_work(engine):
    """A person waiting on a page (a clamp sweep during the demo's fill-in) does not wait for the
    indexing jobs queued before it; among themselves, jobs go oldest first."""
    with session_scope(engine) as s:
        m = _model(s)
        queries.enqueue_job(s, m.id, "examples", "all", {})
        queries.enqueue_job(s, m.id, "probes", "all", {})
        queries.enqueue_job(s, m.id, queries.CLAMP_STAGE, "run:1", {})
    claimed = []
    for worker in ("w1", "w2", "w3"):
        with session_scope(engine) as s:
            claimed.append(queries.claim_job(s, worker).stage)
    assert claimed == [queries.CLAMP_STAGE, "examples", "probes"]


def test_enqueue_is_idempotent_and_force_requeues(engine):
    with session_scope(engine) as s:
        m = _model(s)
        a = queries.enqueue_job(s, m.id, "decode", "k", {})
        b = queries.enqueue_job(s, m.id, "decode", "k", {})
        assert a.id == b.id
    with session_scope(engine) as s:
        j = queries.claim_job(s, "w")
        queries.finish_job(s, j.id, "w")
    with session_scope(engine) as s:
        assert queries.enqueue_job(s, m.id, "decode", "k", {}).state == "done"
        assert queries.enqueue_job(s, m.id, "decode", "k", {}, force=True).state == "queued"


def test_stale_job_goes_back_to_queue_then_fails_after_max_attempts(engine):
    with session_scope(engine) as s:
        m = _model(s)
        queries.enqueue_job(s, m.id, "decode", "k", {}, max_attempts=2)
    for attempt in (1, 2):
        with session_scope(engine) as s:
            j = queries.claim_job(s, f"w{attempt}")
            assert j is not None and j.attempts == attempt
            j.heartbeat_at = queries.utcnow() - timedelta(seconds=120)
        with session_scope(engine) as s:
            assert queries.requeue_stale(s, stale_seconds=60) == 1
    with session_scope(engine) as s:
        (job,) = queries.jobs_for_model(s, m.id)
        assert job.state == "failed" and "heartbeat" in job.error


def test_failure_retries_with_backoff_then_fails(engine):
    with session_scope(engine) as s:
        m = _model(s)
        queries.enqueue_job(s, m.id, "decode", "k", {}, max_attempts=2)
    with session_scope(engine) as s:
        j = queries.claim_job(s, "w")
        assert queries.fail_job(s, j.id, "w", "boom", backoff_s=0) == "queued"
    with session_scope(engine) as s:
        j = queries.claim_job(s, "w")
        assert queries.fail_job(s, j.id, "w", "boom again", backoff_s=0) == "failed"
        assert j.error == "boom again"


def test_a_neurons_curves_list_the_index_one_first_then_cli_then_visitors(engine):
    """A neuron's page leads with the curve `needle index` stored for its own top token, whatever
    visitors swept since; then `needle clamp`'s, then visitors' (each kind newest first); curves
    not yet computed are left out."""
    result = {"token_id": 1, "token": " a", "note": None, "probs": [0.1, 0.2], "baseline": {"activation": 0.0, "prob": 0.1},
              "top_tokens": {"low": [], "high": []}}
    order = ["page", "index", "cli", "page", "cli", "page"]
    with session_scope(engine) as s:
        m = _model(s)
        ids = [queries.add_clamp_curve(s, m.id, 1, 3, prompt="p", target=" a", positions="all", values=[-1.0, 1.0],
                                       source=source, result=result).id for source in order]
        queries.add_clamp_curve(s, m.id, 1, 3, prompt="p", target=" a", positions="all", values=[0.0], source="page")
        queries.add_clamp_curve(s, m.id, 1, 4, prompt="p", target=" a", positions="all", values=[0.0], source="index",
                                result=result)
    with session_scope(engine) as s:
        got = [(c.source, c.id) for c in queries.clamp_curves_of_neuron(s, m.id, 1, 3)]
    assert got == [("index", ids[1]), ("cli", ids[4]), ("cli", ids[2]), ("page", ids[5]), ("page", ids[3]), ("page", ids[0])]


def test_vocabulary_lookups_use_an_index_per_match(engine):
    """The search's and the clamp target's token lookups find exact text, raw pieces and search
    keys, exact matches first; on SQLite each match is an index lookup, not a read of the model's
    whole vocabulary (one WHERE with OR made SQLite do that: 7.6 ms a search on 50k tokens)."""
    from sqlalchemy import event

    from tests.synthetic import vocab_rows

    vocab = [" dog", "dog", "Dog", " Dog", "DOG", " cat", "hot dog", *[f"w{i}" for i in range(500)]]
    with session_scope(engine) as s:
        model = _model(s)
        queries.replace_vocab(s, model.id, vocab_rows(vocab))
        model_id = model.id
    with session_scope(engine) as s:
        found = queries.tokens_by_text_or_key(s, model_id, "dog", "dog")
        assert [v.token for v in found] == ["dog", " dog", "Dog", " Dog", "DOG"], "exact first, then by key"
        assert [v.token for v in queries.tokens_by_text_or_key(s, model_id, "Ġdog", "dog")][0] == " dog", "a raw piece"
        assert [v.token for v in queries.tokens_by_text(s, model_id, [" cat", "Ġdog", "hot dog"])] == [" dog", " cat", "hot dog"]
        assert queries.tokens_by_text(s, model_id, []) == []
        if engine.dialect.name == "sqlite":  # the plans of the statements these lookups sent
            sent = []
            listener = lambda conn, cursor, statement, params, context, many: sent.append((statement, params))  # noqa: E731
            event.listen(engine, "before_cursor_execute", listener)
            try:
                queries.tokens_by_text_or_key(s, model_id, "dog", "dog")
                queries.tokens_by_text(s, model_id, ["dog", " cat"])
            finally:
                event.remove(engine, "before_cursor_execute", listener)
            assert len(sent) == 2
            for statement, params in sent:
                plan = " ".join(str(r) for r in s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all())
                assert "ix_vocab_token" in plan and "ix_vocab_piece" in plan, plan
                assert "SCAN vocab" not in plan and "(model_id=?)" not in plan, plan
