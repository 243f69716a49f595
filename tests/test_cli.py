"""The `needle` command as a user runs it: a real process, its exit code and what it prints.
Bad input gets one clear line and a non-zero exit, and the database stays as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.db import engine_for
from needle.cli import index_model
from needle.running import TqdmProgress
from tests.hubserver import counting_hub, hub_env
from tests.live_server import needle_serve
from tests.tinymodels import build_tiny, build_unsupported


def needle(*args: str, db_url: str, timeout: float = 300, **env: str | None) -> subprocess.CompletedProcess:
    """Run `needle ARGS` with this environment plus env (a None value removes that variable)."""
    merged = {**os.environ, "NEEDLE_DATABASE_URL": db_url, **env}
    environ = {name: value for name, value in merged.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-m", "needle.cli", *args], capture_output=True, text=True, env=environ, timeout=timeout
    )


def dump(db_url: str) -> dict:
    """Every row of every table, to show a failed command changed nothing."""
    engine = engine_for(db_url)
    out = {}
    with engine.connect() as c:
        for table in ("models", "vocab", "neurons", "token_index", "search_parts", "jobs", "clamp_curves", "generations"):
            out[table] = sorted(map(tuple, c.execute(text(f"select * from {table}")).fetchall()), key=repr)
    return out


def test_console_script_is_installed():
    assert shutil.which("needle"), "pip install -e . provides the `needle` command"


@pytest.fixture
def indexed(db_url, tmp_path):
    """A database that already holds one indexed model, and the model's folder."""
    path = build_tiny("gpt2", tmp_path / "gpt2")
    index_model(Settings(database_url=db_url), str(path), "kept", quiet=True)
    return db_url, path


def _assert_clear_error(proc, *phrases):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("error: ")
    for phrase in phrases:
        assert phrase.lower() in proc.stderr.lower(), proc.stderr


def test_unknown_architecture(indexed, tmp_path):
    db_url, _ = indexed
    before = dump(db_url)
    bad = build_unsupported(tmp_path / "bert")
    proc = needle("index", str(bad), "--name", "bert", db_url=db_url)
    _assert_clear_error(proc, "gpt2", "llama")  # names the supported families
    assert dump(db_url) == before


def test_missing_folder(indexed, tmp_path):
    db_url, _ = indexed
    before = dump(db_url)
    proc = needle("index", str(tmp_path / "nope"), "--name", "nope", db_url=db_url)
    _assert_clear_error(proc, "no such folder")
    assert dump(db_url) == before


def test_hub_id_without_network(indexed, tmp_path):
    """A hub id not in the cache, with a hub that fails (503, a status huggingface_hub's backoff retries; a
    local server, so the same with or without network): asked once, no retries, a clear error, the database unchanged."""
    db_url, _ = indexed
    before = dump(db_url)
    with counting_hub(status=503) as hub:
        proc = needle("index", "EleutherAI/pythia-70m", "--name", "pythia-70m", db_url=db_url,
                      **hub_env(hub.url, tmp_path / "hf-home"))
    assert hub.requests == [("HEAD", "/EleutherAI/pythia-70m/resolve/main/config.json")], proc.stderr
    _assert_clear_error(proc, "hub", "EleutherAI/pythia-70m", "503")
    assert dump(db_url) == before


def test_model_without_mlp(indexed, tmp_path):
    """A saved Llama whose MLP weights were removed loads without an MLP the adapter can read."""
    db_url, _ = indexed
    before = dump(db_url)
    from tests.tinymodels import build_without_mlp

    proc = needle("index", str(build_without_mlp(tmp_path / "nomlp")), "--name", "nomlp", db_url=db_url)
    _assert_clear_error(proc, "mlp")
    assert dump(db_url) == before


def test_conflicting_settings_need_force(indexed):
    db_url, path = indexed
    before = dump(db_url)
    proc = needle("index", str(path), "--name", "kept", "--decode-norm", "final", db_url=db_url)
    _assert_clear_error(proc, "--force")
    assert dump(db_url) == before


def test_cuda_without_gpu(indexed):
    db_url, path = indexed
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = dump(db_url)
    proc = needle("index", str(path), "--name", "x", "--device", "cuda", db_url=db_url)
    _assert_clear_error(proc, "cuda")
    assert dump(db_url) == before


