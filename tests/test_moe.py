"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): every expert's MLP neurons are
units, neuron N of a layer being neuron N % F of expert N // F.

Tiny random models are saved with save_pretrained and loaded through the user's path; what
Needle reads is checked against a direct computation written here from the checkpoint's named
parameters (router, each expert's fused gate_up_proj and down_proj): the activations on the
tokens routed to each expert (0 elsewhere), a clamp's effect on the MoE block's output, the
decodings, the examples' statistics over routed tokens only, and the neuron page's expert and
routing share over real HTTP.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import select

from app import queries, urls
from app.arrays import FLOAT32, INT32, unpack
from app.config import Settings
from app.db import engine_for, session_scope
from app.errors import NeedleError
from app.main import create_app
from app.schema import Neuron, NeuronActivations
from needle.cli import index_model
from tests.live_server import get_json, get_soup, running_server
from tests.tinymodels import EXPERT_WIDTH, EXPERTS, MOE_FAMILIES, TOP_EXPERTS, build_tiny
from workers import clamp
from workers.corpus import bos_prefix_id, load_corpus
from workers.inspect import format_inspection, inspect_model
from workers.loading import load_model

PROMPTS = ["the dog sat on the mat", "def feed(dog):\n    return dog"]
CORPUS = "\n".join(["the dog sat on the mat and the cat ran", "def feed(dog):\n    return dog.bark()",
                    "import os\nprint(os.getcwd())"] * 6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: build_tiny(family, root / family) for family in MOE_FAMILIES}


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().double() for name, p in model.named_parameters()}


def direct_moe(model, params, layer: int, x: torch.Tensor, clamp: tuple[int, float] | None = None,
               positions: slice = slice(None)):
    """The MoE block of `layer` on its input x [T, d], from named parameters in float64: (the
    neuron activations [T, E * F], 0 where a token was not routed to the expert; the routing
    [T, E] bool; the block's output [T, d], with neuron clamp[0] set to clamp[1] on the tokens
    of `positions` routed to its expert)."""
    cfg = model.config
    pre = f"model.layers.{layer}.mlp"
    x = x.double()
    probs = torch.softmax(x @ params[f"{pre}.gate.weight"].T, dim=-1)
    top_v, top_i = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
    if getattr(cfg, "norm_topk_prob", True):  # Mixtral always renormalises
        top_v = top_v / top_v.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_v)
    routed = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)
    gate_up, down = params[f"{pre}.experts.gate_up_proj"], params[f"{pre}.experts.down_proj"]
    width = down.shape[2]
    acts = torch.stack([F.silu(x @ gate_up[e, :width].T) * (x @ gate_up[e, width:].T) for e in range(down.shape[0])], 1)
    acts = acts * routed[:, :, None]
    if clamp is not None:
        e, i = divmod(clamp[0], width)
        where = torch.zeros(len(x), dtype=torch.bool)
        where[positions] = True
        acts[routed[:, e] & where, e, i] = clamp[1]
    out = torch.einsum("te,tef,edf->td", weights, acts, down)
    if f"{pre}.shared_expert.up_proj.weight" in params:  # Qwen2-MoE's shared expert, always on
        s = lambda n: params[f"{pre}.shared_expert.{n}.weight"]  # noqa: E731
        shared = (F.silu(x @ s("gate_proj").T) * (x @ s("up_proj").T)) @ s("down_proj").T
        out = out + torch.sigmoid(x @ params[f"{pre}.shared_expert_gate.weight"].T) * shared
    return acts.reshape(len(x), -1), routed, out


