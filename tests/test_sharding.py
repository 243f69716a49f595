"""Sharded jobs (issue 6): decoding split by layer ranges, examples and statistics by layer
range x corpus shard, merged into exactly the rows of a one-job run.

The detector Llama of tests/test_examples.py and its corpus, indexed once in one job per
stage (the module fixture `indexed` there, in batches of 3 windows), and again here with
the work split over layer ranges and corpus shards, on SQLite and Postgres.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app import queries
from app.config import Settings
from app.db import engine_for, session_scope
from needle.cli import index_model
from tests.test_examples import CONTEXT, N_WINDOWS, activation_rows, detector, indexed  # noqa: F401 - fixtures
from workers import examples
from workers.stages import EXAMPLES_PART_STAGE, EXAMPLES_RANGE_STAGE

BATCH = 3 * CONTEXT  # as the `indexed` fixture: 3 windows a batch, so 40 windows make 14 batches


def table_rows(url: str, name: str, table: str, order: str) -> list[tuple]:
    with engine_for(url).connect() as c:
        model_id = c.execute(text("select id from models where name = :n"), {"n": name}).scalar_one()
        rows = c.execute(text(f"select * from {table} where model_id = :m order by {order}"), {"m": model_id}).mappings().all()
    return [tuple(v for k, v in r.items() if k != "model_id") for r in rows]


def run_row(url: str, name: str) -> dict:
    with session_scope(engine_for(url)) as s:
        run = queries.example_run(s, queries.get_model(s, name).id)
        return {"n_windows": run.n_windows, "n_tokens": run.n_tokens, "context": run.context, "settings": run.settings}


def test_shard_bounds_follow_the_one_pass_batches():
    # 40 windows of 16 tokens in batches of 3 windows: 14 batches, the last of one window
    bounds = examples.shard_bounds(40, 16, 3 * 16, 4)
    assert bounds == [(0, 9), (9, 21), (21, 30), (30, 40)]
    assert all(a % 3 == 0 for a, _ in bounds)
    assert examples.shard_bounds(40, 16, 3 * 16, 1) == [(0, 40)]
    # more shards than batches: the extra ones are empty, none is lost
    many = examples.shard_bounds(5, 16, 3 * 16, 4)
    assert sorted(w for a, b in many for w in range(a, b)) == list(range(5))
    assert sum(1 for a, b in many if a == b) == 2


@pytest.mark.parametrize("layers_per_job,shards", [(1, 3), (2, 5), (1, 1)])
def test_sharded_examples_equal_the_one_job_run(detector, indexed, db_url, layers_per_job, shards):  # noqa: F811
    settings = Settings(database_url=db_url, examples_batch_tokens=BATCH)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT,
                layers_per_job=layers_per_job, corpus_shards=shards, quiet=True)
    with session_scope(engine_for(db_url)) as s:
        model = queries.get_model(s, "det")
        jobs = queries.jobs_for_model(s, model.id)
        stages = [j.stage for j in jobs]
        n_ranges = -(-model.n_layers // layers_per_job)
        assert all(j.state == "done" for j in jobs)
        assert stages.count(EXAMPLES_RANGE_STAGE) == (n_ranges if (shards, n_ranges) != (1, 1) else 0)
        assert stages.count(EXAMPLES_PART_STAGE) == (n_ranges * shards if (shards, n_ranges) != (1, 1) else 0)
        assert stages.count("decode") == n_ranges
        # the parts are merged, then gone
        assert queries.example_part_names(s, model.id, "range") == []
        assert queries.example_part_names(s, model.id, "shard") == []
    got, want = activation_rows(db_url, "det"), activation_rows(indexed, "det")
    assert len(got) == len(want) > 0
    columns = None
    with engine_for(db_url).connect() as c:
        columns = [k for k in c.execute(text("select * from neuron_activations limit 1")).keys() if k != "model_id"]
    for g, w in zip(got, want, strict=True):
        for name, a, b in zip(columns, g, w, strict=True):
            if name in ("mean", "std"):  # float64 sums added in another grouping
                assert a == pytest.approx(b, rel=1e-12, abs=1e-15), name
            else:
                assert a == b, (name, g[:2])
    assert table_rows(db_url, "det", "example_windows", "\"window\"") == table_rows(indexed, "det", "example_windows", "\"window\"")
    # the decode shards' merged search index equals the one-job index
    assert table_rows(db_url, "det", "token_index", "token_id") == table_rows(indexed, "det", "token_index", "token_id")
    run, one = run_row(db_url, "det"), run_row(indexed, "det")
    assert (run["n_windows"], run["n_tokens"]) == (one["n_windows"], one["n_tokens"]) == (N_WINDOWS, N_WINDOWS * CONTEXT)
    if (shards, n_ranges) != (1, 1):
        assert run["settings"]["shards"] == shards
        assert len(run["settings"]["layer_ranges"]) == n_ranges


def latent_rows(url: str, name: str) -> list[tuple]:
    """A model's SAE latents' neuron_activations rows (basis > 0), without the model id."""
    with engine_for(url).connect() as c:
        model_id = c.execute(text("select id from models where name = :n"), {"n": name}).scalar_one()
        rows = c.execute(text("select * from neuron_activations where model_id = :m and basis > 0 "
                              "order by basis, layer, neuron"), {"m": model_id}).mappings().all()
    return [dict((k, v) for k, v in r.items() if k != "model_id") for r in rows]


def test_an_sae_s_examples_are_split_as_the_model_s_run_and_equal_one_pass(detector, db_url, tmp_path,  # noqa: F811
                                                                           _sqlite_template):
    """An SAE imported into a model whose examples run is split into corpus shards has its
    latents' examples split alike (an estimate job, a streaming job per shard, the merge), on
    the workers like the neurons', and they equal those of one pass over the same windows."""
    from needle.sae import import_folder
    from workers.saestages import SAE_EXAMPLES, SAE_EXAMPLES_PART, SAE_EXAMPLES_RANGE

    folder, d_mlp = detector_sae(detector, tmp_path)
    one = separate_pass(detector, folder, tmp_path, _sqlite_template)
    settings = Settings(database_url=db_url, examples_batch_tokens=BATCH)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT,
                layers_per_job=1, corpus_shards=3, quiet=True)
    import_folder(settings, "det", str(folder), sae_name="s", quiet=True)
    for url, split in ((one, False), (db_url, True)):
        with session_scope(engine_for(url)) as s:
            model = queries.get_model(s, "det")
            jobs = queries.jobs_for_model(s, model.id)
            assert all(j.state == "done" for j in jobs), [(j.stage, j.key, j.state, j.error) for j in jobs]
            stages = [j.stage for j in jobs]
            assert stages.count(SAE_EXAMPLES) == 1
            assert (stages.count(SAE_EXAMPLES_RANGE), stages.count(SAE_EXAMPLES_PART)) == ((1, 3) if split else (0, 0))
            sae = queries.get_sae(s, model.id, "s")
            merge = next(j for j in jobs if j.stage == SAE_EXAMPLES)
            assert merge.key == f"sae:{sae.id}" and ("layer_ranges" in merge.params) is split
            assert all(j.key.startswith(f"sae:{sae.id}/") for j in jobs if j.stage in (SAE_EXAMPLES_RANGE, SAE_EXAMPLES_PART))
            # the parts are merged, then gone
            assert queries.example_part_names(s, model.id, "range") == []
            assert queries.example_part_names(s, model.id, "shard") == []
    assert_same_latent_rows(latent_rows(db_url, "det"), latent_rows(one, "det"), 2 * d_mlp)


