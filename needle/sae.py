"""`needle sae train | import | list`: sparse autoencoders on a model's sites, their latents
computed as jobs like the neurons (workers/saestages.py)."""

from __future__ import annotations

import argparse
import re
import time

from app.bases import SITES
from app.config import Settings
from app.errors import NeedleError

SAE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
ARCH_CHOICES = ("batchtopk", "topk", "relu", "standard", "jumprelu")
TRAINABLE = ("batchtopk", "topk", "relu", "standard")
DEFAULT_EXPANSION = 4
DEFAULT_K = 32
DEFAULT_TOKENS = 262_144
DEFAULT_EVAL_TOKENS = 16_384


def check_sae_name(name: str) -> str:
    if not SAE_NAME_RE.match(name) or name.endswith(".json"):
        raise NeedleError(f"{name!r} is not a valid SAE name.",
                          hint="Use lowercase letters, digits, '.', '_' and '-' (it becomes part of URLs), "
                          "at most 100 characters.")
    return name


def default_sae_name(layer: int, site: str, d_sae: int) -> str:
    return f"l{layer}-{site.replace('_', '-')}-{d_sae}"


def _model_row(s, name: str):
    from app import queries

    model = queries.get_model(s, name, tokenizer=False)
    if model is None:
        raise NeedleError(f"There is no model named {name!r} here.",
                          hint=f"Index it first: needle index MODEL --name {name}")
    return model


def _check_layer_site(layer: int, site: str, n_layers: int) -> None:
    if site not in SITES:
        raise NeedleError(f"{site!r} is not a site an SAE can read.", hint=f"Use one of {', '.join(SITES)}.")
    if not 0 <= layer < n_layers:
        raise NeedleError(f"There is no layer {layer}: the model has layers 0 to {n_layers - 1}.",
                          hint="Give --layer within that range.")


def _examples_params(s, model_id: int) -> dict | None:
    """The model's examples run's job params (the latents' examples use its windows), or None."""
    from app import queries

    job = next((j for j in queries.jobs_for_model(s, model_id) if j.stage == "examples" and j.key == "all"), None)
    return None if job is None else dict(job.params)  # how it is split too: the latents' run is split alike


def register_sae(settings: Settings, model_name: str, *, sae_name: str, layer: int, site: str, architecture: str,
                 d_in: int, d_sae: int, source: str, cfg: dict, weights: bytes | None, train_params: dict | None,
                 eval_params: dict | None, queue_only: bool, quiet: bool = False, device: str | None = None) -> int:
    """Store a new SAE of a model, enqueue its jobs and (unless queue_only) run them here.
    Everything is checked before the one write. Returns the SAE's id (its basis)."""
    from app import queries
    from app.db import get_engine, require_migrated, session_scope
    from needle.running import work_until_idle
    from workers.loading import load_model
    from workers.stages import ModelSpec, plan_sae

    check_sae_name(sae_name)
    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        model = _model_row(s, model_name)
        if queries.get_sae(s, model.id, sae_name) is not None:
            raise NeedleError(f"Model {model_name!r} already has an SAE named {sae_name!r}.",
                              hint="Choose another --sae-name.")
        source_path, model_device, dtype = model.source, model.device, model.dtype
        max_memory = (model.info or {}).get("max_memory")
        examples_params = _examples_params(s, model.id)
    _check_layer_site(layer, site, model.n_layers)
    loaded = None if queue_only else load_model(source_path, device=device or model_device, dtype=dtype,
                                                  max_memory=max_memory)
    width = loaded.adapter.site_width(site) if loaded is not None else (model.d_mlp if site == "mlp" else model.d_model)
    if d_in != width:
        raise NeedleError(f"The SAE reads {d_in} values per token, but {site} of {model_name!r} has {width}.",
                          hint="Give the --site (and --layer) the SAE was trained on.")
    if loaded is not None and train_params is not None:
        from workers.saestages import training_corpus

        training_corpus(loaded.tokenizer, train_params)  # a corpus too small to train on is an error before any write
    # an imported SAE is measured on the text right after the examples corpus's (whose windows it
    # is read on): held out from those, though Needle cannot know what the SAE was trained on
    corpus = (examples_params or {}).get("corpus") or "stdlib"
    eval_params = eval_params or {"corpus": corpus, "tokens": (examples_params or {}).get("tokens") or DEFAULT_TOKENS,
                                  "eval_tokens": DEFAULT_EVAL_TOKENS,
                                  "context": (examples_params or {}).get("context") or 64}
    with session_scope(engine) as s:
        model = _model_row(s, model_name)
        sae = queries.add_sae(s, model.id, name=sae_name, site=site, layer=layer, architecture=architecture,
                              d_in=d_in, d_sae=d_sae, source=source, cfg=cfg, weights=weights)
        plan_sae(s, model.id, sae.id, layer, train_params=train_params, eval_params=eval_params,
                 examples_params=examples_params, max_attempts=settings.max_attempts)
        sae_id, spec = sae.id, ModelSpec.of(model)
    if loaded is not None:
        work_until_idle(engine, settings, spec, loaded, spec.id, what=f"SAE {sae_name!r}", quiet=quiet)
    return sae_id


