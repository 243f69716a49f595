"""The jobs list (issue 6): the /-/jobs page, its JSON twin /-/jobs.json, the polling list, and
`needle jobs`. Real jobs made by the queue's own functions (enqueue, claim, heartbeat, fail,
finish) and a live request posted to a neuron page, on SQLite and on Postgres, over real HTTP.
HTML is asserted by parsing it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from bs4 import BeautifulSoup
from sqlalchemy import event, update
from sqlalchemy.engine import Engine

from app import queries, urls
from app.config import Settings, get_settings
from app.db import engine_for, session_scope
from app.main import create_app
from app.schema import Job
from tests.live_server import cli_runner, get_json, get_soup, running_server

ALPHA = "alpha-1.5b"  # a dot in the name, like "pythia-1.4b"
BETA = "beta"
# Markup and a second line: the page must show it as text, whole; the CLI must print every line.
OOM = "RuntimeError: CUDA out of memory while decoding layer 0\n  tried to allocate <b>2.00 GiB</b> & failed"
FLAKY = "OSError: the corpus shard could not be read"
STATE_RANK = {"running": 0, "queued": 1, "failed": 2, "done": 3}


@dataclass
class Jobs:
    failed: int  # alpha decode layers:0, out of attempts, with OOM
    running: int  # alpha decode layers:1, 25% done, worker w-run
    backoff: int  # alpha decode layers:2, failed once with FLAKY, queued again after a 600 s backoff
    done: int  # alpha examples all
    blocked: int  # alpha search_index all: queued, waits for decode
    stale: int  # beta decode layers:all: running, its worker's last heartbeat an hour ago
    live: int  # beta's text run on neuron 1/2, posted to its neuron page
    run: int  # the text run's id


@dataclass
class Site:
    http: httpx.Client
    engine: Engine
    db_url: str
    jobs: Jobs

    def json(self, path: str) -> dict:
        return get_json(self.http, path)

    def soup(self, path: str, **kwargs) -> BeautifulSoup:
        return get_soup(self.http, path, **kwargs)


def add_model(engine: Engine, name: str) -> int:
    with session_scope(engine) as s:
        return queries.save_model(
            s, name, source=f"synthetic:{name}", family="gpt2", architecture="GPT2LMHeadModel", n_layers=2,
            d_model=8, d_mlp=4, vocab_size=16, device="cpu", dtype="float32", decode_norm="none",
        ).id


def enqueue(engine: Engine, model_id: int, stage: str, key: str, **kwargs) -> int:
    with session_scope(engine) as s:
        return queries.enqueue_job(s, model_id, stage, key, {}, **kwargs).id


def claim(engine: Engine, model_id: int, worker: str, expected: int) -> None:
    with session_scope(engine) as s:
        job = queries.claim_job(s, worker, model_id=model_id)
        assert job is not None and job.id == expected, "the next runnable job is the one just queued"


def make_jobs(engine: Engine, http: httpx.Client) -> Jobs:
    alpha, beta = add_model(engine, ALPHA), add_model(engine, BETA)

    failed = enqueue(engine, alpha, "decode", "layers:0", max_attempts=1)
    claim(engine, alpha, "w-oom", failed)
    with session_scope(engine) as s:
        assert queries.fail_job(s, failed, "w-oom", OOM) == "failed"

    running = enqueue(engine, alpha, "decode", "layers:1")
    claim(engine, alpha, "w-run", running)
    with session_scope(engine) as s:
        assert queries.heartbeat(s, running, "w-run", progress=0.25)

    backoff = enqueue(engine, alpha, "decode", "layers:2")
    claim(engine, alpha, "w-flaky", backoff)
    with session_scope(engine) as s:
        assert queries.fail_job(s, backoff, "w-flaky", FLAKY, backoff_s=600) == "queued"

    done = enqueue(engine, alpha, "examples", "all")
    claim(engine, alpha, "w-done", done)
    with session_scope(engine) as s:
        assert queries.finish_job(s, done, "w-done")

    blocked = enqueue(engine, alpha, "search_index", "all", requires_stage="decode")

    stale = enqueue(engine, beta, "decode", "layers:all")
    claim(engine, beta, "w-gone", stale)
    with session_scope(engine) as s:  # the worker died an hour ago (requeue_stale has not run yet)
        s.execute(update(Job).where(Job.id == stale).values(heartbeat_at=queries.utcnow() - timedelta(hours=1)))

    # a live request, as a person makes one: "test your own text" on a neuron page
    r = http.post(f"/{BETA}/1/2/text", json={"text": "hello world"})
    assert r.status_code == 202, r.text
    run = r.json()["run"]["id"]
    with session_scope(engine) as s:
        live = queries.text_job(s, beta, run).id
    return Jobs(failed, running, backoff, done, blocked, stale, live, run)


@pytest.fixture
def site(db_url):
    engine = engine_for(db_url)
    app = create_app(Settings(database_url=db_url))
    with running_server(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield Site(http, engine, db_url, make_jobs(engine, http))


def rows(soup: BeautifulSoup) -> dict[int, BeautifulSoup]:
    out = {}
    for tr in soup.select("#jobs-list table.jobs-list tbody tr"):
        out[int(tr.select_one("td").get_text(strip=True))] = tr
    return out


def cells(tr: BeautifulSoup) -> list[str]:
    return [" ".join(td.get_text(" ", strip=True).split()) for td in tr.select("td")]


def error_of(r: httpx.Response) -> str:
    """The message of an error answer and its hint (never a traceback)."""
    assert "Traceback" not in r.text
    if r.headers["content-type"].startswith("application/json"):
        body = r.json()
        assert body["ok"] is False and body["status"] == r.status_code
        return body["error"] + " " + body.get("hint", "")
    soup = BeautifulSoup(r.text, "html.parser")
    shown, hint = soup.select_one(".error-message"), soup.select_one(".hint")
    assert shown is not None, r.text[:500]
    return shown.get_text() + " " + (hint.get_text() if hint else "")


# ---------------------------------------------------------------- the page and its JSON twin


def test_json_lists_every_job_active_first_with_its_details(site):
    j = site.jobs
    data = site.json("/-/jobs.json")
    listed = data["jobs"]
    ids = [job["id"] for job in listed]
    # running (claim order), queued (claim order), failed, done (newest first)
    assert ids == [j.running, j.stale, j.backoff, j.blocked, j.live, j.failed, j.done]
    assert [STATE_RANK[job["state"]] for job in listed] == sorted(STATE_RANK[job["state"]] for job in listed)
    assert data["total"] == 7 and data["counts"] == {"running": 2, "queued": 3, "failed": 1, "done": 1}
    assert data["jobs_pending"] is True and data["page"] == data["pages"] == 1
    # times are ISO 8601 marked UTC
    assert all(j["created_at"].endswith("Z") for j in data["jobs"])
    assert all(j[k] is None or j[k].endswith("Z") for j in data["jobs"] for k in ("started_at", "finished_at", "heartbeat_at"))
    by_id = {job["id"]: job for job in listed}

    failed = by_id[j.failed]
    assert (failed["model"], failed["stage"], failed["key"], failed["state"]) == (ALPHA, "decode", "layers:0", "failed")
    assert failed["error"] == OOM, "the whole error, every line"
    assert (failed["attempts"], failed["max_attempts"], failed["worker"]) == (1, 1, "w-oom")
    assert failed["kind"] == "index" and failed["model_url"] == f"/{ALPHA}"

    running = by_id[j.running]
    assert running["progress"] == 0.25 and running["worker"] == "w-run" and running["attempts"] == 1
    assert 0 <= running["heartbeat_age_seconds"] < 30 and running["stale"] is False
    assert running["heartbeat_at"] is not None and running["run_after"] is None and running["error"] is None

    stale = by_id[j.stale]
    assert stale["model"] == BETA and stale["stale"] is True
    assert 3500 < stale["heartbeat_age_seconds"] < 3700

    backoff = by_id[j.backoff]
    assert backoff["state"] == "queued" and backoff["error"] == FLAKY, "a retried job keeps its last error"
    # back in the queue, it belongs to no worker (the one that failed it is not holding it)
    assert (backoff["attempts"], backoff["max_attempts"], backoff["worker"]) == (1, 3, None)
    assert 500 < backoff["waits_seconds"] <= 600 and backoff["run_after"] is not None
    assert backoff["heartbeat_age_seconds"] is None

    blocked = by_id[j.blocked]
    assert blocked["state"] == "queued" and blocked["waits_seconds"] is None and blocked["requires_stage"] == "decode"
    assert blocked["attempts"] == 0 and blocked["worker"] is None and blocked["error"] is None

    done = by_id[j.done]
    assert done["state"] == "done" and done["progress"] == 1.0 and done["seconds"] is not None

    live = by_id[j.live]
    assert (live["kind"], live["request"], live["stage"]) == ("live", "your text", queries.TEXT_STAGE)
    assert live["request_url"] == urls.text_run_url(BETA, 1, 2, j.run) == f"/{BETA}/1/2/text/{j.run}"
    assert site.http.get(live["request_url"]).status_code == 200, "the live request's own page"
    assert all(job["kind"] == "index" for job in listed if job["id"] != j.live)


def test_html_page_shows_the_same_jobs_and_errors_in_full(site):
    j = site.jobs
    soup = site.soup("/-/jobs")
    link = soup.find("link", rel="alternate", type="application/json")
    assert link is not None and link["href"] == "/-/jobs.json"
    shown = rows(soup)
    assert list(shown) == [job["id"] for job in site.json("/-/jobs.json")["jobs"]], "same jobs, same order"

    failed = shown[j.failed]
    assert failed.select_one("td.error").get_text() == OOM, "the error as text (escaped), whole"
    assert failed.select_one("td.error b") is None
    texts = cells(failed)
    assert texts[1:5] == [ALPHA, "decode", "layers:0", "failed"]
    assert "1 / 1" in texts and "w-oom" in texts
    assert failed.select_one("a")["href"] == f"/{ALPHA}"

    running = cells(shown[j.running])
    assert "25%" in running and "w-run" in running and any(t.endswith("s ago") for t in running)
    assert "(stale)" not in " ".join(running)
    assert "(stale)" in " ".join(cells(shown[j.stale]))
    backoff = cells(shown[j.backoff])
    assert FLAKY in backoff and "1 / 3" in backoff and any(t.startswith("in ") and t.endswith(" s") for t in backoff)

    live = shown[j.live]
    assert cells(live)[3] == f"request {j.run}" and live.select("td")[3].span["title"] == f"job key run:{j.run}"
    assert "live" in live.select_one(".kind").get_text()
    assert live.select_one(".kind a")["href"] == urls.text_run_url(BETA, 1, 2, j.run)
    assert shown[j.failed].select_one(".kind") is None

    # the list polls itself while jobs are queued or running
    polled = soup.select_one("#jobs-list")
    assert polled["hx-trigger"] == "every 2s" and polled["hx-get"] == urls.jobs_list_url()


def test_the_jobs_page_is_linked_from_every_page_header_and_the_model_panel(site):
    for path in ("/", urls.model_url(ALPHA), urls.layer_url(ALPHA, 0), urls.jobs_url()):
        assert site.soup(path).select_one("header.site a[href='/-/jobs']") is not None, path
    assert site.soup(f"/{ALPHA}").select_one(f"#jobs-panel a[href='{urls.jobs_url(ALPHA)}']") is not None
    assert urls.jobs_url(ALPHA) == "/-/jobs?model=alpha-1.5b"


# ---------------------------------------------------------------- filters and pages


def test_filters_by_model_and_state(site):
    j = site.jobs
    beta = site.json(f"/-/jobs.json?model={BETA}")
    assert [job["id"] for job in beta["jobs"]] == [j.stale, j.live] and beta["model"] == BETA
    assert beta["counts"] == {"running": 1, "queued": 1, "failed": 0, "done": 0} and beta["total"] == 2

    failed = site.json("/-/jobs.json?state=failed")
    assert [job["id"] for job in failed["jobs"]] == [j.failed] and failed["jobs"][0]["error"] == OOM
    assert failed["total"] == 1 and failed["counts"]["queued"] == 3, "counts are per state, whatever the filter"

    queued_alpha = site.json(f"/-/jobs.json?model={ALPHA}&state=queued")
    assert [job["id"] for job in queued_alpha["jobs"]] == [j.backoff, j.blocked]
    assert site.json(f"/-/jobs.json?model={BETA}&state=failed")["jobs"] == []

    # the HTML page filters the same way, and its state links keep the model filter
    soup = site.soup(f"/-/jobs?model={BETA}")
    assert list(rows(soup)) == [j.stale, j.live]
    state_links = {a.get_text(" ", strip=True).split()[0]: a["href"] for a in soup.select("nav.job-states a")}
    assert state_links["failed"] == urls.jobs_url(BETA, "failed") == f"/-/jobs?model={BETA}&state=failed"
    assert soup.select_one("select[name=model] option[selected]")["value"] == BETA
    empty = site.soup(f"/-/jobs?model={BETA}&state=failed")
    assert not rows(empty) and "No failed jobs of beta" in empty.select_one("#jobs-list .empty").get_text()

    # the filter form without JavaScript sends empty values for "all"
    assert list(rows(site.soup("/-/jobs?model=&state="))) == list(rows(site.soup("/-/jobs")))


@pytest.mark.parametrize(
    "query, status, words",
    [
        ("model=nope", 404, ["no model named 'nope'", ALPHA]),
        ("state=finished", 400, ["Unknown job state 'finished'", "queued", "failed"]),
        ("state=DONE", 400, ["Unknown job state"]),
        ("page=0", 400, ["Page '0' is not a page number"]),
        ("page=two", 400, ["Page 'two'"]),
        ("page=2", 400, ["out of range"]),
    ],
)
def test_bad_filters_are_clear_errors(site, query, status, words):
    for path in (f"/-/jobs.json?{query}", f"/-/jobs?{query}"):
        r = site.http.get(path)
        assert r.status_code == status, (path, r.status_code, r.text[:300])
        message = error_of(r)
        for word in words:
            assert word in message, (word, message)


def test_a_bad_fragment_is_refused_not_a_server_error(site):
    r = site.http.get("/-/jobs?fragment=everything")
    assert r.status_code == 422 and "fragment" in error_of(r)


def test_the_list_polls_itself_until_nothing_is_pending(site):
    j = site.jobs
    r = site.http.get(urls.jobs_list_url(), headers={"HX-Request": "true"})
    assert r.status_code == 200 and "<html" not in r.text
    panel = BeautifulSoup(r.text, "html.parser").select_one("#jobs-list")
    assert panel["hx-trigger"] == "every 2s" and len(rows(panel)) == 7

    # a list of done jobs polls too while jobs are pending: it grows as they finish
    done_only = site.soup(f"/-/jobs?state=done&model={BETA}").select_one("#jobs-list")
    assert done_only["hx-get"] == urls.jobs_list_url(BETA, "done") == f"/-/jobs?model={BETA}&state=done&fragment=list"
    assert done_only["hx-trigger"] == "every 2s"

    beta_list = urls.jobs_list_url(BETA)
    assert "hx-trigger" in site.http.get(beta_list).text
    with session_scope(site.engine) as s:  # settle beta's jobs: its running one finishes, its live one fails
        model_id = queries.get_model(s, BETA).id
        assert queries.finish_job(s, j.stale, "w-gone")
        assert queries.claim_job(s, "w-last", model_id=model_id).id == j.live
        assert queries.fail_job(s, j.live, "w-last", "gave up") == "failed"
    data = site.json(f"/-/jobs.json?model={BETA}")
    assert data["jobs_pending"] is False and [(job["id"], job["state"]) for job in data["jobs"]] == [
        (j.live, "failed"), (j.stale, "done")]
    panel = BeautifulSoup(site.http.get(beta_list).text, "html.parser").select_one("#jobs-list")
    assert not panel.has_attr("hx-trigger"), "polling stops when nothing (of the model shown) is pending"
    assert "gave up" in rows(panel)[j.live].select_one("td.error").get_text()
    everything = BeautifulSoup(site.http.get(urls.jobs_list_url()).text, "html.parser").select_one("#jobs-list")
    assert everything["hx-trigger"] == "every 2s", "alpha's jobs are still pending"
    # finished jobs come after the active ones, newest first
    assert [job["id"] for job in site.json("/-/jobs.json")["jobs"]] == [
        j.running, j.backoff, j.blocked, j.live, j.failed, j.stale, j.done]


def test_ten_thousand_jobs_are_paged_200_at_a_time(site):
    """A big queue: one page holds 200 jobs, read 200 at a time (no query reads the whole queue)."""
    with session_scope(site.engine) as s:
        model_id = queries.get_model(s, ALPHA).id
        now = queries.utcnow()
        s.execute(Job.__table__.insert(), [
            {"model_id": model_id, "stage": "examples", "key": f"shard:{i}", "params": {}, "state": "queued",
             "attempts": 0, "max_attempts": 3, "progress": 0.0, "run_after": now, "created_at": now}
            for i in range(10_000)
        ])
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(" ".join(statement.split()))

    event.listen(site.engine, "before_cursor_execute", record)  # the app's own engine (engine_for)
    try:
        soup = site.soup("/-/jobs")
    finally:
        event.remove(site.engine, "before_cursor_execute", record)
    reads = [q for q in statements if re.search(r"\bFROM jobs\b", q)]
    assert reads, statements
    for q in reads:  # each read of the jobs table is a page (LIMIT) or a count
        assert " LIMIT " in q or re.search(r"\bcount\(", q, re.IGNORECASE), q
    shown = rows(soup)
    assert len(shown) == 200
    assert list(shown)[:2] == [site.jobs.running, site.jobs.stale], "running jobs still come first"
    next_link = soup.select_one("#jobs-list nav.pager a[rel=next]")["href"]
    assert next_link == "/-/jobs?page=2"
    data = site.json("/-/jobs.json?page=51")
    assert data["total"] == 10_007 and data["pages"] == 51 and data["next_page_url"] is None
    assert [job["id"] for job in data["jobs"]][-2:] == [site.jobs.failed, site.jobs.done]
    assert len(data["jobs"]) == 10_007 - 50 * 200
    queued = site.json("/-/jobs.json?state=queued&page=2")
    assert queued["total"] == 10_003 and queued["prev_page_url"] == "/-/jobs?state=queued"
    assert [job["id"] for job in queued["jobs"]] == sorted(job["id"] for job in queued["jobs"])


# ---------------------------------------------------------------- needle jobs


@pytest.fixture
def cli(site, monkeypatch, capsys):
    """needle.cli.main in this process, on the site's database: (exit code, stdout, stderr)."""
    yield cli_runner(monkeypatch, capsys, site.db_url)
    get_settings.cache_clear()


