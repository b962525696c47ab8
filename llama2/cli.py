"""``llama2 <command>``: one subcommand per job, each a thin shell over the library.

The training stages share one command pattern, built from a table: ``llama2 STAGE [--config FILE.yaml]
[key=value ...]`` fills the stage's config (defaults, then the YAML file, then the overrides) and runs it;
``--help`` lists every field with its meaning and default, grouped as the config nests them. Generation options
come from ``GenerationConfig`` the same way.

Every expected failure (a bad file, setting or checkpoint, a missing device, an interrupted run) ends in one line
``error: ...`` and a non-zero exit; ``--debug`` (or ``LLAMA2_DEBUG=1``) shows the traceback instead.

Start-up: a command's modules (a stage's, the pipeline's, lm-eval, FastAPI) are imported only when that command
runs or shows its help.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import ConfigError, describe, load_config

# -- the training stages: one pattern ------------------------------------------------------------------------------


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all


def _loss_summary(cfg, result, next_cmd: str) -> str:
    last = result["history"][-1] if result["history"] else None
    if not last:
        return f"nothing left to do; model in {cfg.run.out}"
    val = f", val loss {last['val_loss']:.3f}" if "val_loss" in last else ""
    ppl = f" (ppl {last['val_ppl']:.1f})" if "val_ppl" in last else ""
    epoch = f" (epoch {last['epoch']:.2f})" if "epoch" in last else ""
    return f"step {last['step']}{epoch}: loss {last['loss']:.3f}{val}{ppl}; model in {cfg.run.out} ({next_cmd} --ckpt {cfg.run.out})"


def _reward_summary(cfg, result) -> str:
    from .rlhf.reward import format_accuracy_table

    ev = result.get("eval") or {}
    table = format_accuracy_table({f"{cfg.kind} RM (margin {cfg.margin})": ev["accuracy"]}) + "\n" if ev.get("accuracy") else ""
    return f"{table}reward model in {cfg.run.out} (llama2.RewardModel.from_pretrained({cfg.run.out!r}))"


def _rejection_summary(cfg, result) -> str:
    lines = [f"iteration {s['iteration']} (T={s['temperature']}): mean reward {s['mean_reward']:.3f}, "
             f"best-of-{s['k']} {s['mean_best_of_k']:.3f}, kept {s['mean_kept_reward']:.3f}" for s in result["history"]]
    return "\n".join(lines + [f"final model in {cfg.run.out} (llama2 chat --ckpt {cfg.run.out})"])


def _ppo_summary(cfg, result) -> str:
    last = result["history"][-1] if result["history"] else {}
    return (f"{len(result['history'])} iterations, last reward {last.get('reward', float('nan')):.3f}, KL "
            f"{last.get('kl', float('nan')):.3f}; best held-out reward {result['best_heldout_reward']:.4f}; "
            f"policy in {cfg.run.out} (llama2 chat --ckpt {cfg.run.out})")


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    function: str
    help: str
    description: str
    example: str
    summary: Callable[[object, dict], str]


STAGES: dict[str, Stage] = {
    "pretrain": Stage(
        "llama2.train.pretrain", "PretrainConfig", "pretrain",
        "pretrain on token shards (AdamW 0.9/0.95, warmup + cosine to 10%%, clip 1.0)",
        "Next-token pretraining on `llama2 prepare` shards with the paper's optimizer and schedule (Llama 2 section "
        "2.2). Checkpoints go to OUT/checkpoints; OUT itself holds the latest model. resume=true continues exactly "
        "where the newest checkpoint left off. Under torchrun: FSDP2 (strategy=fsdp) or DDP.",
        "configs/pretrain/toy.yaml", lambda cfg, r: _loss_summary(cfg, r, "llama2 generate")),
    "sft": Stage(
        "llama2.train.sft", "SFTConfig", "sft",
        "supervised fine-tuning on dialogs, loss on the answers only (paper section 3.1)",
        "Fine-tune a pretrained checkpoint on chat-formatted dialogs (JSONL). System and user tokens carry no loss; "
        "dialogs are packed into seq_len rows with attention kept inside each dialog. Works alone or under torchrun "
        "(fsdp/ddp) like pretrain.", "configs/sft/toy.yaml", lambda cfg, r: _loss_summary(cfg, r, "llama2 chat")),
    "reward": Stage(
        "llama2.train.reward", "RewardConfig", "train_reward",
        "train a helpfulness or safety reward model with the margin loss (section 3.2.2)",
        "Train a reward model (the chat model with a scalar head) on preference pairs with -log sigmoid(r_chosen - "
        "r_rejected - m(rating)) (margins of Table 27), on one kind's data mixed as the paper describes, and report "
        "held-out accuracy per rating (Table 8 layout) in OUT/eval.json.", "configs/reward/toy.yaml", _reward_summary),
    "rejection": Stage(
        "llama2.train.rejection", "RejectionConfig", "rejection",
        "rejection sampling fine-tuning: best of K samples by reward (section 3.2.3)",
        "Sample K answers per prompt from the newest policy, score them with the reward model(s) (combined "
        "safety/helpfulness rule), keep the best of this and all earlier iterations, fine-tune on the kept set with "
        "the SFT loss; repeat for each iteration.", "configs/rejection/toy.yaml", _rejection_summary),
    "ppo": Stage(
        "llama2.train.ppo", "PPOConfig", "ppo",
        "PPO against the combined safety/helpfulness reward with a KL penalty (section 3.2.3)",
        "Optimise the policy with PPO on R = whiten(logit(R_c)) - beta KL(pi || pi_0), GAE advantages, clipped policy "
        "and value losses, one step per minibatch, early stopping on held-out prompts' reward.",
        "configs/ppo/toy.yaml", _ppo_summary),
    "gatt": Stage(
        "llama2.train.gatt", "GattConfig", "gatt",
        "Ghost Attention: multi-turn consistency with a system instruction (section 3.3)",
        "Sample multi-turn dialogs with an instruction (hobby, style, persona; short form half the time) on every user "
        "turn, keep answers that follow it, then fine-tune with the instruction only in the first turn and zero loss "
        "on earlier turns.", "configs/gatt/toy.yaml",
        lambda cfg, r: f"model in {cfg.run.out} (llama2 gatt-eval ckpts=BEFORE,{cfg.run.out} dialogs=...)"),
    "gatt-eval": Stage(
        "llama2.eval.gatt", "GattEvalConfig", "gatt_eval",
        "adherence to a system instruction turn by turn, up to 20 turns",
        "Play probe dialogs turn by turn with each checkpoint, the instruction given only at the start, and report the "
        "share of answers that follow it per turn (table, gatt_eval.json, gatt_adherence.png).", "configs/gatt/eval.yaml",
        lambda cfg, r: f"written {cfg.out}/gatt_eval.json and {cfg.out}/gatt_adherence.png"),
}


def _stage_class(name: str) -> type:
    spec = STAGES[name]
    return getattr(importlib.import_module(spec.module), spec.config)


def run_stage(name: str, args) -> None:
    spec = STAGES[name]
    module = importlib.import_module(spec.module)
    cfg = load_config(getattr(module, spec.config), args.config, args.overrides)
    result = getattr(module, spec.function)(cfg)
    if isinstance(result, dict) and result.get("stopped"):
        raise SystemExit(130)  # interrupted: saved and resumable, but not finished
    if _rank0():
        print(spec.summary(cfg, result))


# -- generation -------------------------------------------------------------------------------------------------
def _gen_config(args, context: int | None):
    """Generation fields; a max_new_tokens the user did not set is capped to half the model's ``context`` (and said)."""
    from .generate import GenerationConfig

    cfg = load_config(GenerationConfig, args.config, args.overrides)
    if context is None:
        return cfg
    given = any(o.split("=", 1)[0].strip().lstrip("-").replace("-", "_") == "max_new_tokens" for o in args.overrides)
    if args.config and not given:
        import yaml

        given = "max_new_tokens" in (yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {})
    if not given and cfg.max_new_tokens > context // 2:
        cfg = dataclasses.replace(cfg, max_new_tokens=context // 2)
        print(f"(max_new_tokens {cfg.max_new_tokens}: half of this model's {context}-token context; set max_new_tokens= "
              "to change it)", file=sys.stderr)
    return cfg


def _load(args):
    from .generate import Llama

    t0 = time.perf_counter()
    llama = Llama.from_pretrained(args.ckpt, dtype=args.dtype, device=args.device, quantize=args.quantize)
    if llama.tokenizer is None:
        raise ValueError(f"{args.ckpt} has no tokenizer.model; copy one into the checkpoint directory")
    a = llama.args
    print(f"loaded {args.ckpt}: {llama.model.num_params() / 1e6:.1f}M parameters, dim {a.dim}, {a.n_layers} layers, "
          f"{a.n_heads} heads / {a.n_kv_heads} kv heads, context {a.max_seq_len} ({time.perf_counter() - t0:.1f}s)",
          file=sys.stderr)
    return llama


def _refuse_tags(*texts: str | None) -> None:
    """Meta's chat refuses messages holding the template's tags ([INST], [/INST], <<SYS>>, <</SYS>>): typed into a
    message they would become an extra turn or system prompt."""
    from .chat import SPECIAL_TAGS, UNSAFE_ERROR, has_special_tags

    for t in texts:
        if t and has_special_tags([{"content": t}]):
            raise ValueError(f"{UNSAFE_ERROR} ({', '.join(tag for tag in SPECIAL_TAGS if tag in t)} in {t[:40]!r})")


def cmd_generate(args) -> None:
    from .chat import fit_prompt
    from .generate import TextStreamer

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        try:
            prompts += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompt-file")
    _gen_config(args, None)  # bad generation fields fail before the model loads
    llama = _load(args)
    cfg = _gen_config(args, llama.args.max_seq_len)
    tok = llama.tokenizer
    if args.chat:
        _refuse_tags(args.system, *prompts)
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = [fit_prompt(tok, system + [{"role": "user", "content": p}], llama.args.max_seq_len, cfg.max_new_tokens)[1]
               for p in prompts]
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
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s; finish: {', '.join(o.finish_reason for o in outs)}]",
          file=sys.stderr)


