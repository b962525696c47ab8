"""Shared helpers for the benchmarks: environment report, timing, memory bandwidth, markdown tables."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        info["transformers"] = None
    return info


def timeit(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timeit_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Like ``timeit`` for several functions, run in turns (a b a b ...), so that load from other processes on a
    shared machine falls on all of them alike instead of on whichever happened to run at the time."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def memory_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Best-of-``reps`` bytes/s of a large ``dst.copy_(src)``, counting the bytes read plus the bytes written."""
    n = int(gib * (1 << 30)) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    best = min(timeit(lambda: dst.copy_(src), reps, warmup=1))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / best


def gemv_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Best-of-``reps`` bytes/s of a matrix-vector product over a ``gib`` GiB fp32 matrix (the matrix bytes
    only): the read-only streaming rate that batch-1 decoding actually needs, usually above the copy rate."""
    cols = 4096
    rows = int(gib * (1 << 30)) // 4 // cols
    w = torch.ones(rows, cols, dtype=torch.float32)
    x = torch.ones(cols, dtype=torch.float32)
    best = min(timeit(lambda: torch.mv(w, x), reps, warmup=1))
    nbytes = w.numel() * w.element_size()
    del w
    return nbytes / best


def gemv_chain_seconds(matrices: list[torch.Tensor], reps: int = 10) -> float:
    """Best-of-``reps`` seconds to multiply a 1-token vector by each matrix in turn (``F.linear``, as a decode step does):
    the weight-streaming time of one batch-1 decode step with every other cost removed."""
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in matrices}
    with torch.inference_mode():
        times = timeit(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in matrices], reps, warmup=2)
    return min(times)  # a floor: the best this machine did


def cpu_steal_snapshot() -> tuple[int, int]:
    """(steal, total) jiffies from /proc/stat; steal is time the hypervisor gave this VM's CPUs to others."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return (vals[7] if len(vals) > 7 else 0), sum(vals[:8])
    except (OSError, ValueError):
        return 0, 0


def steal_fraction(start: tuple[int, int]) -> float:
    steal, total = cpu_steal_snapshot()
    return (steal - start[0]) / max(1, total - start[1])


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def arguments(doc: str, threads_help: str = "torch intra-op threads (default 2)") -> argparse.ArgumentParser:
    """A benchmark's parser with the options every CPU benchmark takes: --quick, --json and --threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier figures)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--threads", type=int, default=2, help=threads_help)
    return ap


def save_json(path: str | None, results: dict) -> dict:
    """Write the figures to ``path`` (when one was asked for) and return them."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str))
    return results
