"""`needle demo` as a user runs it: a real process on a fresh SQLite database, asked over real
HTTP. It serves before its stages are computed, its pages say what is not there yet, a worker
thread beside the server fills them in, a second run serves at once and queues nothing, and a
run stopped half-way goes on where it stopped. The demo's corpus and probe datasets are cut
small (NEEDLE_DEMO_*); its stages are the same."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from bs4 import BeautifulSoup
from sqlalchemy import text

from app.db import engine_for

MODEL = "stdlib-demo"
NEURON = f"/{MODEL}/3/102"  # comparison operators (README, "The demo model")
# the model's stages, then those of the shipped SAE (assets/demo-sae) it imports
STAGES = {"decode", "search_index", "examples", "probes", "clamp", "sae_decode", "sae_eval", "sae_examples"}
SAE = "l2-mlp-3072"
# examples over some seconds (time enough to read a neuron page before they are done), little to probe
SMALL = {"NEEDLE_DEMO_TOKENS": "32768", "NEEDLE_DEMO_PROBE_TOKENS": "2048"}
FILL_IN_TIMEOUT = 1200  # seconds for every stage on a busy 2-core machine; the test ends as soon as they are done

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """A running `needle demo`: its base URL, an HTTP client, and its output so far."""

    def __init__(self, proc: subprocess.Popen, base: str, log: Path):
        self.proc, self.base, self.log = proc, base, log
        self.http = httpx.Client(base_url=base, timeout=60)

    def output(self) -> str:
        return self.log.read_text()

    def answer(self, path: str) -> httpx.Response | None:
        """GET path, or None while the server does not listen yet; the demo must still be running."""
        assert self.proc.poll() is None, f"needle demo exited with {self.proc.returncode}:\n{self.output()}"
        try:
            return self.http.get(path)
        except httpx.TransportError:
            return None

    def json(self, path: str) -> dict:
        r = self.http.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:500])
        return r.json()

    def soup(self, path: str) -> BeautifulSoup:
        r = self.http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (path, r.status_code)
        return BeautifulSoup(r.text, "html.parser")

    def until(self, path: str, done, what: str, *, pause: float = 0.1) -> dict:
        """Poll path's JSON until done(data) holds; the data it held for."""
        deadline = time.monotonic() + FILL_IN_TIMEOUT
        while time.monotonic() < deadline:
            r = self.answer(path)
            if r is not None and r.status_code == 200 and done(data := r.json()):
                return data
            time.sleep(pause)
        pytest.fail(f"{what}: not within {FILL_IN_TIMEOUT} s\n{self.output()}")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.http.close()
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)


@contextmanager
def demo(tmp_path: Path, db_url: str, run: str):
    port = _free_port()
    log = tmp_path / f"demo-{run}.log"
    env = {**os.environ, "NEEDLE_DATABASE_URL": db_url, "TOKENIZERS_PARALLELISM": "false", **SMALL}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "needle.cli", "demo", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    d = Demo(proc, f"http://127.0.0.1:{port}", log)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def jobs(db_url: str) -> dict[str, tuple]:
    """The demo's jobs by stage: (id, state, worker, started_at, finished_at)."""
    with engine_for(db_url).connect() as c:
        rows = c.execute(text("select stage, id, state, worker, started_at, finished_at from jobs"))
        return {stage: tuple(rest) for stage, *rest in rows}


def first_answer(d: Demo) -> dict:
    """The model's JSON at the first moment the server answers it."""
    return d.until(f"/{MODEL}.json", lambda data: True, "the model page answers")


def stage_states(model: dict) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in model["stages"]}


def all_done(model: dict) -> bool:
    assert "failed" not in stage_states(model).values(), model["stages"]
    return not model["jobs_pending"]


def firing_text(soup: BeautifulSoup) -> str:
    return " ".join(soup.select_one("section#firing").get_text(" ").split())