def detector_sae(detector, tmp_path):  # noqa: F811
    """An SAE saved by sae_lens (standard, twice the neurons) on the detector's last MLP: (folder, d_mlp)."""
    import json

    from tests.test_sae_pipeline import sae_lens_folder

    config = json.loads((detector["path"] / "config.json").read_text())
    d_mlp, layer = config["intermediate_size"], config["num_hidden_layers"] - 1
    folder, _ = sae_lens_folder(tmp_path / "sae", "standard", d_in=d_mlp, d_sae=2 * d_mlp,
                                hook=f"blocks.{layer}.mlp.hook_post", seed=3)
    return folder, d_mlp


def separate_pass(detector, folder, tmp_path, template) -> str:  # noqa: F811
    """A SQLite database where the detector is indexed in one job per stage, then the SAE
    imported: its latents' examples in their own pass. Its URL."""
    import shutil

    from needle.sae import import_folder

    shutil.copy(template, tmp_path / "one.sqlite")
    url = f"sqlite:///{tmp_path / 'one.sqlite'}"
    settings = Settings(database_url=url, examples_batch_tokens=BATCH)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT, quiet=True)
    import_folder(settings, "det", str(folder), sae_name="s", quiet=True)
    return url


def assert_same_latent_rows(got: list[dict], want: list[dict], n: int) -> None:
    assert len(got) == len(want) == n and any(r["max_act"] > 0 for r in want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            if name in ("mean", "std"):  # float64 sums added in another grouping
                assert g[name] == pytest.approx(w[name], rel=1e-12, abs=1e-15), name
            else:
                assert g[name] == w[name], (name, g["neuron"])


def test_latents_queued_with_the_neurons_are_read_in_the_same_forward_pass(detector, db_url, tmp_path,  # noqa: F811
                                                                           _sqlite_template):
    """Neurons and an SAE's latents asked for together (the model and the SAE queued, then a
    worker): the examples job reads both in its forward passes and finishes the SAE's examples
    job, which never runs on its own; the rows equal those of the SAE's own pass."""
    import threading

    from needle.sae import import_folder
    from workers.saestages import SAE_EXAMPLES
    from workers.worker import Worker

    folder, d_mlp = detector_sae(detector, tmp_path)
    one = separate_pass(detector, folder, tmp_path, _sqlite_template)
    settings = Settings(database_url=db_url, examples_batch_tokens=BATCH)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT,
                queue_only=True, quiet=True)
    import_folder(settings, "det", str(folder), sae_name="s", queue_only=True, quiet=True)
    worker = Worker(engine_for(db_url), settings)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True, "poll_seconds": 0.1}, daemon=True)
    thread.start()
    thread.join(300)
    assert not thread.is_alive(), "the worker did not go idle"
    with session_scope(engine_for(db_url)) as s:
        jobs = queries.jobs_for_model(s, queries.get_model(s, "det").id)
        assert all(j.state == "done" for j in jobs), [(j.stage, j.key, j.state, j.error) for j in jobs]
        latents = next(j for j in jobs if j.stage == SAE_EXAMPLES)
        assert latents.attempts == 0 and latents.worker is None, "done by the examples job, never claimed"
    assert_same_latent_rows(latent_rows(db_url, "det"), latent_rows(one, "det"), 2 * d_mlp)
