#!/usr/bin/env python3
"""One-shot GPU benchmark: the llama2 project (PYTHONPATH=.) side by side with Hugging Face
transformers' LlamaForCausalLM on the same weights. "ours" is ``generate(engine="static", compile=True)``, the
static cache with the decode step compiled and replayed as a CUDA graph, "ours eager" the reference loop; decode at
batch 1, 16 and 64.

Run it from the repository root on a machine with a GPU, torch, transformers and this project's dependencies:
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --out gpu-results
and here, on the CPU, as a smoke test:  .venv/bin/python benchmarks/bench_gpu.py --tiny --out /tmp/gpu-test

  A. inference, Llama 2 7B shape (ModelArgs.from_preset("llama2-7b")), bf16, random weights drawn on the device:
     logits check on 64 tokens; prefill 1x2048; greedy decode of 256 new tokens after a 128-token prompt at batch 1
     and 16 (ours: llama2.generate.generate with its KV cache; HF: generate(do_sample=False)); the batch-1
     bandwidth bound (weight bytes / measured device copy bandwidth).
  B. one training step of a ~1.2B Llama-2-shaped model (dim 2048, 24 layers, 16 heads, 4 KV heads, vocab 32000),
     batch 8 x 2048, as the project's pretraining loop does it: fp32 weights, bf16 autocast (the project's autocast_for),
     loss = model(x, targets=y), backward, clip_grad_norm 1.0, the project's AdamW (make_optimizer). The same for HF
     (labels=...), then ours with torch.compile per block (what RunConfig.compile=true does).
  A2. HF generate with cache_implementation="static" at batch 1 (transformers compiles the decode step on CUDA);
     last, since its compile is the slowest item: the 7B models are rebuilt for it.
  C. the project's `llama2 pipeline --quick` on the GPU, only if the CLI's pipeline command has a device option.

Every item runs in try/except (errors go into the JSON) and OUT/gpu_results.json is rewritten after each one, so a
timeout keeps what was measured. Items that would start after --budget seconds (default 330) are skipped.

    python3 benchmarks/bench_gpu.py [--tiny] [--out DIR] [--budget 330] [--no-compile]

--tiny: tiny shapes (dim 64, 2 layers, vocab 32000, short sequences); runs on the CPU when there is no CUDA.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here (before importing torch)

import argparse  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s (datasheet)
# Rough costs of the optional compile items (seconds), used to skip them when they would not fit the budget.
NEED_OURS_COMPILED_TRAIN = 60.0
NEED_HF_STATIC = 90.0

R: dict = {"meta": {}, "device_rates": {}, "A": {}, "B": {}, "A2": {}, "C": {}, "timeline": [], "errors": []}
OUT = Path(".")
DEV = torch.device("cpu")
BUDGET = 330.0
SHAPES: dict = {}


# -- plumbing ---------------------------------------------------------------------------------------------------
def el() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{el():6.1f}s] {msg}", flush=True)


def save() -> None:
    R["elapsed_s"] = round(el(), 2)
    tmp = OUT / "gpu_results.json.tmp"
    tmp.write_text(json.dumps(R, indent=2, default=str))
    os.replace(tmp, OUT / "gpu_results.json")


def free() -> None:
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, result) of fn(), synchronised on both sides."""
    sync()
    t0 = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t0, r


def interleaved(fns: dict, reps: int):
    """Each function ``reps`` times, in turns (a b a b ...). Returns ({name: [seconds]}, {name: last result})."""
    times: dict = {k: [] for k in fns}
    last: dict = {}
    for _ in range(reps):
        for k, f in fns.items():
            t, last[k] = timed(f)
            times[k].append(t)
    return times, last


def med(xs) -> float:
    return statistics.median(xs)


def warm_up(fns: dict, res: dict) -> dict:
    """Call each function once (untimed warm-up); one that raises is recorded as res["<name>_error"] and dropped,
    so that ours is still measured when HF fails (and the other way round)."""
    kept = {}
    for k, f in fns.items():
        try:
            res[f"{k}_warmup_s"] = timed(f)[0]  # includes compiling, where the variant compiles
            kept[k] = f
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res[f"{k}_error"] = f"{type(e).__name__}: {e}"[:1000]
            R["errors"].append(f"{k}: {type(e).__name__}: {e}"[:400])
    if not kept:
        raise RuntimeError("every variant failed: " + "; ".join(str(res.get(f"{k}_error")) for k in fns))
    return kept


def decode_figures(t1: list, tn: list, B: int, N: int) -> dict:
    """Figures of B rows decoding N new tokens from the times of 1 and of N new tokens: end to end, and of the N-1
    cached single-token steps alone (t(N new) - t(1 new): the prefill cancels)."""
    m1, mn = med(t1), med(tn)
    steps = mn - m1
    ok = steps > 0.05 * mn  # else timing noise swamps the difference (only seen on a busy CPU)
    return {"t_1_new_s": t1, f"t_{N}_new_s": tn, "e2e_new_tok_s": B * N / mn,
            "decode_tok_s": B * (N - 1) / steps if ok else None, "step_ms": steps / (N - 1) * 1e3 if ok else None}


def section(name: str) -> None:
    log(f"==== {name}")
    R["timeline"].append({"section": name, "start_s": round(el(), 1)})