def cmd_chat(args) -> None:
    from .chat import UNSAFE_ERROR, fit_prompt, has_special_tags
    from .generate import TextStreamer

    _gen_config(args, None)  # bad generation fields fail before the model loads
    _refuse_tags(args.system)
    llama = _load(args)
    cfg = _gen_config(args, llama.args.max_seq_len)
    tok = llama.tokenizer
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
        except UnicodeDecodeError as e:
            print(f"(message not sent: the input is not valid UTF-8 at byte {e.start})", file=sys.stderr)
            continue
        if not user.strip():
            continue
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            dialog = dialog[:1] if dialog and dialog[0]["role"] == "system" else []
            print("(dialog reset)", file=sys.stderr)
            continue
        if has_special_tags([{"content": user}]):
            print(f"({UNSAFE_ERROR} Message not sent.)", file=sys.stderr)
            continue
        try:  # an over-long message, or one that is not valid Unicode (the tokenizer names it)
            kept, ids, dropped = fit_prompt(tok, dialog + [{"role": "user", "content": user}], llama.args.max_seq_len,
                                            cfg.max_new_tokens)
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


def _gen_parser(p: argparse.ArgumentParser, full: bool) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--config", help="YAML file of generation fields (below); key=value overrides win")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="generation fields, e.g. temperature=0 max_new_tokens=64")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--quantize", choices=("none", "int8"), default=None,
                   help="int8: weight-only int8 linear layers for generation (a quarter of the bytes fp32 reads per token)")
    if full:
        from .generate import GenerationConfig

        p.epilog = "generation fields (key=value):\n" + describe(GenerationConfig)


