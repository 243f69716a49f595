"""Clamp curves and clamped generations on pages: the inputs' rules (shared with the worker and
the CLI), the neuron page's clamp section, and the live requests' panels. No torch here: the
curves are computed by workers/clamp.py."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app import queries, urls
from app.bases import Basis
from app.errors import NeedleError, NotFound
from app.schema import ClampCurve, Generation, Job, Model, NeuronActivations
from app.search import tokenize_query
from app.tokens import from_visible, visible

MAX_VALUES = 101
DEFAULT_COUNT = 41
INDEX_COUNT = 21  # `needle index` precomputes curves of 21 values (a page asks for 41 by default)
MAX_GENERATE_TOKENS = 256
DEFAULT_GENERATE_TOKENS = 32
RANGE_TIMES_MAX = 10.0  # the default sweep: +-10x the neuron's observed max |activation|
FALLBACK_RANGE = 10.0  # ... or +-10 when none was observed
# A clamp value (a sweep's ends, a generation's value) lies within +-MAX_ABS_VALUE: far past any
# neuron's activation (Davies swept +-500 on Llama-3.1-8B), and so a sweep's step and every value
# on it are finite numbers (-1e308 and 1e308 are finite, the step between them is not).
MAX_ABS_VALUE = 1e6
BOUND_TEXT = f"{MAX_ABS_VALUE:,.0f}"
RANGE_HINT = "Write the range as START:STOP:COUNT, e.g. -50:50:41."
ORDER_HINT = "Put the lower value first, e.g. -50:50:41."
FORM_RANGE_HINTS = ("Sweep from a lower value to a higher one, e.g. from -50 to 50 in 41 values.",
                    "Put the lower value in From and the higher in to, e.g. from -50 to 50.")

METHOD = [
    ("Clamp-response curves after Davies (2025), Flash Interpretability, section 3.2: the neuron's activation (the "
    "input of its layer's MLP output projection) is replaced by each value of the sweep (not added to), and the "
    "page plots p(target) for the prompt's next token. The target is one token: text the model reads as several "
    "tokens is refused, with the tokens named, rather than swept for one of them."),
    ("All values run as one batched forward pass, one value per batch row; the layers before the clamped one run "
    "once for all rows. By default the neuron is clamped at every prompt position, as Davies clamps it for the whole "
    "pass; 'last position only' clamps where the next token is predicted. A BOS token the tokenizer adds is not part "
    "of the prompt and is never clamped."),
    ("The marked point is the unclamped model: the neuron's activation at the last position and p(target). Clamped at "
    "the last position only, the curve passes through it; clamped everywhere it need not, since the other positions "
    "change too."),
    ("Default range: ±10× the neuron's largest |activation| on the examples corpus (±10 without one; Davies swept "
    "−500…500 on Llama-3.1-8B). Default prompt: chosen per model, the first 16 tokens of the corpus it was indexed "
    "on (`needle index --clamp-prompt` sets another), so it is text the model knows. `needle index` precomputes a "
    "21-value curve, with that prompt and every position clamped, for each neuron that is a top-10 search hit for "
    "its own top decoded token."),
    ("Generation: the prompt continued twice in one batch, with the neuron clamped at the value at every position "
    "(the generated ones too, as Davies' 'permanently clamped' dog neuron) and unclamped. Greedy, or sampled at "
    "temperature 1 with a seed; both rows share one random draw per step, so they differ only where the clamp "
    "changed the distribution."),
]


# ---- inputs -----------------------------------------------------------------------------------


def value_range(start: float, stop: float, count: int, *, hints: tuple[str, str] = (RANGE_HINT, ORDER_HINT)) -> list[float]:
    """count evenly spaced values from start to stop, both included (each to 15 significant digits);
    NeedleError if not allowed.
    hints: how to write a range, and how to order its ends, where it came from (the CLI's
    START:STOP:COUNT by default)."""
    hint, order_hint = hints
    if not (math.isfinite(start) and math.isfinite(stop)):
        raise NeedleError("The clamp range's ends must be finite numbers.", hint=hint)
    for end in (start, stop):
        within_bound(end, "clamp range's end")
    if not 2 <= count <= MAX_VALUES:
        raise NeedleError(f"A sweep of {count} values is not allowed: use 2 to {MAX_VALUES}.", hint=hint)
    if start >= stop:
        raise NeedleError(f"The clamp range starts at {start:g}, not below its end {stop:g}.",
                          hint=order_hint)
    step = (stop - start) / (count - 1)
    # to 15 significant digits: 69.51, not the 69.51000000000002 that start + i * step can land on
    return [float(f"{start + i * step:.15g}") for i in range(count - 1)] + [stop]


def parse_values(spec: str) -> list[float]:
    """START:STOP:COUNT -> COUNT evenly spaced values from START to STOP (both included)."""
    parts = str(spec).split(":")
    if len(parts) != 3:
        raise NeedleError(f"The clamp range {spec!r} is not START:STOP:COUNT.", hint=RANGE_HINT)
    try:
        start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise NeedleError(f"The clamp range {spec!r} has a part that is not a number.", hint=RANGE_HINT) from None
    return value_range(start, stop, count)


def within_bound(value: float, label: str = "clamp value") -> float:
    """value, if it lies within +-MAX_ABS_VALUE; else NeedleError."""
    hint = f"Use a value from -{BOUND_TEXT} to {BOUND_TEXT}, e.g. -50 to 50."
    if not math.isfinite(value):
        raise NeedleError(f"The {label} must be a finite number.", hint=hint)
    if abs(value) > MAX_ABS_VALUE:
        raise NeedleError(f"The {label} {value:g} is out of range: clamp values lie within ±{BOUND_TEXT}.", hint=hint)
    return value


def default_bound(max_abs: float | None) -> float:
    """The default sweep's end: 10x the observed max |activation|, to 3 significant digits, at most MAX_ABS_VALUE."""
    if max_abs is not None and math.isfinite(max_abs) and max_abs > 0:
        return min(float(f"{RANGE_TIMES_MAX * max_abs:.3g}"), MAX_ABS_VALUE)
    return FALLBACK_RANGE