def item(dst: dict, key: str, fn, need: float = 0.0, always: bool = False):
    """fn(res) fills res = dst[key] (so partial figures survive an error). Errors are recorded, never raised.
    Skipped (recorded) when el() + need exceeds the budget, unless ``always`` (items that cost nothing: arithmetic
    on figures already measured, source inspection). Returns res, or None when skipped or failed."""
    res = dst.setdefault(key, {})
    if not always and el() + need > BUDGET:
        res["skipped"] = f"time budget: {el():.0f}s elapsed + ~{need:.0f}s needed > {BUDGET:.0f}s"
        log(f"SKIP {key}: {res['skipped']}")
        save()
        return None
    t = el()
    log(f"-- {key}")
    ok = False
    try:
        fn(res)
        ok = True
    except Exception as e:  # noqa: BLE001  (every failure is a result here)
        tb = traceback.format_exc()
        print(tb, flush=True)
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        res["traceback"] = tb[-3000:]
        R["errors"].append(f"{key}: {type(e).__name__}: {e}"[:400])
    finally:
        res["item_s"] = round(el() - t, 2)
        R["timeline"].append({"item": key, "start_s": round(t, 1), "end_s": round(el(), 1), "ok": ok})
        free()
        save()
    return res if ok else None


def on_term(signum, frame):  # the hard `timeout` of run.sh: keep what we have
    R["killed"] = f"signal {signum} at {el():.1f}s"
    try:
        save()
        print(f"\n[{el():6.1f}s] killed by signal {signum}; partial results in {OUT / 'gpu_results.json'}", flush=True)
        if SHAPES:
            text = summary(SHAPES)
            (OUT / "gpu_summary.txt").write_text(text + "\n")
            print("=" * 100 + "\n" + text + "\n" + "=" * 100, flush=True)
    finally:
        os._exit(124)


# -- shapes ------------------------------------------------------------------------------------------------------
def shapes(tiny: bool) -> dict:
    from llama2.model import ModelArgs

    if tiny:
        return dict(
            a_args=ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32000, multiple_of=32, max_seq_len=256),
            a_name="tiny MHA (dim 64, 2 layers, 4 heads, vocab 32000)",
            check_len=64, prefill=(1, 64), prompt=16, new=16, batches=(1, 4, 8), prefill_reps=3, reps=3,
            b_args=ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                             max_seq_len=64),
            b_name="tiny GQA (dim 64, 2 layers, 4 heads, 2 kv heads, vocab 32000)",
            b_batch=(2, 64), train_warmup=1, train_reps=3, copy_gib=1 / 16, mm_n=256,
        )
    return dict(
        a_args=ModelArgs.from_preset("llama2-7b"), a_name="llama2-7b preset",
        check_len=64, prefill=(1, 2048), prompt=128, new=256, batches=(1, 16, 64), prefill_reps=5, reps=3,
        b_args=ModelArgs(dim=2048, n_layers=24, n_heads=16, n_kv_heads=4, vocab_size=32000, multiple_of=256,
                         max_seq_len=2048),
        b_name="~1.2B (dim 2048, 24 layers, 16 heads, 4 kv heads, ffn by the project's rule, vocab 32000)",
        b_batch=(8, 2048), train_warmup=2, train_reps=3, copy_gib=4.0, mm_n=8192,
    )


# -- models ------------------------------------------------------------------------------------------------------
def build_ours(args, dtype: torch.dtype, seed: int, std: float = 0.02):
    """The project's Transformer with random weights drawn directly on DEV in ``dtype``: built on the meta device
    and the tensors assigned, as llama2.checkpoint's build_model does. The scheme is Transformer.init_weights's
    (normal(0, std), wo/w2 scaled by 1/sqrt(2 n_layers), norms 1) but with a generator on DEV, since drawing 7B
    numbers on the CPU first takes minutes."""
    from llama2.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    resid_std = std / math.sqrt(2 * args.n_layers)
    sd = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=dtype, device=DEV)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name == "output.bias":
            t.zero_()
        else:
            t.normal_(0.0, resid_std if name.endswith(("wo.weight", "w2.weight")) else std, generator=g)
        sd[name] = t
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_rope()  # the rotary tables are non-persistent buffers, still on meta
    return model


