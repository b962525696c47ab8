"""Inference benchmark, CPU: our Llama 2 (eager reference path, static engine, static engine compiled, int8)
against Hugging Face transformers' LlamaForCausalLM (dynamic and static cache) and llama.cpp (f32, f16, Q8_0
GGUF files written by our own converter), all on the same random weights (bench-100m, 124.7M parameters).

Every peer gets the identical weights (ours -> HF names, q/k rows permuted to HF's half-split rotary layout; ours
-> GGUF by ``llama2.checkpoint.save(format="gguf")``, Q8_0 by llama.cpp's own quantizer from the f32 file) and the
identical inputs; the script first checks that they compute the same logits and the same greedy tokens, since a
benchmark of different work is worthless. Then it measures

1. prefill: batch 1 x 512 tokens: as generation does it (last-position logits, into a cache: our engine's
   chunked prefill, llama.cpp's ``eval``) and as a full forward (all logits, no cache: ``model(ids)`` vs HF);
   batch 4 x 128 full forward vs HF;
2. decode, batch 1: 32-token prompt, greedy, 128 new tokens, no early stop, through each library's own generation
   loop; decode tokens/s = 127 / (t(128 new) - t(1 new)) (the 1-new-token run is the prefill and the first
   sample, so the difference is the 127 cached single-token steps), plus end-to-end new tokens/s;
3. the memory-bandwidth bound of batch-1 decode: fp32 weight bytes read per token / measured bandwidth.

All contenders are timed in turns (a b c ... a b c ...), so load from other processes falls on all alike; the
tables give the median ratio and the best-of ratio. llama.cpp needs ``bash benchmarks/setup_llamacpp.sh`` first
(it is skipped with a note otherwise).

    .venv/bin/python benchmarks/bench_inference.py [--threads N] [--quick] [--no-llamacpp] [--json out.json]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402

from llama2.generate import generate  # noqa: E402
from llama2.model import ModelArgs, Transformer  # noqa: E402

PRESET = "bench-100m"
PROMPT_LEN, NEW_TOKENS = 32, 128
PREFILL_SHAPES = [(1, 512), (4, 128)]
GOALS = {"prefill": 1.0, "decode": 1.5, "decode_vs_llamacpp_f32": 0.8, "int8_vs_q8_0": 1.0, "prefill_vs_llamacpp": 1.0}


# -- the reference model -------------------------------------------------------------------------------------
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF's names, q/k permuted: the same mapping `llama2 convert --to hf` writes (the
    logits check below confirms both models compute the same function)."""
    from llama2.checkpoint.hf import hf_tensors

    return {k: v.clone() for k, v in hf_tensors(model)}


def build_hf(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama2.checkpoint.hf import config_json

    a = model.args
    # the config our HF export writes (the run checks the two models' logits against each other)
    cfg = LlamaConfig(**config_json(a, torch.float32), attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]  # derived buffers, not weights
    if missing or unexpected:
        raise RuntimeError(f"HF weight mapping: missing {missing}, unexpected {unexpected}")
    hf.eval()
    # Greedy with no early stop and no logits processors: no EOS (min_new_tokens would otherwise add a
    # processor that masks the EOS logit, i.e. different work and possibly different tokens).
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.generation_config.bos_token_id = None
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(hf.generation_config, k):
            setattr(hf.generation_config, k, None)
    return hf


def hf_generate(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], dtype=torch.long)
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def hf_generate_static(hf, prompt: list[int], n: int, compile_: bool = False) -> list[int]:
    """transformers with its static cache (cache_implementation="static"); ``compile_`` also compiles the forward
    (transformers does that by itself only on accelerators; _compile_all_devices extends it to the CPU)."""
    from transformers import CompileConfig

    ids = torch.tensor([prompt], dtype=torch.long)
    kw = {"compile_config": CompileConfig(_compile_all_devices=True, mode="default")} if compile_ else {"disable_compile": True}
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      cache_implementation="static", eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def our_generate(model: Transformer, prompt: list[int], n: int, engine: str = "eager", compile_: bool = False) -> list[int]:
    return generate(model, [prompt], temperature=0, max_new_tokens=n, stop_tokens=(), engine=engine,
                    compile=compile_)[0].tokens