def default_values(max_abs: float | None, count: int = DEFAULT_COUNT) -> list[float]:
    bound = default_bound(max_abs)
    return value_range(-bound, bound, count)


def _number(form: dict, name: str, label: str, kind=float):
    """A form's or JSON's number: text of ASCII digits (and sign, point, exponent) or a JSON
    number; for kind=int a whole one (3, "3", 3.0; not 3.9 or "3.0")."""
    raw = form.get(name)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise NeedleError(f"The {label} is missing.", hint=f"Fill in the {label}.")
    shown = repr(raw)[:40]
    not_number = NeedleError(f"The {label} {shown} is not a {'whole ' if kind is int else ''}number.",
                             hint=f"Type a number for the {label}.")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)) or (isinstance(raw, str) and not raw.isascii()):
        raise not_number
    try:
        if kind is int and isinstance(raw, float):
            if not raw.is_integer():
                raise not_number
            value = int(raw)  # OverflowError for inf
        else:
            value = kind(raw)  # OverflowError: float() of a 400-digit integer
    except (TypeError, ValueError):
        raise not_number from None
    except OverflowError:
        raise NeedleError(f"The {label} {shown} is out of range.", hint=f"Type a smaller number for the {label}.") from None
    if kind is float and not math.isfinite(value):
        raise NeedleError(f"The {label} must be a finite number.", hint=f"Type a number for the {label}.")
    return value


def _text_field(form: dict, name: str) -> str:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise NeedleError(f"The {name} must be text, not the number {value!r}.", hint=f"Send the {name} as a string.")
    return value or ""


def _prompt(form: dict, max_chars: int) -> str:
    prompt = _text_field(form, "prompt").replace("\r\n", "\n")
    if not prompt.strip():
        raise NeedleError("The prompt is empty.", hint="Type a prompt for the model to continue.")
    if len(prompt) > max_chars:
        raise NeedleError(f"The prompt is {len(prompt)} characters long; the limit is {max_chars}.",
                          hint="Shorten the prompt.")
    return prompt


# ---- page data ----------------------------------------------------------------------------------


def _state(job: Job | None, done: bool) -> str:
    return "done" if done else (job.state if job is not None else "queued")


# ---- stored rows a page cannot show: an older version or a worker's bug may have written one; its
# place on a page says so ("broken": a short message, state "broken"), and the rest of the page stays.