# -- other commands -----------------------------------------------------------------------------------------------
def cmd_convert(args) -> None:
    from .checkpoint import detect, load, save
    from .tokenizer import Tokenizer

    if args.shards != 1 and args.to != "meta":
        raise ValueError("--shards applies to --to meta only")
    src_format = detect(args.src)
    model, tok = load(args.src, dtype=args.dtype)
    if args.tokenizer:
        tok = Tokenizer.from_file(args.tokenizer)
    kwargs: dict = {"overwrite": args.overwrite}
    if args.shards != 1:
        kwargs["shards"] = args.shards
    if args.gguf_type:
        kwargs["dtype"] = args.gguf_type
    out = save(model, args.dst, format=args.to, tokenizer=tok, **kwargs)
    print(f"converted {args.src} ({src_format}) -> {out} ({args.to}), {model.num_params() / 1e6:.1f}M parameters"
          + ("" if tok is not None else "; no tokenizer found, none written"))


def cmd_prepare(args) -> None:
    from .data.prepare import PrepareConfig, prepare

    cfg = load_config(PrepareConfig, args.config, args.overrides)
    flags = {"out": args.out, "tokenizer": args.tokenizer, "force": args.force or None, "skip_bad": args.skip_bad or None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if args.inputs:
        cfg = dataclasses.replace(cfg, inputs=list(cfg.inputs) + list(args.inputs))
    if not cfg.inputs or not cfg.out or not cfg.tokenizer:
        raise ValueError("give inputs (--input or inputs=...), --out and --tokenizer")
    m = prepare(cfg)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    bad = f"; skipped {m['bad']['count']} bad record(s)" if m["bad"]["count"] else ""
    print(f"{cfg.out}: train {tr['tokens']:,} tokens / {tr['documents']:,} documents in {len(tr['shards'])} shard(s), "
          f"val {va['tokens']:,} tokens / {va['documents']:,} documents ({m['dtype']}, vocab {m['vocab_size']}){bad}")
    if cfg.val_fraction > 0 and va["documents"] == 0:
        print("warning: no document went to validation (too few documents? plain text splits documents at blank "
              "lines); raise val_fraction or give more documents", file=sys.stderr)


def cmd_pipeline(args) -> None:
    from .pipeline import run_pipeline

    report = run_pipeline(args.out, quick=args.quick, from_stage=args.from_stage, seed=args.seed, device=args.device,
                          overrides=args.overrides, size=args.size, reward=args.reward, oracle=args.oracle)
    print(f"\nreport: {report} (figures in {report.parent / 'report'}, numbers in {report.parent / 'metrics.json'})")
    print(f"chat with the final model: llama2 chat --ckpt {report.parent / 'final'}")


@contextlib.contextmanager
def _extra(command: str, extra: str):
    """Imports of an optional extra: a missing package becomes one line that says what to install."""
    try:
        yield
    except ModuleNotFoundError as e:
        raise ValueError(f"llama2 {command} needs {e.name}, which is not installed: "
                         f"pip install 'llama2-recipe[{extra}]'") from None


def cmd_eval(args) -> None:
    with _extra("eval", "eval"):
        from lm_eval.utils import make_table  # lm-eval takes about 2 s to import: only when evaluating

        from .eval.harness import run_eval
        from .eval.paper import format_table

    results = run_eval(args.ckpt, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       include_path=args.include_path, batch_size=args.batch_size, device=args.device, chat=args.chat,
                       out=args.out, allow_code_execution=args.allow_code_execution)
    print(make_table(results))
    if "paper" in [t.strip() for t in args.tasks.split(",")]:
        print(format_table(results, name=str(args.ckpt)))
    if args.out:
        print(f"results in {args.out}", file=sys.stderr)


def cmd_serve(args) -> None:
    with _extra("serve", "serve"):
        from .serve import serve  # FastAPI and uvicorn: only when serving

    serve(args.ckpt, host=args.host, port=args.port, device=args.device, max_batch=args.max_batch, dtype=args.dtype,
          max_seq_len=args.max_seq_len, model_name=args.model_name, quantize=args.quantize)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


# -- the parser: one builder per command ---------------------------------------------------------------------------
def _command(sub, name: str, func, help: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command's parser: its one-line help, its description and examples kept as written, what it runs."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _add_convert(sub, chosen: str | None) -> None:
    p = _command(sub, "convert", cmd_convert, help="convert a checkpoint between native, Meta, Hugging Face and GGUF formats",
                 description="Read a checkpoint in any supported format (detected) and write it in another.")
    p.add_argument("src", help="checkpoint directory (native, Meta params.json + consolidated.*.pth, HF config.json + safetensors) or .gguf file")
    p.add_argument("dst", help="output directory (or .gguf file for --to gguf)")
    p.add_argument("--to", required=True, choices=["native", "meta", "hf", "gguf"], help="output format")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta (consolidated.00.pth ...)")
    p.add_argument("--dtype", default=None, help="convert weights to float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--gguf-type", default=None, choices=["f32", "f16"], help="tensor type for --to gguf (default f32)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (.model or .gguf) to write alongside, if SRC has none")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is already a checkpoint")


def _add_generate(sub, chosen: str | None) -> None:
    p = _command(sub, "generate", cmd_generate, help="complete prompts (plain or in the chat format)",
                 description="Generate continuations of prompts with the KV cache. One prompt streams as it is generated.")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a text file, one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the Llama 2 chat format")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--no-stream", action="store_true", help="print only when done")
    _gen_parser(p, chosen in (None, "generate"))


def _add_chat(sub, chosen: str | None) -> None:
    p = _command(sub, "chat", cmd_chat, help="interactive multi-turn chat in the Llama 2 chat format",
                 description="Chat with a model. The dialog is kept across turns; when it would overflow the "
                 "context, the oldest exchanges are dropped (and you are told). Messages holding the chat "
                 "template's tags are refused, as Meta's code refuses them.")
    p.add_argument("--system", default=None, help="system prompt, folded into the first user turn as <<SYS>>...<</SYS>>")
    _gen_parser(p, chosen in (None, "chat"))


def _add_prepare(sub, chosen: str | None) -> None:
    p = _command(sub, "prepare", cmd_prepare, help="tokenize text / JSONL corpora into token shards for pretraining",
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
    if chosen in (None, "prepare"):
        from .data.prepare import PrepareConfig

        p.epilog = "prepare fields (key=value):\n" + describe(PrepareConfig)


def _add_pipeline(sub, chosen: str | None) -> None:
    p = _command(sub, "pipeline", cmd_pipeline, help="the whole recipe on the built-in toy world, with a report (what make run runs)",
                 description="world -> tokenizer -> prepare -> pretrain -> sft -> reward models -> rejection "
                 "sampling -> ppo -> gatt -> eval -> report, on CPU. A stage whose output exists is skipped, so a "
                 "stopped run resumes; --from redoes a stage and all after it. Default about 10-20 minutes on 2 "
                 "cores, --quick about 2. The sizes are configs/pipeline/{quick,default,large}.yaml.",
                 epilog="overrides: STAGE.FIELD=VALUE for any field of a stage's config (see `llama2 STAGE --help`),\n"
                        "for example: llama2 pipeline ppo.kl_beta=0.02 sft.lr=1e-4 rejection.k=8")
    p.add_argument("--out", default="runs/toy", help="output directory (default runs/toy)")
    p.add_argument("--quick", action="store_true", help="a smaller world and model (about 2 minutes); same as --size quick")
    p.add_argument("--size", default=None,
                   help="quick (CPU, ~2 min), default (CPU, ~10-20 min), large (an 11M-parameter model and a bigger world "
                        "for one GPU, --device cuda), or a YAML file of a size's settings like configs/pipeline/*.yaml")
    stages = None  # the pipeline's own list of stages, read only when its command is chosen (it imports every stage)
    if chosen in (None, "pipeline"):
        from . import pipeline

        stages = pipeline.STAGES + tuple(pipeline.ALIASES)
    p.add_argument("--from", dest="from_stage", choices=stages, default=None,
                   help="redo this stage and every later one (rlhf: the RLHF versions' annotation, reward models and "
                        "rejection sampling; reward and rejection are accepted for it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every stage")
    p.add_argument("--device", default="cpu", help="device of every stage: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--reward", choices=("models", "judges"), default="models",
                   help="what scores rejection sampling and PPO: the trained reward models (default), or the world's "
                        "exact judges (the oracle run: the ceiling of this budget with a perfect reward model)")
    p.add_argument("--oracle", default=None, metavar="DIR",
                   help="an oracle run (--reward judges) of the same size and seed: the report compares against it")
    p.add_argument("overrides", nargs="*", metavar="STAGE.FIELD=VALUE", help="override a stage's field, e.g. ppo.kl_beta=0.02")


def _add_eval(sub, chosen: str | None) -> None:
    p = _command(sub, "eval", cmd_eval, help="evaluate a checkpoint on lm-evaluation-harness tasks, the paper's set, or the toy world",
                 description="Run lm-evaluation-harness tasks on a checkpoint through this package's model (log-"
                 "likelihood, rolling log-likelihood, generation until stop strings) and write lm-eval's results "
                 "JSON. --tasks paper runs the Llama 2 paper's benchmark set and prints it grouped like its "
                 "Table 3; --tasks toyworld scores the built-in world's held-out tasks as the pipeline's report "
                 "does. Datasets are downloaded by lm-eval where a task needs them.",
                 epilog="examples:\n  llama2 eval --ckpt runs/toy/final --tasks toyworld\n"
                        "  llama2 eval --ckpt out/7b-hf --tasks hellaswag,arc_easy --num-fewshot 0 --limit 100\n"
                        "  llama2 eval --ckpt out/7b-hf --tasks paper --out results.json")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names or globs, task YAML files, 'paper' or 'toyworld'")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for every task (default: each task's own; 'paper' uses the paper's)")
    p.add_argument("--limit", type=float, default=None, help="at most this many examples per task (a fraction if < 1); for quick checks")
    p.add_argument("--include-path", action="append", default=None, help="a folder of extra task YAMLs (repeat)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu; bf16 on CUDA)")
    p.add_argument("--chat", action="store_true", help="render prompts in the Llama 2 chat format")
    p.add_argument("--allow-code-execution", action="store_true", help="let code tasks (HumanEval, MBPP) run the model's code")
    p.add_argument("--out", default=None, help="write lm-eval's results JSON here")


def _add_serve(sub, chosen: str | None) -> None:
    p = _command(sub, "serve", cmd_serve, help="an OpenAI-compatible HTTP server over a checkpoint (continuous batching)",
                 description="Serve a checkpoint over HTTP with the OpenAI API: GET /health, GET /v1/models, POST "
                 "/v1/chat/completions (messages rendered in the Llama 2 chat format exactly as `llama2 chat` "
                 "does; messages holding the template's tags are refused) and POST /v1/completions, streaming "
                 "as server-sent events. Concurrent requests share the decode steps (continuous batching).",
                 epilog="example:\n  llama2 serve --ckpt runs/toy/final --port 8000\n"
                        "  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                        "       -d '{\"model\": \"final\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 or float16")
    p.add_argument("--max-seq-len", type=int, default=None, help="context of the server's cache (default: the model's)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the checkpoint's directory name)")
    p.add_argument("--quantize", choices=("none", "int8"), default=None, help="int8: weight-only int8 linear layers")


def _add_demo(sub, chosen: str | None) -> None:
    p = _command(sub, "demo", cmd_demo, help="a short tour on a tiny model: train a tokenizer, convert through every format, generate",
                 description="Train a tokenizer and a tiny model on a built-in corpus, convert it through every "
                 "checkpoint format (native -> Hugging Face -> Meta in 2 shards -> GGUF), reload each with its "
                 "logits compared, and generate from the last copy.")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the tokenizer's sampling")


def _add_stage(sub, chosen: str | None, name: str) -> None:
    spec = STAGES[name]
    p = _command(sub, name, lambda args: run_stage(name, args), help=spec.help, description=spec.description)
    p.add_argument("--config", help=f"YAML file of {name} fields (below), e.g. {spec.example}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{name} fields (listed below), e.g. out=runs/{name}")
    if chosen in (None, name):
        p.epilog = f"{name} fields (key=value):\n" + describe(_stage_class(name))


COMMANDS = {"convert": _add_convert, "generate": _add_generate, "chat": _add_chat, "prepare": _add_prepare,
            "pipeline": _add_pipeline, "eval": _add_eval, "serve": _add_serve, "demo": _add_demo,
            **{name: (lambda sub, chosen, name=name: _add_stage(sub, chosen, name)) for name in STAGES}}
"""Every command, by name, with the function that adds its parser (the training stages share one)."""


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser. With ``chosen``, only that command's module is imported (for its --help; "" for
    none); without, every command's help is complete (tests, docs)."""
    parser = argparse.ArgumentParser(
        prog="llama2",
        description="The Llama 2 recipe (Touvron et al., 2023): model, checkpoints, pretraining, SFT, reward models, "
                    "rejection sampling, PPO, Ghost Attention, generation and chat.",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (or LLAMA2_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS.values():
        add(sub, chosen)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _command_of(argv)
    # `llama2 --help` or a bad command: no command's fields are shown, so none of their modules is imported ("")
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("LLAMA2_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit("error: interrupted") from None
    except (ConfigError, ValueError, OSError, UnicodeError, RecursionError, FloatingPointError, RuntimeError) as e:
        # one line per expected failure; RuntimeError covers torch's (a corrupt tensor file, a device error)
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {msg}") from None


if __name__ == "__main__":
    main()