def train(settings: Settings, model_name: str, *, layer: int, site: str = "mlp", latents: int | None = None,
          expansion: float | None = None, architecture: str = "batchtopk", k: int | None = None,
          corpus: str | None = None, tokens: int = DEFAULT_TOKENS, context: int | None = None,
          sae_name: str | None = None, seed: int = 0, lr: float = 4e-4, batch_size: int = 1024, epochs: int = 1,
          eval_tokens: int = DEFAULT_EVAL_TOKENS, queue_only: bool = False, quiet: bool = False,
          device: str | None = None) -> int:
    from app.db import get_engine, require_migrated, session_scope

    if architecture not in TRAINABLE:
        raise NeedleError(f"Needle does not train {architecture!r} SAEs.", hint=f"Use --arch {' or '.join(TRAINABLE)}.")
    architecture = "standard" if architecture == "relu" else architecture
    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        model = _model_row(s, model_name)
        n_layers, d_mlp, d_model = model.n_layers, model.d_mlp, model.d_model
        examples_params = _examples_params(s, model.id) or {}
    _check_layer_site(layer, site, n_layers)
    d_in = d_mlp if site == "mlp" else d_model
    if latents is not None and expansion is not None:
        raise NeedleError("Give --latents or --expansion, not both.", hint="--latents N sets the width itself.")
    d_sae = latents if latents is not None else round(d_in * (expansion or DEFAULT_EXPANSION))
    if d_sae < 1:
        raise NeedleError(f"An SAE of {d_sae} latents is empty.", hint="Give --latents or --expansion above 0.")
    if architecture in ("topk", "batchtopk"):
        k = k or min(DEFAULT_K, d_sae)
        if not 0 < k <= d_sae:
            raise NeedleError(f"--k {k} must be between 1 and the width, {d_sae}.", hint="Lower --k.")
    elif k is not None:
        raise NeedleError(f"--k applies to topk and batchtopk SAEs, not {architecture}.", hint="Leave --k out.")
    corpus = corpus or examples_params.get("corpus") or "stdlib"
    context = context or examples_params.get("context") or 64
    train_params = {"layer": layer, "site": site, "d_sae": d_sae, "architecture": architecture, "k": k,
                    "corpus": corpus, "tokens": tokens, "eval_tokens": eval_tokens, "context": context, "seed": seed,
                    "lr": lr, "batch_size": batch_size, "epochs": epochs}
    eval_params = {k_: train_params[k_] for k_ in ("corpus", "tokens", "eval_tokens", "context")}
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "layer": layer, "site": site}
    name = sae_name or default_sae_name(layer, site, d_sae)
    return register_sae(settings, model_name, sae_name=name, layer=layer, site=site, architecture=architecture,
                        d_in=d_in, d_sae=d_sae, source="trained", cfg=cfg, weights=None, train_params=train_params,
                        eval_params=eval_params, queue_only=queue_only, quiet=quiet, device=device)


def import_folder(settings: Settings, model_name: str, path: str, *, sae_name: str | None = None,
                  layer: int | None = None, site: str | None = None, queue_only: bool = False, quiet: bool = False,
                  device: str | None = None) -> int:
    from pathlib import Path

    from workers.sae import load_sae, sae_to_bytes

    if (layer is None) != (site is None):
        raise NeedleError("Give --layer and --site together, or neither (the SAE's hook name says them).",
                          hint="e.g. --layer 2 --site mlp")
    # a one-line NeedleError for a folder that is not an SAE in SAELens's format
    sae = load_sae(path, hook=(layer, site) if layer is not None and site is not None else None)
    cfg, blob = sae_to_bytes(sae)
    name = sae_name or check_sae_name(re.sub(r"[^a-z0-9._-]", "-", Path(path).resolve().name.lower()).strip("-.") or "sae")
    return register_sae(settings, model_name, sae_name=name, layer=sae.layer, site=sae.site,
                        architecture=sae.training_architecture, d_in=sae.d_in, d_sae=sae.d_sae,
                        source=str(Path(path).resolve()), cfg=cfg, weights=blob, train_params=None, eval_params=None,
                        queue_only=queue_only, quiet=quiet, device=device)