def hf_config(a):
    """The LlamaConfig of benchmarks/bench_inference.py's build_hf."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu", attn_implementation="sdpa",
    )


def build_hf(ours, dtype: torch.dtype):
    """LlamaForCausalLM (sdpa) built on DEV in ``dtype``, holding ``ours``'s weights through the library's own
    mapping (llama2.checkpoint.hf.hf_tensors: HF names, q/k rows permuted), as benchmarks/bench_inference.py."""
    from transformers import LlamaForCausalLM

    from llama2.checkpoint.hf import hf_tensors

    cfg = hf_config(ours.args)
    with torch.device(DEV):
        hf = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    hf.to(DEV)
    sd = dict(hf_tensors(ours))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    del sd
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"HF weight mapping: missing {missing}, unexpected {unexpected}")
    bad = {str(p.dtype) + "@" + str(p.device) for p in hf.parameters()} - {f"{dtype}@{DEV}"}
    if bad:
        raise RuntimeError(f"HF parameters not all {dtype} on {DEV}: {bad}")
    # greedy with no early stop and no logits processors (as bench_inference.py)
    gc_ = hf.generation_config
    gc_.eos_token_id, gc_.pad_token_id, gc_.bos_token_id = None, 0, None
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc_, k):
            setattr(gc_, k, None)
    return hf


def ours_generate(model, prompts: list, n: int, engine: str = "static", compile_: bool | None = True) -> list:
    """Greedy through llama2.generate.generate: by default the static engine with its compiled decode step
    (a CUDA graph on CUDA); engine="eager" is the reference loop over model.forward."""
    from llama2.generate import generate

    return [c.tokens for c in generate(model, prompts, temperature=0, max_new_tokens=n, stop_tokens=(), engine=engine,
                                       compile=compile_)]


def hf_generate(hf, ids: torch.Tensor, n: int, static: bool = False, disable_compile: bool = False) -> list:
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
              use_cache=True, eos_token_id=None, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
        if disable_compile:
            kw["disable_compile"] = True
    out = hf.generate(ids, **kw)
    return out[:, ids.shape[1]:].tolist()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- device rates ------------------------------------------------------------------------------------------------
def matmul_rate(n: int, dtype=torch.bfloat16, iters: int = 10, rounds: int = 3) -> float:
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    c = torch.empty(n, n, device=DEV, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = min(timed(lambda: [torch.mm(a, b, out=c) for _ in range(iters)])[0] for _ in range(rounds))
    return 2.0 * n**3 * iters / best


def copy_bandwidth(gib: float, iters: int = 5, rounds: int = 3) -> float:
    """Bytes/s of dst.copy_(src) over a ``gib`` GiB tensor, counting bytes read + bytes written (the convention of
    benchmarks/_common.memory_bandwidth)."""
    nbytes = int(gib * (1 << 30)) // 2 * 2
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(lambda: [dst.copy_(src) for _ in range(iters)])[0] for _ in range(rounds))
    return 2.0 * nbytes * iters / best


def device_rates(res: dict, S: dict) -> None:
    res["matmul_n"] = S["mm_n"]
    res["matmul_bf16_flops"] = matmul_rate(S["mm_n"])
    res["copy_gib"] = S["copy_gib"]
    res["copy_bw_bytes_per_s"] = copy_bandwidth(S["copy_gib"], iters=5 if DEV.type == "cuda" else 1)
    res["copy_bw_note"] = "bytes read + bytes written per second (benchmarks/_common.memory_bandwidth's convention)"
    log(f"bf16 matmul {S['mm_n']}^3: {res['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s; "
        f"{S['copy_gib']:g} GiB copy_: {res['copy_bw_bytes_per_s'] / 1e9:.0f} GB/s (r+w)")


# -- A: inference ------------------------------------------------------------------------------------------------
def section_a(S: dict) -> dict:
    """Returns figures the later summary needs. Models live only inside this function."""
    A = R["A"]
    args = S["a_args"]
    A["shape"] = {"name": S["a_name"], **args.to_dict(), "hidden_dim": args.hidden_dim, "dtype": "bfloat16",
                  "init": "normal(0, 0.02), wo/w2 0.02/sqrt(2 n_layers), norms 1 (Transformer.init_weights' scheme), "
                          "drawn on the device, seed 0"}
    models: dict = {}

    def build(res):
        t, ours = timed(lambda: build_ours(args, torch.bfloat16, seed=0))
        ours.eval().requires_grad_(False)
        models["ours"] = ours
        res["ours_build_s"] = t
        res["params"] = n_params(ours)
        t, hf = timed(lambda: build_hf(ours, torch.bfloat16))
        hf.eval().requires_grad_(False)
        models["hf"] = hf
        res["hf_build_s"] = t
        res["hf_params"] = n_params(hf)
        if DEV.type == "cuda":
            res["allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        log(f"built ours ({res['ours_build_s']:.1f}s) and HF ({res['hf_build_s']:.1f}s): {res['params'] / 1e9:.3f}B params each")

    if item(A, "build", build) is None:
        return {}
    ours, hf = models["ours"], models["hf"]
    V = args.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)

    def check(res):
        x = torch.randint(3, V, (1, S["check_len"]), generator=g).to(DEV)
        with torch.inference_mode():
            lo = ours(x).float()
            lh = hf(x, use_cache=False).logits.float()
        d = (lo - lh).abs()
        agree = (lo.argmax(-1) == lh.argmax(-1)).float().mean().item()
        res.update(positions=S["check_len"], max_abs_logit_diff=d.max().item(), mean_abs_logit_diff=d.mean().item(),
                   ours_logit_abs_max=lo.abs().max().item(), ours_logit_std=lo.std().item(),
                   greedy_next_token_agreement=agree, ok=agree >= 0.75)
        log(f"check: max |logit ours - hf| = {res['max_abs_logit_diff']:.4f} (mean {res['mean_abs_logit_diff']:.4f}, "
            f"logit std {res['ours_logit_std']:.3f}); argmax agree at {agree:.0%} of {S['check_len']} positions"
            + ("" if res["ok"] else "  <-- CHECK FAILED: the models may not compute the same function"))

    item(A, "check", check)

    def prefill(res):
        B, T = S["prefill"]
        ids = torch.randint(3, V, (B, T), generator=g).to(DEV)
        res["shape"] = [B, T]
        with torch.inference_mode():
            fns = {"ours": lambda: ours(ids), "hf": lambda: hf(ids, use_cache=False).logits,
                   "ours_last_only": lambda: ours(ids, last_only=True),
                   "hf_logits_to_keep_1": lambda: hf(ids, use_cache=False, logits_to_keep=1).logits}
            fns = warm_up(fns, res)
            ts, _ = interleaved(fns, S["prefill_reps"])
        for k, v in ts.items():
            res[k] = {"times_s": v, "median_s": med(v), "tok_s": B * T / med(v)}
        tok = lambda k: res.get(k, {}).get("tok_s")  # noqa: E731
        if tok("ours") and tok("hf"):
            res["ratio_full_logits"] = tok("ours") / tok("hf")
        if tok("ours_last_only") and tok("hf_logits_to_keep_1"):
            res["ratio_last_only"] = tok("ours_last_only") / tok("hf_logits_to_keep_1")
        log(f"prefill {B}x{T}: ours {fmt(tok('ours'), ',.0f')} tok/s, hf {fmt(tok('hf'), ',.0f')} tok/s "
            f"(x{fmt(res.get('ratio_full_logits'), '.2f')}); last-position logits only: "
            f"x{fmt(res.get('ratio_last_only'), '.2f')}")

    item(A, "prefill", prefill)

    def decode(B):
        def run(res):
            P, N = S["prompt"], S["new"]
            ids_cpu = torch.randint(3, V, (B, P), generator=torch.Generator().manual_seed(100 + B))
            ids, prompts = ids_cpu.to(DEV), ids_cpu.tolist()
            res.update(batch=B, prompt_len=P, new_tokens=N, reps=S["reps"])
            gens = {"ours": lambda n: ours_generate(ours, prompts, n), "hf": lambda n: hf_generate(hf, ids, n),
                    "ours eager": lambda n: ours_generate(ours, prompts, n, engine="eager")}
            # warm-up at the full length (kernels, allocator, cuBLAS handles, and every attention bucket's compiled
            # step and CUDA graph of ours); a variant that fails here is dropped and recorded
            kept = warm_up({k: (lambda f=f: f(N)) for k, f in gens.items()}, res)
            gens = {k: gens[k] for k in kept}
            t1, _ = interleaved({k: (lambda f=f: f(1)) for k, f in gens.items()}, S["reps"])
            tn, last = interleaved({k: (lambda f=f: f(N)) for k, f in gens.items()}, S["reps"])
            for k in gens:
                res[k] = {**decode_figures(t1[k], tn[k], B, N), "tokens_per_row": sorted({len(r) for r in last[k]})}
            o, h = res.get("ours", {}), res.get("hf", {})
            if o and h:
                res["ratio_e2e"] = o["e2e_new_tok_s"] / h["e2e_new_tok_s"]
                if o["decode_tok_s"] and h["decode_tok_s"]:
                    res["ratio_decode"] = o["decode_tok_s"] / h["decode_tok_s"]
                a, b = last["ours"], last["hf"]
                res["greedy_rows_identical"] = sum(x == y for x, y in zip(a, b))
                res["first_divergence_row0"] = next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), None)
            log(f"decode b{B}: ours {fmt(o.get('e2e_new_tok_s'))} new tok/s e2e ({fmt(o.get('step_ms'), '.2f')} ms/step), "
                f"hf {fmt(h.get('e2e_new_tok_s'))} ({fmt(h.get('step_ms'), '.2f')} ms/step): e2e "
                f"x{fmt(res.get('ratio_e2e'), '.2f')}, steps x{fmt(res.get('ratio_decode'), '.2f')}; identical rows "
                f"{res.get('greedy_rows_identical')}/{B}, row 0 first differs at token {res.get('first_divergence_row0')}")
        return run

    for B in S["batches"]:
        item(A, f"decode_b{B}", decode(B))

    def bound(res):
        bw = R["device_rates"].get("copy_bw_bytes_per_s")
        if not bw:
            raise RuntimeError("no copy bandwidth measured")
        elem = next(ours.parameters()).element_size()
        weight_bytes = (n_params(ours) - args.vocab_size * args.dim + args.dim) * elem  # one embedding row read
        b1 = A.get(f"decode_b{S['batches'][0]}", {})
        res.update(weight_bytes_per_token=weight_bytes, copy_bw_bytes_per_s=bw, bound_tok_s=bw / weight_bytes,
                   note="bound = copy bandwidth (read+write bytes/s) / bf16 weight bytes read per token "
                        "(all but the embedding table, of which one row); KV-cache reads ignored")
        res["bound_tok_s_one_way_copy_rate"] = bw / 2 / weight_bytes  # if the copy rate is counted one way
        for k in ("ours", "hf"):
            if k in b1:
                d = b1[k]["decode_tok_s"]
                res[f"{k}_decode_frac"] = d / res["bound_tok_s"] if d else None
                res[f"{k}_e2e_frac"] = b1[k]["e2e_new_tok_s"] / res["bound_tok_s"]
        log(f"batch-1 bound: {weight_bytes / 1e9:.2f} GB/token at {bw / 1e9:.0f} GB/s -> {res['bound_tok_s']:.0f} tok/s; "
            f"ours {fmt(res.get('ours_decode_frac'), '.0%')}, hf {fmt(res.get('hf_decode_frac'), '.0%')} of it (decode steps)")

    item(A, "bound_b1", bound, always=True)

    def compiled_option(res):
        import llama2.generate.decoder as decoder_mod

        res["available"] = "torch.compile" in inspect.getsource(decoder_mod)
        res["note"] = ("'ours' decodes with the static engine's compiled step (llama2.generate; compile=True, CUDA "
                       "graphs on CUDA), 'ours eager' with the same engine uncompiled")
        log(f"compiled decoding in the project: {res['note']}")

    item(A, "compiled_decode_option", compiled_option, always=True)
    out = {"ours_b1_e2e": A.get(f"decode_b{S['batches'][0]}", {}).get("ours", {}).get("e2e_new_tok_s")}
    del ours, hf
    models.clear()
    free()
    if DEV.type == "cuda":
        A["allocated_after_free_gib"] = torch.cuda.memory_allocated() / 2**30
    return out


# -- B: training -------------------------------------------------------------------------------------------------
def train_api():
    """(autocast_for, clip_grad_norm, make_optimizer) from the project's training package."""
    from llama2.dist import autocast_for, clip_grad_norm
    from llama2.train.loop import make_optimizer

    return autocast_for, clip_grad_norm, make_optimizer


