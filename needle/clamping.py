"""`needle clamp` and `needle generate`: a neuron's clamp curve and clamped generation, computed in
this process on the model as indexed, printed, and stored (they show on the neuron page)."""

from __future__ import annotations

import argparse
import json

from app.clamping import within_bound
from app.config import Settings
from app.errors import NeedleError

MAX_SEED = 2**31 - 1


def _target(settings: Settings, name: str, layer: int, neuron: int):
    """(model row detached, the model's default prompt, the neuron's top token id, its max |activation|)."""
    from app import queries
    from app.db import get_engine, require_migrated, session_scope

    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        model = queries.get_model(s, name)
        if model is None:
            raise NeedleError(f"There is no model named {name!r} here.", hint=f"Index it first: needle index MODEL --name {name}")
        if not 0 <= layer < model.n_layers:
            raise NeedleError(f"{name!r} has no layer {layer}: its layers are 0 to {model.n_layers - 1}.")
        if not 0 <= neuron < model.d_mlp:
            raise NeedleError(f"{name!r} has no neuron {neuron}: each layer has neurons 0 to {model.d_mlp - 1}.")
        row = queries.get_neuron(s, model.id, layer, neuron)
        stats = queries.neuron_activations(s, model.id, layer, neuron)
        s.expunge(model)
        top = row.top_token_id if row is not None else None
        max_abs = max(abs(stats.max_act), abs(stats.min_act)) if stats is not None else None
        return engine, model, (model.info or {}).get("clamp_prompt") or "The", top, max_abs


def _token_id(engine, model_id: int, text: str) -> int | None:
    """A target typed as a whole vocabulary token (its text or raw piece) is that token."""
    from app import queries
    from app.db import session_scope

    with session_scope(engine) as s:
        hits = queries.tokens_by_text(s, model_id, [text])
        return hits[0].token_id if hits else None


def _load(model, device: str | None):
    from workers.loading import load_model

    return load_model(model.source, device=device or model.device, dtype=model.dtype)


def cmd_clamp(args, settings: Settings) -> None:
    from app import queries, urls
    from app.db import session_scope
    from workers import clamp

    engine, model, prompt, top, max_abs = _target(settings, args.name, args.layer, args.neuron)
    values = clamp.parse_values(args.values) if args.values else clamp.default_values(max_abs)
    prompt = args.prompt if args.prompt is not None else prompt
    token_id = _token_id(engine, model.id, args.token) if args.token is not None else top
    loaded = _load(model, args.device)
    token_id, token, note = clamp.resolve_target(loaded, args.token, token_id)
    result = clamp.sweep(loaded, args.layer, args.neuron, prompt, token_id, values, last_only=args.last_only)
    result["note"] = note
    with session_scope(engine) as s:
        row = queries.add_clamp_curve(s, model.id, args.layer, args.neuron, prompt=prompt,
                                      target=args.token if args.token is not None else token,
                                      positions=result["positions"], values=result["values"], source="cli", result=result)
        curve_id = row.id
    url = f"http://{settings.host}:{settings.port}" + urls.clamp_url(model.name, args.layer, args.neuron, curve_id)
    if args.json:
        keys = ("values", "probs", "baseline", "token", "token_id", "top_tokens", "positions", "note")
        print(json.dumps({**{k: result[k] for k in keys}, "prompt": prompt, "layer": args.layer,
                          "neuron": args.neuron, "id": curve_id, "url": url}))
        return
    where = "the last position" if args.last_only else "every prompt position"
    print(f"{model.name} layer {args.layer} neuron {args.neuron}: p({token!r} | prompt), clamped at {where}")
    print(f"prompt: {prompt!r}")
    if note:
        print(f"note: {note}")
    base = result["baseline"]
    print(f"unclamped: activation {base['activation']:.4g}, p {base['prob']:.4g}")
    width = 40
    for v, p in zip(result["values"], result["probs"]):
        print(f"{v:>10.4g}  {p:9.4g}  {'#' * round(p * width)}")
    for end, v in (("low", result["values"][0]), ("high", result["values"][-1])):
        tops = ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in result["top_tokens"][end])
        print(f"top next tokens at {v:.4g}: {tops}")
    print(f"stored: {url}")


