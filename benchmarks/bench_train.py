"""Training-step benchmark: our Llama 2 against Hugging Face transformers' LlamaForCausalLM, CPU fp32.

Identical config (dim 512, 8 layers, 8 heads, 2 KV heads, vocab 32000, SwiGLU hidden 1536), identical weights
(ours -> HF names, q/k rows permuted to HF's rotary layout, as `llama2 convert --to hf` writes), identical batch
(8 x 256 tokens) and the identical optimizer. A step is what a trainer does:

    loss = forward + next-token cross-entropy; loss.backward(); clip_grad_norm_(1.0);
    AdamW(betas 0.9/0.95, eps 1e-5, weight decay 0.1 on matrices, foreach).step(); zero_grad()

Ours runs ``model(x, targets=y)`` (the fused LM head + loss of ``llama2.ops``, what the trainer calls); HF runs
``hf(input_ids=x, labels=x)``, which shifts the labels itself and so scores positions 0..T-2. Ours gets the
same pairs: y = the next token at 0..T-2 and ignore_index at T-1. Before timing, the script checks that both
compute the same first-step loss and gradient norm and the same weights after one step.

Then: tokens/s of each (median and best of runs timed in turns: ours, theirs, ours, ...), MFU (model FLOPs
per token from ``llama2.perf.flops_per_token`` x tokens/s / the measured FLOP/s of a 2048^2 fp32 matmul), and
peak memory of a step in fresh subprocesses (VmHWM): ours, theirs, and ours with activation checkpointing,
against weights + grads + 2 AdamW states.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--json out.json] [--compile] [--profile]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402

from llama2.model import ModelArgs, Transformer  # noqa: E402
from llama2.perf import (  # noqa: E402
    current_rss_bytes, flops_per_token, measure_matmul_flops, peak_memory_bytes, reset_peak_memory,
)
from llama2.train.loop import make_optimizer  # noqa: E402

ARGS = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=256, max_seq_len=256)
BATCH, SEQ = 8, 256
LR, CLIP = 3e-4, 1.0
GOAL = 1.2


def build(seed: int = 0):
    """Our model (random init, seed) and HF's with the same weights, both in training mode."""
    from bench_inference import build_hf  # the same weight mapping the inference benchmark checks

    ours = Transformer(ModelArgs(**ARGS)).init_weights(seed=seed).train()
    hf = build_hf(ours).train()
    hf.config.use_cache = False
    return ours, hf


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T) input ids and y (B, T) our targets: y[:, t] = x[:, t + 1], and ignore_index at the last position,
    which HF's internal shift leaves unscored too (HF gets labels = x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, ARGS["vocab_size"], (BATCH, SEQ), generator=g)
    y = torch.full_like(x, -100)
    y[:, :-1] = x[:, 1:]
    return x, y


def make_steps(ours, hf, x, y):
    opt_ours, opt_hf = make_optimizer(ours, LR), make_optimizer(hf, LR)  # same groups: decay on matrices only

    def step(model, opt, loss_fn):
        loss = loss_fn()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), norm

    return {
        "ours": lambda: step(ours, opt_ours, lambda: ours(x, targets=y)),
        "hf": lambda: step(hf, opt_hf, lambda: hf(input_ids=x, labels=x, use_cache=False).loss),
    }


def check(ours, hf, steps) -> dict:
    """One step of each from the same start: same loss, same gradient norm, same weights after the update."""
    from llama2.checkpoint.hf import hf_tensors

    (lo, no), (lh, nh) = steps["ours"](), steps["hf"]()
    hf_sd = hf.state_dict()
    w_diff = max((v - hf_sd[k]).abs().max().item() for k, v in hf_tensors(ours))
    (lo2, _), (lh2, _) = steps["ours"](), steps["hf"]()
    out = {"loss_ours": lo.item(), "loss_hf": lh.item(), "loss_diff": abs(lo - lh).item(),
           "grad_norm_ours": no.item(), "grad_norm_hf": nh.item(), "grad_norm_rel_diff": abs(no - nh).item() / nh.item(),
           "weights_max_abs_diff_after_step": w_diff, "step2_loss_diff": abs(lo2 - lh2).item()}
    out["ok"] = out["loss_diff"] < 1e-4 and out["grad_norm_rel_diff"] < 1e-4 and w_diff < 1e-6 and out["step2_loss_diff"] < 1e-4
    return out


