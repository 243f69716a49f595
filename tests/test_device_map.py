"""Big models: `--device-map auto` spreads a model over its machine's devices (here the CPU and an
offload folder on disk, forced by a --max-memory cap), and every stage gives what it gives on one
device; a model that does not fit is refused before any weight is read; loading in a smaller
dtype goes straight onto its device (checked on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sqlalchemy import text

from app.config import Settings
from app.db import engine_for
from app.errors import NeedleError
from needle.cli import index_model, main
from tests.tinymodels import build_tiny
from workers import clamp
from workers.devices import DEVICE_MAP_AUTO, spread
from workers.inspect import format_inspection, inspect_model
from workers.loading import load_model, parse_max_memory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    path = build_tiny("llama", root / "llama")
    corpus = root / "corpus.txt"
    corpus.write_text("The dog sat on the mat. def feed(dog):\n    dog.eat(food)\n    return dog\n" * 40)
    weights = inspect_model(str(path), device="cpu", dtype="float32")["memory"]["model_bytes"]
    # CPU memory for 3/4 of the weights: accelerate keeps room for the largest block beside what it
    # places, so the embedding goes there and the rest to disk
    return {"path": path, "corpus": corpus, "caps": {"cpu": weights * 3 // 4}}


def test_a_memory_cap_spreads_the_model_over_cpu_and_disk(tiny):
    loaded = load_model(str(tiny["path"]), device=DEVICE_MAP_AUTO, dtype="float32", max_memory=tiny["caps"])
    places = set(map(str, spread(loaded.model).values()))
    assert places == {"cpu", "disk"}, spread(loaded.model)
    assert loaded.device == DEVICE_MAP_AUTO
    one = load_model(str(tiny["path"]), device="cpu", dtype="float32")
    assert spread(one.model) == {}
    # the adapter reads every weight, offloaded ones from their store, as on one device
    a, b = loaded.adapter, one.adapter
    for layer in range(a.n_layers):
        assert a.input_weights(layer).equal(b.input_weights(layer))
        assert a.output_weights(layer).equal(b.output_weights(layer))
    assert a.unembedding().equal(b.unembedding()) and a.final_norm_scale().equal(b.final_norm_scale())
    # a clamp sweep through the spread model: the same curve
    items = [clamp.SweepItem(layer, 5, 7, [-3.0, 0.0, 2.5]) for layer in range(a.n_layers)]
    got = clamp.sweep_many(loaded, "The dog sat", items)
    want = clamp.sweep_many(one, "The dog sat", items)
    for g, w in zip(got, want, strict=True):
        assert g["probs"] == pytest.approx(w["probs"], rel=1e-5, abs=1e-7)
        assert g["baseline"]["activation"] == pytest.approx(w["baseline"]["activation"], rel=1e-5, abs=1e-6)
    # a clamped generation too
    gen = [clamp.generate(m, 1, 5, "The dog", 4.0, tokens=6, seed=3) for m in (loaded, one)]
    assert gen[0]["clamped"]["token_ids"] == gen[1]["clamped"]["token_ids"]


def rows(url: str, name: str, table: str, order: str) -> list[tuple]:
    with engine_for(url).connect() as c:
        model_id = c.execute(text("select id from models where name = :n"), {"n": name}).scalar_one()
        found = c.execute(text(f"select * from {table} where model_id = :m order by {order}"), {"m": model_id})
        return [tuple(v for k, v in r.items() if k not in ("model_id", "id", "created_at", "seconds"))
                for r in found.mappings().all()]


def same(a, b) -> bool:
    """Equal, floats within float32 rounding (blobs are compared as they are stored: exactly)."""
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-5, atol=1e-7))
    return a == b


def test_index_with_a_device_map_gives_the_one_device_results(tiny, db_url):
    settings = Settings(database_url=db_url, examples_batch_tokens=256)
    common = dict(corpus=str(tiny["corpus"]), tokens=1024, context=16, clamp_prompt="The dog", quiet=True)
    index_model(settings, str(tiny["path"]), "one", device="cpu", **common)
    index_model(settings, str(tiny["path"]), "split", device=DEVICE_MAP_AUTO, max_memory=tiny["caps"], **common)
    with engine_for(db_url).connect() as c:
        device, info = c.execute(text("select device, info from models where name = 'split'")).one()
    assert device == DEVICE_MAP_AUTO
    info = json.loads(info) if isinstance(info, str) else info
    assert info["max_memory"] == tiny["caps"]
    for table, order in (("neurons", "layer, neuron"), ("neuron_activations", "layer, neuron"),
                         ("token_index", "token_id"), ("example_windows", '"window"'),
                         ("clamp_curves", "layer, neuron")):
        got, want = rows(db_url, "split", table, order), rows(db_url, "one", table, order)
        assert len(got) == len(want) > 0, table
        for g, w in zip(got, want, strict=True):
            assert all(same(a, b) for a, b in zip(g, w, strict=True)), (table, g[:2])
    # the model page says where it ran
    from fastapi.testclient import TestClient

    from app.main import create_app

    page = TestClient(create_app(settings)).get("/split")
    assert page.status_code == 200 and "a device map (auto" in page.text


def test_a_model_that_does_not_fit_is_refused_before_any_weight_is_read(tiny, tmp_path, capsys):
    path = tmp_path / "llama"
    build_tiny("llama", path)
    (path / "model.safetensors").write_bytes(b"not weights")  # read, it would be another error
    needed = inspect_model(str(path), device="cpu", dtype="float32")["memory"]["model_bytes"]
    with pytest.raises(NeedleError) as err:
        load_model(str(path), device="cpu", dtype="float32", max_memory={"cpu": needed - 1})
    message = err.value.message
    assert f"needs {needed / 1024:.1f} KiB for its weights as float32" in message
    assert f"cpu has {(needed - 1) / 1024:.1f} KiB free" in message
    assert "--device-map auto" in err.value.hint
    # in bfloat16 it needs half: it fits, and only then is the broken file read
    with pytest.raises(NeedleError, match="could not load"):
        load_model(str(path), device="cpu", dtype="bfloat16", max_memory={"cpu": needed - 1})
    # a device map with no disk and too little CPU memory is refused the same way, by the command
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    os.environ["NEEDLE_DATABASE_URL"] = url
    try:
        assert main(["db", "upgrade"]) == 0
        assert main(["index", str(path), "--name", "m", "--device-map", "auto", "--max-memory", "cpu=1KiB,disk=0"]) == 1
    finally:
        del os.environ["NEEDLE_DATABASE_URL"]
    err_text = capsys.readouterr().err
    assert "needs" in err_text and "the device map (cpu 1.0 KiB, disk 0.0 KiB) has 1.0 KiB free" in err_text
    assert "Traceback" not in err_text
    # needle inspect says so
    info = inspect_model(str(path), device="cpu", dtype="float32", max_memory={"cpu": needed - 1})
    assert info["fits"] == {"fits": False, "needed_bytes": needed, "free_bytes": {"cpu": needed - 1}}
    assert "does not fit" in format_inspection(info)
    assert inspect_model(str(path), device="cpu", dtype="float32")["fits"]["fits"] is True


@pytest.mark.parametrize("bad", ["cpu", "gpu=1GiB", "cpu=lots", "cuda:x=2GB"])
def test_a_bad_memory_cap_is_a_clear_error(bad):
    with pytest.raises(NeedleError, match="is not PLACE=SIZE"):
        parse_max_memory(bad)


def test_memory_caps_read_as_bytes():
    assert parse_max_memory("cpu=2GiB, cuda=1.5GB,cuda:1=500MiB,disk=0") == {
        "cpu": 2 * 2**30, "cuda:0": 1_500_000_000, "cuda:1": 500 * 2**20, "disk": 0}


# The process's anonymous memory (its own, not the checkpoint's pages mapped from the file), sampled
# every half millisecond while the model loads onto the GPU in bfloat16: its peak growth.
PEAK = textwrap.dedent("""
    import sys, threading, time, torch
    from workers.loading import load_model

    def anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    torch.zeros(1, device="cuda")  # the CUDA context before the baseline
    start, peak, done = anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    loaded = load_model(sys.argv[1], device="cuda", dtype="bfloat16")
    done.set()
    thread.join()
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    print(peak[0] - start, torch.cuda.max_memory_allocated())
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: on the CPU the weights are loaded in place")
def test_loading_onto_a_gpu_holds_no_copy_in_cpu_memory(tmp_path):
    """A model saved in float32 (about 260 MB), loaded onto the GPU as bfloat16 (130 MB): each weight
    goes straight there in its dtype, so CPU memory never holds the model (reading it onto the CPU,
    then moving it, took its bfloat16 size there), nor the GPU the float32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodels import tiny_tokenizer

    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=512, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    bf16 = sum(p.numel() for p in model.parameters()) * 2
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer("sentencepiece").save_pretrained(tmp_path / "m")
    del model
    proc = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "m")], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    cpu_growth, gpu_peak = map(int, proc.stdout.strip().splitlines()[-1].split())
    assert cpu_growth < bf16 / 2, (cpu_growth / 2**20, bf16 / 2**20)
    assert gpu_peak < 1.25 * bf16, (gpu_peak / 2**20, bf16 / 2**20)
