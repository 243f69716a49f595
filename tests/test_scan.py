"""What fires on this text (`/{model}/text`): a user's text run through the model for every
unit at once, each unit ranked by its activation relative to its max on the examples corpus.

The detector Llama of tests/test_examples.py (neuron 1/5 fires on "▁house" only) is indexed
with its corpus on SQLite and Postgres, with an SAE saved by sae_lens on its last MLP; a real
server and a real worker answer the live request, and every number on the page is checked
against a direct forward pass (the neurons by a hook, the latents by sae_lens's encode).
"""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from sqlalchemy import update

from app.config import Settings
from app.db import engine_for, session_scope
from app.main import create_app
from app.schema import TextScan
from needle.cli import index_model
from tests.live_server import running_server
from tests.test_examples import CONTEXT, DETECTOR, detector  # noqa: F401 - fixtures
from tests.test_sharding import detector_sae
from workers.loading import load_model
from workers.worker import Worker

TEXT = "the dog is in the house and the lazy house is not your day"


def work(engine, settings) -> None:
    worker = Worker(engine, settings)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True, "poll_seconds": 0.1}, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the worker did not go idle"


@pytest.fixture
def site(detector, db_url, tmp_path):  # noqa: F811
    from needle.sae import import_folder

    settings = Settings(database_url=db_url, live_rate_per_minute=0, heartbeat_seconds=0.5)
    index_model(settings, str(detector["path"]), "det", corpus=str(detector["corpus"]), context=CONTEXT, quiet=True)
    folder, _ = detector_sae(detector, tmp_path)
    import_folder(settings, "det", str(folder), sae_name="s", quiet=True)
    engine = engine_for(db_url)
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield http, engine, settings, folder


def direct(detector, folder, engine) -> tuple[list[int], list[list[tuple]], dict]:  # noqa: F811
    """Each token's units ranked by activation / stored max, computed here: (ids, per token
    [(kind, layer, index, activation, relative)] best first, the stored maxima)."""
    from sae_lens import SAE
    from sqlalchemy import text as sql

    loaded = load_model(str(detector["path"]), device="cpu", dtype="float32")
    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with engine.connect() as c:
        rows = c.execute(sql("select basis, layer, neuron, max_act from neuron_activations")).all()
    maxima = {(int(b), int(layer), int(n)): float(m) for b, layer, n, m in rows}
    sae = SAE.load_from_disk(str(folder)).eval()
    acts: dict[int, torch.Tensor] = {}
    hooks = [block.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, i=i: acts.__setitem__(i, args[0][0].detach().float()))
        for i, block in enumerate(loaded.model.model.layers)]
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([ids]))
            layer = sae.cfg.metadata.hook_name.split(".")[1]
            latents = sae.encode(acts[int(layer)]).float()
    finally:
        for h in hooks:
            h.remove()
    per_token = []
    basis = max(b for b, _, _ in maxima)  # the SAE's id
    for t in range(len(ids)):
        units = []
        for layer, a in acts.items():
            for n, v in enumerate(a[t].tolist()):
                top = maxima.get((0, layer, n), 0.0)
                if top > 0:
                    units.append(("neuron", layer, n, v, v / top))
        for n, v in enumerate(latents[t].tolist()):
            top = maxima.get((basis, int(layer), n), 0.0)
            if top > 0:
                units.append(("latent", int(layer), n, v, v / top))
        units.sort(key=lambda u: -u[4])
        per_token.append(units)
    return ids, per_token, maxima


