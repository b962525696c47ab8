"""``llama2 <command>``: one subcommand per job, each a thin shell over the library.

Generation options come from ``GenerationConfig`` and are given as ``key=value`` (e.g. ``temperature=0``)
or read from ``--config FILE.yaml``; ``llama2 <command> --help`` lists every field with its default.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, describe, load_config

# Heavy imports (torch, the model) happen inside the commands so that --help is instant.


def _gen_config(args):
    from .generation import GenerationConfig

    return load_config(GenerationConfig, args.config, args.overrides)


def _add_gen_options(p: argparse.ArgumentParser) -> None:
    from .generation import GenerationConfig

    p.add_argument("--config", help="YAML file of generation fields (below); key=value overrides win")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="generation fields, e.g. temperature=0 max_new_tokens=64")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.epilog = "generation fields (key=value):\n" + describe(GenerationConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _load(args):
    from .generation import Llama

    t0 = time.perf_counter()
    llama = Llama.from_pretrained(args.ckpt, dtype=args.dtype, device=args.device)
    if llama.tokenizer is None:
        raise SystemExit(f"error: {args.ckpt} has no tokenizer.model; copy one into the checkpoint directory")
    a = llama.args
    print(
        f"loaded {args.ckpt}: {llama.model.num_params() / 1e6:.1f}M parameters, dim {a.dim}, {a.n_layers} layers, "
        f"{a.n_heads} heads / {a.n_kv_heads} kv heads, context {a.max_seq_len} ({time.perf_counter() - t0:.1f}s)",
        file=sys.stderr,
    )
    return llama


# -- convert ----------------------------------------------------------------------------------------------------
def cmd_convert(args) -> None:
    from .checkpoint import detect, load, save
    from .tokenizer import Tokenizer

    src_format = detect(args.src)
    model, tok = load(args.src, dtype=args.dtype)
    if args.tokenizer:
        tok = Tokenizer.from_file(args.tokenizer)
    kwargs = {"overwrite": args.overwrite}
    if args.shards != 1:
        if args.to != "meta":
            raise SystemExit("error: --shards applies to --to meta only")
        kwargs["shards"] = args.shards
    if args.gguf_type:
        kwargs["dtype"] = args.gguf_type
    out = save(model, args.dst, format=args.to, tokenizer=tok, **kwargs)
    print(f"converted {args.src} ({src_format}) -> {out} ({args.to}), {model.num_params() / 1e6:.1f}M parameters"
          + ("" if tok is not None else "; no tokenizer found, none written"))


# -- generate ---------------------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    from .chat import encode_dialog_prompt
    from .generation import TextStreamer

    cfg = _gen_config(args)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SystemExit(f"error: prompt file not found: {path}")
        prompts += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompt-file")
    llama = _load(args)
    tok = llama.tokenizer
    if args.chat:
        ids = []
        for p in prompts:
            dialog = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}]
            ids.append(encode_dialog_prompt(tok, dialog))
    else:
        ids = [tok.encode(p, bos=True) for p in prompts]
    stream = len(prompts) == 1 and not args.no_stream
    streamer = TextStreamer(tok, lambda s: print(s, end="", flush=True)) if stream else None
    if stream and not args.chat:
        print(prompts[0], end="", flush=True)
    t0 = time.perf_counter()
    outs = llama.generate(ids, on_token=(lambda row, t: streamer.put(t)) if streamer else None, **vars(cfg))
    dt = time.perf_counter() - t0
    n = sum(len(o.tokens) for o in outs)
    if stream:
        print()
    else:
        for p, o in zip(prompts, outs):
            print(f"=== {p}\n{o.text}\n")
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s; finish: {', '.join(o.finish_reason for o in outs)}]", file=sys.stderr)


# -- chat -------------------------------------------------------------------------------------------------------
from .chat import fit_dialog  # noqa: E402  (re-exported: the chat loop and its tests use it)


def cmd_chat(args) -> None:
    from .generation import TextStreamer

    cfg = _gen_config(args)
    llama = _load(args)
    tok = llama.tokenizer
    if cfg.max_new_tokens >= llama.args.max_seq_len:
        raise SystemExit(f"error: max_new_tokens {cfg.max_new_tokens} leaves no room in a {llama.args.max_seq_len}-token context")
    dialog: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset starts over, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            user = input("\nyou> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not user.strip():
            continue
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            dialog = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
            print("(dialog reset)", file=sys.stderr)
            continue
        candidate = dialog + [{"role": "user", "content": user}]
        try:
            kept, ids, dropped = fit_dialog(tok, candidate, llama.args.max_seq_len - cfg.max_new_tokens)
        except ValueError as e:
            print(f"(message not sent: {e})", file=sys.stderr)
            continue
        if dropped:
            print(f"(context full: dropped the {dropped} oldest exchange(s))", file=sys.stderr)
        print("assistant> " if interactive else "", end="", flush=True)
        streamer = TextStreamer(tok, lambda s: print(s, end="", flush=True))
        out = llama.generate([ids], on_token=lambda row, t: streamer.put(t), **vars(cfg))[0]
        print(flush=True)
        dialog = kept + [{"role": "assistant", "content": out.text.strip()}]


# -- demo -------------------------------------------------------------------------------------------------------
def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


# -- prepare ----------------------------------------------------------------------------------------------------
def cmd_prepare(args) -> None:
    import dataclasses

    from .data.prepare import PrepareConfig, prepare

    cfg = load_config(PrepareConfig, args.config, args.overrides)
    flags = {"out": args.out, "tokenizer": args.tokenizer, "force": args.force or None, "skip_bad": args.skip_bad or None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.inputs:
        cfg = dataclasses.replace(cfg, inputs=list(cfg.inputs) + list(args.inputs))
    if not cfg.inputs or not cfg.out or not cfg.tokenizer:
        raise SystemExit("error: give inputs (--input or inputs=...), --out and --tokenizer")
    m = prepare(cfg)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    bad = f"; skipped {m['bad']['count']} bad record(s)" if m["bad"]["count"] else ""
    print(f"{cfg.out}: train {tr['tokens']:,} tokens / {tr['documents']:,} documents in {len(tr['shards'])} shard(s), "
          f"val {va['tokens']:,} tokens / {va['documents']:,} documents ({m['dtype']}, vocab {m['vocab_size']}){bad}")
    if cfg.val_fraction > 0 and va["documents"] == 0:
        print("warning: no document went to validation (too few documents? plain text splits documents at blank "
              "lines); raise val_fraction or give more documents", file=sys.stderr)


# -- pretrain ---------------------------------------------------------------------------------------------------
def cmd_pretrain(args) -> None:
    from .train.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    result = pretrain(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    last = result["history"][-1] if result["history"] else None
    if last:
        val = f", val loss {last['val_loss']:.3f} (ppl {last['val_ppl']:.1f})" if "val_loss" in last else ""
        print(f"step {last['step']}: loss {last['loss']:.3f}{val}; model in {cfg.out} (llama2 generate --ckpt {cfg.out})")
    if result.get("stopped"):
        raise SystemExit(130)  # interrupted: saved and resumable, but not finished


# -- sft --------------------------------------------------------------------------------------------------------
def cmd_sft(args) -> None:
    from .train.sft import SFTConfig, sft

    cfg = load_config(SFTConfig, args.config, args.overrides)
    result = sft(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    last = result["history"][-1] if result["history"] else None
    if last:
        val = f", val loss {last['val_loss']:.3f}" if "val_loss" in last else ""
        print(f"step {last['step']} (epoch {last['epoch']:.2f}): loss {last['loss']:.3f}{val}; model in {cfg.out} "
              f"(llama2 chat --ckpt {cfg.out})")
    if result.get("stopped"):
        raise SystemExit(130)


# -- reward ------------------------------------------------------------------------------------------------------
def cmd_reward(args) -> None:
    from .rlhf.reward import format_accuracy_table
    from .train.reward import RewardConfig, train_reward

    cfg = load_config(RewardConfig, args.config, args.overrides)
    result = train_reward(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    ev = result.get("eval") or {}
    if ev.get("accuracy"):
        name = f"{cfg.kind} RM (margin {cfg.margin})"
        print(format_accuracy_table({name: ev["accuracy"]}))
    print(f"reward model in {cfg.out} (llama2.RewardModel.from_pretrained({cfg.out!r}))")
    if result.get("stopped"):
        raise SystemExit(130)


# -- rejection sampling, ppo ---------------------------------------------------------------------------------------
def cmd_rejection(args) -> None:
    from .train.rejection import RejectionConfig, rejection

    cfg = load_config(RejectionConfig, args.config, args.overrides)
    result = rejection(cfg)
    if result.get("stopped"):
        raise SystemExit(130)  # interrupted: the unfinished iteration is redone by a rerun
    if os.environ.get("RANK", "0") == "0":
        for s in result["history"]:
            print(f"iteration {s['iteration']} (T={s['temperature']}): mean reward {s['mean_reward']:.3f}, "
                  f"best-of-{s['k']} {s['mean_best_of_k']:.3f}, kept {s['mean_kept_reward']:.3f}")
        print(f"final model in {cfg.out} (llama2 chat --ckpt {cfg.out})")


def cmd_ppo(args) -> None:
    from .train.ppo import PPOConfig, ppo

    cfg = load_config(PPOConfig, args.config, args.overrides)
    result = ppo(cfg)
    if os.environ.get("RANK", "0") == "0":
        last = result["history"][-1] if result["history"] else {}
        print(f"{len(result['history'])} iterations, last reward {last.get('reward', float('nan')):.3f}, KL "
              f"{last.get('kl', float('nan')):.3f}; best held-out reward {result['best_heldout_reward']:.4f}; "
              f"policy in {cfg.out} (llama2 chat --ckpt {cfg.out})")
    if result.get("stopped"):
        raise SystemExit(130)


def cmd_gatt(args) -> None:
    from .train.gatt import GattConfig, gatt

    cfg = load_config(GattConfig, args.config, args.overrides)
    result = gatt(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"model in {cfg.out} (llama2 gatt-eval ckpts=BEFORE,{cfg.out} dialogs=...)")
    if result.get("stopped"):
        raise SystemExit(130)


def cmd_gatt_eval(args) -> None:
    from .train.gatt import GattEvalConfig, gatt_eval

    cfg = load_config(GattEvalConfig, args.config, args.overrides)
    gatt_eval(cfg)
    print(f"written {cfg.out}/gatt_eval.json and {cfg.out}/gatt_adherence.png")


def cmd_pipeline(args) -> None:
    from .pipeline import run_pipeline

    report = run_pipeline(args.out, quick=args.quick, from_stage=args.from_stage, seed=args.seed)
    print(f"\nreport: {report} (figures in {report.parent / 'report'}, numbers in {report.parent / 'metrics.json'})")
    print(f"chat with the final model: llama2 chat --ckpt {report.parent / 'final'}")


def _stage_parser(sub, name: str, cls: type, help: str, description: str, example: str, func) -> None:
    """A training stage's subcommand: --config YAML plus key=value overrides, every field listed in --help."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML file of {name} fields (below), e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{name} fields (listed below), e.g. out=runs/{name}")
    p.epilog = f"{name} fields (key=value):\n" + describe(cls)
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama2",
        description="The Llama 2 recipe (Touvron et al., 2023): model, checkpoints, generation and chat.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("convert", help="convert a checkpoint between native, Meta, Hugging Face and GGUF formats",
                       description="Read a checkpoint in any supported format (detected) and write it in another.")
    p.add_argument("src", help="checkpoint directory (native, Meta params.json + consolidated.*.pth, HF config.json + safetensors) or .gguf file")
    p.add_argument("dst", help="output directory (or .gguf file for --to gguf)")
    p.add_argument("--to", required=True, choices=["native", "meta", "hf", "gguf"], help="output format")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta (consolidated.00.pth ...)")
    p.add_argument("--dtype", default=None, help="convert weights to float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--gguf-type", default=None, choices=["f32", "f16"], help="tensor type for --to gguf (default f32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (.model or .gguf) to write alongside, if SRC has none")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is already a checkpoint")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="complete prompts (plain or in the chat format)",
                       description="Generate continuations of prompts with the KV cache. One prompt streams as it is generated.")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a text file, one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the Llama 2 chat format")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    _add_gen_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the Llama 2 chat format",
                       description="Chat with a model. The dialog is kept across turns; when it would overflow the "
                       "context, the oldest exchanges are dropped (and you are told).")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--system", default=None, help="system prompt, folded into the first user turn as <<SYS>>...<</SYS>>")
    _add_gen_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("prepare", help="tokenize text / JSONL corpora into token shards for pretraining",
                       description="Tokenize documents ([BOS] + ids + [EOS]) into flat uint16/uint32 shards plus a "
                       "manifest.json, split into train/val by a seeded hash of each document. A rerun with unchanged "
                       "inputs, tokenizer and settings does nothing.")
    p.add_argument("--input", dest="inputs", action="append", metavar="PATH",
                   help="a file, directory or glob (repeat); added to inputs=... from --config / overrides")
    p.add_argument("--out", default=None, help="output directory (same as out=...)")
    p.add_argument("--tokenizer", default=None, help="tokenizer .model or .gguf (same as tokenizer=...)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date (same as force=true)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad input instead of failing (same as skip_bad=true)")
    p.add_argument("--config", help="YAML file of prepare fields (below); key=value overrides win")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="prepare fields, e.g. val_fraction=0.01 shard_tokens=16777216")
    from .data.prepare import PrepareConfig

    p.epilog = "prepare fields (key=value):\n" + describe(PrepareConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="pretrain on token shards (AdamW 0.9/0.95, warmup + cosine to 10%%, clip 1.0)",
                       description="Next-token pretraining on `llama2 prepare` shards with the paper's optimizer and "
                       "schedule (Llama 2 section 2.2). Checkpoints go to OUT/checkpoints; OUT itself holds the latest "
                       "model. resume=true continues exactly where the newest checkpoint left off.")
    p.add_argument("--config", help="YAML file of pretrain fields (below), e.g. configs/pretrain/toy.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretrain fields, e.g. data=runs/shards max_steps=500")
    from .train.pretrain import PretrainConfig

    p.epilog = "pretrain fields (key=value):\n" + describe(PretrainConfig)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=cmd_pretrain)

    from .train.sft import SFTConfig

    _stage_parser(sub, "sft", SFTConfig, "supervised fine-tuning on dialogs, loss on the answers only (paper section 3.1)",
                  "Fine-tune a pretrained checkpoint on chat-formatted dialogs (JSONL). System and user tokens carry no "
                  "loss; dialogs are packed into seq_len rows with attention kept inside each dialog. Works alone or "
                  "under torchrun (fsdp/ddp) like pretrain.", "configs/sft/toy.yaml", cmd_sft)

    from .train.reward import RewardConfig

    _stage_parser(sub, "reward", RewardConfig, "train a helpfulness or safety reward model with the margin loss (section 3.2.2)",
                  "Train a reward model (the chat model with a scalar head) on preference pairs with "
                  "-log sigmoid(r_chosen - r_rejected - m(rating)) (margins of Table 27), on one kind's data mixed as "
                  "the paper describes, and report held-out accuracy per rating (Table 8 layout) in OUT/eval.json.",
                  "configs/reward/toy.yaml", cmd_reward)
    from .train.rejection import RejectionConfig

    _stage_parser(sub, "rejection", RejectionConfig, "rejection sampling fine-tuning: best of K samples by reward (section 3.2.3)",
                  "Sample K answers per prompt from the newest policy, score them with the reward model(s) (combined "
                  "safety/helpfulness rule), keep the best of this and all earlier iterations, fine-tune on the kept "
                  "set with the SFT loss; repeat for each iteration.", "configs/rejection/toy.yaml", cmd_rejection)
    from .train.ppo import PPOConfig

    _stage_parser(sub, "ppo", PPOConfig, "PPO against the combined safety/helpfulness reward with a KL penalty (section 3.2.3)",
                  "Optimise the policy with PPO on R = whiten(logit(R_c)) - beta KL(pi || pi_0), GAE advantages, clipped "
                  "policy and value losses, one step per minibatch, early stopping on held-out prompts' reward.",
                  "configs/ppo/toy.yaml", cmd_ppo)

    from .train.gatt import GattConfig, GattEvalConfig

    _stage_parser(sub, "gatt", GattConfig, "Ghost Attention: multi-turn consistency with a system instruction (section 3.3)",
                  "Sample multi-turn dialogs with an instruction (hobby, style, persona; short form half the time) on "
                  "every user turn, keep answers that follow it, then fine-tune with the instruction only in the first "
                  "turn and zero loss on earlier turns.", "configs/gatt/toy.yaml", cmd_gatt)
    _stage_parser(sub, "gatt-eval", GattEvalConfig, "adherence to a system instruction turn by turn, up to 20 turns",
                  "Play probe dialogs turn by turn with each checkpoint, the instruction given only at the start, and "
                  "report the share of answers that follow it per turn (table, gatt_eval.json, gatt_adherence.png).",
                  "configs/gatt/eval.yaml", cmd_gatt_eval)

    from .pipeline import STAGES

    p = sub.add_parser("pipeline", help="the whole recipe on the built-in toy world, with a report (what make run runs)",
                       description="world -> tokenizer -> prepare -> pretrain -> sft -> reward models -> rejection sampling "
                       "-> ppo -> gatt -> eval -> report, on CPU. A stage whose output exists is skipped, so a stopped run "
                       "resumes; --from redoes a stage and all after it. Default about 20 minutes on 2 cores, --quick about 3.")
    p.add_argument("--out", default="runs/toy", help="output directory (default runs/toy)")
    p.add_argument("--quick", action="store_true", help="a smaller world and model (about 3 minutes)")
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None, help="redo this stage and every later one")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every stage")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("demo", help="a short tour on a tiny model: train a tokenizer, convert through every format, generate")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
