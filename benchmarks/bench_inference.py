"""Inference benchmark: our Llama 2 against Hugging Face transformers' LlamaForCausalLM, CPU fp32.

Both models get the identical random weights (ours -> HF names, q/k rows permuted to HF's half-split rotary
layout) and the identical inputs; the script first checks that they compute the same logits and the same greedy
tokens, since a benchmark of different work is worthless. Then it measures

1. prefill: one forward over batch 1 x 512 and batch 4 x 128 tokens (full logits, no cache), tokens/s;
2. decode, batch 1: 32-token prompt, greedy, 128 new tokens, no early stop, through each library's own
   ``generate``; decode tokens/s = 127 / (t(128 new) - t(1 new)) (the 1-new-token run is the prefill and the
   first sample, so the difference is the 127 cached single-token steps), plus end-to-end new tokens/s;
3. the memory-bandwidth bound of batch-1 decode: fp32 weight bytes read per token (every parameter except the
   embedding table, of which one row is read) / measured copy bandwidth (1 GiB copy_, read + write bytes);
   for reference also / the read rate of a 1 GiB fp32 matrix-vector product, the primitive decoding streams.

    .venv/bin/python benchmarks/bench_inference.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

import torch  # noqa: E402

from llama2.generation import generate  # noqa: E402
from llama2.model import ModelArgs, Transformer  # noqa: E402

PRESET = "bench-100m"
PROMPT_LEN, NEW_TOKENS = 32, 128
PREFILL_SHAPES = [(1, 512), (4, 128)]
GOALS = {"prefill": 1.0, "decode": 1.5}


# -- the reference model -------------------------------------------------------------------------------------
def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF's names, q/k permuted: the same mapping `llama2 convert --to hf` writes (the
    logits check below confirms both models compute the same function)."""
    from llama2.checkpoint.hf import hf_tensors

    return {k: v.clone() for k, v in hf_tensors(model)}


def build_hf(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.args
    cfg = LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.dim,
        intermediate_size=a.hidden_dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta,
        max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        attn_implementation="sdpa",
    )
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