def test_what_fires_on_a_typed_text_every_unit_against_a_direct_pass(site, detector):  # noqa: F811
    http, engine, settings, folder = site
    form = http.get("/det/text")
    assert form.status_code == 200 and 'action="/det/text"' in form.text
    assert 'href="/det/text"' in http.get("/det").text, "the model page links it"
    r = http.post("/det/text", json={"text": TEXT})
    assert r.status_code == 202, r.text[:300]
    queued = r.json()
    assert queued["state"] == "queued" and queued["url"] == f"/det/text/{queued['id']}"
    assert "hx-trigger" in http.get(queued["url"], headers={"HX-Request": "true"}).text, "the panel polls while queued"
    listed = [j for j in http.get("/-/jobs.json").json()["jobs"] if j["stage"] == "scan"]
    assert [(j["kind"], j["request"], j["request_url"]) for j in listed] == [
        ("live", "what fires on your text", queued["url"])], "the jobs list links the request"
    work(engine, settings)
    data = http.get(queued["json_url"]).json()
    assert data["state"] == "done" and data["model"] == "det" and data["text"] == TEXT, data.get("error")

    ids, want, _ = direct(detector, folder, engine)
    assert [t["token_id"] for t in data["tokens"]] == ids
    kinds = set()
    for t, units in zip(data["tokens"], want, strict=True):
        got = t["units"]
        assert len(got) == 10
        # the same units, best first (ties aside), with the same numbers
        assert [u["relative"] for u in got] == pytest.approx([u[4] for u in units[:10]], rel=1e-4, abs=1e-6)
        for u, w in zip(got, units[:10]):
            kinds.add(u["kind"])
            assert u["relative"] == pytest.approx(w[4], rel=1e-4, abs=1e-6)
            assert u["activation"] == pytest.approx(w[3], rel=1e-4, abs=1e-6)
            assert u["url"] == (f"/det/{u['layer']}/{u['index']}" if u["kind"] == "neuron"
                                else f"/det/sae/s/{u['index']}")
    assert kinds == {"neuron", "latent"}, "neurons and latents are ranked together"
    # the detector neuron leads on each "house" and on no other token
    for t in data["tokens"]:
        lead = (t["units"][0]["kind"], t["units"][0]["layer"], t["units"][0]["index"])
        assert (lead == ("neuron", *DETECTOR)) is (t["token"] == "▁house"), (t["token"], lead)
    # the whole text's top units: each one's best token
    best = sorted(((u[4], u[0], u[1], u[2], i) for i, units in enumerate(want) for u in units), reverse=True)
    seen, top = set(), []
    for rel, kind, layer, index, i in best:
        if (kind, layer, index) not in seen:
            seen.add((kind, layer, index))
            top.append((kind, layer, index, i, rel))
        if len(top) == 20:
            break
    assert [(u["kind"], u["layer"], u["index"], u["token_index"]) for u in data["top_units"]] == [x[:4] for x in top]
    assert [u["relative"] for u in data["top_units"]] == pytest.approx([x[4] for x in top], rel=1e-4)

    # the page: every token a link to its list, each list's units linked
    page = http.get(queued["url"])
    assert page.status_code == 200
    for i in range(len(data["tokens"])):
        assert f'href="#tok-{i}"' in page.text and f'id="tok-{i}"' in page.text
    assert f'href="/det/{DETECTOR[0]}/{DETECTOR[1]}"' in page.text


def test_a_form_post_redirects_and_bad_input_is_a_clear_error(site):
    http, engine, settings, _ = site
    r = http.post("/det/text", data={"text": "the dog"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/det/text/")
    for body, words in (({"text": "  "}, "There is no text to run"),
                        ({"text": "x" * (settings.text_max_chars + 1)}, "the limit is")):
        r = http.post("/det/text", json=body)
        assert r.status_code == 400 and words in r.json()["error"], r.text[:300]
    assert http.post("/nope/text", json={"text": "the dog"}).status_code == 404
    for path in ("/det/text/999999", "/det/text/x", "/det/text/999999.json"):
        r = http.get(path)
        assert r.status_code == 404 and "There is no text run" in r.text, path
    assert http.get("/det/text/0012", follow_redirects=False).headers["location"] == "/det/text/12"


def test_a_stored_result_that_cannot_be_shown_breaks_only_its_panel(site):
    http, engine, settings, _ = site
    r = http.post("/det/text", json={"text": "the dog is in the house"})
    work(engine, settings)
    scan_id = r.json()["id"]
    for bad in ({"units": [[0, 1]], "tokens": [], "top": []}, {"units": "x"}, [1, 2], {"units": [], "tokens": [[]] * 50,
                                                                                       "top": []}):
        with session_scope(engine) as s:
            s.execute(update(TextScan).where(TextScan.id == scan_id).values(result=bad))
        page = http.get(f"/det/text/{scan_id}")
        assert page.status_code == 200 and "This text run cannot be shown" in page.text, bad
        data = http.get(f"/det/text/{scan_id}.json").json()
        assert data["state"] == "broken" and data["tokens"] == [] and data["top_units"] == []


def test_a_model_without_examples_says_what_is_missing(detector, db_url):  # noqa: F811
    settings = Settings(database_url=db_url, live_rate_per_minute=0, heartbeat_seconds=0.5)
    index_model(settings, str(detector["path"]), "bare", quiet=True)  # no corpus: no unit has a max
    engine = engine_for(db_url)
    with running_server(create_app(settings)) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/bare/text", json={"text": "the dog"})
        assert r.status_code == 202
        work(engine, settings)
        data = http.get(r.json()["json_url"]).json()
        assert data["state"] == "failed" and "max activation on the examples corpus" in data["error"], data
    off = Settings(database_url=db_url, live_requests=False)
    with running_server(create_app(off)) as base, httpx.Client(base_url=base, timeout=30) as http:
        r = http.post("/bare/text", json={"text": "the dog"})
        assert r.status_code == 403
        assert "switched off" in http.get("/bare/text").text