CURVE_SOURCES = ("index", "cli", "page")


def finite(x) -> bool:
    """A real number (not a bool), not NaN nor infinite: what a stored figure must be to be shown."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _finite_list(x, length: int | None = None) -> bool:
    return isinstance(x, list) and bool(x) and length in (None, len(x)) and all(finite(v) for v in x)


def _top_tokens(x) -> bool:
    return isinstance(x, list) and all(
        isinstance(t, dict) and isinstance(t.get("token"), (str, type(None))) and isinstance(t.get("token_id"), int)
        and finite(t.get("prob")) for t in x)


def curve_problem(curve: ClampCurve) -> str | None:
    """What in a stored clamp curve cannot be shown, or None."""
    if curve.source not in CURVE_SOURCES:
        return "its source is not one Needle writes"
    if not _finite_list(curve.clamp_values):
        return "its clamp values are not a list of finite numbers"
    if curve.probs is None:  # a worker has yet to compute it
        return None
    if not _finite_list(curve.probs, len(curve.clamp_values)):
        return "its probabilities are not one finite number per clamp value"
    base = curve.baseline
    if not (isinstance(base, dict) and finite(base.get("activation")) and finite(base.get("prob"))):
        return "its unclamped point is not two finite numbers"
    tops = curve.top_tokens
    if not (isinstance(tops, dict) and _top_tokens(tops.get("low")) and _top_tokens(tops.get("high"))):
        return "its top next tokens are malformed"
    return None


def generation_problem(gen: Generation) -> str | None:
    """What in a stored clamped generation cannot be shown, or None."""
    if not finite(gen.value):
        return "its clamp value is not a finite number"
    sides = (gen.clamped, gen.unclamped)
    if (sides[0] is None) != (sides[1] is None) or not all(
            side is None or (isinstance(side, dict) and isinstance(side.get("text"), str)
                             and isinstance(side.get("token_ids"), list)) for side in sides):
        return "its continuations are malformed"
    return None


def curve_data(model: Model, curve: ClampCurve, job: Job | None = None, sae: str | None = None) -> dict:
    """A curve as the CLI's JSON shape plus where it came from; "state" while a worker computes it,
    "broken" (and its values left out) if the stored row cannot be shown."""
    problem = curve_problem(curve)
    state = "broken" if problem else _state(job, curve.probs is not None)
    shown = problem is None
    return {
        "id": curve.id,
        "layer": curve.layer,
        "neuron": curve.neuron,
        "prompt": curve.prompt,
        "target": curve.target,
        "token": curve.token,
        "token_id": curve.token_id,
        "note": curve.note,
        "positions": curve.positions,
        "values": curve.clamp_values if shown else None,
        "probs": curve.probs if shown else None,
        "baseline": curve.baseline if shown else None,
        "top_tokens": curve.top_tokens if shown else None,
        "source": curve.source,
        "created_at": queries.utc_text(curve.created_at),
        "state": state,
        "error": job.error if job is not None and state == "failed" else None,
        "broken": f"This clamp curve cannot be shown: {problem}." if problem else None,
        "url": urls.clamp_url(model.name, curve.layer, curve.neuron, curve.id, sae=sae),
        "json_url": urls.clamp_url(model.name, curve.layer, curve.neuron, curve.id, fmt=urls.JSON, sae=sae),
    }


def _parting(clamped: dict | None, unclamped: dict | None) -> int | None:
    """The first character where the clamped continuation differs from the unclamped one."""
    if not clamped or not unclamped:
        return None
    a, b = clamped.get("text") or "", unclamped.get("text") or ""
    return None if a == b else len(os.path.commonprefix([a, b]))


def generation_data(model: Model, gen: Generation, job: Job | None = None, sae: str | None = None) -> dict:
    """A generation as the CLI's JSON shape plus where it came from; "state" while a worker computes
    it, "broken" (and its continuations left out) if the stored row cannot be shown."""
    problem = generation_problem(gen)
    state = "broken" if problem else _state(job, gen.clamped is not None)
    shown = problem is None
    clamped, unclamped = (gen.clamped, gen.unclamped) if shown else (None, None)
    return {
        "id": gen.id,
        "layer": gen.layer,
        "neuron": gen.neuron,
        "prompt": gen.prompt,
        "value": gen.value if finite(gen.value) else None,
        "tokens": gen.tokens,
        "seed": gen.seed,
        "mode": "greedy" if gen.seed is None else "sampled",
        "clamped": clamped,
        "unclamped": unclamped,
        # where the two continuations part (a character index), None while running or if identical
        "differ_at": _parting(clamped, unclamped),
        "source": gen.source,
        "created_at": queries.utc_text(gen.created_at),
        "state": state,
        "error": job.error if job is not None and state == "failed" else None,
        "broken": f"This generation cannot be shown: {problem}." if problem else None,
        "url": urls.generation_url(model.name, gen.layer, gen.neuron, gen.id, sae=sae),
        "json_url": urls.generation_url(model.name, gen.layer, gen.neuron, gen.id, fmt=urls.JSON, sae=sae),
    }


def form_base(model: Model, layer: int, neuron: int, *, live: bool, sae: str | None = None) -> dict:
    """What every clamp and generate form of a unit needs besides its values: where it posts, the
    limits it states, and whether live requests are on (off: no form is shown)."""
    return {
        "clamp_url": urls.clamp_form_url(model.name, layer, neuron, sae=sae),
        "generate_url": urls.generate_form_url(model.name, layer, neuron, sae=sae),
        "max_values": MAX_VALUES,
        "max_tokens": MAX_GENERATE_TOKENS,
        "live": live,
    }


def again_form(model: Model, layer: int, neuron: int, *, live: bool, curve: dict | None = None,
               generation: dict | None = None, sae: str | None = None) -> dict:
    """The form a curve's or a generation's own page shows to ask again (curve_data's or
    generation_data's dict), filled with what it asked for: the prompt, target, range and positions
    of a sweep; the prompt, value, length and seed of a generation. One field can be changed, the
    rest kept."""
    form = form_base(model, layer, neuron, live=live, sae=sae)
    if curve is not None:
        values = curve["values"] or [0.0, 0.0]
        form.update(prompt=curve["prompt"], token=target_field(curve["target"] or curve["token"]), start=values[0],
                    stop=values[-1], count=len(values), last_only=curve["positions"] == "last")
    if generation is not None:
        value = generation["value"] if generation["value"] is not None else 0.0
        form.update(prompt=generation["prompt"], value=value, tokens=generation["tokens"],
                    seed=generation["seed"])
    return form


def observed_range(stats: NeuronActivations | None) -> list[float] | None:
    """The unit's [min, max] activation on the examples corpus, marked on its clamp curves."""
    if stats is None or not (finite(stats.min_act) and finite(stats.max_act)):
        return None
    return [float(stats.min_act), float(stats.max_act)]


def neuron_section(session: Session, model: Model, layer: int, neuron: int, top_token: str | None,
                   stats: NeuronActivations | None, *, live: bool, prompt_max_chars: int,
                   basis: Basis | None = None, top_prompt: str | None = None) -> dict:
    """A unit page's clamp section: its stored curves (each with the unit's observed range) and
    the forms' defaults: the prompt is its top context up to its max token (top_prompt), else
    the model's default prompt; the range is ±10x its largest |activation| on the corpus."""
    seen = observed_range(stats)
    max_abs = max(abs(seen[0]), abs(seen[1])) if seen else None
    bound = default_bound(max_abs)
    sae, basis_id = (basis.sae, basis.id) if basis is not None else (None, queries.NEURONS)
    curves = queries.clamp_curves_of_neuron(session, model.id, layer, neuron, basis=basis_id)
    prompt = top_prompt[-prompt_max_chars:] if top_prompt and top_prompt.strip() else None
    return {
        "clamp_curves": [{**curve_data(model, c, sae=sae), "observed_range": seen} for c in curves],
        "clamp_form": {
            **form_base(model, layer, neuron, live=live, sae=sae),
            "prompt": prompt or (model.info or {}).get("clamp_prompt") or "The",
            "prompt_from": "its top context on the examples corpus, up to its max token" if prompt
            else "the model's default prompt (the start of its examples corpus)",
            "token": target_field(top_token),
            "start": -bound,
            "stop": bound,
            "count": DEFAULT_COUNT,
            "value": bound / 2,
            "tokens": DEFAULT_GENERATE_TOKENS,
            "prompt_max_chars": prompt_max_chars,
            "range_from": "its largest |activation| on the examples corpus" if max_abs else "no observed activation",
        },
    }


def require_live(live: bool) -> None:
    if not live:
        raise NeedleError(
            "Live requests are switched off on this server.", status=403,
            hint="Its operator set NEEDLE_LIVE_REQUESTS=false; run `needle clamp` or `needle generate` "
            "where the model is indexed instead.",
        )


def _basis_params(basis: Basis | None) -> dict:
    return {} if basis is None or basis.is_neurons else {"sae": basis.id, "sae_name": basis.sae}


def start_clamp(session: Session, model: Model, layer: int, neuron: int, form: dict, *, live: bool,
                prompt_max_chars: int, basis: Basis | None = None) -> dict:
    """Queue a clamp curve asked for on a neuron page: the form's prompt, token, range and positions."""
    require_live(live)
    prompt = _prompt(form, prompt_max_chars)
    target = _text_field(form, "token")
    if not target:
        raise NeedleError("There is no target token.", hint="Type the token whose probability to plot, e.g. ' dog'.")
    if len(target) > 200:
        raise NeedleError(f"The target is {len(target)} characters long; a token is at most 200 here.",
                          hint="Type one token.")
    values = value_range(_number(form, "start", "range start"), _number(form, "stop", "range end"),
                         _number(form, "count", "number of values", int), hints=FORM_RANGE_HINTS)
    positions = "last" if str(form.get("positions", "all")) == "last" or form.get("last_only") in (True, "on", "1", "true") else "all"
    token_id, target = target_token(session, model, target)  # ␣dog is kept as " dog", as it is meant
    curve = queries.add_clamp_curve(session, model.id, layer, neuron, prompt=prompt, target=target,
                                    positions=positions, values=values, source="page",
                                    basis=basis.id if basis is not None else queries.NEURONS)
    job = queries.enqueue_job(
        session, model.id, queries.CLAMP_STAGE, f"run:{curve.id}",
        {"curve": curve.id, "layer": layer, "neuron": neuron, "prompt": prompt, "target": target,
         "token_id": token_id, "values": values, "positions": positions, **_basis_params(basis)}, max_attempts=1,
    )
    return curve_data(model, curve, job, sae=basis.sae if basis is not None else None)


def target_field(token: str | None) -> str:
    """A target token as the sweep form's field shows it: as its chip does (␣dog for " dog"), so a
    leading space, a newline or a tab can be seen, where typed text showed nothing. target_token
    reads it back. A token that holds one of the marks itself (a literal ␣) is shown as it is:
    marked, it could not be read back (its own ␣ would become a space)."""
    if not token:
        return ""
    if from_visible(token) != token:
        return token
    return visible(token)


def target_token(session: Session, model: Model, target: str) -> tuple[int | None, str]:
    """(the id of the one token a sweep follows, the text it was found as): a vocabulary token
    spelled exactly so, or as a page's chip shows it (␣dog for " dog": found as " dog"), else what
    the model's stored tokenizer makes of it. Text of several tokens is a 400 that names them:
    p(token) is one next token's probability (Davies), and plotting a word's first piece instead
    would be a curve for something not asked. None: no stored tokenizer, so the worker encodes the
    text (and refuses several tokens the same way)."""
    meant = from_visible(target)
    for text in dict.fromkeys((target, meant)):
        hits = queries.tokens_by_text(session, model.id, [text])
        if hits:
            return hits[0].token_id, text
    ids = tokenize_query(model, target)
    if ids is None:
        return None, target
    if len(ids) != 1 and meant != target:  # ␣dog␣house: the marks stand for spaces
        target, ids = meant, tokenize_query(model, meant) or []
    if len(ids) == 1:
        return ids[0], target
    if not ids:
        raise NeedleError(f"The target {target!r} has no tokens.", hint="Type a word or a token, e.g. ' dog'.")
    raise several_tokens(target, [queries.tokens_by_ids(session, model.id, ids).get(i) for i in ids])


def several_tokens(target: str, pieces: Sequence[str | None]) -> NeedleError:
    """The error for a target that is several tokens, naming them (as the pages show tokens)."""
    shown = ", ".join(visible(p) if p is not None else "?" for p in pieces)
    first = pieces[0] if pieces[0] is not None else target
    return NeedleError(
        f"The target {target!r} is {len(pieces)} tokens for this model ({shown}); a clamp curve follows the "
        "probability of one next token.",
        hint=f"Type one token, for example its first, {first!r}, or search the model's tokens for the one you mean.",
    )


def row_id(text: str) -> int | None:
    """A curve's or generation's id from a path segment: ASCII digits only ("¹".isdigit() is true
    but int() refuses it) and within the id column's 32 bits, else None (a 404, not a 500)."""
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value < 2**31 else None


def _unit_words(basis: Basis | None, layer: int, neuron: int) -> str:
    return f"neuron {layer}/{neuron}" if basis is None or basis.is_neurons else f"latent {neuron} of SAE {basis.sae!r}"


def clamp_page(session: Session, model: Model, layer: int, neuron: int, curve_text: str,
               basis: Basis | None = None) -> dict:
    curve_id = row_id(curve_text)
    curve = queries.get_clamp_curve(session, curve_id) if curve_id is not None else None
    basis_id = basis.id if basis is not None else queries.NEURONS
    if curve is None or curve.model_id != model.id or (curve.basis, curve.layer, curve.neuron) != (basis_id, layer, neuron):
        raise NotFound(f"There is no clamp curve {curve_text[:60]!r} for {_unit_words(basis, layer, neuron)} of {model.name!r}.")
    job = queries.live_job(session, model.id, queries.CLAMP_STAGE, curve.id) if curve.probs is None else None
    stats = queries.neuron_activations(session, model.id, layer, neuron, basis_id)
    return {**curve_data(model, curve, job, sae=basis.sae if basis is not None else None),
            "observed_range": observed_range(stats)}


def start_generation(session: Session, model: Model, layer: int, neuron: int, form: dict, *, live: bool,
                     prompt_max_chars: int, basis: Basis | None = None) -> dict:
    """Queue a clamped generation asked for on a neuron page."""
    require_live(live)
    prompt = _prompt(form, prompt_max_chars)
    value = within_bound(_number(form, "value", "clamp value"))
    tokens = _number(form, "tokens", "number of tokens", int)
    if not 1 <= tokens <= MAX_GENERATE_TOKENS:
        raise NeedleError(f"Generating {tokens} tokens is not allowed: use 1 to {MAX_GENERATE_TOKENS}.",
                          hint="e.g. 32 tokens.")
    seed = None
    if form.get("seed") is not None and str(form.get("seed")).strip():  # JSON's seed 0 is a seed, not greedy
        seed = _number(form, "seed", "seed", int)
        if not 0 <= seed < 2**31:
            raise NeedleError(f"The seed {seed} is out of range.", hint="Use a seed from 0 to 2147483647, or none for greedy.")
    gen = queries.add_generation(session, model.id, layer, neuron, prompt=prompt, value=value, tokens=tokens,
                                 seed=seed, source="page", basis=basis.id if basis is not None else queries.NEURONS)
    job = queries.enqueue_job(
        session, model.id, queries.GENERATE_STAGE, f"run:{gen.id}",
        {"generation": gen.id, "layer": layer, "neuron": neuron, "prompt": prompt, "value": value,
         "tokens": tokens, "seed": seed, **_basis_params(basis)}, max_attempts=1,
    )
    return generation_data(model, gen, job, sae=basis.sae if basis is not None else None)


def generation_page(session: Session, model: Model, layer: int, neuron: int, gen_text: str,
                    basis: Basis | None = None) -> dict:
    gen_id = row_id(gen_text)
    gen = queries.get_generation(session, gen_id) if gen_id is not None else None
    basis_id = basis.id if basis is not None else queries.NEURONS
    if gen is None or gen.model_id != model.id or (gen.basis, gen.layer, gen.neuron) != (basis_id, layer, neuron):
        raise NotFound(f"There is no generation {gen_text[:60]!r} for {_unit_words(basis, layer, neuron)} of {model.name!r}.")
    job = queries.live_job(session, model.id, queries.GENERATE_STAGE, gen.id) if gen.clamped is None else None
    return generation_data(model, gen, job, sae=basis.sae if basis is not None else None)
