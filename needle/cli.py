"""The `needle` command: demo, index, probe, clamp, generate, sae, compare, jobs, export, serve, worker, db."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING

from pydantic import ValidationError

from app.config import ROOT, Settings, get_settings
from app.errors import NeedleError
from app.tokens import is_text
from needle.clamping import add_clamp_commands
from needle.compare import add_compare_command
from needle.export import add_export_command
from needle.jobs import add_jobs_command
from needle.running import say, work_until_idle
from needle.sae import add_sae_commands

if TYPE_CHECKING:
    from workers.adapters import Family

DEMO_MODEL = ROOT / "assets" / "demo-model"
DEMO_SAE = ROOT / "assets" / "demo-sae"  # trained by workers/demo_sae.py, in SAELens's format
DEMO_SAE_NAME = "l2-mlp-3072"
DEMO_FEATURES = ("text", "python")  # the built-in feature datasets the demo probes
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name.endswith(".json"):
        raise NeedleError(
            f"{name!r} is not a valid model name.",
            hint="Use lowercase letters, digits, '.', '_' and '-' (starting with a letter or digit, not ending in .json), e.g. --name pythia-70m.",
        )
    return name


def digits(text: str, default: int) -> int:
    """ASCII digits as a number, else `default` (int() also takes "٣", "1_0" and " 3")."""
    return int(text) if text.isascii() and text.isdigit() else default


def non_negative_int(text: str) -> int:
    value = digits(text, -1)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def positive_int(text: str) -> int:
    value = digits(text, 0)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def port(text: str) -> int:
    value = digits(text, 0)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return value


def check_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an argument that is not text (it could be neither stored nor printed), naming it."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[args.command]._actions:
        value = getattr(args, action.dest, None)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not is_text(text):
                name = action.option_strings[-1] if action.option_strings else action.metavar or action.dest.upper()
                raise NeedleError(f"{name} {text!r} is not valid text: it has bytes that are not UTF-8.",
                                  hint=f"Give {name} as UTF-8 text (check the encoding of your terminal or script).")


# ---------------------------------------------------------------- index


def index_model(
    settings: Settings,
    source: str,
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    max_memory: dict[str, int] | None = None,
    decode_norm: str = "none",
    force: bool = False,
    layers_per_job: int = 0,
    corpus_shards: int = 1,
    corpus: str | None = None,
    tokens: int | None = None,
    context: int = 64,
    features: list[str] | None = None,
    probe_corpus: str = "stdlib",
    probe_tokens: int = 32_768,
    probe_method: str = "needle",
    force_probes: bool = False,
    clamp: bool = True,
    clamp_prompt: str | None = None,
    queue_only: bool = False,
    quiet: bool = False,
) -> int:
    """Register `source` as `name`, enqueue its stages and run them in this process.
    Returns the model id. Raises NeedleError, leaving the database as it was, when the
    model cannot be loaded or conflicts with what is stored."""
    from app import queries
    from app.db import get_engine, require_migrated, session_scope
    from workers.clamp import INDEX_COUNT, INDEX_TOP, default_prompt, encode_prompt
    from workers.corpus import load_corpus
    from workers.loading import load_model, local_path, tokenizer_json, vocabulary
    from workers.stages import ModelSpec, check_context, examples_params_for, plan_index

    check_name(name)
    engine = get_engine(settings)
    require_migrated(engine)
    loaded = load_model(source, device=device, dtype=dtype, max_memory=max_memory)
    adapter = loaded.adapter
    if adapter.spec.detected and not quiet:
        say(detected_line(source, adapter.spec))
    if decode_norm == "final" and adapter.final_norm_scale() is None:
        raise NeedleError(f"{source} has no final norm weight to apply.", hint="Use --decode-norm none.")
    examples_params = None
    first_window = None
    if corpus is not None:
        check_examples_options(context, tokens)
        check_context(loaded, context)
        # Read the corpus up to its first window now, so a missing, empty, binary or too short
        # corpus is an error before anything is written (the examples job reads all of it).
        first = load_corpus(corpus, loaded.tokenizer, context=context, max_tokens=context)
        first_window = first.windows[0].tolist()
        examples_params = examples_params_for(
            corpus, tokens, context, n_layers=adapter.n_layers, layers_per_job=layers_per_job or adapter.n_layers,
            shards=corpus_shards, batch_tokens=settings.examples_batch_tokens,
        )
    probe_params = None
    if features:
        from workers.features import check_features

        check_examples_options(context, probe_tokens)
        check_context(loaded, context)
        # a bad spec or a bad line of a JSONL file is an error before any write (read a batch of lines at a time)
        check_features(features, loaded.tokenizer, context=context, max_tokens=probe_tokens, corpus=probe_corpus)
        probe_params = {"features": list(features), "corpus": probe_corpus, "tokens": probe_tokens, "context": context}
        if probe_method != "needle":  # (the default is left out: probes stored before --method compare equal)
            probe_params["method"] = probe_method
    if clamp_prompt is not None:
        encode_prompt(loaded, clamp_prompt)  # an empty or too long prompt is an error before any write
    fields = {
        "source": loaded.source,  # a local folder as its resolved path: the same model however it is named
        "family": family_label(adapter.spec),
        "architecture": (loaded.config.architectures or [type(loaded.model).__name__])[0],
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "d_mlp": adapter.d_mlp,
        "vocab_size": adapter.vocab_size,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "decode_norm": decode_norm,
    }
    with session_scope(engine) as s:
        existing = queries.get_model(s, name)
        if existing is not None and not force:
            changed = {k: (getattr(existing, k), v) for k, v in fields.items() if k != "device" and getattr(existing, k) != v
                       and not (k == "source" and local_path(existing.source) == v)}  # stored as named once
            if changed:
                what = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in changed.items())
                raise NeedleError(
                    f"A model named {name!r} is already indexed with {what}.",
                    hint="Pass --force to recompute it with the new settings, or choose another --name.",
                )
        # the default clamp prompt: --clamp-prompt, else from this corpus, else the one stored before
        stored_prompt = (existing.info or {}).get("clamp_prompt") if existing is not None else None
        if clamp_prompt is None:
            clamp_prompt = default_prompt(loaded.tokenizer, first_window) if first_window or not stored_prompt else stored_prompt
        model = queries.save_model(
            s, name, tokenizer_json=tokenizer_json(loaded.tokenizer),
            info={"hidden_act": getattr(loaded.config, "hidden_act", None) or getattr(loaded.config, "activation_function", None)
                  or getattr(loaded.config, "activation", None),
                  "logit_softcap": adapter.logit_softcap, "logit_scale": adapter.logit_scale,
                  "head_bias": adapter.head_bias() is not None,
                  "clamp_prompt": clamp_prompt,
                  # a mixture of experts: neuron N of a layer is neuron N % width of expert N // width
                  **({"experts": {"count": adapter.n_experts, "width": adapter.d_expert,
                                  "per_token": adapter.experts_per_token}} if adapter.n_experts else {}),
                  **({"max_memory": max_memory} if max_memory else {})},
            **fields,
        )
        if force or existing is None or queries.vocab_size_stored(s, model.id) != adapter.vocab_size:
            queries.replace_vocab(s, model.id, vocabulary(loaded.tokenizer, adapter.vocab_size))
        lpj = layers_per_job or adapter.n_layers
        if not force:
            check_stage_unchanged(s, model.id, name, "examples", examples_params)
            if not force_probes:
                check_stage_unchanged(s, model.id, name, "probes", probe_params)
        clamp_params = {"prompt": clamp_prompt, "count": INDEX_COUNT, "top": INDEX_TOP, "positions": "all"} if clamp else None
        plan_index(
            s, model, force=force, layers_per_job=lpj, max_attempts=settings.max_attempts,
            examples_params=examples_params, probe_params=probe_params, force_probes=force_probes,
            clamp_params=clamp_params,
        )
        model_id, spec = model.id, ModelSpec.of(model)
    if queue_only:
        return model_id
    work_until_idle(engine, settings, spec, loaded, model_id, what=f"Indexing {name!r}", quiet=quiet)
    return model_id


def family_label(spec: Family) -> str:
    """The family as a model row stores it: a detected one says so ("nemotron (detected)"), in 50 characters."""
    return f"{spec.name[:39]} (detected)" if spec.detected else spec.name


def detected_line(source: str, spec: Family) -> str:
    where = f"{spec.layers}.L"
    parts = f"{where}.{spec.mlp_in}" + (f" (gate {where}.{spec.mlp_gate})" if spec.kind == "gated" else "")
    return (f"{source}: model_type {spec.name!r} is not in Needle's registry; its MLP was detected from the module "
            f"tree ({spec.kind}): {parts} -> {where}.{spec.mlp_out}, final norm {spec.final_norm}. "
            f"`needle inspect {source}` shows all that was found.")


def check_examples_options(context: int, tokens: int | None) -> None:
    if context < 2:
        raise NeedleError(f"--context {context} is too short: a window needs at least 2 tokens.", hint="Use --context 64.")
    if tokens is not None and tokens < context:
        raise NeedleError(
            f"--tokens {tokens} is fewer than one window of --context {context} tokens.",
            hint="Raise --tokens or lower --context.",
        )


def check_stage_unchanged(session, model_id: int, name: str, stage: str, params: dict | None) -> None:
    """Examples or probes stored with other settings (corpus, features, cap, context) are only replaced with --force."""
    from app import queries
    from workers.stages import unsharded

    if params is None:
        return
    params = unsharded(params)
    for job in queries.jobs_for_model(session, model_id):
        stored = unsharded(job.params)
        if job.stage == stage and job.state == "done" and _same_specs(stored) != _same_specs(params):
            old = ", ".join(f"{k} {job.params.get(k)!r} (now {v!r})" for k, v in params.items() if job.params.get(k) != v)
            raise NeedleError(
                f"{name!r} already has {stage} computed with {old}.",
                hint=f"Pass --force to recompute them (and the rest of {name!r}) with the new settings.",
            )


def _same_specs(params: dict) -> dict:
    """Params with the corpus and feature specs that name a file or folder as its resolved path,
    so that a corpus given relative once and absolute once is the same corpus."""
    from workers.loading import local_path

    out = dict(params)
    if isinstance(out.get("corpus"), str):
        out["corpus"] = local_path(out["corpus"])
    if isinstance(out.get("features"), list):
        out["features"] = [local_path(f) if isinstance(f, str) else f for f in out["features"]]
    return out


def _model_is_indexed(settings: Settings, name: str) -> bool:
    from app import queries
    from app.db import get_engine, session_scope

    with session_scope(get_engine(settings)) as s:
        model = queries.get_model(s, name)
        if model is None:
            return False
        jobs = queries.jobs_for_model(s, model.id)
        # a demo indexed before the examples stage existed is finished by indexing it again
        stages = {j.stage for j in jobs}
        return {"examples", "probes", "clamp"} <= stages and all(j.state == "done" for j in jobs)


# ---------------------------------------------------------------- commands


def add_placement_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-map", choices=["auto"],
                   help="auto: spread the model over the GPUs, CPU memory and disk (accelerate), for a model "
                   "no one device holds; instead of --device")
    p.add_argument("--max-memory", metavar="CAPS",
                   help="at most this much memory per place, e.g. cpu=2GiB,cuda:0=20GiB,disk=0 (with --device-map "
                   "auto, the places the map may fill; else the device's, for the check that the model fits)")


def placement(args) -> tuple[str | None, dict[str, int] | None]:
    """(device, memory caps) of --device, --device-map and --max-memory."""
    from workers.devices import DEVICE_MAP_AUTO
    from workers.loading import parse_max_memory

    device = args.device
    if args.device_map is not None:
        if device not in (None, "auto"):
            raise NeedleError(f"--device {device} and --device-map {args.device_map} were both given.",
                              hint="Give one: --device for one device, --device-map auto to spread the model.")
        device = DEVICE_MAP_AUTO
    return device, parse_max_memory(args.max_memory) if args.max_memory is not None else None


def cmd_index(args, settings: Settings) -> None:
    t0 = time.time()
    device, max_memory = placement(args)
    index_model(
        settings, args.model, args.name, device=device or "auto", dtype=args.dtype, max_memory=max_memory,
        decode_norm=args.decode_norm,
        force=args.force, layers_per_job=args.layers_per_job, corpus_shards=args.corpus_shards, queue_only=args.queue,
        corpus=args.corpus, tokens=args.tokens, context=args.context,
        features=args.features, probe_corpus=args.probe_corpus, probe_tokens=args.probe_tokens,
        probe_method=args.probe_method,
        clamp_prompt=args.clamp_prompt,
    )
    if args.queue:
        print(f"Queued {args.name}: run `needle worker` to compute it.")
    else:
        print(f"Indexed {args.name} in {time.time() - t0:.1f}s. Browse it with `needle serve`: "
              f"http://{settings.host}:{settings.port}/{args.name}")


def add_probe_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--features", nargs="+", metavar="SPEC", required=required,
                   help="feature datasets to probe: text (token rules), python (Python code, from the stdlib), "
                   "or a .jsonl file of your own")
    p.add_argument("--probe-corpus", default="stdlib", metavar="SPEC", help="the corpus the text features label (default stdlib)")
    p.add_argument("--probe-tokens", type=positive_int, default=32_768, help="tokens per feature dataset (default 32768)")
    p.add_argument("--method", dest="probe_method", default="needle", choices=["needle", "paper"],
                   help="needle (default: a stratified split, neurons scaled to std 1) or paper (the paper's code's "
                   "settings: its split and seed 1, neurons scaled to std 0.1), to compare with published figures")


def cmd_probe(args, settings: Settings) -> None:
    from app import queries
    from app.db import get_engine, require_migrated, session_scope

    check_name(args.name)
    engine = get_engine(settings)
    require_migrated(engine)
    with session_scope(engine) as s:
        model = queries.get_model(s, args.name)
        if model is None:
            raise NeedleError(
                f"There is no model named {args.name!r} here.",
                hint=f"Index it first: needle index MODEL --name {args.name} (add --features to probe in the same run).",
            )
        source, device, dtype, decode_norm = model.source, model.device, model.dtype, model.decode_norm
        max_memory = (model.info or {}).get("max_memory")
    t0 = time.time()
    index_model(
        settings, source, args.name, device=args.device or device, dtype=dtype, max_memory=max_memory,
        decode_norm=decode_norm,
        force_probes=args.force, queue_only=args.queue, context=args.context, clamp=False,
        features=args.features, probe_corpus=args.probe_corpus, probe_tokens=args.probe_tokens,
        probe_method=args.probe_method,
    )
    if args.queue:
        print(f"Queued probes of {args.name}: run `needle worker` to compute them.")
    else:
        print(f"Probed {args.name} in {time.time() - t0:.1f}s: "
              f"http://{settings.host}:{settings.port}/{args.name}/features")


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise NeedleError(
                f"Cannot serve on {host}:{port}: {exc.strerror or exc}.",
                hint="Stop what is using that port, or pass --port with another number.",
            ) from None


def serve(settings: Settings, host: str, port: int, *, with_worker: bool = False, processes: int = 1) -> None:
    import uvicorn

    from app.db import get_engine, require_migrated
    from app.main import create_app
    from needle.serving import uvicorn_options

    engine = get_engine(settings)
    require_migrated(engine)
    check_port_free(host, port)
    if with_worker:
        start_background_worker(engine, settings)
    shown = f" in {processes} processes" if processes > 1 else ""
    print(f"Needle is serving at http://{host}:{port}/{shown}  (Ctrl-C to stop)", flush=True)
    # X-Forwarded-For from a proxy on this host is uvicorn's to apply only when NEEDLE_TRUST_PROXY says so
    # (app/security.py counts live requests per client address); idle and slow connections are
    # closed, and connections capped, as needle/serving.py says
    if processes > 1:
        serve_processes(settings, host, port, processes)
    else:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", proxy_headers=settings.trust_proxy,
                    **uvicorn_options(settings))


def serve_processes(settings: Settings, host: str, port: int, processes: int) -> None:
    """The app in `processes` server processes sharing one listening socket (uvicorn's own
    supervisor restarts one that dies). The socket is made here (listening_socket): uvicorn's own
    `--workers` socket is not an IPPROTO_TCP one, so asyncio left TCP_NODELAY off and each small
    answer waited ~40 ms for a delayed ACK. Each process builds the app from the environment
    (settings are read from NEEDLE_* variables); the database URL is put there in case it came
    from the default."""
    import os

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from needle.serving import uvicorn_options

    os.environ["NEEDLE_DATABASE_URL"] = settings.resolved_database_url()
    sock = listening_socket(host, port)
    config = uvicorn.Config("app.main:create_app", factory=True, host=host, port=port, workers=processes,
                            log_level="warning", proxy_headers=settings.trust_proxy, **uvicorn_options(settings))
    try:
        Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def listening_socket(host: str, port: int):
    """A TCP socket listening on host:port, made as IPPROTO_TCP so that asyncio sets TCP_NODELAY
    on the connections it accepts (serve_processes)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def start_background_worker(engine, settings: Settings):
    """A worker thread beside the server, for users' text runs (and any other queued job)."""
    import threading

    from workers.worker import Worker

    worker = Worker(engine, settings)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": False}, daemon=True, name="needle-worker")
    thread.start()
    return worker


