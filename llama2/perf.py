"""Performance accounting: model FLOPs per token, the machine's matmul rate, peak memory.

MFU (model FLOPs utilisation) = flops_per_token * tokens/s / peak FLOP/s. The peak used here is *measured*
(``measure_matmul_flops``: the best rate of a large square matmul on this device and dtype), not a datasheet
figure, so on a CPU the MFU says how much of what the matmul library can do the training step achieves.
"""
from __future__ import annotations

import time

import torch

from .model import ModelArgs
from .ops import onednn_ok, onednn_linear

__all__ = ["matmul_params", "flops_per_token", "measure_matmul_flops", "peak_memory_bytes", "reset_peak_memory",
           "current_rss_bytes"]


def matmul_params(args: ModelArgs) -> int:
    """Parameters that take part in a matmul: every projection of every block plus the output head. Not the
    embedding table (a lookup, no FLOPs) and not the RMSNorm gains (elementwise, negligible)."""
    c, kvd = args.dim, args.n_kv_heads * args.head_dim
    per_layer = 2 * c * c + 2 * c * kvd + 3 * c * args.hidden_dim  # wq, wo, wk, wv; w1, w2, w3
    head = args.vocab_size * c if args.head == "lm" else c
    return args.n_layers * per_layer + head


def flops_per_token(args: ModelArgs, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token of a forward + backward pass over sequences of ``seq_len`` tokens:

        6 * N + 12 * n_layers * dim * seq_len

    as in PaLM (Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with Pathways", Appendix B): 6 FLOPs
    per matmul parameter per token (2 in the forward, 4 in the backward), N = ``matmul_params(args)``, plus the
    attention scores (Q K^T) and the weighted sum of values (A V), 2 * 2 * dim * seq_len in the forward per
    layer and twice that in the backward. Like PaLM it counts the full seq_len x seq_len score matrix, not the
    causal half, and ignores elementwise work (norms, softmax, rotary, SwiGLU's product). Rematerialisation
    (activation checkpointing) is not counted: these are *model* FLOPs, not hardware FLOPs.
    ``training=False``: forward only, a third of that.
    """
    total = 6.0 * matmul_params(args) + 12.0 * args.n_layers * args.dim * seq_len
    return total if training else total / 3.0


_MATMUL_CACHE: dict[tuple, float] = {}


def measure_matmul_flops(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                         reps: int = 5) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul on ``device`` in ``dtype``: the best of ``reps`` timed runs after a
    warm-up, 2 n^3 FLOPs each, of ``torch.mm`` and (CPU fp32) of oneDNN's linear, which the model's layers call.
    Cached in-process per (device, dtype, n, CPU thread count), since it costs a second or so."""
    device = torch.device(device)
    key = (str(device), dtype, n, torch.get_num_threads() if device.type == "cpu" else None)
    if key in _MATMUL_CACHE:
        return _MATMUL_CACHE[key]
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kernels = [lambda: torch.mm(a, b, out=out)]
    if onednn_ok(a, b):  # the kernel our CPU layers call
        kernels.append(lambda: onednn_linear(a, b))
    best = float("inf")
    for kernel in kernels:
        kernel()  # warm-up: threads, caches, kernel selection
        sync()
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            kernel()
            sync()
            best = min(best, time.perf_counter() - t0)
    _MATMUL_CACHE[key] = 2.0 * n**3 / best
    return _MATMUL_CACHE[key]


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux) in bytes; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Peak memory of this process so far: on CUDA, the most bytes the caching allocator had handed out
    (``torch.cuda.max_memory_allocated``); elsewhere the peak resident set size (VmHWM), which includes
    everything the process holds (the Python interpreter, torch's libraries), 0 if the OS does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _proc_status_bytes("VmHWM")


def reset_peak_memory(device: str | torch.device = "cpu") -> bool:
    """Start a new peak: on CUDA reset the allocator's peak statistics; elsewhere reset VmHWM to the current RSS
    (Linux >= 4.0, by writing 5 to /proc/self/clear_refs). False if it could not be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS), in bytes; 0 if the OS does not say."""
    return _proc_status_bytes("VmRSS")