def test_index_and_serve_refuse_an_unmigrated_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    for args in (["index", str(tmp_path), "--name", "x"], ["serve", "--port", "8765"]):
        proc = needle(*args, db_url=url, timeout=60)
        _assert_clear_error(proc, "needle db upgrade")
    proc = needle("db", "upgrade", db_url=url, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "head" in proc.stdout


def test_unreachable_postgres_is_a_clear_error(tmp_path):
    proc = needle("db", "current", db_url="postgresql+psycopg://postgres@127.0.0.1:1/none", timeout=60)
    _assert_clear_error(proc, "cannot reach the database")


def test_unreachable_database_is_a_clear_error_for_upgrade_and_demo(tmp_path):
    """db upgrade and demo connect through upgrade(): the same clear error as the other commands."""
    for args in (["db", "upgrade"], ["demo", "--no-serve"]):
        proc = needle(*args, db_url="postgresql+psycopg://postgres@127.0.0.1:1/none", timeout=60)
        _assert_clear_error(proc, "cannot reach the database", "NEEDLE_DATABASE_URL")
    folder = tmp_path / "folder"
    folder.mkdir()
    for args in (["db", "upgrade"], ["db", "current"], ["jobs"]):
        proc = needle(*args, db_url=f"sqlite:///{folder}", timeout=60)
        _assert_clear_error(proc, f"names the folder '{folder}'", "needle.sqlite")
    assert list(folder.iterdir()) == []


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    for args in (["db", "current"], ["db", "upgrade"], ["jobs"], ["serve", "--port", "8765"], ["demo", "--no-serve"]):
        proc = needle(*args, db_url=f"sqlite:///{notes}", timeout=60)
        _assert_clear_error(proc, f"'{notes}' is not an sqlite database", "NEEDLE_DATABASE_URL")
    assert notes.read_text() == "not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_database_url_with_a_bad_port_is_a_clear_error():
    for args in (["jobs"], ["db", "upgrade"]):
        proc = needle(*args, db_url="postgresql+psycopg://postgres@127.0.0.1:notaport/x", timeout=60)
        _assert_clear_error(proc, "NEEDLE_DATABASE_URL", "is not a database URL")


def test_a_missing_sqlite_database_is_only_made_by_upgrade(tmp_path):
    """A mistyped path is an error naming it, and no folder or file appears; db upgrade (and so
    demo) makes it, also at the default location."""
    url = f"sqlite:///{tmp_path / 'typo' / 'sub' / 'x.sqlite'}"
    for args in (["db", "current"], ["jobs"], ["serve", "--port", "8765"], ["export", "kept", "--format", "jsonl",
                 "--out", str(tmp_path / "out")], ["index", str(tmp_path), "--name", "x"], ["clamp", "kept", "0", "0"]):
        proc = needle(*args, db_url=url, timeout=120)
        _assert_clear_error(proc, f"no database at '{tmp_path / 'typo' / 'sub' / 'x.sqlite'}'", "needle db upgrade")
        assert not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()
    proc = needle("db", "upgrade", db_url=url, timeout=60)
    assert proc.returncode == 0 and "(head)" in proc.stdout, proc.stderr
    proc = needle("db", "current", db_url=url, timeout=60)
    assert proc.returncode == 0 and "run `needle db upgrade`" not in proc.stdout, proc.stderr
    # the default location (no NEEDLE_DATABASE_URL), folders and all
    proc = needle("db", "upgrade", db_url="", XDG_DATA_HOME=str(tmp_path / "xdg"), timeout=60)
    assert proc.returncode == 0 and (tmp_path / "xdg" / "needle" / "needle.sqlite").is_file(), proc.stderr


def test_index_command_prints_progress_and_the_url(db_url, tmp_path):
    path = build_tiny("llama", tmp_path / "m")
    proc = needle("index", str(path), "--name", "tiny-llama", db_url=db_url)
    assert proc.returncode == 0, proc.stderr
    assert "neuron" in proc.stderr  # the progress bar
    assert "/tiny-llama" in proc.stdout
    again = needle("index", str(path), "--name", "tiny-llama", db_url=db_url)
    assert again.returncode == 0, again.stderr


BAR_UNITS = ("neuron", "step", "tok", "layer", "value", "feature")
# a tqdm bar's rate field, "[00:01<00:02, 1.23ktok/s]", "?tok/s]" or "2.50s/tok]", names its unit
BAR_RATE = re.compile(rf"(?:[\d?]|\d[kMGT])({'|'.join(BAR_UNITS)})/s\]|\ds/({'|'.join(BAR_UNITS)})\]")


def bar_units(stderr: str, model: str) -> dict[str, set[str]]:
    """{stage: the units its bars were drawn with} from `needle index`'s stderr, where each job's
    bar is redrawn (after "\\r") with its description "MODEL STAGE KEY", or "MODEL STAGE KEY (PHASE)"
    for a stage counted in phases (then the entry is "STAGE/PHASE")."""
    units: dict[str, set[str]] = {}
    for line in re.split(r"[\r\n]", stderr):
        if not line.startswith(f"{model} "):
            continue
        stage = line.split(" ")[1]
        phase = re.match(r"[^:]* \((\w+)\):", line)
        if phase:
            stage += "/" + phase.group(1)
        found = BAR_RATE.findall(line)
        assert len(found) == 1, line  # every redraw names one unit, one of BAR_UNITS
        units.setdefault(stage, set()).add("".join(found[0]))
    return units


def test_each_progress_bar_counts_in_its_stages_unit(sqlite_url, tmp_path):
    """The bar of each job of `needle index` says what it counts, from its first redraw to its
    last: decoded neurons, corpus tokens (an examples pass, a sharded run's range and part jobs,
    and the probes), layers (a sharded run's merge), clamp values, or steps."""
    path = build_tiny("gpt2", tmp_path / "m")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The dog sat on the mat, and the cat sat by the dog.\n" * 80)
    common = ["--corpus", str(corpus), "--context", "16"]
    proc = needle("index", str(path), "--name", "whole", *common, db_url=sqlite_url)
    assert proc.returncode == 0, proc.stderr
    assert bar_units(proc.stderr, "whole") == {
        "decode": {"neuron"}, "search_index": {"step"}, "examples": {"tok"}, "clamp": {"value"},
    }
    proc = needle("index", str(path), "--name", "split", *common, "--layers-per-job", "1",
                  "--features", "text", "--probe-tokens", "1024", db_url=sqlite_url)
    assert proc.returncode == 0, proc.stderr
    assert bar_units(proc.stderr, "split") == {
        "decode": {"neuron"}, "search_index": {"step"}, "examples_range": {"tok"}, "examples_part": {"tok"},
        "examples": {"layer"}, "clamp": {"value"},
        # the probes' bar is drawn before the features are read, then becomes the forward pass's
        "probes": {"tok"}, "probes/forward": {"tok"}, "probes/fit": {"feature"},
    }


def test_a_job_in_phases_has_one_rising_fraction():
    """The probes count corpus tokens, then features fitted: the /-/jobs page's fraction (the
    heartbeat's) runs 0 -> 0.5 over the first phase and 0.5 -> 1 over the second, never back."""
    from workers.worker import Progress

    for progress in (Progress("m probes all", 0, "tok"), TqdmProgress("m probes all", 0, "tok")):
        seen = [progress.fraction()]
        progress.phase("forward", 1000, "tok", 0.5)
        for _ in range(4):
            progress.advance(250)
            seen.append(progress.fraction())
        progress.phase("fit", 3, "feature", 0.5)
        seen.append(progress.fraction())
        for _ in range(3):
            progress.advance(1)
            seen.append(progress.fraction())
        progress.close()
        assert seen == pytest.approx([None, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5 + 1 / 6, 0.5 + 2 / 6, 1.0]), seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_indexes_the_bundled_model_and_serves_it(tmp_path):
    """`needle demo` on a fresh database: migrates, indexes the bundled model, serves pages
    (tests/test_demo.py: it serves before the indexing is done)."""
    url = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    port = _free_port()
    env = {**os.environ, "NEEDLE_DATABASE_URL": url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "needle.cli", "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/stdlib-demo.json", timeout=5)
                if r.status_code == 200 and not r.json()["jobs_pending"]:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(1)
        else:
            pytest.fail("needle demo did not finish indexing within 900 s")
        model = r.json()
        assert model["model"] == "stdlib-demo" and model["neurons_stored"] == model["n_layers"] * model["d_mlp"]
        neuron = httpx.get(f"http://127.0.0.1:{port}/stdlib-demo/0/0.json", timeout=10).json()
        assert len(neuron["input_tokens"]) == 20
        search = httpx.get(f"http://127.0.0.1:{port}/stdlib-demo/search.json", params={"token": "def"}, timeout=10).json()
        assert search["results"], "a common Python token has neurons"
        # activation examples from the standard library, and your own text through the demo's worker
        assert model["examples_run"]["corpus"] == "stdlib-sample" and model["examples_run"]["tokens"] == 262_144
        assert len(neuron["examples"]) == 20 and neuron["stats"]["tokens"] == 262_144
        run = httpx.post(f"http://127.0.0.1:{port}/stdlib-demo/0/0/text", json={"text": "def f(x):"}, timeout=10)
        assert run.status_code == 202
        for _ in range(120):
            result = httpx.get(f"http://127.0.0.1:{port}{run.json()['run']['json_url']}", timeout=10).json()["run"]
            if result["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert result["state"] == "done" and "".join(result["result"]["tokens"]) == "def f(x):"
        # the built-in features are probed; is_python_code (code against its own prose) is found
        features = httpx.get(f"http://127.0.0.1:{port}/stdlib-demo/features.json", timeout=10).json()["features"]
        by_name = {f["feature"]: f for f in features}
        assert {"contains_digit", "in_comment", "is_keyword", "is_python_code"} <= set(by_name)
        assert by_name["is_python_code"]["best"]["f1"] >= 0.8
        # clamp curves: precomputed for every neuron that is a top-10 search hit for its own top token
        checked = 0
        for token in ("def", "return", "self", "import"):
            hits = httpx.get(f"http://127.0.0.1:{port}/stdlib-demo/search.json", params={"token": token}, timeout=10).json()
            for hit in hits["results"][:10]:
                page = httpx.get(f"http://127.0.0.1:{port}/stdlib-demo/{hit['layer']}/{hit['neuron']}.json", timeout=10).json()
                own = [c for c in page["clamp_curves"] if c["source"] == "index"]
                if page["top_token"]["token_id"] == hit["token_id"]:
                    assert len(own) == 1 and len(own[0]["values"]) == 21 and own[0]["token_id"] == hit["token_id"]
                    checked += 1
        assert checked > 0
        assert page["clamp_form"]["prompt"].strip(), "the demo's clamp prompt comes from its corpus"
        # and a clamped generation through the demo's worker
        gen = httpx.post(f"http://127.0.0.1:{port}/stdlib-demo/0/0/generate",
                         json={"prompt": "def f(x):", "value": 20, "tokens": 8}, timeout=10)
        assert gen.status_code == 202
        for _ in range(120):
            result = httpx.get(f"http://127.0.0.1:{port}{gen.json()['generation']['json_url']}", timeout=10).json()
            if result["generation"]["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert result["generation"]["state"] == "done" and result["generation"]["unclamped"]["token_ids"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/stdlib-demo" in out
    # a second run skips indexing
    again = needle("demo", "--no-serve", db_url=url)
    assert again.returncode == 0 and "skipping" in again.stdout


def test_bad_layers_per_job_is_a_usage_error(sqlite_url, tmp_path):
    proc = needle("index", str(tmp_path), "--name", "x", "--layers-per-job", "-2", db_url=sqlite_url, timeout=60)
    assert proc.returncode == 2 and "not a whole number" in proc.stderr and "Traceback" not in proc.stderr


def _assert_usage_error(proc, *phrases):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [["serve", "--port", "99999"], ["serve", "--port", "-5"], ["serve", "--port", "0"],
                                  ["serve", "--port", "٣٠٠٠"], ["demo", "--no-serve", "--port", "99999"]])
def test_a_bad_port_is_a_usage_error(sqlite_url, args):
    proc = needle(*args, db_url=sqlite_url, timeout=60)
    _assert_usage_error(proc, "--port", "1 to 65535")
    assert "serving at" not in proc.stdout and "Indexing" not in proc.stdout


def test_generate_takes_the_pages_seeds_only(indexed):
    """0 to 2147483647, as the page's form (and the seed column); -1 was stored, a huge one a crash."""
    db_url, _ = indexed
    before = dump(db_url)
    for seed in ("99999999999999999999", "-1", "2147483648", "1e3", "٣"):
        proc = needle("generate", "kept", "0", "0", "--value", "1", "--seed", seed, db_url=db_url, timeout=60)
        _assert_usage_error(proc, "--seed", "0 to 2147483647")
    assert dump(db_url) == before
    proc = needle("generate", "kept", "0", "0", "--value", "1", "--tokens", "2", "--seed", "2147483647", db_url=db_url)
    assert proc.returncode == 0 and "seed 2147483647" in proc.stdout, proc.stderr


def test_numbers_are_ascii_digits_only(indexed):
    """int() takes other scripts' digits ("١" is 1), "1_0" and " 1"; the pages answer 404 for them, and the CLI refuses them."""
    db_url, _ = indexed
    before = dump(db_url)
    for args, bad in (
        (["clamp", "kept", "١", "0"], "١"), (["clamp", "kept", "0", "٣"], "٣"), (["clamp", "kept", "1_0", "0"], "1_0"),
        (["clamp", "kept", " 1", "0"], " 1"), (["generate", "kept", "١", "0", "--value", "1"], "١"),
        (["generate", "kept", "0", "0", "--value", "١"], "١"), (["generate", "kept", "0", "0", "--value", "1", "--tokens", "٣"], "٣"),
        (["index", "x", "--name", "x", "--context", "٣"], "٣"), (["index", "x", "--name", "x", "--layers-per-job", "١"], "١"),
    ):
        proc = needle(*args, db_url=db_url, timeout=60)
        _assert_usage_error(proc, f"'{bad}' is not a ", "number")
    assert dump(db_url) == before


def test_arguments_that_are_not_utf8_are_a_clear_error(indexed, tmp_path):
    """Bytes that are not UTF-8 reach Python as lone surrogates (bash $'\\xff\\xfe' is "\\udcff\\udcfe", and
    $'\\xed\\xa0\\x80', a UTF-8 surrogate, "\\udced\\udca0\\udc80"): one clear error naming the argument."""
    db_url, path = indexed
    before = dump(db_url)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args, name in (
        (["clamp", "kept", "0", "0", "--token", "\udcff\udcfe"], "--token"),
        (["clamp", "kept", "0", "0", "--prompt", "\udced\udca0\udc80"], "--prompt"),
        (["generate", "kept", "0", "0", "--value", "1", "--prompt", "x\udcff"], "--prompt"),
        (["clamp", "kept\udcff", "0", "0"], "NAME"),
        (["index", str(path), "--name", "kept", "--clamp-prompt", "\udcff"], "--clamp-prompt"),
        (["index", "\udcff", "--name", "kept"], "MODEL"),
        (["export", "\udcff", "--format", "jsonl", "--out", "out"], "NAME"),
        (["jobs", "--model", "\udcff"], "--model"),
        (["serve", "--host", "\udcff"], "--host"),
    ):
        proc = subprocess.run([sys.executable, "-m", "needle.cli", *args], capture_output=True, text=True, timeout=60,
                              cwd=cwd, env={**os.environ, "NEEDLE_DATABASE_URL": db_url}, check=False)
        _assert_clear_error(proc, f"{name} '", "not valid text", "utf-8")
    assert dump(db_url) == before and list(cwd.iterdir()) == []


def test_serve_with_no_processes_is_a_usage_error(sqlite_url):
    proc = needle("serve", "--processes", "0", db_url=sqlite_url, timeout=60)
    assert proc.returncode == 2 and "--processes" in proc.stderr and "Traceback" not in proc.stderr
    assert "serving at" not in proc.stdout


def test_serve_on_a_busy_port_is_a_clear_error(sqlite_url):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = needle("serve", "--port", str(port), db_url=sqlite_url, timeout=60)
    _assert_clear_error(proc, "cannot serve", "--port")
    assert "serving at" not in proc.stdout


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_serve_in_several_processes(indexed):
    """`needle serve --processes 2`: two server processes share the port and answer pages."""
    db_url, _ = indexed
    with needle_serve(db_url, "--processes", "2") as (port, proc):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(10):
                page = http.get("/kept/0/1")
                assert page.status_code == 200 and "Layer 0 · Neuron 1" in page.text
            assert http.get("/kept/0/1.json").json()["neuron"] == 1
        time.sleep(0.5)
        assert len(_children(proc.pid)) >= 2, "one server process per --processes"
    assert "in 2 processes" in proc.output
    assert proc.returncode == 0


def test_listening_socket_gives_connections_tcp_nodelay():
    """asyncio sets TCP_NODELAY only on connections accepted from an IPPROTO_TCP socket; without it
    each small answer of a `--processes` server waited for a delayed ACK."""
    import asyncio

    from needle.cli import listening_socket

    async def check() -> int:
        sock = listening_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        def accepted(reader, writer):
            raw = writer.get_extra_info("socket")
            seen.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        _, w = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            w.close()
            server.close()

    assert asyncio.run(check()) != 0


def test_a_bad_setting_is_a_clear_error(sqlite_url):
    """A NEEDLE_* variable that is not valid names itself (it was "unexpected ValidationError")."""
    for name, value in (("NEEDLE_PORT", "abc"), ("NEEDLE_LIVE_RATE_PER_MINUTE", "-1"), ("NEEDLE_GZIP_LEVEL", "10")):
        proc = needle("jobs", db_url=sqlite_url, timeout=60, **{name: value})
        _assert_clear_error(proc, name, "not valid")


def test_a_negative_clamp_value_reads_as_a_value(indexed):
    """`--value -1e3` would read as an unknown option to argparse; it is the value -1000."""
    db_url, _ = indexed
    proc = needle("generate", "kept", "0", "0", "--value", "-1e3", "--tokens", "2", "--json", db_url=db_url, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["value"] == -1000.0
    with engine_for(db_url).connect() as c:
        assert c.execute(text("select value from generations")).scalar_one() == -1000.0
