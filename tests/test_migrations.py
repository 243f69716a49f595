"""The migrations build exactly app/schema.py's tables, on both databases, and the basis
migration (0008) keeps every row a database at 0007 holds, as neuron rows (basis 0)."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.db import alembic_config, connect, make_engine, upgrade
from app.schema import Base


def _fresh_url(request, kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'm.sqlite'}"
    admin, _ = request.getfixturevalue("_pg_template")
    name = f"needle_m_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    request.addfinalizer(lambda: _drop(admin, name))
    return f"{str(admin.url.render_as_string(hide_password=False)).rsplit('/', 1)[0]}/{name}"


def _drop(admin, name: str) -> None:
    from app.db import engine_for

    engine_for(admin.url.set(database=name).render_as_string(hide_password=False)).dispose()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _schema_diff(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": False})
        diff = compare_metadata(ctx, Base.metadata)
    # SQLite does not keep the names of primary keys; everything else must match
    return [d for d in diff if not (isinstance(d, tuple) and d[0] in ("remove_pk", "add_pk"))]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrations_build_exactly_the_schema(request, tmp_path, kind):
    url = _fresh_url(request, kind, tmp_path)
    engine = make_engine(url)
    upgrade(engine)
    assert _schema_diff(engine) == []
    pk = inspect(engine).get_pk_constraint("neuron_activations")["constrained_columns"]
    assert pk == ["model_id", "basis", "layer", "neuron"]
    engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_basis_migration_keeps_rows_as_neurons_and_downgrades(request, tmp_path, kind):
    url = _fresh_url(request, kind, tmp_path)
    engine = make_engine(url)
    cfg = alembic_config(url)
    with connect(engine, create=True) as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0007")
    with engine.begin() as c:
        c.execute(text("INSERT INTO models (id, name, source, family, architecture, n_layers, d_model, d_mlp, "
                       "vocab_size, device, dtype, decode_norm, info, created_at, updated_at) VALUES "
                       "(1, 'm', 's', 'gpt2', 'a', 2, 4, 8, 10, 'cpu', 'float32', 'none', '{}', "
                       "'2026-01-01', '2026-01-01')"))
        c.execute(text("INSERT INTO token_index (model_id, token_id, layers, neurons, scores, probs) "
                       "VALUES (1, 7, :b, :b, :b, :b)"), {"b": b"\x00\x00\x00\x00"})
        c.execute(text("INSERT INTO clamp_curves (model_id, layer, neuron, prompt, target, positions, clamp_values, "
                       "source, created_at) VALUES (1, 1, 3, 'p', 't', 'all', '[0]', 'cli', '2026-01-01')"))
    upgrade(engine)
    with engine.connect() as c:
        assert c.execute(text("SELECT basis, token_id FROM token_index")).all() == [(0, 7)]
        assert c.execute(text("SELECT basis, layer, neuron FROM clamp_curves")).all() == [(0, 1, 3)]
        # a latent's row beside the neuron's with the same (layer, index) is a different unit
        c.execute(text("INSERT INTO token_index (model_id, basis, token_id, layers, neurons, scores, probs) "
                       "VALUES (1, 5, 7, :b, :b, :b, :b)"), {"b": b""})
        c.commit()
    with connect(engine) as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0007")
    assert "saes" not in inspect(create_engine(url)).get_table_names()
    engine.dispose()