def cmd_inspect(args, settings: Settings) -> None:
    """What Needle finds in a model, before anything is computed or stored (no database needed)."""
    import json

    from workers.inspect import format_inspection, inspect_model

    device, max_memory = placement(args)
    info = inspect_model(args.model, device=device or "auto", dtype=args.dtype, max_memory=max_memory)
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))


def cmd_serve(args, settings: Settings) -> None:
    serve(settings, args.host or settings.host, args.port or settings.port, with_worker=args.with_worker,
          processes=args.processes)


def cmd_demo(args, settings: Settings) -> None:
    """Serve the demo model at once, its stages queued for a worker thread beside the server,
    which fills its pages in (they say what is not computed yet); with --no-serve, index it here
    and exit. A demo whose stages are all done queues nothing; one stopped half-way goes on."""
    from app.db import get_engine, upgrade

    engine = get_engine(settings)
    upgrade(engine)
    name = settings.demo_name

    def index(queue_only: bool) -> None:
        index_model(settings, str(DEMO_MODEL), name, device=args.device, corpus=settings.demo_corpus,
                    tokens=settings.demo_tokens, features=list(DEMO_FEATURES),
                    probe_tokens=settings.demo_probe_tokens, queue_only=queue_only)

    indexed = _model_is_indexed(settings, name)
    if indexed:
        print(f"The demo model {name!r} is already indexed; skipping.", flush=True)
    if args.no_serve:
        if not indexed:
            print(f"Indexing the demo model {name!r} from {DEMO_MODEL} ...", flush=True)
            index(queue_only=False)
        demo_sae(settings, name, queue_only=False, device=args.device)
        return
    host, port = args.host or settings.host, args.port or settings.port
    check_port_free(host, port)  # before anything is queued
    if not indexed:
        print(f"Queuing the demo model {name!r} from {DEMO_MODEL}: a worker thread computes its decodings, "
              "examples, probes and clamp curves while the pages are served, and the model page shows "
              "what is done and what is left.", flush=True)
        index(queue_only=True)
    demo_sae(settings, name, queue_only=True, device=args.device)
    print(f"Open http://{host}:{port}/{name}", flush=True)

    def terminate(signum, frame):
        raise SystemExit(0)  # as Ctrl-C: the jobs in hand go back to the queue (below)

    worker = start_background_worker(engine, settings)
    try:
        signal.signal(signal.SIGTERM, terminate)
        serve(settings, host, port)
    except SystemExit:
        pass  # SIGTERM: stop as on Ctrl-C
    finally:
        released = release_jobs(engine, worker)
        if released:
            print(f"Stopped: the job in hand ({', '.join(released)}) went back to the queue, and the next "
                  "`needle demo` goes on from there.", file=sys.stderr, flush=True)
    # The worker thread may be inside a stage's native code (torch, BLAS threads), which the
    # interpreter's shutdown around it would abort ("terminate called without an active
    # exception"): leave at once, what it computed being stored or given back above.
    sys.stdout.flush()
    os._exit(0)


