"""`needle index` end to end: a tiny saved model of every family, loaded through the user's
code path, decoded into SQLite and Postgres, and compared with a direct computation
written here from the models' named parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sqlalchemy import select

from app import queries
from app.arrays import FLOAT32, INT32, unpack
from app.config import Settings
from app.db import engine_for, session_scope
from app.errors import NeedleError
from app.schema import Neuron, TokenIndex
from needle.cli import index_model
from tests.tinymodels import LINEAR_LAYOUT, build_tiny

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "opt_proj", "gptj", "phi3",
            "olmo", "olmo2", "stablelm", "smollm3", "granite", "cohere", "gpt_neo", "phi", "gpt_bigcode", "starcoder2", "falcon", "bloom"]

# Where each family keeps a neuron's input row and output column, by parameter name.
IN_OUT = {
    "gpt2": ("transformer.h.{L}.mlp.c_fc.weight", "T", "transformer.h.{L}.mlp.c_proj.weight", ""),
    "gpt_neox": ("gpt_neox.layers.{L}.mlp.dense_h_to_4h.weight", "", "gpt_neox.layers.{L}.mlp.dense_4h_to_h.weight", "T"),
    "llama": ("model.layers.{L}.mlp.up_proj.weight", "", "model.layers.{L}.mlp.down_proj.weight", "T"),
    "opt": ("model.decoder.layers.{L}.fc1.weight", "", "model.decoder.layers.{L}.fc2.weight", "T"),
    "gptj": ("transformer.h.{L}.mlp.fc_in.weight", "", "transformer.h.{L}.mlp.fc_out.weight", "T"),
    "phi3": ("model.layers.{L}.mlp.gate_up_proj.weight", "second-half", "model.layers.{L}.mlp.down_proj.weight", "T"),
}
for fam in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "stablelm", "smollm3", "granite",
            "cohere"):
    IN_OUT[fam] = IN_OUT["llama"]
IN_OUT["opt_proj"] = IN_OUT["opt"]
for fam, (blocks, w_in, w_out, *_) in LINEAR_LAYOUT.items():
    IN_OUT[fam] = (blocks + ".{L}." + w_in + ".weight", "", blocks + ".{L}." + w_out + ".weight", "T")


@torch.no_grad()
def direct_decodings(path, family: str, decode_norm: str = "none"):
    """softmax(W_U . w_in) and W_U . w_out for every neuron, in float64, from named parameters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    params = dict(model.named_parameters())
    w_u = model.get_output_embeddings().weight.double()
    if family == "opt_proj":
        w_u = w_u @ params["model.decoder.project_out.weight"].double()
    bias = model.get_output_embeddings().bias
    cfg = model.config
    in_name, in_how, out_name, out_how = IN_OUT[family]
    n_layers = cfg.num_hidden_layers
    result = []
    for layer in range(n_layers):
        w_in = params[in_name.format(L=layer)].double()
        if in_how == "T":
            w_in = w_in.T
        elif in_how == "second-half":
            w_in = w_in[w_in.shape[0] // 2 :]
        w_out = params[out_name.format(L=layer)].double()
        if out_how == "T":
            w_out = w_out.T
        if decode_norm == "final":
            norm = model.model.norm.weight.double()
            w_in = w_in * ((1 + norm) if family.startswith("gemma") else norm)
        logits = w_in @ w_u.T
        if bias is not None:
            logits = logits + bias.double()
        if family == "granite":  # the head's temperature
            logits = logits / cfg.logits_scaling
        if family == "cohere":
            logits = logits * cfg.logit_scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probs = torch.softmax(logits, dim=-1)
        result.append((probs, w_out @ w_u.T))
    return result


def stored_neurons(engine, name):
    with session_scope(engine) as s:
        model = queries.get_model(s, name)
        rows = s.scalars(select(Neuron).where(Neuron.model_id == model.id).order_by(Neuron.layer, Neuron.neuron)).all()
        return model, rows


@pytest.mark.parametrize("family", FAMILIES)
def test_index_matches_direct_computation(family, db_url, tmp_path):
    path = build_tiny(family, tmp_path / family)
    settings = Settings(database_url=db_url)
    index_model(settings, str(path), family.replace("_", "-"), quiet=True)
    model, rows = stored_neurons(engine_for(db_url), family.replace("_", "-"))
    direct = direct_decodings(path, family)
    assert model.n_layers == len(direct)
    assert len(rows) == model.n_layers * model.d_mlp
    for row in rows:
        probs, out = direct[row.layer][0][row.neuron], direct[row.layer][1][row.neuron]
        top = torch.topk(probs, 100)
        mean100 = float(top.values.mean())
        ids = unpack(row.in_ids, INT32)
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), probs[ids].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(unpack(row.in_scores, FLOAT32), probs[ids].numpy() / mean100, rtol=1e-3)
        # the stored tokens are the top 20 (ties aside: compare the probabilities)
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), top.values[:20].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(row.mean_top100, mean100, rtol=1e-4)
        entropy = float(torch.special.entr(probs).sum())  # -sum p ln p, in float64
        assert row.entropy == pytest.approx(entropy, abs=1e-3), (row.layer, row.neuron)
        pos_ids, neg_ids = unpack(row.out_pos_ids, INT32), unpack(row.out_neg_ids, INT32)
        np.testing.assert_allclose(unpack(row.out_pos_logits, FLOAT32), out[pos_ids].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(unpack(row.out_pos_logits, FLOAT32), torch.topk(out, 10).values.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(unpack(row.out_neg_logits, FLOAT32), out[neg_ids].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(unpack(row.out_neg_logits, FLOAT32), torch.topk(out, 10, largest=False).values.numpy(), rtol=1e-4, atol=1e-5)


def test_search_index_is_the_top_neurons_of_every_token(db_url, tmp_path):
    path = build_tiny("llama", tmp_path / "m")
    settings = Settings(database_url=db_url)
    # two layers per job would be one shard; one per job makes two shards to merge
    index_model(settings, str(path), "m", layers_per_job=1, quiet=True)
    direct = direct_decodings(path, "llama")
    probs = torch.cat([p for p, _ in direct])  # [N, V], neuron id = layer * d_mlp + neuron
    scores = torch.cat([p / torch.topk(p, 100).values.mean(dim=-1, keepdim=True) for p, _ in direct])  # [N, V]
    d_mlp = direct[0][0].shape[0]
    engine = engine_for(db_url)
    with session_scope(engine) as s:
        model = queries.get_model(s, "m")
        index = {r.token_id: r for r in s.scalars(select(TokenIndex).where(TokenIndex.model_id == model.id))}
    assert len(index) == scores.shape[1]
    k = min(50, scores.shape[0])
    for token_id, row in index.items():
        got_scores = unpack(row.scores, FLOAT32)
        want = torch.topk(scores[:, token_id], k).values.numpy()
        np.testing.assert_allclose(got_scores, want, rtol=1e-3)
        ids = unpack(row.layers, INT32) * d_mlp + unpack(row.neurons, INT32)
        np.testing.assert_allclose(scores[ids, token_id].numpy(), got_scores, rtol=1e-3)
        # each neuron's probability of this token, softmax(W_U . w_in)[token]
        got_probs = unpack(row.probs, FLOAT32)
        assert got_probs.shape == (k,)
        np.testing.assert_allclose(got_probs, probs[ids, token_id].numpy(), rtol=1e-4, atol=1e-9)
        assert np.all(np.diff(got_scores) <= 1e-6), "best first"


def _snapshot(engine, name):
    with session_scope(engine) as s:
        model = queries.get_model(s, name)
        if model is None:
            return None
        neurons = [(r.layer, r.neuron, r.in_ids, r.in_probs, r.out_pos_ids) for r in
                   s.scalars(select(Neuron).where(Neuron.model_id == model.id).order_by(Neuron.layer, Neuron.neuron))]
        index = [(r.token_id, r.layers, r.neurons, r.scores) for r in
                 s.scalars(select(TokenIndex).where(TokenIndex.model_id == model.id).order_by(TokenIndex.token_id))]
        jobs = [(j.stage, j.key, j.state) for j in queries.jobs_for_model(s, model.id)]
        return model.decode_norm, neurons, index, jobs


def test_reindex_is_idempotent_and_force_recomputes_the_same_rows(db_url, tmp_path):
    path = build_tiny("gpt2", tmp_path / "m")
    settings = Settings(database_url=db_url)
    engine = engine_for(db_url)
    index_model(settings, str(path), "m", quiet=True)
    first = _snapshot(engine, "m")
    index_model(settings, str(path), "m", quiet=True)
    assert _snapshot(engine, "m") == first
    with session_scope(engine) as s:
        jobs_before = [(j.id, j.finished_at) for j in queries.jobs_for_model(s, queries.get_model(s, "m").id)]
    index_model(settings, str(path), "m", force=True, quiet=True)
    with session_scope(engine) as s:
        jobs_after = [(j.id, j.finished_at) for j in queries.jobs_for_model(s, queries.get_model(s, "m").id)]
    # recomputed (the same jobs ran again) into exactly the same rows
    assert [i for i, _ in jobs_after] == [i for i, _ in jobs_before]
    assert all(after > before for (_, before), (_, after) in zip(jobs_before, jobs_after))
    assert _snapshot(engine, "m") == first


def test_decode_norm_final_applies_the_norm_weight_and_needs_force_to_change(db_url, tmp_path):
    path = build_tiny("gemma", tmp_path / "m")
    settings = Settings(database_url=db_url)
    engine = engine_for(db_url)
    index_model(settings, str(path), "m", quiet=True)
    before = _snapshot(engine, "m")
    with pytest.raises(NeedleError, match="--force"):
        index_model(settings, str(path), "m", decode_norm="final", quiet=True)
    assert _snapshot(engine, "m") == before
    index_model(settings, str(path), "m", decode_norm="final", force=True, quiet=True)
    model, rows = stored_neurons(engine, "m")
    assert model.decode_norm == "final"
    direct = direct_decodings(path, "gemma", decode_norm="final")
    for row in rows[:10]:
        probs = direct[row.layer][0][row.neuron]
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), torch.topk(probs, 20).values.numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad_name", ["Has Caps", "x/y", "", "a.json", "-lead"])
def test_bad_model_name_is_refused(bad_name, sqlite_url, tmp_path):
    with pytest.raises(NeedleError, match="not a valid model name"):
        index_model(Settings(database_url=sqlite_url), str(tmp_path), bad_name, quiet=True)
