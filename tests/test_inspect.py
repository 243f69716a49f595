"""`needle inspect MODEL`: what Needle finds in a model before anything is computed or stored,
for every family's tiny model, checked against the model loaded with its weights; and the
errors for what cannot be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.tinymodels import TINY_FAMILIES, build_tiny, build_unsupported
from workers.inspect import format_inspection, inspect_model
from workers.loading import load_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_inspect_agrees_with_the_loaded_model(family, tmp_path):
    path = build_tiny(family, tmp_path / family)
    info = inspect_model(str(path), device="cpu", dtype="float32")
    loaded = load_model(str(path), device="cpu", dtype="float32")
    adapter, model = loaded.adapter, loaded.model
    assert info["family"] == adapter.family and info["detected"] is False
    assert (info["layers"], info["d_model"], info["d_mlp"], info["vocab_size"]) == (
        adapter.n_layers, adapter.d_model, adapter.d_mlp, adapter.vocab_size)
    assert info["neurons"] == adapter.n_layers * adapter.d_mlp
    # the named parts are the loaded model's: the output projection's input is the neurons
    out = model.get_submodule(info["mlp"]["output"])
    assert out is adapter.out_projection(0)
    assert model.get_submodule(info["mlp"]["input"]) is not None
    if info["mlp"]["gate"]:
        model.get_submodule(info["mlp"]["gate"])
    assert info["mlp"]["gated"] == adapter.gated
    assert info["head"]["bias"] == (adapter.head_bias() is not None)
    assert info["head"]["softcap"] == adapter.logit_softcap and info["head"]["logit_scale"] == adapter.logit_scale
    assert info["final_norm"]["has_weight"] == (adapter.final_norm_scale() is not None)
    # the model's memory is its parameters' bytes in the dtype asked for
    assert info["memory"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["memory"]["model_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(b > 0 for b in info["memory"]["stages_bytes"].values())
    assert json.loads(json.dumps(info)) == info
    text = format_inspection(info)
    assert adapter.family in text and info["mlp"]["output"] in text


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "needle.cli", "inspect", *args], capture_output=True, text=True,
                          env={**os.environ, "NEEDLE_DATABASE_URL": "sqlite:////nonexistent/needle.sqlite"},
                          timeout=120)


def test_the_command_prints_it_as_text_or_json_without_a_database(tmp_path):
    path = build_tiny("gpt2", tmp_path / "gpt2")
    proc = run(str(path), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    printed, info = json.loads(proc.stdout), inspect_model(str(path), device="cpu")
    assert printed["fits"]["fits"] is info["fits"]["fits"] is True  # the free memory itself moves between calls
    assert {k: v for k, v in printed.items() if k != "fits"} == {k: v for k, v in info.items() if k != "fits"}
    proc = run(str(path), "--dtype", "float16", "--device", "cpu")
    assert proc.returncode == 0 and "gpt2" in proc.stdout and "float16" in proc.stdout


def test_what_cannot_be_read_is_one_clear_error(tmp_path):
    from transformers import LlamaConfig

    proc = run(str(build_unsupported(tmp_path / "bert")))
    assert proc.returncode == 1 and "unsupported architecture" in proc.stderr and "llama" in proc.stderr
    no_layers = tmp_path / "no-layers"
    no_layers.mkdir()
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=0, num_attention_heads=2,
                max_position_embeddings=16).save_pretrained(no_layers)
    proc = run(str(no_layers))  # transformers would build its default Llama's 32 layers in its place
    assert proc.returncode == 1 and "lacks num_hidden_layers" in proc.stderr
    missing = run(str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "no such folder" in missing.stderr
    assert not any("Traceback" in p.stderr for p in (proc, missing))
