"""`needle compare A B [--json]`: two models compared, as /-/compare/{a}/{b} shows them.

Models of one shape and vocabulary are compared neuron by neuron by a worker's compare job, run
here (or only queued with --queue); the printout is the page's data (app/compare.py), as text or
as its JSON. Models that cannot be compared neuron by neuron still compare by the features
probed in both; the printout names what differs.
"""

from __future__ import annotations

import argparse
import json

from app.config import Settings
from app.errors import NeedleError


def add_compare_command(sub) -> None:
    p = sub.add_parser("compare", help="compare two models: top-token agreement neuron by neuron (one shape), "
                       "and the features probed in both (any shapes)")
    p.add_argument("a", help="the first model's name (e.g. the base model)")
    p.add_argument("b", help="the second model's name (e.g. its fine-tune)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (the shape of /-/compare/A/B.json)")
    p.add_argument("--queue", action="store_true", help="only enqueue the comparison, for `needle worker`")
    p.set_defaults(func=cmd_compare)


def _models(s, a: str, b: str):
    from app import compare, queries

    found = []
    for name in (a, b):
        model = queries.get_model(s, name, tokenizer=False)
        if model is None:
            raise NeedleError(f"There is no model named {name!r} here.", hint=f"Index it first: needle index MODEL --name {name}")
        found.append(model)
    compare.check_two(*found)
    return found


def compare_models(settings: Settings, a: str, b: str, *, queue_only: bool = False, quiet: bool = False) -> dict:
    """Compare a with b (neuron by neuron where they can be) and return the page's data. Raises
    NeedleError naming what differs when they can be compared in no way."""
    from app import compare, queries
    from app.db import get_engine, require_migrated, session_scope
    from needle.running import work_until_idle
    from workers.loading import load_model
    from workers.stages import ModelSpec

    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        ma, mb = _models(s, a, b)
        try:
            compare.check_comparable(s, ma, mb)
            why = None
        except NeedleError as exc:
            why = exc
        if why is not None:
            if not compare.features_data(s, ma, mb)["rows"]:
                raise NeedleError(f"{why.message.rstrip('.')}; and no feature is probed in both.",
                                  hint="Probe the same features in both (needle probe MODEL --features SPEC) to compare "
                                       "them by feature, or compare models of one shape and vocabulary.")
            spec = None
        else:
            queries.enqueue_job(s, ma.id, queries.COMPARE_STAGE, str(mb.id), {"b": mb.id},
                                max_attempts=settings.max_attempts, force=True)
            spec = ModelSpec.of(ma)
    if spec is not None and not queue_only:
        loaded = load_model(spec.source, device=spec.device, dtype=spec.dtype, max_memory=spec.max_memory)
        work_until_idle(engine, settings, spec, loaded, spec.id, what=f"Comparing {a!r} with {b!r}", quiet=quiet)
    with session_scope(engine) as s:
        ma, mb = _models(s, a, b)
        return compare.comparison_data(s, ma, mb)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _tokens(tokens: list[dict]) -> str:
    return " ".join(repr(t["token"]) for t in tokens)


def format_comparison(data: dict) -> str:
    a, b = data["a"], data["b"]
    lines = [f"{a} vs {b}"]
    if data["state"] == "not comparable":
        lines.append("Not compared neuron by neuron: " + "; ".join(data["differences"]) + ".")
    elif data["state"] == "done":
        lines.append(f"Top input-weight token the same in {data['same']:,} of {data['neurons']:,} neurons: "
                     f"{_pct(data['agreement'])} (mean input-weight cosine {_num(data['mean_cosine'])})")
        lines.append("layer  agreement  mean cosine")
        lines += [f"{la['layer']:>5}  {_pct(la['agreement']):>9}  {_num(la['mean_cosine']):>11}" for la in data["layers"]]
        for key, title in (("changed", "lowest input-weight cosine"),
                           ("changed_tokens", f"fewest of the top {data['top']} tokens in common")):
            lines.append(f"Changed most ({title}):")
            lines += [f"  {c['layer']}/{c['neuron']}  cosine {_num(c['cosine'])}  {c['overlap']} in common  "
                      f"{_tokens(c['a_tokens'])}  ->  {_tokens(c['b_tokens'])}" for c in data[key][:10]]
    else:
        lines.append(f"Neuron by neuron: {data['state']}" + (f" ({data['error']})" if data["error"] else ""))
    features = data["features"]
    if features["rows"]:
        lines.append("Features probed in both: best single-neuron F1 (layer/neuron); smallest k at 90% of the best "
                     "k-sparse F1 (layer)")
        for r in features["rows"]:
            cells = []
            for side in (r["a"], r["b"]):
                where = f"{side['best_layer']}/{side['best_neuron']}" if side["best_layer"] is not None else "-"
                k = f"k={side['k90']} (L{side['k90_layer']})" if side["k90"] is not None else "k=-"
                cells.append(f"{_num(side['best_f1'])} ({where}) {k}")
            lines.append(f"  {r['feature']}: {a} {cells[0]} | {b} {cells[1]}")
    elif features["note"]:
        lines.append(features["note"])
    lines.append(f"Page: {data['url']}")
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace, settings: Settings) -> None:
    data = compare_models(settings, args.a, args.b, queue_only=args.queue, quiet=args.json)
    print(json.dumps(data, indent=2) if args.json else format_comparison(data))