def train_autocast():
    """The project's autocast (autocast_for: bf16 on CUDA). On a CPU (--tiny without CUDA) the project
    uses none; bf16 CPU autocast is used instead so that the tiny run goes through the same mixed-precision paths."""
    autocast_for = train_api()[0]

    if DEV.type == "cuda":
        return autocast_for(DEV), "the project's autocast_for (bf16 autocast, fp32 weights)"
    return torch.autocast("cpu", dtype=torch.bfloat16), "CPU bf16 autocast (tiny CPU stand-in for the CUDA path)"


def train_item(S: dict, kind: str, compile_blocks: bool = False):
    def run(res):
        from llama2.perf import flops_per_token, matmul_params
        _, clip_grad_norm, make_optimizer = train_api()

        args = S["b_args"]
        Bsz, T = S["b_batch"]
        t, model = timed(lambda: build_ours(args, torch.float32, seed=1))
        if kind == "hf":
            src = model
            t2, model = timed(lambda: build_hf(src, torch.float32))
            del src
            free()
            t += t2
        res["build_s"] = t
        if compile_blocks:  # what RunConfig.compile=true does
            for block in model.layers:
                block.compile()
        model.train()
        opt = make_optimizer(model, lr=3e-4, weight_decay=0.1)
        ac, ac_note = train_autocast()
        w = torch.randint(3, args.vocab_size, (Bsz, T + 1), generator=torch.Generator().manual_seed(7)).to(DEV)
        x, y = w[:, :-1], w[:, 1:]

        def step():
            with ac:
                if kind == "ours":
                    loss = model(x, targets=y)  # fused head + loss, as the pretraining loop
                else:
                    loss = model(input_ids=x, labels=x, use_cache=False).loss  # HF shifts the labels itself
                loss.backward()
            gnorm = clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item(), gnorm

        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            res["allocated_before_gib"] = torch.cuda.memory_allocated() / 2**30
        losses, gnorms = [], []
        t_first, (l0, g0) = timed(step)
        losses.append(l0)
        gnorms.append(g0)
        res["first_step_s"] = t_first
        for _ in range(S["train_warmup"] - 1):
            _, (l_, g_) = timed(step)
            losses.append(l_)
            gnorms.append(g_)
        times = []
        for _ in range(S["train_reps"]):
            dt, (l_, g_) = timed(step)
            times.append(dt)
            losses.append(l_)
            gnorms.append(g_)
        tok_s = Bsz * T / med(times)
        fpt = flops_per_token(args, T)
        mm = R["device_rates"].get("matmul_bf16_flops")
        res.update(kind=kind, compiled=compile_blocks, batch=[Bsz, T], params=n_params(model),
                   matmul_params=matmul_params(args), flops_per_token=fpt, step_times_s=times, median_step_s=med(times),
                   tok_s=tok_s, mfu_vs_989T=fpt * tok_s / H200_PEAK_BF16, mfu_vs_measured_matmul=fpt * tok_s / mm if mm else None,
                   losses=losses, grad_norms=gnorms, autocast=ac_note,
                   optimizer="the project's make_optimizer: AdamW(0.9, 0.95), eps 1e-5, wd 0.1 on >=2-D, "
                             "foreach=True (the project does not use fused=True)",
                   loss_positions=T if kind == "ours" else T - 1)
        if DEV.type == "cuda":
            res["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        log(f"train {kind}{' +compile' if compile_blocks else ''}: {tok_s:,.0f} tok/s ({med(times) * 1e3:.0f} ms/step, "
            f"first step {t_first:.1f}s), MFU {res['mfu_vs_989T']:.1%} of 989T"
            + (f" / {res['mfu_vs_measured_matmul']:.1%} of measured matmul" if mm else "")
            + (f", peak {res['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in res else "")
            + f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}, first grad norm {gnorms[0]:.4f}")

    return run


def section_b(S: dict, no_compile: bool) -> None:
    Bd = R["B"]
    a = S["b_args"]
    from llama2.perf import flops_per_token

    Bd["shape"] = {"name": S["b_name"], **a.to_dict(), "hidden_dim": a.hidden_dim, "batch": list(S["b_batch"]),
                   "mfu_formula": "(6*N + 12*n_layers*dim*seq) * tok/s / peak, N = matmul params (projections + "
                                  "output head; not the embedding table or norms) = llama2.perf.flops_per_token",
                   "flops_per_token": flops_per_token(a, S["b_batch"][1])}
    item(Bd, "ours", train_item(S, "ours"))
    item(Bd, "hf", train_item(S, "hf"))
    o, h = Bd.get("ours", {}), Bd.get("hf", {})
    if "tok_s" in o and "tok_s" in h:
        Bd["ratio_ours_hf"] = o["tok_s"] / h["tok_s"]
        Bd["first_loss_diff"] = abs(o["losses"][0] - h["losses"][0])
        Bd["first_grad_norm_ratio"] = o["grad_norms"][0] / h["grad_norms"][0] if h["grad_norms"][0] else None
    # does the project's training support compile? (RunConfig.compile -> block.compile() in llama2.train.loop)
    import llama2

    cfg_dir = Path(llama2.__file__).resolve().parents[1] / "configs"
    cfg_hits = sorted(str(p.relative_to(cfg_dir)) for p in cfg_dir.rglob("*.yaml") if "compile" in p.read_text()) \
        if cfg_dir.is_dir() else []
    from llama2.train import loop  # the training loop compiles each block when its run config says compile=true

    supported = "block.compile()" in inspect.getsource(loop)
    Bd["compile_support"] = {"supported": supported, "configs_setting_compile": cfg_hits,
                             "how": "RunConfig.compile=true: block.compile() for every TransformerBlock"}
    if not supported:
        Bd["ours_compiled"] = {"skipped": "the project's training has no compile option"}
    elif no_compile:
        Bd["ours_compiled"] = {"skipped": "--no-compile"}
    else:
        torch._dynamo.reset()
        item(Bd, "ours_compiled", train_item(S, "ours", compile_blocks=True), need=NEED_OURS_COMPILED_TRAIN)
        c = Bd.get("ours_compiled", {})
        if "tok_s" in c and "tok_s" in o:
            Bd["compiled_speedup"] = c["tok_s"] / o["tok_s"]
    save()


# -- A2: HF static cache --------------------------------------------------------------------------------------------
def section_a2(S: dict, no_compile: bool, ours_b1_e2e) -> None:
    def run(res):
        args = S["a_args"]
        B, P, N = 1, S["prompt"], S["new"]
        torch._dynamo.reset()  # drop B's compiled blocks
        t, ours = timed(lambda: build_ours(args, torch.bfloat16, seed=0))
        t2, hf = timed(lambda: build_hf(ours, torch.bfloat16))
        del ours
        free()
        hf.eval().requires_grad_(False)
        res["rebuild_s"] = t + t2
        ids = torch.randint(3, args.vocab_size, (B, P), generator=torch.Generator().manual_seed(100 + B)).to(DEV)
        res.update(batch=B, prompt_len=P, new_tokens=N, disable_compile=no_compile)
        t_first, _ = timed(lambda: hf_generate(hf, ids, N, static=True, disable_compile=no_compile))
        res["first_call_s"] = t_first
        res["auto_compiled"] = hasattr(hf, "_compiled_call")
        log(f"HF static b1 first call {t_first:.1f}s (auto torch.compile: {res['auto_compiled']})")
        times, last = [], None
        for _ in range(S["reps"]):
            dt, last = timed(lambda: hf_generate(hf, ids, N, static=True, disable_compile=no_compile))
            times.append(dt)
        res["times_s"] = times
        res["e2e_new_tok_s"] = B * N / med(times)
        res["tokens_per_row"] = sorted({len(r) for r in last})
        if ours_b1_e2e:
            res["ours_b1_e2e_new_tok_s"] = ours_b1_e2e
            res["ratio_ours_vs_hf_static"] = ours_b1_e2e / res["e2e_new_tok_s"]
        log(f"HF static b1: {res['e2e_new_tok_s']:,.1f} new tok/s e2e"
            + (f" (ours eager {ours_b1_e2e:,.1f}: x{res['ratio_ours_vs_hf_static']:.2f})" if ours_b1_e2e else ""))
        del hf
        torch._dynamo.reset()

    item(R["A2"], "hf_static_b1", run, need=NEED_HF_STATIC)


# -- D: batch-1 decode, ours against HF's static cache in one process ------------------------------------------------
def section_d(S: dict) -> None:
    """--b1-static: only batch-1 decode, ours (static engine, compiled step, CUDA graphs) and HF generate with its
    static cache (which compiles its step), both warmed at the full length and then timed in turns, plus the
    bandwidth bound; the short run that checks the two issue targets at batch 1 (~3 minutes on an H200)."""
    def run(res):
        args = S["a_args"]
        P, N = S["prompt"], S["new"]
        ours = build_ours(args, torch.bfloat16, seed=0).eval().requires_grad_(False)
        hf = build_hf(ours, torch.bfloat16).eval().requires_grad_(False)
        ids_cpu = torch.randint(3, args.vocab_size, (1, P), generator=torch.Generator().manual_seed(101))
        ids, prompts = ids_cpu.to(DEV), ids_cpu.tolist()
        gens = {"ours": lambda n: ours_generate(ours, prompts, n),
                "hf_static": lambda n: hf_generate(hf, ids, n, static=True)}
        kept = warm_up({k: (lambda f=f: f(N)) for k, f in gens.items()}, res)
        t1, _ = interleaved({k: (lambda f=f: f(1)) for k in kept for f in [gens[k]]}, S["reps"])
        tn, last = interleaved({k: (lambda f=f: f(N)) for k in kept for f in [gens[k]]}, S["reps"])
        res.update(prompt_len=P, new_tokens=N, reps=S["reps"])
        for k in kept:
            res[k] = decode_figures(t1[k], tn[k], 1, N)
        o, h = res.get("ours"), res.get("hf_static")
        if o and h:
            res["ratio_e2e"] = o["e2e_new_tok_s"] / h["e2e_new_tok_s"]
            if o["decode_tok_s"] and h["decode_tok_s"]:
                res["ratio_decode"] = o["decode_tok_s"] / h["decode_tok_s"]
            res["greedy_identical"] = last["ours"][0] == last["hf_static"][0]
        bw = R["device_rates"].get("copy_bw_bytes_per_s")
        if bw:
            weight_bytes = (n_params(ours) - args.vocab_size * args.dim + args.dim) * 2
            res["bound_tok_s"] = bw / weight_bytes
            for k in kept:
                res[k]["decode_frac_of_bound"] = (res[k]["decode_tok_s"] or float("nan")) / res["bound_tok_s"]
                res[k]["e2e_frac_of_bound"] = res[k]["e2e_new_tok_s"] / res["bound_tok_s"]
        log(f"b1: ours {fmt(o and o['e2e_new_tok_s'])} tok/s e2e ({fmt(o and o['step_ms'], '.2f')} ms/step), HF static "
            f"{fmt(h and h['e2e_new_tok_s'])} ({fmt(h and h['step_ms'], '.2f')} ms/step): e2e x{fmt(res.get('ratio_e2e'), '.2f')}, "
            f"steps x{fmt(res.get('ratio_decode'), '.2f')}; bound {fmt(res.get('bound_tok_s'), ',.0f')} tok/s, ours at "
            f"{fmt(o and o.get('decode_frac_of_bound'), '.0%')} (steps) / {fmt(o and o.get('e2e_frac_of_bound'), '.0%')} (e2e)")
        del ours, hf
        gens.clear()

    item(R.setdefault("D", {}), "b1_ours_vs_hf_static", run)


# -- C: the project's pipeline on the GPU ------------------------------------------------------------------------
def section_c(tiny: bool) -> None:
    def run(res):
        from llama2.cli import build_parser

        parser = build_parser()
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        p = subs.choices["pipeline"]
        opts = sorted(s for a in p._actions for s in a.option_strings)
        res["pipeline_options"] = opts
        if "--device" not in opts:
            res["skipped"] = ("`llama2 pipeline` has no --device option (llama2/cli.py cmd_pipeline calls "
                              "run_pipeline(out, quick, from_stage, seed): CPU only); not run")
            log(f"C: {res['skipped']}")
            return
        if tiny:
            res["skipped"] = "--tiny: the pipeline is not run"
            return
        if el() > BUDGET:
            res["skipped"] = f"time budget: {el():.0f}s elapsed > {BUDGET:.0f}s"
            return
        cmd = [sys.executable, "-m", "llama2.cli", "pipeline", "--quick", "--device", str(DEV.type), "--out", "pq"]
        limit = max(10.0, BUDGET - el())
        t0 = time.perf_counter()
        try:
            pr = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            res.update(rc=pr.returncode, tail=(pr.stdout + pr.stderr)[-3000:])
        except subprocess.TimeoutExpired:
            res["timed_out_after_s"] = limit
        res["wall_s"] = time.perf_counter() - t0
        res["cmd"] = " ".join(cmd)

    item(R["C"], "pipeline_quick", run, always=True)  # the check is free; run() minds the budget itself


# -- summary -----------------------------------------------------------------------------------------------------
def fmt(v, spec=",.1f", suffix=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:{spec}}{suffix}"


def summary(S: dict) -> str:
    A, Bd, A2 = R["A"], R["B"], R["A2"]
    L = []
    dr = R["device_rates"]
    L.append(f"device: {R['meta'].get('device_name')} | torch {R['meta'].get('torch')} | transformers "
             f"{R['meta'].get('transformers')} | project {R['meta'].get('project_rev')}")
    L.append(f"measured: bf16 matmul {S['mm_n']}^3 {fmt(dr.get('matmul_bf16_flops', 0) / 1e12, '.0f')} TFLOP/s; "
             f"copy_ {fmt(dr.get('copy_bw_bytes_per_s', 0) / 1e9, ',.0f')} GB/s (r+w)")
    c = A.get("check", {})
    L.append(f"A ({A.get('shape', {}).get('name')}, bf16): max|logit ours-hf| {fmt(c.get('max_abs_logit_diff'), '.4f')}, "
             f"argmax agreement {fmt(c.get('greedy_next_token_agreement'), '.0%')} of {c.get('positions')} positions"
             + ("" if c.get("ok", True) else "  CHECK FAILED"))
    rows = [("", "ours", "HF", "ours/HF")]
    g = lambda d, k, f="tok_s": d.get(k, {}).get(f)  # noqa: E731
    p = A.get("prefill", {})
    if "shape" in p:
        sh = "x".join(map(str, p["shape"]))
        rows.append((f"prefill {sh}, full logits (tok/s)", fmt(g(p, "ours"), ",.0f"), fmt(g(p, "hf"), ",.0f"),
                     fmt(p.get("ratio_full_logits"), ".2f", "x")))
        rows.append((f"prefill {sh}, last logits (tok/s)", fmt(g(p, "ours_last_only"), ",.0f"),
                     fmt(g(p, "hf_logits_to_keep_1"), ",.0f"), fmt(p.get("ratio_last_only"), ".2f", "x")))
    for B in S["batches"]:
        d = A.get(f"decode_b{B}", {})
        if "ours" in d or "hf" in d:
            rows.append((f"decode b{B} {S['prompt']}+{S['new']}: e2e new tok/s", fmt(g(d, "ours", "e2e_new_tok_s")),
                         fmt(g(d, "hf", "e2e_new_tok_s")), fmt(d.get("ratio_e2e"), ".2f", "x")))
            rows.append((f"decode b{B}: cached steps tok/s", fmt(g(d, "ours", "decode_tok_s")),
                         fmt(g(d, "hf", "decode_tok_s")), fmt(d.get("ratio_decode"), ".2f", "x")))
    s = A2.get("hf_static_b1", {})
    if "e2e_new_tok_s" in s:
        rows.append((f"decode b1 HF static cache{' +compile' if s.get('auto_compiled') else ''}: e2e",
                     fmt(s.get("ours_b1_e2e_new_tok_s")), fmt(s["e2e_new_tok_s"]), fmt(s.get("ratio_ours_vs_hf_static"), ".2f", "x")))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    L += ["  " + " | ".join(r[i].ljust(w[i]) if i == 0 else r[i].rjust(w[i]) for i in range(4)) for r in rows]
    if "first_call_s" in s:
        L.append(f"  HF static first call: {s['first_call_s']:.1f}s (auto torch.compile: {s.get('auto_compiled')}; "
                 f"later calls {fmt(med(s['times_s']) if s.get('times_s') else None, '.2f')}s)")
    elif s:
        L.append(f"  HF static: {s.get('skipped') or s.get('error', '?')[:200]}")
    b = A.get("bound_b1", {})
    if "bound_tok_s" in b:
        L.append(f"  b1 bound: {b['weight_bytes_per_token'] / 1e9:.2f} GB/token / {b['copy_bw_bytes_per_s'] / 1e9:,.0f} GB/s "
                 f"= {b['bound_tok_s']:,.0f} tok/s; ours at {fmt(b.get('ours_decode_frac'), '.0%')} (steps) / "
                 f"{fmt(b.get('ours_e2e_frac'), '.0%')} (e2e), HF at {fmt(b.get('hf_decode_frac'), '.0%')} / "
                 f"{fmt(b.get('hf_e2e_frac'), '.0%')}")
    if "note" in A.get("compiled_decode_option", {}):
        L.append(f"  compiled decoding: {A['compiled_decode_option']['note']}")
    if Bd:
        L.append(f"B ({Bd.get('shape', {}).get('name')}, batch {'x'.join(map(str, S['b_batch']))}, fp32 master + bf16 autocast):")
    rows = [("", "tok/s", "ms/step", "MFU/989T", "MFU/meas", "peak GiB", "first step s")]
    notes = []
    for k, label in (("ours", "ours"), ("hf", "HF"), ("ours_compiled", "ours +compile/block")):
        r = Bd.get(k, {})
        if "tok_s" in r:
            rows.append((label, fmt(r["tok_s"], ",.0f"), fmt(r["median_step_s"] * 1e3, ".0f"), fmt(r["mfu_vs_989T"], ".1%"),
                         fmt(r.get("mfu_vs_measured_matmul"), ".1%"), fmt(r.get("peak_allocated_gib"), ".1f"),
                         fmt(r["first_step_s"], ".1f")))
        elif r:
            notes.append(f"  {label}: {(r.get('skipped') or r.get('error', '?'))[:300]}")
    w = [max(len(r[i]) for r in rows) for i in range(7)]
    if len(rows) > 1:
        L += ["  " + " | ".join(r[i].ljust(w[i]) if i == 0 else r[i].rjust(w[i]) for i in range(7)) for r in rows]
    L += notes
    if "ratio_ours_hf" in Bd:
        L.append(f"  ours/HF x{Bd['ratio_ours_hf']:.2f}; first-step loss |ours-HF| {Bd['first_loss_diff']:.4f}, "
                 f"grad-norm ratio {fmt(Bd.get('first_grad_norm_ratio'), '.3f')}"
                 + (f"; compile speedup x{Bd['compiled_speedup']:.2f}" if "compiled_speedup" in Bd else ""))
    cc = R["C"].get("pipeline_quick", {})
    if cc:
        L.append(f"C: {cc.get('skipped') or cc.get('error') or ('rc ' + str(cc.get('rc')) + ', ' + fmt(cc.get('wall_s'), '.0f') + ' s')}")
    if R["errors"]:
        L.append("errors: " + " || ".join(R["errors"]))
    L.append(f"total {el():.0f}s (budget {BUDGET:.0f}s)")
    return "\n".join(L)


# -- main --------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    global OUT, DEV, BUDGET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes; CPU when there is no CUDA")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-out", help="output directory (default $OUT)")
    ap.add_argument("--budget", type=float, default=330.0, help="no item starts after this many seconds (default 330)")
    ap.add_argument("--no-compile", action="store_true", help="skip ours+compile training; HF static without compile")
    ap.add_argument("--b1-static", action="store_true",
                    help="only batch-1 decode: ours against HF's static cache in turns, and the bandwidth bound")
    opts = ap.parse_args(argv)
    OUT = Path(opts.out)
    OUT.mkdir(parents=True, exist_ok=True)
    BUDGET = opts.budget
    signal.signal(signal.SIGTERM, on_term)

    if torch.cuda.is_available():
        DEV = torch.device("cuda", 0)
    elif opts.tiny:
        DEV = torch.device("cpu")
    else:
        print("error: no CUDA device; only --tiny runs on the CPU", file=sys.stderr)
        return 2
    if DEV.type == "cuda":
        torch.cuda.set_device(DEV)
    torch.manual_seed(0)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tf_version = transformers.__version__
    except Exception as e:  # noqa: BLE001
        tf_version = f"unavailable: {e}"

    import llama2

    rev_file = Path(llama2.__file__).resolve().parent.parent / "SOURCE_REV"
    m = R["meta"]
    m.update(argv=sys.argv, tiny=opts.tiny, budget_s=BUDGET, no_compile=opts.no_compile, device=str(DEV),
             started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), host=platform.node(), python=platform.python_version(),
             torch=torch.__version__, cuda=torch.version.cuda, transformers=tf_version, nproc=os.cpu_count(),
             llama2_path=str(Path(llama2.__file__).resolve().parent),
             project_rev=rev_file.read_text().strip() if rev_file.is_file() else "working tree")
    if DEV.type == "cuda":
        props = torch.cuda.get_device_properties(DEV)
        free_b, total_b = torch.cuda.mem_get_info()
        m.update(device_name=props.name, capability=f"{props.major}.{props.minor}", total_mem_gib=total_b / 2**30,
                 free_mem_gib=free_b / 2**30, sms=props.multi_processor_count,
                 cudnn=torch.backends.cudnn.version(), flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                 mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled())
    else:
        m.update(device_name=f"cpu ({platform.processor() or 'unknown'})", threads=torch.get_num_threads())
    log(f"device {m['device_name']} | torch {m['torch']} (cuda {m['cuda']}) | transformers {tf_version} | "
        f"python {m['python']} | project {m['project_rev']} from {m['llama2_path']} | budget {BUDGET:.0f}s")
    save()

    S = shapes(opts.tiny)
    SHAPES.update(S)
    section("device rates")
    item(R, "device_rates", lambda res: device_rates(res, S))
    if opts.b1_static:
        section("D. batch-1 decode against HF's static cache")
        section_d(S)
        save()
        return 0
    section("A. inference")
    a_out = {}
    try:
        a_out = section_a(S) or {}
    except Exception as e:  # noqa: BLE001  (item() catches per item; this is a last resort)
        traceback.print_exc()
        R["errors"].append(f"A: {type(e).__name__}: {e}"[:400])
    free()
    section("B. training step")
    try:
        section_b(S, opts.no_compile)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        R["errors"].append(f"B: {type(e).__name__}: {e}"[:400])
    free()
    section("A2. HF static cache decode")
    try:
        section_a2(S, opts.no_compile, a_out.get("ours_b1_e2e"))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        R["errors"].append(f"A2: {type(e).__name__}: {e}"[:400])
    free()
    section("C. pipeline")
    section_c(opts.tiny)
    text = summary(S)
    R["summary"] = text
    save()
    (OUT / "gpu_summary.txt").write_text(text + "\n")
    print("\n" + "=" * 100 + "\n" + text + "\n" + "=" * 100, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
