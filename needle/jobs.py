"""`needle jobs`: every job (live requests included) with its state, progress, worker, attempts,
backoff, heartbeat and error, as a text table or as JSON. It prints the data of the /-/jobs
page (app.pagedata.jobs_page), so the command and the page always agree."""

from __future__ import annotations

import argparse
import json
import textwrap

from app.config import Settings
from app.errors import NeedleError

DEFAULT_LIMIT = 100
COLUMNS = ("job", "model", "stage", "part", "state", "progress", "worker", "attempts", "run after", "heartbeat")


def add_jobs_command(sub) -> None:
    p = sub.add_parser("jobs", help="list jobs: state, progress, worker, attempts, errors")
    p.add_argument("--model", metavar="NAME", help="only this model's jobs")
    p.add_argument("--state", metavar="STATE", help="only jobs in this state: queued, running, done or failed")
    p.add_argument("--limit", metavar="N", default=str(DEFAULT_LIMIT),
                   help=f"list at most N jobs, active and newest first (default {DEFAULT_LIMIT})")
    p.add_argument("--json", action="store_true", help="print the list as JSON (the shape of /-/jobs.json)")
    p.set_defaults(func=cmd_jobs)


def parse_limit(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if value < 1:
        raise NeedleError(f"--limit {text!r} is not a whole number >= 1.", hint=f"e.g. --limit {DEFAULT_LIMIT}.")
    return value


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> None:
    from app import pagedata
    from app.db import get_engine, require_migrated, session_scope

    limit = parse_limit(args.limit)
    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        data = pagedata.jobs_page(s, model=args.model, state=args.state, page_size=limit,
                                  stale_seconds=settings.stale_seconds)
    print(json.dumps(data, indent=2) if args.json else format_jobs(data))


def _seconds(value: float) -> str:
    value = round(value)
    if value < 120:
        return f"{value}s"
    if value < 7200:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{value % 3600 // 60:02d}m"


def _row(job: dict) -> tuple[str, ...]:
    stage = f"{job['stage']} (live)" if job["kind"] == "live" else job["stage"]
    run_after = f"in {_seconds(job['waits_seconds'])}" if job["waits_seconds"] is not None else "-"
    heartbeat = "-"
    if job["heartbeat_age_seconds"] is not None:
        heartbeat = f"{_seconds(job['heartbeat_age_seconds'])} ago" + (" (stale)" if job["stale"] else "")
    return (
        str(job["id"]), job["model"], stage, job["key"], job["state"], f"{100 * job['progress']:.0f}%",
        job["worker"] or "-", f"{job['attempts']}/{job['max_attempts']}", run_after, heartbeat,
    )


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    header = tuple(c.upper() for c in COLUMNS)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(COLUMNS))]
    numeric = {0, 5, 7}
    return [
        "  ".join(cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in (header, *rows)
    ]


def format_jobs(data: dict) -> str:
    """The jobs as a table, then each job's error in full below it."""
    counts = ", ".join(f"{n} {state}" for state, n in data["counts"].items() if n)
    noun = "job" if data["total"] == 1 else "jobs"
    scope = (f"{data['state']} " if data["state"] else "") + noun + (f" of {data['model']}" if data["model"] else "")
    if not data["jobs"]:
        return f"No {scope}." + (f" ({counts})" if counts and data["state"] else "")
    lines = [f"{data['total']} {scope}" + (f" ({counts})" if counts and not data["state"] else "") + ":", ""]
    lines += _table([_row(j) for j in data["jobs"]])
    failed = [j for j in data["jobs"] if j["error"]]
    if failed:
        lines += ["", "Errors:"]
        for j in failed:
            when = (f"failed after {j['attempts']}/{j['max_attempts']} attempts" if j["state"] == "failed"
                    else f"{j['state']}; the last failed attempt was {j['attempts']}/{j['max_attempts']}")
            lines.append(f"  job {j['id']} ({j['model']} {j['stage']} {j['key']}, {when}):")
            for text_line in j["error"].splitlines() or [""]:
                lines += textwrap.wrap(text_line, width=100, initial_indent="    ", subsequent_indent="    ",
                                       break_long_words=True, break_on_hyphens=False) or ["    "]
    if len(data["jobs"]) < data["total"]:
        lines += ["", (f"Showing the first {len(data['jobs'])} of {data['total']}, active and newest first: "
                       "raise --limit to see more, or filter with --model and --state.")]
    return "\n".join(lines)
