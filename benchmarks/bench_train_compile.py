"""Is ``torch.compile`` of the training step faster on this CPU? Eager against compiled, toy shapes, fp32.

The step is the pretraining loop's: ``loss = model(x, targets=y)`` (the fused head + cross-entropy), backward,
``clip_grad_norm_(1.0)``, the paper's AdamW (``llama2.train.loop.make_optimizer``), ``zero_grad``. "compiled" is
what ``compile=true`` does in ``llama2.train.loop``: ``block.compile()`` on each transformer block (as FSDP wraps
them), the head and the loss staying eager. Shapes: the default pipeline's pretraining (toy-small with its
1024-piece vocabulary, 8 x 256 tokens) and toy-25m (dim 384, 6 layers, vocab 8000, 8 x 256). Each variant gets a
fresh model with the same weights; steps are timed in turns after the compile (whose time is reported).

    .venv/bin/python benchmarks/bench_train_compile.py [--threads N] [--steps 6]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import torch  # noqa: E402

from llama2.model import ModelArgs, Transformer  # noqa: E402


def make_step(model):
    from llama2.train.loop import make_optimizer

    opt = make_optimizer(model, 3e-4, 0.1)

    def step(x, y):
        loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    load_start = C.load_average()
    rows = []
    for name, args in (("toy-small, vocab 1024 (pipeline pretraining)", ModelArgs.from_preset("toy-small", vocab_size=1024, max_seq_len=256)),
                       ("toy-25m", ModelArgs.from_preset("toy-25m", max_seq_len=256))):
        base = Transformer(args).init_weights(seed=0)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, args.vocab_size, (8, 257), generator=g)
        x, y = x[:, :-1], x[:, 1:]
        eager_m, comp_m = copy.deepcopy(base).train(), copy.deepcopy(base).train()
        for block in comp_m.layers:
            block.compile()
        steps = {"eager": make_step(eager_m), "compiled blocks": make_step(comp_m)}
        t0 = time.perf_counter()
        l_c = steps["compiled blocks"](x, y)
        compile_s = time.perf_counter() - t0
        l_e = steps["eager"](x, y)
        ts = C.timeit_interleaved({k: (lambda f=f, x=x, y=y: f(x, y)) for k, f in steps.items()}, opts.steps, warmup=1)
        e, c = C.median(ts["eager"]), C.median(ts["compiled blocks"])
        print(f"{name}: first-step loss eager {l_e.item():.6f} compiled {l_c.item():.6f}; first compiled step {compile_s:.1f} s; "
              f"step eager {e * 1e3:.0f} ms, compiled {c * 1e3:.0f} ms (medians)")
        rows.append([name, f"{e * 1e3:.0f}", f"{c * 1e3:.0f}", f"{e / c:.2f}x", f"{min(ts['eager']) / min(ts['compiled blocks']):.2f}x",
                     f"{compile_s:.1f}", f"{compile_s / max(1e-9, e - c):.0f}" if e > c else "never"])
    print()
    print(C.markdown_table(["model (8 x 256 tokens)", "eager ms/step", "compiled ms/step", "speed-up (median)", "best-of",
                            "first compiled step (s)", "steps to repay"], rows))
    print(f"\n(threads {opts.threads}; {opts.steps} steps each in turns after a warm-up; load average {load_start} at start, "
          f"{C.load_average()} at end)")


if __name__ == "__main__":
    main()