def demo_sae(settings: Settings, name: str, *, queue_only: bool, device: str | None = None) -> None:
    """Import the shipped SAE of the demo model (once), its latents' jobs queued behind the model's."""
    from app import queries
    from app.db import get_engine, session_scope
    from needle.sae import import_folder

    with session_scope(get_engine(settings)) as s:
        model = queries.get_model(s, name, tokenizer=False)
        if model is None or queries.get_sae(s, model.id, DEMO_SAE_NAME) is not None or not DEMO_SAE.is_dir():
            return
    import_folder(settings, name, str(DEMO_SAE), sae_name=DEMO_SAE_NAME, queue_only=queue_only,
                  device=None if device in (None, "auto") else device)


def release_jobs(engine, worker) -> list[str]:
    """Stop `worker` (a thread of this process, which is ending) from claiming more jobs and give
    the ones it holds back to the queue, for the next run to take up at once (rather than after
    NEEDLE_STALE_SECONDS without heartbeats). Returns them as "model stage part"."""
    from sqlalchemy.exc import DBAPIError

    from app import queries
    from app.db import StorageError, session_scope

    worker.stopping.set()
    released = []
    try:
        with session_scope(engine) as s:
            for job, model in queries.list_jobs(s, state="running"):
                if job.worker == worker.name:
                    queries.release_job(s, job.id, worker.name)
                    released.append(f"{model} {job.stage} {job.key}")
    except (DBAPIError, StorageError) as exc:  # unreachable, full or read-only
        why = exc.message if isinstance(exc, StorageError) else "database unreachable"
        print(f"could not give the jobs in hand back to the queue ({why}): they go back "
              "once their heartbeats are stale", file=sys.stderr)
        return []
    return released


