"""`needle clamp` and `needle generate`: a unit's clamp curve and clamped generation, computed in
this process on the model as indexed, printed, and stored (they show on the unit's page). A unit
is LAYER NEURON, or with --sae S the LATENT of that SAE (clamped by steering at its site)."""

from __future__ import annotations

import argparse
import json

from app.clamping import within_bound
from app.config import Settings
from app.errors import NeedleError

MAX_SEED = 2**31 - 1


class Unit:
    """What the commands address: a neuron, or a latent of an SAE (its stored weights in `sae`)."""

    def __init__(self, layer: int, index: int, basis: int = 0, sae_name: str | None = None, sae=None):
        self.layer, self.index, self.basis, self.sae_name, self.sae = layer, index, basis, sae_name, sae

    def words(self, model: str) -> str:
        return f"{model} layer {self.layer} neuron {self.index}" if self.sae_name is None else \
            f"{model} SAE {self.sae_name} latent {self.index} (layer {self.layer})"

    def units(self, loaded):
        """The clamped units for workers/clamp.py: None for a neuron."""
        if self.sae is None:
            return None
        from workers.devices import compute_device
        from workers.saestages import LatentUnits

        return LatentUnits(loaded.adapter, self.sae.to(compute_device(loaded.model)))

    def json(self) -> dict:
        return {"layer": self.layer, "neuron": self.index} if self.sae_name is None else \
            {"layer": self.layer, "sae": self.sae_name, "latent": self.index}


def _unit(args) -> tuple[int, int | None, str | None]:
    """(first number, second number or None, SAE name or None) as given, checked for their count."""
    numbers = args.unit
    if args.sae is None and len(numbers) != 2:
        raise NeedleError("Give the neuron as LAYER NEURON (two numbers).", hint="e.g. needle clamp MODEL 3 120; "
                          "a latent: needle clamp MODEL --sae NAME LATENT")
    if args.sae is not None and len(numbers) != 1:
        raise NeedleError("With --sae, give the latent as one number (the SAE fixes the layer).",
                          hint="e.g. needle clamp MODEL --sae l2-mlp-3072 17")
    return numbers[0], numbers[1] if len(numbers) > 1 else None, args.sae


def _target(settings: Settings, name: str, first: int, second: int | None, sae_name: str | None = None):
    """(engine, model row detached, the unit's default prompt, the unit, its top token id, its max |activation|)."""
    from app import examples, queries
    from app.db import get_engine, require_migrated, session_scope

    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        model = queries.get_model(s, name)
        if model is None:
            raise NeedleError(f"There is no model named {name!r} here.", hint=f"Index it first: needle index MODEL --name {name}")
        if sae_name is None:
            layer, index = first, second if second is not None else 0
            if not 0 <= layer < model.n_layers:
                raise NeedleError(f"{name!r} has no layer {layer}: its layers are 0 to {model.n_layers - 1}.")
            if not 0 <= index < model.d_mlp:
                raise NeedleError(f"{name!r} has no neuron {index}: each layer has neurons 0 to {model.d_mlp - 1}.")
            unit = Unit(layer, index)
        else:
            from workers.sae import sae_from_bytes

            row = queries.get_sae(s, model.id, sae_name, weights=True)
            if row is None:
                names = [x.name for x in queries.list_saes(s, model.id)]
                raise NeedleError(f"{name!r} has no SAE named {sae_name!r}.",
                                  hint=f"Its SAEs: {', '.join(names)}." if names else "Train one with needle sae train.")
            if row.weights is None:
                raise NeedleError(f"SAE {sae_name!r} is not trained yet.", hint="Run `needle worker` until its jobs are done.")
            if not 0 <= first < row.d_sae:
                raise NeedleError(f"SAE {sae_name!r} has no latent {first}: its latents are 0 to {row.d_sae - 1}.")
            unit = Unit(row.layer, first, row.id, row.name, sae_from_bytes(row.cfg, row.weights))
        decoded = queries.get_neuron(s, model.id, unit.layer, unit.index, unit.basis)
        stats = queries.neuron_activations(s, model.id, unit.layer, unit.index, unit.basis)
        run = queries.example_run(s, model.id)
        # the unit's own top context up to its max token, as its page's forms default to; else the model's prompt
        prompt = examples.top_context_prompt(s, model, stats, run.context) if run is not None else None
        s.expunge(model)
        top = decoded.top_token_id if decoded is not None else None
        max_abs = max(abs(stats.max_act), abs(stats.min_act)) if stats is not None else None
        return engine, model, prompt or (model.info or {}).get("clamp_prompt") or "The", unit, top, max_abs


def _token_id(engine, model_id: int, text: str) -> int | None:
    """A target typed as a whole vocabulary token (its text or raw piece) is that token."""
    from app import queries
    from app.db import session_scope

    with session_scope(engine) as s:
        hits = queries.tokens_by_text(s, model_id, [text])
        return hits[0].token_id if hits else None