def list_saes(settings: Settings, model_name: str) -> list[dict]:
    from app import queries
    from app.db import get_engine, require_migrated, session_scope

    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        model = _model_row(s, model_name)
        return [{"name": x.name, "layer": x.layer, "site": x.site, "architecture": x.architecture, "d_in": x.d_in,
                 "d_sae": x.d_sae, "source": x.source, "quality": x.quality} for x in queries.list_saes(s, model.id)]


# ---- the commands ----------------------------------------------------------------------------------


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def _layer(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a layer number (0, 1, 2, ...)")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


def cmd_sae(args, settings: Settings) -> None:
    t0 = time.time()
    if args.sae_command == "list":
        rows = list_saes(settings, args.name)
        if not rows:
            print(f"{args.name} has no SAEs: train one with `needle sae train {args.name} --layer L`.")
        for r in rows:
            q = r["quality"] or {}
            figures = f" L0 {q['l0']:.1f}, variance explained {q['variance_explained']:.3f}" if q.get("l0") is not None else ""
            print(f"{r['name']}: layer {r['layer']} {r['site']}, {r['architecture']}, {r['d_sae']} latents{figures}")
        return
    if args.sae_command == "train":
        train(settings, args.name, layer=args.layer, site=args.site, latents=args.latents, expansion=args.expansion,
              architecture=args.arch, k=args.k, corpus=args.corpus, tokens=args.tokens, context=args.context,
              sae_name=args.sae_name, seed=args.seed, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
              queue_only=args.queue, device=args.device)
    else:
        import_folder(settings, args.name, args.path, sae_name=args.sae_name, layer=args.layer, site=args.site,
                      queue_only=args.queue, device=args.device)
    what = "Queued" if args.queue else f"Done in {time.time() - t0:.1f}s:"
    print(f"{what} the SAE of {args.name}; browse it at http://{settings.host}:{settings.port}/{args.name}/sae"
          + ("" if not args.queue else " once `needle worker` has computed it"))


def add_sae_commands(sub) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders on a model's activations: train, import, list")
    inner = p.add_subparsers(dest="sae_command", required=True)
    t = inner.add_parser("train", help="train an SAE on one site of one layer, as jobs a worker runs")
    t.add_argument("name", help="the model's name")
    t.add_argument("--layer", type=_layer, required=True)
    t.add_argument("--site", default="mlp", choices=SITES, help="what the SAE reads (default mlp: the neurons)")
    width = t.add_mutually_exclusive_group()
    width.add_argument("--latents", type=_positive, help="the SAE's width")
    width.add_argument("--expansion", type=_positive_float, help=f"width as a multiple of the site's (default {DEFAULT_EXPANSION})")
    t.add_argument("--arch", default="batchtopk", choices=("batchtopk", "topk", "relu"))
    t.add_argument("--k", type=_positive, help=f"active latents per token for topk and batchtopk (default {DEFAULT_K})")
    t.add_argument("--corpus", metavar="SPEC", help="training text (default: the model's examples corpus, else stdlib)")
    t.add_argument("--tokens", type=_positive, default=DEFAULT_TOKENS, help=f"training tokens (default {DEFAULT_TOKENS})")
    t.add_argument("--context", type=_positive, help="tokens per window (default: the examples run's, else 64)")
    t.add_argument("--epochs", type=_positive, default=1)
    t.add_argument("--batch-size", type=_positive, default=1024)
    t.add_argument("--lr", type=_positive_float, default=4e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sae-name", help="its name in URLs (default l{layer}-{site}-{width})")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the model's")
    t.add_argument("--queue", action="store_true", help="only enqueue the jobs, for `needle worker`")
    i = inner.add_parser("import", help="import an SAE saved in SAELens's format (cfg.json + sae_weights.safetensors)")
    i.add_argument("name", help="the model's name")
    i.add_argument("path", help="the SAE's folder")
    i.add_argument("--sae-name", help="its name in URLs (default: the folder's name)")
    i.add_argument("--layer", type=_layer, help="with --site: where it reads, when its hook name does not say")
    i.add_argument("--site", choices=SITES)
    i.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the model's")
    i.add_argument("--queue", action="store_true", help="only enqueue the jobs, for `needle worker`")
    ls = inner.add_parser("list", help="a model's SAEs")
    ls.add_argument("name", help="the model's name")
    p.set_defaults(func=cmd_sae)
