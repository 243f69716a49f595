#!/usr/bin/env bash
# The GPU check, one command: install what the benchmarks need into a virtualenv, run the GPU
# case of bench/decode.py, bench/examples.py, bench/probes.py, bench/clamp.py, bench/sae.py and bench/text.py one after the
# other, and print one table of their figures and ratios (docs/benchmarks.md, "bench/gpu.sh").
#
#   bench/gpu.sh                                       # one CUDA GPU: under 8 minutes of benchmarks
#   bench/gpu.sh --device cpu --small --python "$(command -v python)"   # the pipeline on tiny shapes
#
#   --device cuda|cuda:N|cpu  where the benchmarks run (default cuda; cpu needs --small)
#   --small                   tiny shapes: the same pipeline end to end in about a minute on a CPU
#   --python PATH             run with this Python and install nothing (it needs Needle's
#                             dependencies and scikit-learn)
#   --venv DIR                the virtualenv to create or reuse (default $NEEDLE_BENCH_VENV,
#                             else /tmp/needle-bench-venv)
#   --out DIR                 each benchmark's log, results.json and table.md (default: a new
#                             folder under /tmp, printed)
#   --timeout SECONDS         every benchmark's time limit (default: its own, below)
#
# The install is `pip install torch==2.13.0` (from PyPI on Linux that is the CUDA build), then
# `pip install -e . scikit-learn`, both pinned by constraints.txt, the tested set. Exit
# status: 0 when every benchmark ran, 1 when one failed or ran out of time (its row says which;
# the others still run and the table is printed), 2 for a bad argument, a failed install or no
# GPU. A goal not met is a figure, not a failure.
set -uo pipefail

usage() { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; }
die() { echo "bench/gpu.sh: $*" >&2; exit 2; }

device=cuda small=0 python="" venv="${NEEDLE_BENCH_VENV:-${TMPDIR:-/tmp}/needle-bench-venv}" out="" limit=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || die "--device needs a value: cuda, cuda:N or cpu"; device=$2; shift 2 ;;
    --small) small=1; shift ;;
    --python) [ $# -ge 2 ] || die "--python needs a path"; python=$2; shift 2 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; venv=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs a number of seconds"; limit=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see bench/gpu.sh --help)" ;;
  esac
done
case "$device" in
  cpu|cuda|cuda:[0-9]|cuda:[0-9][0-9]) ;;
  *) die "--device '$device' is not cuda, cuda:N or cpu" ;;
esac
if [ "$device" = cpu ] && [ "$small" = 0 ]; then
  die "--device cpu runs the small shapes only: add --small (the full run is Llama-8B shapes, for a GPU)"