def _load(model, device: str | None):
    from workers.loading import load_model

    return load_model(model.source, device=device or model.device, dtype=model.dtype,
                      max_memory=(model.info or {}).get("max_memory"))


def cmd_clamp(args, settings: Settings) -> None:
    from app import queries, urls
    from app.db import session_scope
    from workers import clamp

    engine, model, prompt, unit, top, max_abs = _target(settings, args.name, *_unit(args))
    values = clamp.parse_values(args.values) if args.values else clamp.default_values(max_abs)
    prompt = args.prompt if args.prompt is not None else prompt
    token_id = _token_id(engine, model.id, args.token) if args.token is not None else top
    loaded = _load(model, args.device)
    token_id, token, note = clamp.resolve_target(loaded, args.token, token_id)
    result = clamp.sweep(loaded, unit.layer, unit.index, prompt, token_id, values, last_only=args.last_only,
                         units=unit.units(loaded))
    result["note"] = note
    with session_scope(engine) as s:
        row = queries.add_clamp_curve(s, model.id, unit.layer, unit.index, prompt=prompt,
                                      target=args.token if args.token is not None else token,
                                      positions=result["positions"], values=result["values"], source="cli", result=result,
                                      basis=unit.basis)
        curve_id = row.id
    url = f"http://{settings.host}:{settings.port}" + urls.clamp_url(model.name, unit.layer, unit.index, curve_id,
                                                                     sae=unit.sae_name)
    if args.json:
        keys = ("values", "probs", "baseline", "token", "token_id", "top_tokens", "positions", "note")
        print(json.dumps({**{k: result[k] for k in keys}, "prompt": prompt, **unit.json(), "id": curve_id, "url": url}))
        return
    where = "the last position" if args.last_only else "every prompt position"
    print(f"{unit.words(model.name)}: p({token!r} | prompt), clamped at {where}")
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
    engine, model, prompt, unit, _, _ = _target(settings, args.name, *_unit(args))
    prompt = args.prompt if args.prompt is not None else prompt
    loaded = _load(model, args.device)
    result = clamp.generate(loaded, unit.layer, unit.index, prompt, args.value, tokens=args.tokens, seed=args.seed,
                            units=unit.units(loaded))
    with session_scope(engine) as s:
        row = queries.add_generation(s, model.id, unit.layer, unit.index, prompt=prompt, value=args.value,
                                     tokens=args.tokens, seed=args.seed, source="cli", result=result, basis=unit.basis)
        gen_id = row.id
    url = f"http://{settings.host}:{settings.port}" + urls.generation_url(model.name, unit.layer, unit.index, gen_id,
                                                                          sae=unit.sae_name)
    if args.json:
        print(json.dumps({**result, "prompt": prompt, **unit.json(), "id": gen_id, "url": url}))
        return
    how = "greedy" if args.seed is None else f"sampled, seed {args.seed}"
    print(f"{unit.words(model.name)}, {args.tokens} tokens ({how})")
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
    p = sub.add_parser("clamp", help="a unit's clamp curve: p(token | prompt) as its activation is clamped to a sweep")
    p.add_argument("name", help="the model's name, as given to `needle index --name`")
    p.add_argument("unit", type=_int, nargs="+", metavar="LAYER NEURON | LATENT",
                   help="a neuron's layer and index, or with --sae a latent's index")
    p.add_argument("--sae", metavar="NAME", help="clamp a latent of this SAE (steering at its site)")
    p.add_argument("--prompt", help="default: the unit's top context up to its max token (its page's default), "
                   "else the model's clamp prompt (see `needle index --clamp-prompt`)")
    p.add_argument("--token", help="the target token (default: the neuron's top decoded token); text of several "
                   "tokens is refused, naming them")
    p.add_argument("--values", metavar="START:STOP:COUNT",
                   help="the clamp values (default: 41 values over +-10x the neuron's observed max |activation|)")
    p.add_argument("--last-only", action="store_true", help="clamp the last prompt position only (default: every one)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: as indexed")
    p.add_argument("--json", action="store_true", help="print the curve as JSON")
    p.set_defaults(func=cmd_clamp)

    p = sub.add_parser("generate", help="continue a prompt with a unit clamped, beside the unclamped continuation")
    p.add_argument("name", help="the model's name, as given to `needle index --name`")
    p.add_argument("unit", type=_int, nargs="+", metavar="LAYER NEURON | LATENT",
                   help="a neuron's layer and index, or with --sae a latent's index")
    p.add_argument("--sae", metavar="NAME", help="clamp a latent of this SAE (steering at its site)")
    p.add_argument("--prompt", help="default: the unit's top context up to its max token, else the model's clamp prompt")
    p.add_argument("--value", type=_float, required=True, help="the clamp value")
    p.add_argument("--tokens", type=_int, default=32, help="tokens to generate (1 to 256, default 32)")
    p.add_argument("--seed", type=_seed, help=f"sample with this seed, 0 to {MAX_SEED} (default: greedy)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: as indexed")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_generate)
