"""Int8Linear against nn.Linear on one 4096 x 4096 layer for 1-128 input rows (eager, medians of 10): the int8
kernel row by row (what a decode batch uses) against dequantising the weight (what larger inputs use).

    .venv/bin/python benchmarks/bench_int8_rows.py --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

import llama2.generate.int8 as Q
from llama2.generate import Int8Linear


def median_ms(fn, reps: int = 10) -> float:
    fn(), fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lin = torch.nn.Linear(4096, 4096, bias=False)
    q = Int8Linear.from_linear(lin)
    limit = Q._GEMV_ROWS
    print("| rows | fp32 | int8, dequantised | int8, row by row | max abs err |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for n in (1, 2, 8, 32, 64, 128):
            x = torch.randn(n, 4096)
            fp = median_ms(lambda: lin(x))
            Q._GEMV_ROWS = 10**6
            rows = median_ms(lambda: q(x))
            Q._GEMV_ROWS = 0
            deq = median_ms(lambda: q(x)) if n > 1 else float("nan")
            Q._GEMV_ROWS = limit
            err = (q(x) - lin(x)).abs().max().item()
            print(f"| {n} | {fp:.1f} ms | {deq:.1f} ms | {rows:.1f} ms | {err:.3g} |")


if __name__ == "__main__":
    main()