def _mlp_inputs(model, layers, ids) -> dict[int, torch.Tensor]:
    """The input of each layer's MoE block on a forward pass of ids, flattened to [T, d]."""
    seen: dict[int, torch.Tensor] = {}
    handles = [model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda m, args, layer=layer: seen.__setitem__(layer, args[0].reshape(-1, args[0].shape[-1]).detach()))
        for layer in layers]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_neuron_reads_and_clamps_as_the_model_computes(family, tiny):
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny[family]), device="cpu", dtype="float32")
    adapter, model, tok = loaded.adapter, loaded.model, loaded.tokenizer
    assert (adapter.n_experts, adapter.d_expert, adapter.experts_per_token) == (EXPERTS, EXPERT_WIDTH, TOP_EXPERTS)
    assert adapter.d_mlp == EXPERTS * EXPERT_WIDTH and adapter.gated
    reference = AutoModelForCausalLM.from_pretrained(tiny[family], dtype=torch.float32).eval()  # no Needle forward
    params = _params(reference)
    encoded = [tok(p).input_ids for p in PROMPTS]
    ids = torch.tensor([e[: min(map(len, encoded))] for e in encoded])  # a batch of 2, no padding
    inputs = _mlp_inputs(reference, [0, 1], ids)
    with torch.no_grad():
        expected_logits = reference(input_ids=ids).logits
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)  # Needle's experts forward: same model

    with torch.no_grad(), adapter.read_activations([0, 1]) as acts:
        model(input_ids=ids)
    for layer in (0, 1):
        direct, routed, _ = direct_moe(reference, params, layer, inputs[layer])
        torch.testing.assert_close(acts[layer].reshape(len(direct), -1).double(), direct, rtol=1e-4, atol=1e-5)
        assert torch.equal(adapter.routed(layer), routed)
        assert (routed.sum(1) == TOP_EXPERTS).all()
        # input and output weights: expert e's up row and down column i, for neuron e * F + i
        up, down = params[f"model.layers.{layer}.mlp.experts.gate_up_proj"], params[f"model.layers.{layer}.mlp.experts.down_proj"]
        e, i = divmod(37, EXPERT_WIDTH)
        assert adapter.expert_of(37) == (e, i)
        torch.testing.assert_close(adapter.input_weights(layer)[37].double(), up[e, EXPERT_WIDTH + i])
        torch.testing.assert_close(adapter.output_weights(layer)[37].double(), down[e, :, i])

    # a clamp: on the tokens routed to the neuron's expert, weighted by the router
    neuron, value = 2 * EXPERT_WIDTH + 5, 4.0
    _, routed, plain = direct_moe(reference, params, 1, inputs[1])
    _, _, clamped = direct_moe(reference, params, 1, inputs[1], clamp=(neuron, value))
    assert routed[:, 2].any() and (~routed[:, 2]).any(), "the test needs tokens routed and not routed to expert 2"
    with torch.no_grad(), adapter.clamp(1, neuron, value), adapter.read_sites([(1, "mlp_out")]) as sites:
        model(input_ids=ids)
    got = sites[(1, "mlp_out")].reshape(len(clamped), -1).double()
    torch.testing.assert_close(got, clamped, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), adapter.read_sites([(1, "mlp_out")]) as sites:
        model(input_ids=ids)
    unclamped = sites[(1, "mlp_out")].reshape(len(clamped), -1).double()
    torch.testing.assert_close(unclamped, plain, rtol=1e-4, atol=1e-4)
    changed = (got - unclamped).abs().amax(1) > 0
    assert torch.equal(changed, routed[:, 2])  # only where its expert ran


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_the_workers_sweep_matches_the_direct_computation(family, tiny):
    """clamp.sweep_many, as `needle index` and the clamp page run it: for each value, p(target)
    at the last position equals a forward pass of transformers' own model whose MoE block output
    at the layer is replaced by the direct computation with the neuron clamped."""
    from transformers import AutoModelForCausalLM

    loaded = load_model(str(tiny[family]), device="cpu", dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(tiny[family], dtype=torch.float32).eval()
    params = _params(reference)
    prompt = PROMPTS[0]
    ids = torch.tensor([loaded.tokenizer(prompt).input_ids])
    values = [-6.0, -1.0, 0.5, 3.0, 8.0]
    inputs = _mlp_inputs(reference, [0, 1], ids)
    # in each layer, a neuron of an expert the last token is routed to (elsewhere a clamp there does nothing)
    neurons = [(layer, int(direct_moe(reference, params, layer, inputs[layer])[1][-1].nonzero()[-1]) * EXPERT_WIDTH + 5)
               for layer in (0, 1)]
    for last_only in (False, True):
        want: dict[tuple[int, int], torch.Tensor] = {}  # (layer, neuron) -> p(next token) [values, V]
        for layer, neuron in neurons:
            probs = []
            for value in values:
                where = slice(-1, None) if last_only else slice(None)

                def replace(module, args, output, layer=layer, value=value, neuron=neuron, where=where):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    out = direct_moe(reference, params, layer, x, clamp=(neuron, value), positions=where)[2]
                    return out.reshape(output.shape).to(output.dtype)

                handle = reference.model.layers[layer].mlp.register_forward_hook(replace)
                try:
                    with torch.no_grad():
                        probs.append(torch.softmax(reference(input_ids=ids).logits[0, -1].double(), -1))
                finally:
                    handle.remove()
            want[(layer, neuron)] = torch.stack(probs)
        # the token whose probability the clamp moves most
        items = [clamp.SweepItem(layer, neuron, int((p[-1] - p[0]).abs().argmax()), values) for (layer, neuron), p in want.items()]
        results = clamp.sweep_many(loaded, prompt, items, last_only=last_only)
        for item, res in zip(items, results, strict=True):
            expected = want[(item.layer, item.neuron)][:, item.token_id]
            assert float(expected.max() - expected.min()) > 1e-3, "the clamp must move the target's probability"
            np.testing.assert_allclose(res["probs"], expected.numpy(), rtol=0, atol=1e-5, err_msg=f"{family} {item} {last_only}")


def test_a_layer_without_experts_is_refused_with_what_to_do(tmp_path):
    import json

    path = build_tiny("qwen2_moe", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "decoder_sparse_step": 2}))  # layer 0 dense
    with pytest.raises(NeedleError, match=r"layer 0 of this qwen2_moe model has no experts .*dense"):
        load_model(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_inspect_names_the_experts(family, tiny):
    info = inspect_model(str(tiny[family]), device="cpu", dtype="float32")
    assert info["family"] == family and info["mlp"]["kind"] == "experts"
    assert info["d_mlp"] == EXPERTS * EXPERT_WIDTH and info["neurons"] == 2 * EXPERTS * EXPERT_WIDTH
    experts = info["experts"]
    assert (experts["count"], experts["width"], experts["per_token"]) == (EXPERTS, EXPERT_WIDTH, TOP_EXPERTS)
    assert experts["router"] == "model.layers.0.mlp.gate"
    assert (experts["shared_expert"] is not None) == (family == "qwen2_moe")
    text = format_inspection(info)
    assert f"{EXPERTS} experts of {EXPERT_WIDTH} neurons" in text and "expert N // 16" in text


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_index_reads_each_expert_on_its_routed_tokens(family, tiny, db_url, tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    settings = Settings(database_url=db_url)
    name = family.replace("_", "-")
    index_model(settings, str(tiny[family]), name, device="cpu", corpus=str(corpus), context=8, quiet=True)
    engine = engine_for(db_url)

    reference = AutoModelForCausalLM.from_pretrained(tiny[family], dtype=torch.float32).eval()
    params = _params(reference)
    w_u = reference.get_output_embeddings().weight.detach().double()
    with session_scope(engine) as s:
        model = queries.get_model(s, name)
        assert model.d_mlp == EXPERTS * EXPERT_WIDTH
        assert model.info["experts"] == {"count": EXPERTS, "width": EXPERT_WIDTH, "per_token": TOP_EXPERTS}
        neurons = s.scalars(select(Neuron).where(Neuron.model_id == model.id).order_by(Neuron.layer, Neuron.neuron)).all()
        stats = s.scalars(select(NeuronActivations).where(NeuronActivations.model_id == model.id)
                          .order_by(NeuronActivations.layer, NeuronActivations.neuron)).all()
        run = queries.example_run(s, model.id)
        n_tokens = run.n_tokens
    assert len(neurons) == len(stats) == 2 * EXPERTS * EXPERT_WIDTH

    # decodings: softmax(W_U . expert e's up row i) for neuron e * F + i
    for row in neurons:
        e, i = divmod(row.neuron, EXPERT_WIDTH)
        w_in = params[f"model.layers.{row.layer}.mlp.experts.gate_up_proj"][e, EXPERT_WIDTH + i]
        probs = torch.softmax(w_u @ w_in, dim=-1)
        np.testing.assert_allclose(unpack(row.in_probs, FLOAT32), torch.topk(probs, 20).values.numpy(), rtol=1e-4, atol=1e-7)

    # examples: each neuron's statistics over the tokens routed to its expert only
    loaded_tok = load_model(str(tiny[family]), device="cpu", dtype="float32").tokenizer
    windows = load_corpus(str(corpus), loaded_tok, context=8).windows
    bos = bos_prefix_id(loaded_tok)
    ids = windows if bos is None else torch.cat([torch.full((len(windows), 1), bos), windows], 1)
    inputs = _mlp_inputs(reference, [0, 1], ids)
    keep = torch.ones(ids.shape, dtype=torch.bool)
    if bos is not None:
        keep[:, 0] = False
    keep = keep.reshape(-1)
    for layer in (0, 1):
        acts, routed, _ = direct_moe(reference, params, layer, inputs[layer])
        acts, routed = acts[keep], routed[keep].repeat_interleave(EXPERT_WIDTH, dim=1)
        assert routed.any(0).all() and (~routed).any(0).all(), "the test needs every expert routed to, and not always"
        rows = [r for r in stats if r.layer == layer]
        count = routed.sum(0)
        assert [r.tokens for r in rows] == count.tolist()
        high = torch.where(routed, acts, -torch.inf).amax(0)
        low = torch.where(routed, acts, torch.inf).amin(0)
        np.testing.assert_allclose([r.max_act for r in rows], high.numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose([r.min_act for r in rows], low.numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose([r.mean for r in rows], ((acts * routed).sum(0) / count).numpy(), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose([r.frequency for r in rows], (((acts > 0) & routed).sum(0) / count).numpy(), atol=1e-9)
        # the best context is the window of the routed max, at a routed token
        routed_acts = torch.where(routed, acts, -torch.inf).reshape(len(windows), -1, acts.shape[1])
        best = routed_acts.amax(1).argmax(0)
        assert [int(unpack(r.top_windows, INT32)[0]) for r in rows] == best.tolist()
        np.testing.assert_allclose([unpack(r.top_max, FLOAT32)[0] for r in rows], high.numpy(), rtol=1e-3, atol=1e-5)

    # the page: its expert, the router's share of the corpus, evidence over routed tokens
    neuron = 3 * EXPERT_WIDTH + 2
    row = stats[EXPERTS * EXPERT_WIDTH + neuron]
    assert (row.layer, row.neuron) == (1, neuron)
    with running_server(create_app(settings)) as base:
        import httpx

        with httpx.Client(base_url=base, timeout=30) as http:
            data = get_json(http, urls.neuron_url(name, 1, neuron, fmt="json"))
            soup = get_soup(http, urls.neuron_url(name, 1, neuron))
            card = get_soup(http, urls.embed_url(name, 1, neuron))
            layer = get_json(http, urls.layer_url(name, 1, fmt="json"))
            layer_soup = get_soup(http, urls.layer_url(name, 1))
    expert = data["expert"]
    assert (expert["expert"], expert["index"], expert["experts"], expert["width"]) == (3, 2, EXPERTS, EXPERT_WIDTH)
    assert expert["routed_tokens"] == row.tokens and expert["routed_share"] == pytest.approx(row.tokens / n_tokens, rel=1e-5)
    facts = soup.select_one(".expert-facts").get_text(" ", strip=True)
    assert "expert 3" in facts and f"{100 * row.tokens / n_tokens:.3g}%" in facts
    assert "the tokens routed to its expert" in soup.select_one("#firing").get_text(" ", strip=True)
    assert "(expert 3, its neuron 2)" in card.select_one("h1").get_text(" ", strip=True)
    # the layer page: every expert's routing share, each expert's neurons counting its tokens
    shares = [x["routed_share"] for x in layer["experts"]]
    assert [x["expert"] for x in layer["experts"]] == list(range(EXPERTS))
    by_expert = [r.tokens for r in stats if r.layer == 1][::EXPERT_WIDTH]
    assert shares == pytest.approx([t / n_tokens for t in by_expert], rel=1e-5)  # 6 digits shown
    assert sum(by_expert) == TOP_EXPERTS * n_tokens  # each token goes to TOP_EXPERTS experts
    assert len(layer_soup.select("table.experts tbody tr")) == EXPERTS


def test_a_mixture_of_experts_spread_by_a_device_map_reads_and_clamps_as_on_one_device(tiny):
    """Mixtral over the CPU and an offload folder (a --max-memory cap forces it): the expert weights
    read from the offload store, every layer's activations and routing, and a clamp sweep are those
    of the model on one device."""
    from workers.devices import DEVICE_MAP_AUTO, spread

    path = str(tiny["mixtral"])
    weights = inspect_model(path, device="cpu", dtype="float32")["memory"]["model_bytes"]
    spread_out = load_model(path, device=DEVICE_MAP_AUTO, dtype="float32", max_memory={"cpu": weights * 3 // 4})
    assert set(map(str, spread(spread_out.model).values())) == {"cpu", "disk"}, spread(spread_out.model)
    one = load_model(path, device="cpu", dtype="float32")
    a, b = spread_out.adapter, one.adapter
    for layer in (0, 1):
        assert a.input_weights(layer).equal(b.input_weights(layer))
        assert a.output_weights(layer).equal(b.output_weights(layer))
    ids = torch.tensor([one.tokenizer(PROMPTS[1]).input_ids])
    with torch.no_grad(), a.read_activations([0, 1]) as got, b.read_activations([0, 1]) as want:
        spread_out.model(input_ids=ids)
        one.model(input_ids=ids)
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        spread_out.model(input_ids=ids)
        one.model(input_ids=ids)
    assert torch.equal(a.routed(1), b.routed(1))
    items = [clamp.SweepItem(layer, neuron, 7, [-4.0, 0.0, 5.0]) for layer, neuron in ((0, 3), (1, 2 * EXPERT_WIDTH + 1))]
    for g, w in zip(clamp.sweep_many(spread_out, PROMPTS[1], items), clamp.sweep_many(one, PROMPTS[1], items),
                    strict=True):
        assert g["probs"] == pytest.approx(w["probs"], rel=1e-5, abs=1e-7)