fi
if [ -n "$limit" ] && ! [[ "$limit" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  die "--timeout '$limit' is not a number of seconds"
fi
absolute() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }  # symlinks kept: a venv's python is one
if [ -n "$python" ]; then
  found=$(command -v -- "$python") || die "--python '$python': no such program"
  python=$(absolute "$found")
fi
if [ -n "$out" ]; then
  mkdir -p "$out" || die "--out '$out': cannot create that folder"
  out=$(cd "$out" && pwd)
fi
cd "$(dirname "$0")/.." || exit 2

# ---- install ---------------------------------------------------------------------------------
if [ -n "$python" ]; then
  py=$python
else
  py="$venv/bin/python"
  if [ ! -x "$py" ]; then
    echo "virtualenv: $venv"
    # without ensurepip (Debian's python3 without python3-venv), the system's pip serves the venv
    python3 -m venv "$venv" >/dev/null 2>&1 ||
      python3 -m venv --clear --without-pip --system-site-packages "$venv" ||
      die "could not create a virtualenv at $venv (python3 -m venv failed): give --venv DIR or --python PATH"
  fi
  echo "installing torch==2.13.0, then Needle and scikit-learn into $venv ..."
  started=$SECONDS
  "$py" -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 ||
    die "pip install torch==2.13.0 failed (above)"
  "$py" -m pip install -q --disable-pip-version-check -c constraints.txt -e . scikit-learn ||
    die "pip install -e . scikit-learn failed (above)"
  echo "installed in $((SECONDS - started)) s"
fi

# ---- the machine -----------------------------------------------------------------------------
"$py" - "$device" <<'EOF' || exit 2
import platform
import sys

sys.path.insert(0, "bench")
from machine import cpu_name  # bench/machine.py

try:
    import torch
except ImportError as exc:
    sys.exit(f"bench/gpu.sh: {sys.executable} cannot import torch ({exc}): leave out --python to install it")
device = sys.argv[1]
cuda = torch.version.cuda or "none"
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit(f"bench/gpu.sh: torch {torch.__version__} (CUDA {cuda}) sees no GPU"
                 + (": it is a CPU build; install the CUDA one (plain `pip install torch==2.13.0` from PyPI)"
                    if torch.version.cuda is None else ": check nvidia-smi and CUDA_VISIBLE_DEVICES")
                 + ", or run --device cpu --small")
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        sys.exit(f"bench/gpu.sh: --device {device}, but torch sees {torch.cuda.device_count()} GPU(s)")
    where = f"{torch.cuda.get_device_name(index)}, CUDA {cuda}"
else:
    where = cpu_name()
print(f"machine: {where}; torch {torch.__version__}; Python {platform.python_version()} ({sys.executable})")
EOF

# ---- the benchmarks --------------------------------------------------------------------------
# name (bench/NAME.py; a second case of one script is NAME-CASE), time limit in seconds, arguments.
# The full run's limits add up to 10.75 minutes.
if [ "$device" = cpu ]; then small_cap=cpu=600KB; else small_cap=cuda:0=600KB; fi
if [ "$small" = 1 ]; then
  runs=(
    "decode 180 --shape tiny --device $device --batch 128"
    "examples 180 --shape tiny --device $device --tokens 4096 --repeats 1 --memory-batches 1"
    # the same stage on the tiny shape spread by --device-map auto (a cap below its 0.9 MB), against one device
    "examples-map 120 --shape tiny --device $device --dtype float32 --tokens 4096 --repeats 1 --device-map auto --max-memory $small_cap"
    "probes 180 --synthetic 2 2 2000 64 --prune-pairs 1 --device $device"
    "clamp 180 --device $device --repeats 2 --count 11"
    "sae 180 --small --device $device --repeats 1"
    "text 180 --device $device --repeats 2 --tokens 4096 --no-sae"
  )
else
  runs=(
    # Llama-3.1-8B's shape in bf16: 458,752 neurons against a 128,256-token vocabulary
    "decode 75 --shape llama-8b --device $device --dtype bfloat16"
    # Llama-3-8B's shape, bf16: 327,680 tokens, so the estimate pass is at its floor of 1/20
    "examples 210 --shape llama-8b --device $device --repeats 2 --memory-batches 4"
    # Llama-3.2-1B's shape (2.5 GB in bf16) with cuda:0 capped at 1 GiB: spread over the GPU and the CPU, against the GPU alone
    "examples-map 60 --shape llama-1b --device $device --dtype bfloat16 --tokens 32768 --repeats 2 --device-map auto --max-memory cuda:0=1GiB"
    # the demo's built-in features x 4 layers; sklearn on the CPU beside it (no saga pruning: 40 s a pair)
    "probes 120 --device $device --prune-pairs 0"
    # the demo model's default 41-value sweep
    "clamp 45 --device $device"
    # the demo's shipped SAE: training steps, the latents' examples pass, its quality
    "sae 90 --device $device"
    # what fires on a 2,000-character text: every neuron and the demo SAE's latents, against one forward pass
    "text 45 --device $device"
  )
fi

[ -n "$out" ] || out=$(mktemp -d "${TMPDIR:-/tmp}/needle-gpu.XXXXXX")
json_dir=$(mktemp -d "${TMPDIR:-/tmp}/needle-gpu-json.XXXXXX")
trap 'rm -rf "$json_dir"' EXIT
rows=()
failed=0
for run in "${runs[@]}"; do
  read -r name seconds args <<<"$run"
  seconds=${limit:-$seconds}
  log="$out/$name.log"
  printf '%s: bench/%s.py %s (limit %s s) ... ' "$name" "${name%%-*}" "$args" "$seconds"
  started=$(date +%s.%N)
  # shellcheck disable=SC2086  # $args is a list of words
  PYTHONUNBUFFERED=1 timeout -k 5 "$seconds" "$py" "bench/${name%%-*}.py" $args --json-out "$json_dir/$name.json" \
    >"$log" 2>&1
  rc=$?
  took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 0 ] && [ -s "$json_dir/$name.json" ]; then
    echo "ok in $took s"
  else
    failed=1
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "TIMED OUT after $took s"; else echo "FAILED (exit $rc) in $took s"; fi
    if [ -s "$log" ]; then echo "  last lines of $log:"; tail -n 15 "$log" | sed 's/^/    /'; else echo "  (nothing in $log)"; fi
  fi
  rows+=("$name:$rc:$took:$seconds")
done

# ---- the table -------------------------------------------------------------------------------
"$py" - "$out" "$json_dir" "$device" "$small" "${rows[@]}" <<'EOF' || failed=1
import json
import sys
from pathlib import Path

out, json_dir, device, small = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"


def num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def decode(r: dict) -> list[str]:
    big = r["shape"] == "llama-8b" and device.startswith("cuda")
    goal = f"< 3 s: {met(r['decode_s'] < 3)}" if big else f"decode / bare <= 1.5: {met(r['ratio'] <= 1.5)}"
    return [f"{r['shape']}, {r['neurons']:,} neurons, {r['dtype']}", f"{num(r['decode_s'])} s "
            f"({num(r['neurons_per_s'])} neurons/s)", f"bare matmuls {num(r['bare_matmuls_s'])} s",
            f"decode / bare {r['ratio']:.2f}", goal]


