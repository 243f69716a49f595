"""What the benchmarks share: memory and machine figures of this process, and a device sync."""

from __future__ import annotations

import ctypes
import gc
import platform
from pathlib import Path


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM = peak), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_rss_peak() -> None:
    """Set VmHWM back to the current resident size (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def trim_heap() -> None:
    """Free what Python and the C heap hold on to, so one phase's leftovers do not count in the next."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch  # here, so that a benchmark without torch (bench/server.py) can use the rest

        torch.cuda.synchronize()


def report(result: dict, json_out) -> None:
    """Print a benchmark's figures as JSON and, with --json-out FILE, write them there too (bench/gpu.sh reads it)."""
    import json

    print(json.dumps(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result))
