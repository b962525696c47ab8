"""fp32 matrix products on the CPU: ``F.linear`` (MKL's sgemm in PyTorch's CPU wheels) against oneDNN's linear
(``llama2.ops.onednn_linear``, what ``llama2.ops.cpu_linear`` and the engine call), at the shapes
of the toy pipeline's inference passes (dim 256, FFN 688, vocabulary 1024; rows = batch x tokens) and at
bench-100m's (dim 768). Both kernels on the same tensors, in turns; median of 5 rounds. ``--bf16`` adds
``F.linear`` on bf16 copies of the tensors (what ``dtype=bfloat16`` autocast would multiply).

    .venv/bin/python benchmarks/bench_linear.py [--threads 2] [--bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama2.ops import onednn_linear


def per_call(fn, n: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time F.linear on bf16 copies of the tensors")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads; ms per call (GFLOP/s)")
    print("| rows | out x in | F.linear (MKL) | oneDNN | speed-up |" + (" F.linear bf16 | bf16/MKL fp32 |" if a.bf16 else "")
          + "\n|---|---|---|---|---|" + ("---|---|" if a.bf16 else ""))
    for rows in (64, 320, 1280):
        for out_f, in_f in ((256, 256), (688, 256), (256, 688), (1024, 256), (768, 768), (2048, 768)):
            x, w = torch.randn(rows, in_f), torch.randn(out_f, in_f)
            torch.testing.assert_close(onednn_linear(x, w), torch.nn.functional.linear(x, w),
                                       atol=1e-3, rtol=1e-4)
            n = max(20, int(2e9 / (2 * rows * out_f * in_f)))
            mkl, dnn = [], []
            for _ in range(5):
                mkl.append(per_call(lambda: torch.nn.functional.linear(x, w), n))
                dnn.append(per_call(lambda: onednn_linear(x, w), n))
            m, d = statistics.median(mkl), statistics.median(dnn)
            flop = 2 * rows * out_f * in_f
            extra = ""
            if a.bf16:
                xb, wb = x.bfloat16(), w.bfloat16()
                b = statistics.median(per_call(lambda: torch.nn.functional.linear(xb, wb), n) for _ in range(5))
                extra = f" {b * 1e3:.3f} ({flop / b / 1e9:.0f}) | {m / b:.2f}x |"
            print(f"| {rows} | {out_f} x {in_f} | {m * 1e3:.3f} ({flop / m / 1e9:.0f}) | {d * 1e3:.3f} "
                  f"({flop / d / 1e9:.0f}) | {m / d:.2f}x |" + extra)


if __name__ == "__main__":
    main()