def examples(r: dict) -> list[str]:
    tps, ratio = r["tokens_per_s"], r["ratio_stage_over_bare"]
    return [f"{r['model']}, {r['tokens']:,} tokens, {r['dtype']}", f"stage {num(tps['stage'])} tokens/s",
            f"bare forward {num(tps['bare'])} tokens/s", f"stage / bare {ratio:.0%}",
            f">= {r['goal']:.0%}: {met(r['goal_met'])}"]


def examples_map(r: dict) -> list[str]:
    tps = r["tokens_per_s"]
    return [f"{r['model']}, {r['tokens']:,} tokens, {r['dtype']}, device map over {' + '.join(r['device_map_places'])} "
            f"({r['max_memory']})", f"device map {num(tps['device_map'])} tokens/s",
            f"one {r['one_device']} {num(tps['one_device'])} tokens/s",
            f"map / one {r['ratio_device_map_over_one_device']:.0%}",
            f"spread over more than one place: {met(len(r['device_map_places']) > 1)}"]


def probes(r: dict) -> list[str]:
    best = min(r["sklearn_s"], key=r["sklearn_s"].get)
    return [f"{r['features']} features x {r['layers_probed'] // max(r['features'], 1)} layers",
            f"{num(r['ours_s'])} s", f"sklearn {best} {num(r['sklearn_s'][best])} s",
            f"sklearn / ours {r['ratio'][best]:.2f}x",
            f">= {r['goal']:g}x, max dF1 {r['max_abs_dF1'][best]:.3f} <= 0.02: {met(r['goal_met'][best])}"]


def clamp(r: dict) -> list[str]:
    ms = r["ms_median"]
    return [f"demo layer {r['layer']}, {r['values']} values, {r['dtype']}", f"{num(ms['ours'])} ms",
            f"sequential {num(ms['sequential'])} ms", f"sequential / ours {r['ratio_sequential_over_ours']:.1f}x",
            f">= {r['goal']:g}x: {met(r['goal_met'])}"]


def sae(r: dict) -> list[str]:
    t, e, q = r["train"], r["examples"], r["quality"]
    return [f"{q['latents']:,} latents ({r['steps']} training steps of {r['batch']}, examples on "
            f"{q['examples_tokens']:,} tokens): L0 {q['l0']:.1f}, variance explained {q['variance_explained']:.3f}, "
            f"CE recovered {q['ce_recovered']:.3f}",
            f"train {num(t['needle_acts_per_s'])} act/s; examples {num(e['stage_tok_per_s'])} tokens/s",
            f"SAELens step {num(t['bare_acts_per_s'])} act/s (SAETrainer {num(t['trainer_acts_per_s'])}); "
            f"forward + encode {num(e['bare_tok_per_s'])} tokens/s",
            f"train / SAELens step {t['ratio']:.0%} (/ SAETrainer {t['trainer_ratio']:.0%}), examples / bare {e['ratio']:.0%}",
            f"train >= 80%: {met(t['ratio'] >= 0.8)}; examples >= 70%: {met(e['ratio'] >= 0.7)}"]


def text(r: dict) -> list[str]:
    return [f"{r['chars']:,} characters ({r['tokens']} tokens), {r['units']:,} units", f"{num(r['scan_ms'])} ms",
            f"forward {num(r['forward_ms'])} ms", f"scan / forward {r['ratio']:.2f}x",
            f"<= {r['goal']:g}x: {met(r['goal_met'])}"]


header = ["benchmark", "case", "ours", "baseline", "ratio", "goal", "run"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
results, machine, unreadable = {}, None, False
for row in sys.argv[5:]:
    name, rc, took, limit = row.split(":")
    path = json_dir / f"{name}.json"
    result = json.loads(path.read_text()) if rc == "0" and path.is_file() and path.stat().st_size else None
    if result is None:
        run = f"TIMED OUT after {limit} s" if rc in ("124", "137") else f"FAILED (exit {rc})"
        cells = ["-"] * 5
        cells[0] = f"see {out / (name + '.log')}"
    else:
        run = f"ok, {took} s"
        try:
            cells = globals()[name.replace("-", "_")](result)
        except (KeyError, TypeError, ValueError) as exc:  # a figure missing from its JSON: say so, keep the table
            cells, run, unreadable = ["-"] * 5, f"FAILED: its figures could not be read ({exc!r})", True
        if machine in (None, "cpu"):
            machine = result.get("device")
    results[name] = {"exit": int(rc), "seconds": float(took), "limit_s": float(limit), "ok": result is not None,
                     "result": result}
    lines.append("| " + " | ".join([name, *cells, run]) + " |")
table = "\n".join(lines) + "\n"
(out / "table.md").write_text(table)
summary = {"device": device, "small": small, "machine": machine, "benchmarks": results}
(out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
print()
print(table, end="")
print(f"\n{'small shapes' if small else 'full run'} on {machine or device}; logs, results.json and table.md in {out}")
sys.exit(1 if unreadable else 0)
EOF
exit "$failed"