# -- the floor: the step's matmuls and attention kernels, nothing else ------------------------------------------
def matmul_floor_seconds(args: ModelArgs, reps: int) -> tuple[float, int]:
    """Best-of-``reps`` seconds of the GEMMs a training step cannot avoid, run back to back with no model around
    them: for every projection and the head, y = x W^T, dx = dy W, dW = dy^T x (N = batch x seq rows), plus one
    SDPA forward + backward per layer. Every implementation of this fp32 step does at least this work with these
    kernels; (step time - floor) is what an implementation can still win. The GEMMs run through the fastest fp32
    kernel this machine offers our layers (``llama2.ops._mm_t``: oneDNN on x86 CPUs, else ``torch.matmul``), so the
    floor binds ours, while transformers' ``F.linear`` may run slower ones. Returns (seconds, number of GEMMs)."""
    import torch.nn.functional as F

    from llama2.ops import _mm_t as mm_t

    g = torch.Generator().manual_seed(0)
    N, c, kvd = BATCH * SEQ, args.dim, args.n_kv_heads * args.head_dim
    shapes = [(c, c), (kvd, c), (kvd, c), (c, c), (args.hidden_dim, c), (args.hidden_dim, c), (c, args.hidden_dim)]
    shapes = shapes * args.n_layers + [(args.vocab_size, c)]
    ws = {s: torch.randn(s, generator=g) * 0.02 for s in set(shapes)}
    xs = {i: torch.randn(N, i, generator=g) for i in {s[1] for s in shapes}}
    dys = {o: torch.randn(N, o, generator=g) for o in {s[0] for s in shapes}}
    q = torch.randn(BATCH, args.n_heads, SEQ, args.head_dim, generator=g, requires_grad=True)
    k = torch.randn(BATCH, args.n_kv_heads, SEQ, args.head_dim, generator=g, requires_grad=True)
    v = torch.randn(BATCH, args.n_kv_heads, SEQ, args.head_dim, generator=g, requires_grad=True)
    do = torch.randn(BATCH, args.n_heads, SEQ, args.head_dim, generator=g)

    def run():
        for o, i in shapes:
            w, x, dy = ws[(o, i)], xs[i], dys[o]
            mm_t(x, w), mm_t(dy, w.T), mm_t(dy.T, x.T)  # y = x W^T, dx = dy W, dW = dy^T x
        for _ in range(args.n_layers):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=args.n_kv_heads != args.n_heads)
            torch.autograd.grad(out, (q, k, v), do)

    return min(C.timeit(run, reps, warmup=1)), 3 * len(shapes)


# -- memory, one variant per fresh process ---------------------------------------------------------------------
def memory_child(variant: str) -> dict:
    """Peak RSS of the second training step of one variant ("ours", "hf", "ours-ckpt"), alone in this process."""
    import gc

    torch.set_num_threads(2)
    ours, hf = build()
    if variant == "hf":
        model, del_ = hf, ours
        loss_fn = lambda: model(input_ids=x, labels=x, use_cache=False).loss  # noqa: E731
    else:
        model, del_ = ours, hf
        model.gradient_checkpointing = variant == "ours-ckpt"
        loss_fn = lambda: model(x, targets=y)  # noqa: E731
    del ours, hf, del_
    x, y = batch()
    opt = make_optimizer(model, LR)

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step creates AdamW's two state tensors per parameter
    gc.collect()
    before = current_rss_bytes()  # the process + weights + AdamW states (+ what the allocator kept)
    reset_ok = reset_peak_memory("cpu")  # so the peak is this step's, not the model building's
    step()
    return {"variant": variant, "params": sum(p.numel() for p in model.parameters()), "rss_before_step": before,
            "peak": peak_memory_bytes("cpu"), "peak_reset": reset_ok}


def memory(variants=("ours", "hf", "ours-ckpt")) -> dict:
    out = {}
    for v in variants:
        r = subprocess.run([sys.executable, __file__, "--memory-child", v], capture_output=True, text=True, check=True)
        out[v] = json.loads(r.stdout.strip().splitlines()[-1])
    # the process with nothing but torch + transformers imported (the floor of every child)
    code = "import torch, transformers, llama2; from llama2.perf import current_rss_bytes; print(current_rss_bytes())"
    out["bare_process"] = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                             cwd=C.ROOT).stdout.split()[-1])
    return out