def table_ids(out: str) -> list[int]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["JOB", "MODEL"]) + 1
    ids = []
    for line in lines[start:]:
        if not line.strip():
            break
        ids.append(int(line.split()[0]))
    return ids


def test_cli_lists_the_jobs_with_errors_below_the_table(site, cli):
    j = site.jobs
    code, out, err = cli("jobs")
    assert code == 0, err
    assert table_ids(out) == [job["id"] for job in site.json("/-/jobs.json")["jobs"]]
    assert out.splitlines()[0] == "7 jobs (2 running, 3 queued, 1 failed, 1 done):"
    row = {int(line.split()[0]): line for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    running = row[j.running].split()
    assert running[1:9] == [ALPHA, "decode", "layers:1", "running", "25%", "w-run", "1/3", "-"]
    assert running[9].endswith("s") and running[10:] == ["ago"]
    assert "(stale)" in row[j.stale] and "ago" in row[j.stale]
    assert f"{queries.TEXT_STAGE} (live)" in row[j.live]
    assert " in " in row[j.backoff] and "1/3" in row[j.backoff] and "w-flaky" not in row[j.backoff]
    errors = out[out.index("\nErrors:\n"):]
    assert f"job {j.failed} ({ALPHA} decode layers:0, failed after 1/1 attempts):" in errors
    for line in OOM.splitlines():
        assert "    " + line.strip() in errors, "every line of the error, readable"
    assert f"job {j.backoff} ({ALPHA} decode layers:2, queued;" in errors and FLAKY in errors


def test_cli_filters_limit_and_json(site, cli):
    j = site.jobs
    code, out, err = cli("jobs", "--state", "failed")
    assert code == 0, err
    assert table_ids(out) == [j.failed] and out.startswith("1 failed job:")
    code, out, err = cli("jobs", "--model", BETA)
    assert code == 0, err
    assert table_ids(out) == [j.stale, j.live] and "Errors:" not in out
    code, out, err = cli("jobs", "--model", BETA, "--state", "done")
    assert code == 0 and out.strip() == f"No done jobs of {BETA}. (1 running, 1 queued)"
    code, out, err = cli("jobs", "--limit", "2")
    assert code == 0, err
    assert table_ids(out) == [j.running, j.stale] and "Showing the first 2 of 7" in out

    code, out, err = cli("jobs", "--json", "--model", ALPHA, "--state", "failed")
    assert code == 0, err
    data = json.loads(out)
    page = site.json(f"/-/jobs.json?model={ALPHA}&state=failed")
    assert (data["page_size"], page["page_size"]) == (100, 200), "--limit is the page size (100 by default)"
    assert {**data, "page_size": 200} == page, "the command prints the page's JSON"
    assert data["jobs"][0]["error"] == OOM
    code, out, err = cli("jobs", "--json")
    assert code == 0, err
    listed = json.loads(out)["jobs"]
    assert [job["id"] for job in listed] == [job["id"] for job in site.json("/-/jobs.json")["jobs"]]
    assert {job["id"]: job["error"] for job in listed}[j.backoff] == FLAKY


@pytest.mark.parametrize(
    "args, phrase",
    [
        (("--model", "nope"), "There is no model named 'nope'"),
        (("--state", "finished"), "Unknown job state 'finished': use one of running, queued, failed, done"),
        (("--limit", "0"), "--limit '0' is not a whole number"),
        (("--limit", "ten"), "--limit 'ten' is not a whole number"),
    ],
)
def test_cli_bad_filters_are_one_clear_error(site, cli, args, phrase):
    code, out, err = cli("jobs", *args)
    assert code == 1, err
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, err
    assert phrase in lines[0], err


@pytest.mark.parametrize("key, label", [
    ("layers:0-4", "layers 0–3"), ("layers:3-4", "layer 3"), ("layers:0-4/shard:1-of-2", "layers 0–3, shard 1 of 2"),
    ("run:12", "request 12"), ("all", "all"), ("layers:0", "layers:0"), ("run:x", "run:x"),
])
def test_a_jobs_part_reads_as_the_layers_it_covers(key, label):
    """A decode or examples job's key is a half-open layer range: "layers:0-4" covers layers 0 to 3."""
    from app.pagedata import part_label

    assert part_label(key) == label