def cmd_generate(args, settings: Settings) -> None:
    from app import queries, urls
    from app.db import session_scope
    from workers import clamp

    within_bound(args.value)  # the pages' rule, said before the model loads
    engine, model, prompt, _, _ = _target(settings, args.name, args.layer, args.neuron)
    prompt = args.prompt if args.prompt is not None else prompt
    loaded = _load(model, args.device)
    result = clamp.generate(loaded, args.layer, args.neuron, prompt, args.value, tokens=args.tokens, seed=args.seed)
    with session_scope(engine) as s:
        row = queries.add_generation(s, model.id, args.layer, args.neuron, prompt=prompt, value=args.value,
                                     tokens=args.tokens, seed=args.seed, source="cli", result=result)
        gen_id = row.id
    url = f"http://{settings.host}:{settings.port}" + urls.generation_url(model.name, args.layer, args.neuron, gen_id)
    if args.json:
        print(json.dumps({**result, "prompt": prompt, "layer": args.layer, "neuron": args.neuron, "id": gen_id, "url": url}))
        return
    how = "greedy" if args.seed is None else f"sampled, seed {args.seed}"
    print(f"{model.name} layer {args.layer} neuron {args.neuron}, {args.tokens} tokens ({how})")
    print(f"prompt: {prompt!r}")
    print(f"clamped at {args.value:g}: {result['clamped']['text']!r}")
    print(f"unclamped: {result['unclamped']['text']!r}")
    print(f"stored: {url}")


def _int(text: str) -> int:
    """ASCII digits, perhaps after a '-' (a layer -1 gets _target's error), as the pages take them."""
    if not (text.isascii() and text.removeprefix("-").isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _float(text: str) -> float:
    if text.isascii():  # float() also takes other scripts' digits ("٣"); the pages do not
        try:
            return float(text)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a number")


def _seed(text: str) -> int:
    """A seed the page's form also takes (app/clamping.py start_generation) and the seed column holds."""
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_SEED):
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed from 0 to {MAX_SEED}")
    return int(text)


def add_clamp_commands(sub) -> None:
    p = sub.add_parser("clamp", help="a neuron's clamp curve: p(token | prompt) as its activation is clamped to a sweep")
    p.add_argument("name", help="the model's name, as given to `needle index --name`")
    p.add_argument("layer", type=_int)
    p.add_argument("neuron", type=_int)
    p.add_argument("--prompt", help="default: the model's clamp prompt (see `needle index --clamp-prompt`)")
    p.add_argument("--token", help="the target token (default: the neuron's top decoded token); text of several "
                   "tokens is refused, naming them")
    p.add_argument("--values", metavar="START:STOP:COUNT",
                   help="the clamp values (default: 41 values over +-10x the neuron's observed max |activation|)")
    p.add_argument("--last-only", action="store_true", help="clamp the last prompt position only (default: every one)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: as indexed")
    p.add_argument("--json", action="store_true", help="print the curve as JSON")
    p.set_defaults(func=cmd_clamp)

    p = sub.add_parser("generate", help="continue a prompt with a neuron clamped, beside the unclamped continuation")
    p.add_argument("name", help="the model's name, as given to `needle index --name`")
    p.add_argument("layer", type=_int)
    p.add_argument("neuron", type=_int)
    p.add_argument("--prompt", help="default: the model's clamp prompt")
    p.add_argument("--value", type=_float, required=True, help="the clamp value")
    p.add_argument("--tokens", type=_int, default=32, help="tokens to generate (1 to 256, default 32)")
    p.add_argument("--seed", type=_seed, help=f"sample with this seed, 0 to {MAX_SEED} (default: greedy)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: as indexed")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)