def test_demo_serves_at_once_and_fills_its_pages_in(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    with demo(tmp_path, url, "first") as d:
        # it answers while its stages are still to be computed, and the model page says which
        model = first_answer(d)
        assert set(stage_states(model)) == STAGES
        assert model["jobs_pending"] and model["stages_left"], model["stages"]
        panel = d.soup(f"/{MODEL}").select_one("#jobs-panel")
        assert panel.get("hx-get"), "the jobs panel polls itself while stages are left"
        assert "Left: " in panel.get_text()

        # a decoded neuron whose examples are not computed yet says so, in its page and its JSON
        # (read after the page: examples pending then were pending when the page was made)
        d.until(f"{NEURON}.json", lambda data: True, "the neuron is decoded")
        page = d.soup(NEURON)
        neuron = d.json(f"{NEURON}.json")
        assert "examples" in neuron["pending"], neuron["pending"]
        pending = neuron["pending"]["examples"]
        assert pending["state"] in ("queued", "running")
        assert pending["message"].startswith("Activation examples not computed yet: ")
        assert neuron["examples"] == [] and neuron["stats"] is None
        assert {"features", "clamp_curves"} <= set(neuron["pending"]), "probes and clamp curves come after"
        assert "not computed yet" in neuron["pending"]["features"]["message"]
        assert "Activation examples not computed yet" in firing_text(page)
        assert not page.select("section#firing ol.contexts")
        assert "Sparse probes not computed yet" in page.select_one("section#features").get_text()

        # the worker thread computes every stage, and the pages show what it computed
        model = d.until(f"/{MODEL}.json", all_done, "every stage is done", pause=1)
        assert set(model["stages_done"]) == STAGES and model["stages_left"] == [] and model["pending"] == {}
        assert model["neurons_stored"] == model["n_layers"] * model["d_mlp"]
        assert model["examples_run"]["tokens"] == int(SMALL["NEEDLE_DEMO_TOKENS"])
        neuron = d.json(f"{NEURON}.json")
        assert neuron["pending"] == {}
        assert len(neuron["examples"]) == 20 and neuron["stats"]["tokens"] == int(SMALL["NEEDLE_DEMO_TOKENS"])
        page = d.soup(NEURON)
        assert page.select("section#firing ol.contexts") and "not computed yet" not in page.get_text()
        features = d.json(f"/{MODEL}/features.json")
        assert features["probed"] and features["pending"] is None and features["features"]
        curves = 0
        for token in ("def", "return", "self", "import"):
            for hit in d.json(f"/{MODEL}/search.json?token={token}")["results"][:10]:
                page = d.json(f"/{MODEL}/{hit['layer']}/{hit['neuron']}.json")
                curves += any(c["source"] == "index" for c in page["clamp_curves"])
        assert curves, "the precomputed clamp curves are on their neurons' pages"
        # the shipped SAE: its latents decoded, their examples over the same windows, its quality measured
        sae = d.json(f"/{MODEL}/sae/{SAE}.json")
        assert sae["latents_stored"] == sae["d_sae"] == 3072 and sae["site"] == "mlp" and sae["layer"] == 2
        assert 20 < sae["quality"]["l0"] < 50 and 0 < sae["quality"]["ce_recovered"] <= 1, sae["quality"]
        assert sae["density"]["latents"] == 3072
        latent = d.json(f"/{MODEL}/sae/{SAE}/2926.json")
        assert latent["unit"] == "latent" and latent["stats"]["tokens"] == int(SMALL["NEEDLE_DEMO_TOKENS"])
        assert latent["links"] and latent["links"][0]["kind"] == "neuron"
        assert d.stop() == 0
    done = jobs(url)
    assert {state for _, state, *_ in done.values()} == {"done"}

    # a second run on the finished database serves at once and queues nothing
    with demo(tmp_path, url, "second") as d:
        model = first_answer(d)
        assert not model["jobs_pending"] and model["stages_left"] == [] and model["pending"] == {}
        assert d.json(f"{NEURON}.json")["pending"] == {}
        d.stop()
        assert "already indexed" in d.output()
    assert jobs(url) == done, "nothing queued or recomputed"


def half_way(model: dict) -> bool:
    states = stage_states(model)
    if all_done(model):
        pytest.fail(f"every stage was done before the demo could be stopped half-way: {model['stages']}")
    return states["examples"] == "done" and states["probes"] == "running"


def test_a_demo_stopped_half_way_goes_on_where_it_stopped(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    with demo(tmp_path, url, "first") as d:
        first_answer(d)
        # stopped (Ctrl-C) with the examples done and the probes in hand
        d.until(f"/{MODEL}.json", half_way, "the examples are done and the probes running", pause=0.05)
        assert d.stop(signal.SIGINT) == 0
        assert f"the job in hand ({MODEL} probes all) went back to the queue" in d.output()
    before = jobs(url)
    assert before["examples"][1] == "done"
    assert before["probes"][1:3] == ("queued", None), "the job in hand went back to the queue"

    with demo(tmp_path, url, "again") as d:
        model = first_answer(d)
        assert model["jobs_pending"] and "probes" in model["stages_left"]
        model = d.until(f"/{MODEL}.json", all_done, "every stage is done", pause=1)
        assert set(model["stages_done"]) == STAGES
        neuron = d.json(f"{NEURON}.json")
        assert neuron["pending"] == {} and len(neuron["examples"]) == 20
        assert d.stop(signal.SIGTERM) == 0
    after = jobs(url)
    for stage in ("decode", "search_index", "examples"):
        assert after[stage] == before[stage], f"{stage} was done before the stop and is not computed again"
    assert {state for _, state, *_ in after.values()} == {"done"}