# -- the benchmark -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = C.arguments(__doc__)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours) (an extra line, not the default path)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    if opts.memory_child:
        print(json.dumps(memory_child(opts.memory_child)))
        return {}

    torch.set_num_threads(opts.threads)
    reps = 3 if opts.quick else 7
    t_start = time.perf_counter()
    load_start, steal_start = C.load_average(), C.cpu_steal_snapshot()
    env = C.environment()
    print(f"torch {env['torch']} | transformers {env['transformers']} | python {env['python']} | "
          f"threads {env['threads']} (nproc {env['nproc']}) | {env['cpu']} ({env['cpu_capability']})")

    ours, hf = build()
    args = ours.args
    n_params = ours.num_params()
    x, y = batch()
    steps = make_steps(ours, hf, x, y)
    print(f"model: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / {args.n_kv_heads} kv, vocab "
          f"{args.vocab_size}, hidden {args.hidden_dim}: {n_params / 1e6:.1f}M params; batch {BATCH} x {SEQ}; fp32")

    chk = check(ours, hf, steps)
    print(f"check: first-step loss ours {chk['loss_ours']:.6f} hf {chk['loss_hf']:.6f} max |diff| {chk['loss_diff']:.2e} "
          f"(< 1e-4: {chk['loss_diff'] < 1e-4}); grad norm rel diff {chk['grad_norm_rel_diff']:.1e}; weights after "
          f"one AdamW step max |diff| {chk['weights_max_abs_diff_after_step']:.1e} (lr {LR}); second-step loss "
          f"|diff| {chk['step2_loss_diff']:.1e}")
    if not chk["ok"]:
        print("CHECK FAILED: the two steps do not do the same work; figures below are not comparable")
    results: dict = {"env": env, "args": ARGS, "batch": BATCH, "seq": SEQ, "quick": opts.quick, "check": chk}

    if opts.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n== profile: {name} ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    # -- speed ---------------------------------------------------------------------------------------------------
    ts = C.timeit_interleaved(steps, reps, warmup=1)
    tokens = BATCH * SEQ
    med = {k: tokens / C.median(v) for k, v in ts.items()}
    best = {k: tokens / min(v) for k, v in ts.items()}
    ratio, best_ratio = med["ours"] / med["hf"], best["ours"] / best["hf"]
    peak_flops = measure_matmul_flops("cpu", torch.float32, n=2048, reps=8 if opts.quick else 20)  # best of: load only slows
    fpt = flops_per_token(args, SEQ)
    mfu = {k: fpt * v / peak_flops for k, v in med.items()}
    mfu_best = {k: fpt * v / peak_flops for k, v in best.items()}
    results["speed"] = {"ours_tok_s": med["ours"], "hf_tok_s": med["hf"], "ratio": ratio, "best_of_ratio": best_ratio,
                        "ours_best_tok_s": best["ours"], "hf_best_tok_s": best["hf"], "ours_times_s": ts["ours"],
                        "hf_times_s": ts["hf"], "flops_per_token": fpt, "matmul_flops_per_s": peak_flops,
                        "mfu_ours": mfu["ours"], "mfu_hf": mfu["hf"], "mfu_best_ours": mfu_best["ours"],
                        "mfu_best_hf": mfu_best["hf"]}
    print(f"step: ours {C.median(ts['ours']) * 1e3:.0f} ms, hf {C.median(ts['hf']) * 1e3:.0f} ms (medians of {reps})")
    rows = [["training step (tok/s)", f"{med['ours']:,.0f}", f"{med['hf']:,.0f}", f"{ratio:.2f}x", f"{best_ratio:.2f}x",
             f">= {GOAL:.1f}x"],
            ["MFU, median step (vs measured fp32 matmul)", f"{mfu['ours']:.1%}", f"{mfu['hf']:.1%}", "", "", ""],
            ["MFU, best step", f"{mfu_best['ours']:.1%}", f"{mfu_best['hf']:.1%}", "", "", ""]]

    floor_s, n_gemm = matmul_floor_seconds(args, reps=3 if opts.quick else 5)
    max_ratio = min(ts["hf"]) / floor_s
    results["floor"] = {"seconds": floor_s, "gemms": n_gemm, "tok_s": tokens / floor_s,
                        "max_possible_ratio_vs_hf_best": max_ratio, "ours_best_over_floor": min(ts["ours"]) / floor_s,
                        "hf_best_over_floor": min(ts["hf"]) / floor_s}
    print(f"floor: the step's {n_gemm} GEMMs + {args.n_layers} SDPA forward/backward alone take {floor_s * 1e3:.0f} ms "
          f"(best of runs) -> a step can be at most {max_ratio:.2f}x faster than transformers' best step")
    rows.append([f"GEMM + attention floor ({n_gemm} GEMMs, {args.n_layers} SDPA fwd+bwd)", f"{tokens / floor_s:,.0f}",
                 "", f"max {max_ratio:.2f}x", "", ""])

    if opts.compile:
        compiled = torch.compile(ours)
        opt_c = make_optimizer(ours, LR)

        def step_c():
            loss = compiled(x, targets=y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ours.parameters(), CLIP, foreach=True)
            opt_c.step()
            opt_c.zero_grad(set_to_none=True)

        t0 = time.perf_counter()
        step_c()
        print(f"torch.compile: first step (compilation) {time.perf_counter() - t0:.0f} s")
        tc = C.timeit_interleaved({"compiled": step_c, "hf": steps["hf"]}, reps, warmup=1)
        c_tok = tokens / C.median(tc["compiled"])
        c_ratio = c_tok / (tokens / C.median(tc["hf"]))
        results["compiled"] = {"tok_s": c_tok, "ratio": c_ratio, "times_s": tc["compiled"], "hf_times_s": tc["hf"]}
        rows.append(["extra: torch.compile(ours) step (tok/s)", f"{c_tok:,.0f}", f"{tokens / C.median(tc['hf']):,.0f}",
                     f"{c_ratio:.2f}x", f"{min(tc['hf']) / min(tc['compiled']):.2f}x", "(not the default)"])

    # -- memory --------------------------------------------------------------------------------------------------
    mem_rows = []
    if not opts.no_memory:
        del ours, hf, steps
        mem = memory()
        results["memory"] = mem
        states = 4 * n_params * 4  # weights + grads + AdamW exp_avg + exp_avg_sq, fp32
        bare = mem["bare_process"]
        for v, label in (("ours", "ours"), ("hf", "transformers"), ("ours-ckpt", "ours + activation checkpointing")):
            m = mem[v]
            extra = m["peak"] - bare - states
            mem_rows.append([label, f"{m['peak'] / 2**20:,.0f}", f"{(m['peak'] - bare) / 2**20:,.0f}",
                             f"{(m['peak'] - bare) / states:.2f}", f"{extra / 2**20:,.0f}"])
        saving = mem["ours"]["peak"] - mem["ours-ckpt"]["peak"]
        results["memory"]["states_bytes"] = states
        results["memory"]["checkpointing_saving_bytes"] = saving

    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    results["loadavg_start"], results["loadavg_end"] = load_start, C.load_average()
    results["cpu_steal_fraction"] = C.steal_fraction(steal_start)
    noisy = {k: max(v) / min(v) for k, v in ts.items() if max(v) / min(v) > 1.25}
    results["noisy_series"] = noisy
    if noisy:
        print("WARNING: noisy timings (slowest/fastest run): " + ", ".join(f"{k} {r:.2f}x" for k, r in noisy.items())
              + "; compare with the best-of ratio or rerun")
    print()
    print(C.markdown_table(["workload", "ours", "transformers", "ours/theirs", "best-of ratio", "goal"], rows))
    print(f"\nmodel FLOPs/token {fpt / 1e6:.1f} M (6 N + 12 L d T, PaLM App. B); fp32 2048^2 matmul on this machine: "
          f"{peak_flops / 1e9:.1f} GFLOP/s ({opts.threads} threads)")
    if mem_rows:
        print()
        print(C.markdown_table(["peak RSS of a training step", "MiB", "MiB above bare process", "/ (w + g + 2 Adam)",
                                "activations etc. (MiB)"], mem_rows))
        print(f"\nweights + grads + 2 AdamW states = {states / 2**20:,.0f} MiB ({n_params / 1e6:.1f}M params x 16 B); "
              f"bare process (torch + transformers imported) {bare / 2**20:,.0f} MiB; activation checkpointing saves "
              f"{saving / 2**20:,.0f} MiB of peak")
    print(f"\n(tok/s from medians of {reps} steps after a warm-up step, ours and transformers timed in turns; best-of "
          f"ratio from the fastest step of each; load average {load_start} at start, {results['loadavg_end']} at end; "
          f"CPU steal {results['cpu_steal_fraction']:.1%}; total {elapsed:.0f} s)")
    return C.save_json(opts.json, results)


if __name__ == "__main__":
    main()
