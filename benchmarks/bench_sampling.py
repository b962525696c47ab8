"""Batched sampling as the RLHF stages do it: the eager reference loop against the static engine (with and
without compaction of finished rows, eager and compiled step), CPU.

The shape is the default toy pipeline's (``llama2 pipeline``): toy-small (dim 256, 4 layers, vocab 1024, context
256), rejection sampling's batches of 8 chat prompts x K = 4 samples (32 rows) and PPO's 64 rollouts, prompts of
30-80 tokens, temperature 0.7, top-p 0.9, at most 48 new tokens. The model is random, so rows end when they draw
one of 43 "stop" tokens (about 4% a step: answers of very different lengths, as a trained policy gives), not at
a trained EOS. Each call is timed end to end (prefill, decoding, sampling, stop handling), the contenders in
turns; the table gives median and best-of times per call and the speed-up over the eager loop.

    .venv/bin/python benchmarks/bench_sampling.py [--threads N] [--quick] [--json out.json]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

from llama2.generate import generate  # noqa: E402
from llama2.model import ModelArgs, Transformer  # noqa: E402

STOPS = tuple(range(3, 46))


def main(argv: list[str] | None = None) -> dict:
    ap = C.arguments(__doc__)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    reps = 2 if opts.quick else 5
    t_start, load_start = time.perf_counter(), C.load_average()
    model = Transformer(ModelArgs.from_preset("toy-small", vocab_size=1024, max_seq_len=256)).init_weights(seed=0).eval()
    g = torch.Generator().manual_seed(0)
    results: dict = {"env": C.environment(), "threads": opts.threads}
    rows = []
    for name, n_prompts, k in (("rejection sampling: 8 prompts x 4", 8, 4), ("PPO rollouts: 64 prompts x 1", 64, 1)):
        prompts = []
        for _ in range(n_prompts):
            n = int(torch.randint(30, 81, (1,), generator=g))
            prompts += [[1] + torch.randint(46, 1024, (n - 1,), generator=g).tolist()] * k
        kw = dict(temperature=0.7, top_p=0.9, max_new_tokens=48, stop_tokens=STOPS, seed=3)
        def call(prompts=prompts, kw=kw, **path):
            return lambda: generate(model, prompts, **path, **kw)

        calls = {
            "eager (reference)": call(engine="eager"),
            "static, no compaction": call(engine="static", compile=False, compact=False),
            "static": call(engine="static", compile=False),
            "static, compiled step": call(engine="static", compile=True),
        }
        t0 = time.perf_counter()
        calls["static, compiled step"]()  # compiles (the batch shrinks as rows finish: a few shapes)
        calls["static, compiled step"]()
        compile_s = time.perf_counter() - t0
        ts = C.timeit_interleaved(calls, reps, warmup=1)
        lengths = [len(c.tokens) for c in calls["static"]()]
        base = C.median(ts["eager (reference)"])
        res = {k: {"median_s": C.median(v), "best_s": min(v), "times_s": v} for k, v in ts.items()}
        res.update(rows=len(prompts), new_tokens=sum(lengths), mean_len=sum(lengths) / len(lengths),
                   max_len=max(lengths), first_two_compiled_calls_s=compile_s)
        results[name] = res
        print(f"{name}: {len(prompts)} rows, {sum(lengths)} new tokens (mean {res['mean_len']:.1f}, max {max(lengths)}); "
              f"first two compiled calls {compile_s:.1f} s")
        for k, v in ts.items():
            rows.append([name, k, f"{C.median(v) * 1e3:.0f}", f"{min(v) * 1e3:.0f}", f"{base / C.median(v):.2f}x",
                         f"{min(ts['eager (reference)']) / min(v):.2f}x"])
    print()
    print(C.markdown_table(["workload", "path", "median ms/call", "best ms/call", "speed-up (median)", "best-of"], rows))
    results.update(elapsed_s=time.perf_counter() - t_start, loadavg_start=load_start, loadavg_end=C.load_average())
    print(f"\n(threads {opts.threads}; {reps} calls each after a warm-up, in turns; load average {load_start} at start, "
          f"{results['loadavg_end']} at end; total {results['elapsed_s']:.0f} s)")
    return C.save_json(opts.json, results)


if __name__ == "__main__":
    main()