def our_generate(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return generate(model, [prompt], temperature=0, max_new_tokens=n, stop_tokens=())[0].tokens


# -- the benchmark -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier figures)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    opts = ap.parse_args(argv)

    torch.set_num_threads(opts.threads)
    prefill_reps, decode_reps = (2, 1) if opts.quick else (7, 5)
    t_start = time.perf_counter()
    load_start, steal_start = C.load_average(), C.cpu_steal_snapshot()
    env = C.environment()
    print(f"torch {env['torch']} | transformers {env['transformers']} | python {env['python']} | "
          f"threads {env['threads']} (nproc {env['nproc']}) | {env['cpu']} ({env['cpu_capability']})")

    args = ModelArgs.from_preset(PRESET)
    ours = Transformer(args).init_weights(seed=0).eval()
    hf = build_hf(ours)
    print(f"model: {PRESET}, {ours.num_params() / 1e6:.1f}M params, fp32, random init (seed 0)")

    # -- correctness: same logits, same greedy tokens ------------------------------------------------------
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (2, 64), generator=g)
    with torch.inference_mode():
        lo, lt = ours(x), hf(x, use_cache=False).logits
    logit_diff = (lo - lt).abs().max().item()
    prompt = torch.randint(0, args.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    tok_ours, tok_hf = our_generate(ours, prompt, NEW_TOKENS), hf_generate(hf, prompt, NEW_TOKENS)
    same_tokens = tok_ours == tok_hf
    first_diff = next((i for i, (a, b) in enumerate(zip(tok_ours, tok_hf)) if a != b), None)
    ok = logit_diff < 1e-3 and same_tokens and len(tok_ours) == len(tok_hf) == NEW_TOKENS
    print(f"check: logits (2x64) max |ours - hf| = {logit_diff:.2e} (< 1e-3: {logit_diff < 1e-3}); "
          f"greedy {PROMPT_LEN}+{NEW_TOKENS}: {len(tok_ours)}/{len(tok_hf)} tokens, identical: {same_tokens}"
          + ("" if same_tokens else f" (first difference at new token {first_diff})"))
    if not ok:
        print("CHECK FAILED: the two models do not do the same work; figures below are not comparable")

    results: dict = {"env": env, "preset": PRESET, "quick": opts.quick,
                     "check": {"logits_max_abs_diff": logit_diff, "greedy_identical": same_tokens, "ok": ok}}
    rows, bound_rows = [], []

    # -- 1. prefill --------------------------------------------------------------------------------------------
    for B, T in PREFILL_SHAPES:
        ids = torch.randint(0, args.vocab_size, (B, T), generator=g)
        with torch.inference_mode():
            ts = C.timeit_interleaved({"ours": lambda: ours(ids), "hf": lambda: hf(ids, use_cache=False).logits},
                                      prefill_reps, warmup=1)
        t_ours, t_hf = C.median(ts["ours"]), C.median(ts["hf"])
        r_ours, r_hf = B * T / t_ours, B * T / t_hf
        best_ratio = min(ts["hf"]) / min(ts["ours"])
        results[f"prefill_{B}x{T}"] = {"ours_s": t_ours, "hf_s": t_hf, "ours_tok_s": r_ours, "hf_tok_s": r_hf,
                                       "ratio": r_ours / r_hf, "ours_times_s": ts["ours"], "hf_times_s": ts["hf"],
                                       "best_of_ratio": best_ratio}
        rows.append([f"prefill {B}x{T} (tok/s)", f"{r_ours:,.0f}", f"{r_hf:,.0f}", f"{r_ours / r_hf:.2f}x",
                     f"{best_ratio:.2f}x", f">= {GOALS['prefill']:.1f}x"])
        print(f"prefill {B}x{T}: ours {t_ours * 1e3:.0f} ms, hf {t_hf * 1e3:.0f} ms (medians)")

    # -- 2. decode, batch 1 ------------------------------------------------------------------------------------
    gens = {"ours": lambda n: our_generate(ours, prompt, n), "hf": lambda n: hf_generate(hf, prompt, n)}
    t1s = C.timeit_interleaved({k: (lambda f=f: f(1)) for k, f in gens.items()}, max(3, decode_reps), warmup=1)
    tns = C.timeit_interleaved({k: (lambda f=f: f(NEW_TOKENS)) for k, f in gens.items()}, decode_reps, warmup=0)
    dec = {}
    for name in gens:
        t1, tn = C.median(t1s[name]), C.median(tns[name])
        best_step = (min(tns[name]) - min(t1s[name])) / (NEW_TOKENS - 1)
        dec[name] = {"t_1_new_s": t1, f"t_{NEW_TOKENS}_new_s": tn,
                     "decode_tok_s": (NEW_TOKENS - 1) / (tn - t1), "end_to_end_tok_s": NEW_TOKENS / tn,
                     "step_ms": (tn - t1) / (NEW_TOKENS - 1) * 1e3, "best_of_step_ms": best_step * 1e3,
                     "t_1_new_times_s": t1s[name], f"t_{NEW_TOKENS}_new_times_s": tns[name]}
        print(f"generate {name}: 1 new token {t1 * 1e3:.0f} ms, {NEW_TOKENS} new tokens {tn * 1e3:.0f} ms "
              f"(medians) -> {dec[name]['step_ms']:.2f} ms per cached step (best-of {best_step * 1e3:.2f} ms)")
    dr = dec["ours"]["decode_tok_s"] / dec["hf"]["decode_tok_s"]
    er = dec["ours"]["end_to_end_tok_s"] / dec["hf"]["end_to_end_tok_s"]
    dr_best = dec["hf"]["best_of_step_ms"] / dec["ours"]["best_of_step_ms"]
    er_best = min(tns["hf"]) / min(tns["ours"])
    results["decode_b1"] = dict(dec, ratio=dr, end_to_end_ratio=er, best_of_ratio=dr_best,
                                best_of_end_to_end_ratio=er_best)
    rows.append([f"decode b1, {NEW_TOKENS - 1} cached steps (tok/s)", f"{dec['ours']['decode_tok_s']:.1f}",
                 f"{dec['hf']['decode_tok_s']:.1f}", f"{dr:.2f}x", f"{dr_best:.2f}x", f">= {GOALS['decode']:.1f}x"])
    rows.append([f"generate b1 end-to-end, {PROMPT_LEN}+{NEW_TOKENS} (new tok/s)",
                 f"{dec['ours']['end_to_end_tok_s']:.1f}", f"{dec['hf']['end_to_end_tok_s']:.1f}", f"{er:.2f}x",
                 f"{er_best:.2f}x", ""])

    # -- 3. memory-bandwidth bound ----------------------------------------------------------------------------
    bw = C.memory_bandwidth(1.0, reps=3 if opts.quick else 5)
    gemv_bw = C.gemv_bandwidth(1.0, reps=3 if opts.quick else 5)
    weight_bytes = (ours.num_params() - ours.tok_embeddings.weight.numel() + args.dim) * 4
    bound, gemv_bound = bw / weight_bytes, gemv_bw / weight_bytes
    # The floor of a batch-1 step on this machine: this model's own weight matrices, one GEMV each, nothing else
    # (best of several runs). No implementation of the same fp32 work can step faster than this.
    mats = [p.detach() for n, p in ours.named_parameters() if p.dim() == 2 and not n.startswith("tok_embeddings")]
    floor_s = C.gemv_chain_seconds(mats, reps=5 if opts.quick else 15)
    ours_dec, hf_dec = dec["ours"]["decode_tok_s"], dec["hf"]["decode_tok_s"]
    max_ratio = dec["hf"]["best_of_step_ms"] / 1e3 / floor_s  # best-of against best-of
    results["bandwidth"] = {"copy_bytes_per_s": bw, "gemv_read_bytes_per_s": gemv_bw,
                            "weight_bytes_per_token": weight_bytes, "bound_tok_s": bound,
                            "gemv_bound_tok_s": gemv_bound, "ours_fraction": ours_dec / bound,
                            "hf_fraction": hf_dec / bound, "gemv_chain_step_s": floor_s,
                            "gemv_chain_tok_s": 1 / floor_s, "max_possible_decode_ratio": max_ratio}
    print(f"bandwidth: 1 GiB copy_ {bw / 1e9:.1f} GB/s (read + write); 1 GiB fp32 GEMV {gemv_bw / 1e9:.1f} GB/s (read)")
    print(f"GEMV-only floor: the {len(mats)} weight matrices x 1 token take {floor_s * 1e3:.2f} ms (best of runs) "
          f"-> a decode step can be at most {max_ratio:.2f}x faster than transformers' (best-of) step")
    bound_rows.append([f"copy bound: {weight_bytes / 1e6:.0f} MB/token / {bw / 1e9:.1f} GB/s (1 GiB copy_, r+w)",
                       f"{bound:.1f} tok/s", f"{ours_dec / bound:.0%}", f"{hf_dec / bound:.0%}"])
    bound_rows.append([f"read bound: {weight_bytes / 1e6:.0f} MB/token / {gemv_bw / 1e9:.1f} GB/s (1 GiB GEMV)",
                       f"{gemv_bound:.1f} tok/s", f"{ours_dec / gemv_bound:.0%}", f"{hf_dec / gemv_bound:.0%}"])
    bound_rows.append([f"GEMV-only floor: the model's {len(mats)} weight GEMVs, nothing else",
                       f"{1 / floor_s:.1f} tok/s", f"{ours_dec * floor_s:.0%}", f"{hf_dec * floor_s:.0%}"])

    elapsed = time.perf_counter() - t_start
    results["elapsed_s"] = elapsed
    results["loadavg_start"], results["loadavg_end"] = load_start, C.load_average()
    results["cpu_steal_fraction"] = C.steal_fraction(steal_start)
    # Other processes on a small shared machine can slow a few runs several-fold; say so instead of hiding it.
    series = {f"prefill {B}x{T} {k}": results[f"prefill_{B}x{T}"][f"{k}_times_s"] for B, T in PREFILL_SHAPES
              for k in ("ours", "hf")}
    series.update({f"generate {k} {n} new": (t1s if n == 1 else tns)[k] for k in gens for n in (1, NEW_TOKENS)})
    noisy = {k: max(v) / min(v) for k, v in series.items() if len(v) > 1 and max(v) / min(v) > 1.25}
    results["noisy_series"] = noisy
    if noisy:
        print("WARNING: noisy timings (slowest/fastest run): "
              + ", ".join(f"{k} {r:.2f}x" for k, r in noisy.items()) + "; compare with the best-of ratio or rerun")
    print()
    print(C.markdown_table(["workload", "ours", "transformers", "ours/theirs", "best-of ratio", "goal"], rows))
    print()
    print(C.markdown_table(["batch-1 decode limit", "tok/s", "ours at", "transformers at"], bound_rows))
    print(f"\nmax possible decode ratio vs transformers (its best step / GEMV-only floor): {max_ratio:.2f}x")
    print(f"\n(tok/s from medians of {prefill_reps} prefill / {decode_reps} decode runs after a warmup; best-of ratio "
          f"from the fastest run of each; ours and transformers timed in turns; load average {load_start} at start, "
          f"{results['loadavg_end']} at end; CPU steal {results['cpu_steal_fraction']:.1%}; total {elapsed:.0f} s)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