def cmd_worker(args, settings: Settings) -> None:
    from app.db import get_engine, require_migrated
    from workers.worker import Worker

    device, max_memory = placement(args)
    if device is not None:
        from workers.loading import resolve_device

        device = resolve_device(device)  # a GPU that is not there is an error now, not in a job
    engine = get_engine(settings)
    require_migrated(engine)
    worker = Worker(engine, settings, device=device, max_memory=max_memory, on_wait=say)

    def terminate(signum, frame):
        # the job in hand goes back to the queue (Worker.run_job releases it on SystemExit)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    print(f"worker {worker.name} waiting for jobs on {engine.url.render_as_string(hide_password=True)}", flush=True)
    try:
        summary = worker.run(until_idle=args.until_idle)
    except SystemExit:
        print(f"worker {worker.name}: terminated; the job in hand, if any, is back in the queue", flush=True)
        raise
    print(f"worker {worker.name}: {len(summary.done)} done, {len(summary.failed)} failed attempts, "
          f"models loaded: {worker.cache.loads}")


def cmd_db(args, settings: Settings) -> None:
    from app.db import current_revision, get_engine, head_revision, known_revision, safe_url, upgrade

    engine = get_engine(settings)
    if args.db_command == "upgrade":
        upgrade(engine)
        print(f"{safe_url(engine)} is at schema {current_revision(engine)} (head).")
    else:
        cur, head = current_revision(engine), head_revision()
        state = ""
        if cur is not None and cur != head and not known_revision(cur):
            state = " (written by a newer Needle: upgrade Needle)"
        elif cur != head:
            state = " (run `needle db upgrade`)"
        print(f"{safe_url(engine)}: schema {cur or 'none'}, head {head}{state}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="needle", description="Find and browse the neurons of transformer language models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="serve the dashboard on the bundled demo model, indexing it (if needed) "
                       "in a worker thread beside the server")
    p.add_argument("--host")
    p.add_argument("--port", type=port)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-serve", action="store_true", help="index only, in this process, then exit")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("index", help="decode a model's MLP neurons into the database")
    p.add_argument("model", help="a Hugging Face hub id or a local folder")
    p.add_argument("--name", required=True, help="the model's name in URLs (a slug)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_placement_options(p)
    p.add_argument("--decode-norm", default="none", choices=["none", "final"],
                   help="'final' multiplies input weights by the final norm's weight before decoding")
    p.add_argument("--force", action="store_true", help="recompute what is already stored")
    p.add_argument("--layers-per-job", type=non_negative_int, default=0,
                   help="layers per decode job, and per examples job with --corpus (default 0: all in one job)")
    p.add_argument("--corpus-shards", type=positive_int, default=1,
                   help="split the examples pass over the corpus into this many jobs, for several workers "
                   "(default 1; merged exactly)")
    p.add_argument("--corpus", metavar="SPEC",
                   help="text for activation examples: a text file, a folder of them, a .jsonl with a \"text\" field, "
                   "hf:NAME[:split[:field]] or stdlib")
    p.add_argument("--tokens", type=positive_int, help="read at most this many corpus tokens")
    p.add_argument("--context", type=positive_int, default=64, help="tokens per example window (default 64)")
    add_probe_options(p, required=False)
    p.add_argument("--clamp-prompt", metavar="TEXT",
                   help="the prompt of the clamp curves index precomputes and of the pages' clamp forms "
                   "(default: the first 16 tokens of --corpus, else 'The')")
    p.add_argument("--queue", action="store_true", help="only enqueue the jobs, for `needle worker`")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("inspect", help="what Needle finds in a model (family, MLP parts, head, memory), "
                       "before anything is computed or stored")
    p.add_argument("model", help="a Hugging Face hub id (in the local cache) or a local folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    add_placement_options(p)
    p.add_argument("--json", action="store_true", help="print it as one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("probe", help="sparse-probe an indexed model's neurons for labelled features")
    p.add_argument("name", help="the model's name, as given to `needle index --name`")
    add_probe_options(p, required=True)
    p.add_argument("--context", type=positive_int, default=64, help="tokens per row (default 64)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: as indexed")
    p.add_argument("--force", action="store_true", help="recompute probes stored with other settings")
    p.add_argument("--queue", action="store_true", help="only enqueue the job, for `needle worker`")
    p.set_defaults(func=cmd_probe)

    add_clamp_commands(sub)

    p = sub.add_parser("serve", help="serve the dashboard")
    p.add_argument("--host")
    p.add_argument("--port", type=port)
    p.add_argument("--with-worker", action="store_true",
                   help="also run a worker thread, for users' text runs (needs torch; `needle worker` is the other way)")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="server processes sharing the port (default 1; one Python process uses one core)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="claim and run queued jobs")
    p.add_argument("--until-idle", action="store_true", help="exit when no job is left")
    p.add_argument("--device", help="load models here (auto, cpu, cuda, cuda:N) instead of on the device "
                   "each model was indexed with")
    add_placement_options(p)
    p.set_defaults(func=cmd_worker)

    add_sae_commands(sub)
    add_compare_command(sub)
    add_jobs_command(sub)
    add_export_command(sub)

    p = sub.add_parser("db", help="database schema")
    p.add_argument("db_command", choices=["upgrade", "current"])
    p.set_defaults(func=cmd_db)
    return ap


NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|[^-]*:)")  # -5, -1e3, -.5, -50:50:41; not an option such as --json


def _join_negative_values(argv: list[str]) -> list[str]:
    """`--values -50:50:41` or `--value -1e3` would read as an unknown option: join it to
    `--values=-50:50:41` (and --layers, whose value then gets export's own error)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--values", "--layers", "--value") and NEGATIVE_VALUE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _settings() -> Settings:
    """The NEEDLE_* settings, or a NeedleError naming each variable that is not valid."""
    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(f"NEEDLE_{'_'.join(map(str, e['loc'])).upper()}={str(e.get('input'))[:60]!r}: {e['msg']}"
                             for e in exc.errors())
        raise NeedleError(f"A setting is not valid: {problems}.",
                          hint="Correct or unset that environment variable (the README lists the settings).") from None


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so that what is still buffered for a closed pipe goes nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        check_text(parser, args)
        args.func(args, _settings())
        sys.stdout.flush()  # a closed pipe is found here, not in the interpreter's last flush
    except NeedleError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; what was stored is kept, and unfinished jobs go back to the queue.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of the output went away (`needle jobs | head -1`): stop quietly, as `cat` does
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE: what the shell reports for a command stopped by a closed pipe
    except Exception as exc:
        if os.environ.get("NEEDLE_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  This is a bug in Needle; rerun with NEEDLE_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