def our_prefill(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """The engine's prefill as generation runs it: (B, T) into a fresh static cache, last-position logits."""
    from llama2.generate import decoder_for
    from llama2.kv_cache import StaticKVCache

    cache = StaticKVCache.for_model(model, ids.shape[0], ids.shape[1] + 1)
    return decoder_for(model).prefill(cache, ids, torch.zeros(ids.shape[0], dtype=torch.long))


# -- the benchmark -------------------------------------------------------------------------------------------
def same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share (a random-init model's logits are nearly flat, so
    one flipped near-tie makes everything after it differ: the shared prefix is the meaningful figure)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_series(gens: dict, reps: int) -> dict:
    """Times of each generator at 1 and NEW_TOKENS new tokens, all in turns; per contender the decode step time
    (median and best-of) and end-to-end figures."""
    t1s = C.timeit_interleaved({k: (lambda f=f: f(1)) for k, f in gens.items()}, max(3, reps), warmup=1)
    tns = C.timeit_interleaved({k: (lambda f=f: f(NEW_TOKENS)) for k, f in gens.items()}, reps, warmup=0)
    dec = {}
    for name in gens:
        t1, tn = C.median(t1s[name]), C.median(tns[name])
        dec[name] = {"t_1_new_s": t1, f"t_{NEW_TOKENS}_new_s": tn,
                     "step_ms": (tn - t1) / (NEW_TOKENS - 1) * 1e3,
                     "best_of_step_ms": (min(tns[name]) - min(t1s[name])) / (NEW_TOKENS - 1) * 1e3,
                     "end_to_end_tok_s": NEW_TOKENS / tn, "best_end_to_end_s": min(tns[name]),
                     "t_1_new_times_s": t1s[name], f"t_{NEW_TOKENS}_new_times_s": tns[name]}
        dec[name]["decode_tok_s"] = 1e3 / dec[name]["step_ms"]
        print(f"decode {name:28s} 1 new {t1 * 1e3:6.0f} ms, {NEW_TOKENS} new {tn * 1e3:6.0f} ms (medians) -> "
              f"{dec[name]['step_ms']:6.2f} ms/step (best-of {dec[name]['best_of_step_ms']:6.2f}) = "
              f"{dec[name]['decode_tok_s']:6.1f} tok/s")
    return dec


def main(argv: list[str] | None = None) -> dict:
    ap = C.arguments(__doc__, "torch intra-op threads and llama.cpp threads (default 2)")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp even when it is installed")
    ap.add_argument("--hf-compile", action="store_true", help="also time transformers' static cache with its compiled forward")
    ap.add_argument("--gguf-dir", default=str(C.ROOT / "build" / "bench-gguf"), help="where the GGUF files go")
    opts = ap.parse_args(argv)

    torch.set_num_threads(opts.threads)
    prefill_reps, decode_reps = (2, 2) if opts.quick else (7, 5)
    t_start = time.perf_counter()
    load_start, steal_start = C.load_average(), C.cpu_steal_snapshot()
    env = C.environment()
    print(f"torch {env['torch']} | transformers {env['transformers']} | python {env['python']} | "
          f"threads {env['threads']} (nproc {env['nproc']}) | {env['cpu']} ({env['cpu_capability']})")

    args = ModelArgs.from_preset(PRESET)
    ours = Transformer(args).init_weights(seed=0).eval()
    hf = build_hf(ours)
    from llama2.generate import quantize_int8

    ours_int8 = quantize_int8(Transformer(args).init_weights(seed=0).eval())
    print(f"model: {PRESET}, {ours.num_params() / 1e6:.1f}M params, fp32, random init (seed 0)")

    llamacpp = {}
    if not opts.no_llamacpp:
        from _llamacpp import LlamaCpp, export_ggufs, load_llamacpp

        if load_llamacpp() is not None:
            import llama_cpp

            files = export_ggufs(ours, Path(opts.gguf_dir))
            llamacpp = {k: LlamaCpp(f, PROMPT_LEN + NEW_TOKENS + 512, opts.threads, kv_f32=k == "f32") for k, f in files.items()}
            env["llama_cpp_python"] = llama_cpp.__version__
            print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, GGUF files in {opts.gguf_dir}")

    # -- correctness: same logits, same greedy tokens ------------------------------------------------------
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (2, 64), generator=g)
    with torch.inference_mode():
        lo, lt = ours(x), hf(x, use_cache=False).logits
        lq = ours_int8(x)
    logit_diff = (lo - lt).abs().max().item()
    prompt = torch.randint(0, args.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    tok_ours, tok_hf = our_generate(ours, prompt, NEW_TOKENS), hf_generate(hf, prompt, NEW_TOKENS)
    tok_static = our_generate(ours, prompt, NEW_TOKENS, "static")
    t0 = time.perf_counter()
    tok_compiled = our_generate(ours, prompt, NEW_TOKENS, "static", True)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok_int8 = our_generate(ours_int8, prompt, NEW_TOKENS, "static", True)
    compile_int8_s = time.perf_counter() - t0
    same_tokens = tok_ours == tok_hf
    ok = logit_diff < 1e-3 and same_tokens and tok_static == tok_ours and tok_compiled == tok_ours
    check = {"logits_max_abs_diff_hf": logit_diff, "greedy_identical_hf": same_tokens,
             "static_equals_eager": tok_static == tok_ours, "compiled_equals_eager": tok_compiled == tok_ours,
             "first_call_with_compile_s": compile_s, "first_int8_call_with_compile_s": compile_int8_s,
             "int8_logits_max_abs_err": (lq - lo).abs().max().item(), "int8_logits_mean_abs_err": (lq - lo).abs().mean().item(),
             "int8_greedy_same_prefix": same_prefix(tok_int8, tok_ours)}
    print(f"check: logits (2x64) max |ours - hf| = {logit_diff:.2e} (< 1e-3: {logit_diff < 1e-3}); greedy "
          f"{PROMPT_LEN}+{NEW_TOKENS}: hf identical {same_tokens}, static engine identical {tok_static == tok_ours}, "
          f"compiled identical {tok_compiled == tok_ours} (first call incl. compile {compile_s:.1f} s)")
    if llamacpp:
        lc = LlamaCpp(files["f32"], 128, opts.threads, logits_all=True, kv_f32=True)
        ref = lo[0].numpy()
        lcl = lc.all_logits(x[0].tolist())
        check["llamacpp_f32_logits_max_abs_diff"] = float(abs(lcl - ref).max())
        q8 = LlamaCpp(files["q8_0"], 128, opts.threads, logits_all=True).all_logits(x[0].tolist())
        check["llamacpp_q8_0_logits_max_abs_err"] = float(abs(q8 - lcl).max())
        check["llamacpp_q8_0_logits_mean_abs_err"] = float(abs(q8 - lcl).mean())
        tok_lc = llamacpp["f32"].greedy(prompt, NEW_TOKENS)
        tok_q8 = llamacpp["q8_0"].greedy(prompt, NEW_TOKENS)
        check["llamacpp_f32_greedy_identical"] = tok_lc == tok_ours
        check["llamacpp_q8_0_greedy_same_prefix"] = same_prefix(tok_q8, tok_lc)
        ok = ok and check["llamacpp_f32_logits_max_abs_diff"] < 1e-3
        print(f"check: llama.cpp f32 logits (64 positions) max |llama.cpp - ours| = "
              f"{check['llamacpp_f32_logits_max_abs_diff']:.2e} (< 1e-3: {check['llamacpp_f32_logits_max_abs_diff'] < 1e-3}); "
              f"greedy identical {tok_lc == tok_ours}")
        del lc
    print(f"int8 vs fp32 (ours, 2x64 positions): logits max abs err {check['int8_logits_max_abs_err']:.4f}, mean "
          f"{check['int8_logits_mean_abs_err']:.5f} (logit std {lo.std().item():.3f}); greedy tokens equal to fp32's for "
          f"the first {check['int8_greedy_same_prefix']} of {NEW_TOKENS}; first int8 call incl. compile {compile_int8_s:.1f} s")
    if llamacpp:
        print(f"Q8_0 vs f32 (llama.cpp, 64 positions): logits max abs err {check['llamacpp_q8_0_logits_max_abs_err']:.4f}, "
              f"mean {check['llamacpp_q8_0_logits_mean_abs_err']:.5f}; greedy tokens equal to f32's for the first "
              f"{check['llamacpp_q8_0_greedy_same_prefix']} of {NEW_TOKENS}")
    if not ok:
        print("CHECK FAILED: the contenders do not do the same work; figures below are not comparable")

    results: dict = {"env": env, "preset": PRESET, "quick": opts.quick, "threads": opts.threads, "check": check, "ok": ok}
    rows, bound_rows = [], []

    # -- 1. prefill --------------------------------------------------------------------------------------------
    ids = torch.randint(0, args.vocab_size, (1, 512), generator=g)
    fns = {"ours engine (last logits)": lambda: our_prefill(ours, ids), "ours model(ids) (all logits)": lambda: ours(ids),
           "hf (all logits)": lambda: hf(ids, use_cache=False).logits}
    if llamacpp:
        fns["llama.cpp f32 (last logits)"] = lambda: llamacpp["f32"].prefill(ids[0].tolist())
    with torch.inference_mode():
        ts = C.timeit_interleaved(fns, prefill_reps, warmup=1)
    pre = {k: {"median_s": C.median(v), "best_s": min(v), "times_s": v, "tok_s": 512 / C.median(v)} for k, v in ts.items()}
    results["prefill_1x512"] = pre
    for k, v in pre.items():
        print(f"prefill 1x512 {k:30s} {v['median_s'] * 1e3:6.0f} ms median, {v['best_s'] * 1e3:6.0f} best = {v['tok_s']:6.0f} tok/s")
    rows.append(["prefill 1x512, full logits (tok/s)", f"{pre['ours model(ids) (all logits)']['tok_s']:,.0f}",
                 "transformers", f"{pre['hf (all logits)']['tok_s']:,.0f}",
                 f"{pre['hf (all logits)']['median_s'] / pre['ours model(ids) (all logits)']['median_s']:.2f}x",
                 f"{pre['hf (all logits)']['best_s'] / pre['ours model(ids) (all logits)']['best_s']:.2f}x", ">= 1.0x"])
    if llamacpp:
        a, b = pre["ours engine (last logits)"], pre["llama.cpp f32 (last logits)"]
        rows.append(["prefill 1x512, as generation (tok/s)", f"{a['tok_s']:,.0f}", "llama.cpp f32", f"{b['tok_s']:,.0f}",
                     f"{b['median_s'] / a['median_s']:.2f}x", f"{b['best_s'] / a['best_s']:.2f}x",
                     f">= {GOALS['prefill_vs_llamacpp']:.1f}x"])
    ids4 = torch.randint(0, args.vocab_size, (4, 128), generator=g)
    with torch.inference_mode():
        ts = C.timeit_interleaved({"ours": lambda: ours(ids4), "hf": lambda: hf(ids4, use_cache=False).logits},
                                  prefill_reps, warmup=1)
    results["prefill_4x128"] = {k: {"median_s": C.median(v), "best_s": min(v), "times_s": v} for k, v in ts.items()}
    rows.append(["prefill 4x128, full logits (tok/s)", f"{512 / C.median(ts['ours']):,.0f}", "transformers",
                 f"{512 / C.median(ts['hf']):,.0f}", f"{C.median(ts['hf']) / C.median(ts['ours']):.2f}x",
                 f"{min(ts['hf']) / min(ts['ours']):.2f}x", ">= 1.0x"])

    # -- 2. decode, batch 1 ------------------------------------------------------------------------------------
    gens = {
        "ours static, compiled": lambda n: our_generate(ours, prompt, n, "static", True),
        "ours static, eager step": lambda n: our_generate(ours, prompt, n, "static", False),
        "ours eager (reference)": lambda n: our_generate(ours, prompt, n, "eager"),
        "ours int8 static, compiled": lambda n: our_generate(ours_int8, prompt, n, "static", True),
        "hf eager (dynamic cache)": lambda n: hf_generate(hf, prompt, n),
        "hf static cache": lambda n: hf_generate_static(hf, prompt, n),
    }
    if opts.hf_compile:
        gens["hf static cache, compiled"] = lambda n: hf_generate_static(hf, prompt, n, True)
    for k, lc in llamacpp.items():
        gens[f"llama.cpp {k}"] = lambda n, lc=lc: lc.greedy(prompt, n)
    dec = decode_series(gens, decode_reps)
    results["decode_b1"] = dec

    def ratio_row(label, a, b, goal=""):
        da, db = dec[a], dec[b]
        rows.append([label, f"{da['decode_tok_s']:.1f}", b, f"{db['decode_tok_s']:.1f}",
                     f"{db['step_ms'] / da['step_ms']:.2f}x", f"{db['best_of_step_ms'] / da['best_of_step_ms']:.2f}x", goal])

    ratio_row("decode b1, ours static compiled (tok/s)", "ours static, compiled", "hf eager (dynamic cache)", ">= 1.5x")
    ratio_row("decode b1, ours static compiled (tok/s)", "ours static, compiled", "hf static cache")
    if "llama.cpp f32" in dec:
        ratio_row("decode b1, ours static compiled (tok/s)", "ours static, compiled", "llama.cpp f32", ">= 0.8x")
        ratio_row("decode b1, ours static eager step (tok/s)", "ours static, eager step", "llama.cpp f32")
        ratio_row("decode b1, ours int8 compiled (tok/s)", "ours int8 static, compiled", "llama.cpp q8_0", ">= 1.0x")
        ratio_row("decode b1, ours int8 compiled (tok/s)", "ours int8 static, compiled", "llama.cpp f16")
    ratio_row("decode b1, ours eager reference (tok/s)", "ours eager (reference)", "hf eager (dynamic cache)")

    # -- 3. memory-bandwidth bound ----------------------------------------------------------------------------
    bw = C.memory_bandwidth(1.0, reps=3 if opts.quick else 5)
    gemv_bw = C.gemv_bandwidth(1.0, reps=3 if opts.quick else 5)
    weight_bytes = (ours.num_params() - ours.tok_embeddings.weight.numel() + args.dim) * 4
    mats = [p.detach() for n, p in ours.named_parameters() if p.dim() == 2 and not n.startswith("tok_embeddings")]
    floor_s = C.gemv_chain_seconds(mats, reps=5 if opts.quick else 15)
    results["bandwidth"] = {"copy_bytes_per_s": bw, "gemv_read_bytes_per_s": gemv_bw, "weight_bytes_per_token": weight_bytes,
                            "bound_tok_s": bw / weight_bytes, "gemv_chain_step_s": floor_s}
    print(f"bandwidth: 1 GiB copy_ {bw / 1e9:.1f} GB/s (read + write); 1 GiB fp32 torch.mv {gemv_bw / 1e9:.1f} GB/s (read); "
          f"the 85 weight matrices through F.linear one after another {floor_s * 1e3:.2f} ms")
    for name in [k for k in dec if k.startswith(("ours static", "llama.cpp f32", "hf eager"))]:
        if "int8" in name:
            continue
        bound_rows.append([name, f"{dec[name]['decode_tok_s']:.1f}",
                           f"{weight_bytes / (dec[name]['best_of_step_ms'] / 1e3) / 1e9:.1f} GB/s",
                           f"{dec[name]['decode_tok_s'] / (bw / weight_bytes):.0%}"])

    elapsed = time.perf_counter() - t_start
    results.update(elapsed_s=elapsed, loadavg_start=load_start, loadavg_end=C.load_average(),
                   cpu_steal_fraction=C.steal_fraction(steal_start))
    series = {f"decode {k} {n} new": v[f"t_{n}_new_times_s"] for k, v in dec.items() for n in (1, NEW_TOKENS)}
    noisy = {k: max(v) / min(v) for k, v in series.items() if len(v) > 1 and max(v) / min(v) > 1.25}
    results["noisy_series"] = noisy
    if noisy:
        print("WARNING: noisy timings (slowest/fastest run): "
              + ", ".join(f"{k} {r:.2f}x" for k, r in noisy.items()) + "; compare with the best-of ratio or rerun")
    print()
    print(C.markdown_table(["workload", "ours", "peer", "peer's", "ours/peer (median)", "best-of ratio", "goal"], rows))
    print()
    print(C.markdown_table([f"batch-1 decode, fp32 ({weight_bytes / 1e6:.0f} MB/token)", "tok/s", "weights read at (best step)",
                            f"of the copy bound {bw / weight_bytes:.1f} tok/s"], bound_rows))
    print(f"\n(threads {opts.threads}; tok/s from medians of {prefill_reps} prefill / {decode_reps} decode runs after a warmup; "
          f"best-of ratio from the fastest run of each; all contenders timed in turns; load average {load_start} at start, "
          f"{results['loadavg_end']} at end; CPU steal {results['cpu_steal_fraction']:.1%}; total {elapsed:.0f} s)")
    return C.save_json(opts.json, results)


if __name__ == "__main__":
    main()
