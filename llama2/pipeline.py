"""The whole Llama 2 recipe end to end on the toy world, with a report of its effects (`llama2 pipeline`).

world -> tokenizer -> prepare -> pretrain -> sft -> reward models (helpfulness and safety, with and without a
margin) -> rejection sampling (2 iterations) -> PPO -> GAtt -> evaluation -> report. Every stage runs through
the same library function as its command (``llama2 pretrain``, ``llama2 sft`` ...) on files in the same
formats real data uses, and writes a directory under OUT. A stage whose output is complete is skipped, so a
stopped pipeline resumes where it stopped; ``--from STAGE`` redoes that stage and every later one.

The sizes are chosen for a 2-core CPU: ``quick`` (toy-tiny, about 2 minutes, what the test suite runs) and the
default (toy-small, about 10-20 minutes on 2 cores, by the CPU). Pretraining takes many small steps rather than few large ones: on the
default world, 500 steps of 2,048 tokens recall 90-95% of held-out facts after SFT where 120 steps of 8,192 tokens
(the same 1M tokens, the same time) recalled 18%.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from .chat import format_dialog
from .checkpoint import load
from .config import ConfigError, StageSampling, apply_overrides
from .data.prepare import PrepareConfig, prepare
from .data.records import read_dialogs, read_objects, read_preferences, read_prompts
from .eval.gatt import GattEvalConfig, gatt_eval
from .eval.report import write_report
from .eval.reward import evaluate_reward
from .eval.toyworld import evaluate_chat_model, read_eval_items, read_pipeline_marker
from .eval.winrate import compare_answers, win_rate
from .sampling import answer_texts
from .tokenizer import train_tokenizer
from .toyworld import ToyWorld, pipeline_world
from .train.gatt import GattConfig, gatt
from .train.ppo import PPOConfig, ppo
from .train.pretrain import PretrainConfig, pretrain
from .train.rejection import RejectionConfig, load_reward_models, rejection
from .train.reward import RewardConfig, train_reward
from .train.sft import SFTConfig, sft
from .train.state import publish

STAGES = ("world", "tokenizer", "prepare", "pretrain", "sft", "rlhf", "ppo", "gatt", "eval", "report")

# Per-size settings. Learning rates are far above the paper's: a model of a few million parameters trained for
# minutes needs large steps; the structure of every stage (losses, schedules, selection rules) is the paper's.
SIZES = {
    "quick": dict(
        world="quick", vocab=512, model="toy-tiny", seq_len=128, versions=2,
        pretrain=dict(max_steps=800, batch_tokens=2048, micro_batch=16, lr=3e-3, warmup_steps=20, eval_every=200),
        sft=dict(epochs=6, batch_size=16, micro_batch=8, lr=1e-3, warmup_steps=5),
        annotate=dict(pairs=2, temperatures=[0.7, 1.0], max_new_tokens=32),
        reward=dict(epochs=2, batch_pairs=16, micro_batch=8, lr=3e-4),
        rejection=dict(k=4, temperatures=[1.0, 1.1], max_new_tokens=32, epochs=1, batch_size=16, micro_batch=8,
                       lr=2e-4),
        ppo=dict(iterations=4, rollout_batch=32, minibatch=8, micro_batch=8, lr=2e-5, value_lr=1e-4,
                 max_new_tokens=32, eval_every=2, patience=0),
        gatt=dict(turns=4, k=4, max_new_tokens=24, epochs=1, batch_size=16, micro_batch=8, lr=2e-4, temperature=0.5),
        eval=dict(max_new_tokens=32, gatt_probes=8, gatt_turns=20, k_curve=4),
        # measured stage times on the reference 2-core machine (the progress line's estimate of time left)
        seconds=dict(world=1, tokenizer=1, prepare=1, pretrain=52, sft=6, rlhf=23, ppo=4, gatt=1, eval=9, report=2),
    ),
    "default": dict(
        world="default", vocab=1024, model="toy-small", seq_len=256,
        versions=3,
        pretrain=dict(max_steps=500, batch_tokens=2048, micro_batch=8, lr=2e-3, warmup_steps=20, eval_every=100),
        # SFT 6 epochs: at 3 the model was short of training, and GAtt's replay of the SFT data finished it, which
        # then passed for a win of RLHF over SFT (README)
        sft=dict(epochs=6, batch_size=16, micro_batch=8, lr=5e-4, warmup_steps=10),
        # many small steps at a high rate: a toy reward model learns more from them than from a few large ones;
        # centred scores (RewardConfig.center): with the stronger SFT model the free offset crowded sigmoid(score) at 1
        reward=dict(epochs=1, batch_pairs=16, micro_batch=8, lr=3e-4, center=0.01),
        # two pairs of the latest model's answers per new prompt, rated by the judges (with the world's own pairs)
        annotate=dict(pairs=2, temperatures=[0.7, 1.0], max_new_tokens=48),
        # Rejection sampling cool and short: a toy reward model picks a correct answer among the K samples hardly more
        # often than chance (the report's table; README), so hotter samples and longer fine-tuning only teach the
        # samples' errors.
        rejection=dict(k=4, temperatures=[0.5, 0.5, 0.5], max_new_tokens=48, epochs=1, batch_size=16, micro_batch=8,
                       lr=1e-4),
        # PPO at 3e-5: at 1e-5 it never passed its starting held-out reward and kept its start; faster rates raise the
        # reward model's reward further while the exact judges' falls (README; benchmarks/RESULTS.md)
        ppo=dict(iterations=12, rollout_batch=64, minibatch=16, micro_batch=8, lr=3e-5, value_lr=1e-4,
                 max_new_tokens=48, eval_every=4, patience=3),
        # GAtt: long dialogs, many samples a turn (a failed turn retried with other user messages: GattConfig.retries),
        # the SFT dialogs replayed one for one (without them the model learns to decorate every answer and loses task
        # accuracy; README), several epochs; batches of 8 windows, as packed windows (GattConfig.pack) hold several
        # trained answers each.
        gatt=dict(turns=10, k=8, max_new_tokens=32, epochs=6, batch_size=8, micro_batch=8, lr=2e-4, temperature=0.5),
        eval=dict(max_new_tokens=48, gatt_probes=48, gatt_turns=20, k_curve=8),
        seconds=dict(world=1, tokenizer=1, prepare=1, pretrain=102, sft=49, rlhf=148, ppo=26, gatt=110, eval=37,
                     report=1),
    ),
    # For one GPU (--device cuda): an 11M-parameter model (toy-25m at vocab 2,048), a bigger world, larger batches, more RLHF versions. Its stage
    # times are estimates (no GPU run yet), used only by the progress line.
    "large": dict(
        world="large", vocab=2048, model="toy-25m", seq_len=512, versions=4,
        pretrain=dict(max_steps=4000, batch_tokens=16384, micro_batch=32, lr=1e-3, warmup_steps=100, eval_every=500),
        sft=dict(epochs=3, batch_size=32, micro_batch=32, lr=3e-4, warmup_steps=20),
        reward=dict(epochs=1, batch_pairs=32, micro_batch=32, lr=1e-4),
        annotate=dict(pairs=2, temperatures=[0.7, 1.0], max_new_tokens=64),
        rejection=dict(k=8, temperatures=[0.5, 0.5, 0.5, 0.5], max_new_tokens=64, epochs=1, batch_size=32,
                       micro_batch=32, lr=5e-5),
        ppo=dict(iterations=40, rollout_batch=256, minibatch=64, micro_batch=32, lr=5e-6, value_lr=5e-5,
                 max_new_tokens=64, eval_every=5, patience=4),
        gatt=dict(turns=10, k=8, max_new_tokens=48, epochs=4, batch_size=32, micro_batch=32, lr=1e-4, temperature=0.5),
        eval=dict(max_new_tokens=64, gatt_probes=64, gatt_turns=20, k_curve=8),
        seconds=dict(world=5, tokenizer=5, prepare=5, pretrain=300, sft=30, rlhf=240, ppo=120, gatt=60, eval=60,
                     report=2),
    ),
}


@dataclass
class Ctx:
    out: Path
    size: str
    seed: int
    s: dict
    world: ToyWorld
    device: str = "cpu"
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> ["field=value", ...]
    paths: dict | None = None

    def config(self, cls: type, stage: str, **values):
        """A stage's config: the pipeline's values, this run's seed and device, then the user's overrides."""
        cfg = cls(**{"seed": self.seed, "device": self.device, **values})
        return apply_overrides(cfg, self.overrides.get(stage, []))


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _mark(path: Path, info: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "DONE").write_text(json.dumps(info or {}, indent=2))


def _finished(result: dict) -> dict:
    """A stage stopped by Ctrl-C / SIGTERM saved its last step but is not finished: stop the pipeline before
    the stage is marked done, so that the same command resumes it."""
    if result.get("stopped"):
        _say("pipeline stopped; run the same command again to resume")
        raise SystemExit(130)
    return result


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- stages ----------------------------------------------------------------------------------------------------------
def stage_world(c: Ctx) -> None:
    c.paths = {k: str(v) for k, v in c.world.write(c.out / "world").items()}
    _mark(c.out / "world", c.paths)


def stage_tokenizer(c: Ctx) -> None:
    d = c.out / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    # the world's text plus its dialogs in the chat format, so [INST] and <<SYS>> get pieces of their own
    with open(d / "corpus.txt", "w", encoding="utf-8") as f:
        f.write(Path(c.paths["pretrain"]).read_text(encoding="utf-8"))
        for dialog in read_dialogs(c.paths["sft"]):
            f.write("\n\n" + "\n".join(format_dialog(dialog)))
    train_tokenizer([d / "corpus.txt"], c.s["vocab"], d / "tokenizer.model")
    _mark(d)


def stage_prepare(c: Ctx) -> None:
    prepare(PrepareConfig(inputs=[c.paths["pretrain"]], out=str(c.out / "shards"), tokenizer=str(c.out / "tokenizer" / "tokenizer.model"),
                          val_fraction=0.02, seed=c.seed, force=True), quiet=True)
    _mark(c.out / "shards")


def stage_pretrain(c: Ctx) -> None:
    _finished(pretrain(c.config(PretrainConfig, "pretrain", data=str(c.out / "shards"), out=str(c.out / "pretrain"),
                                model=c.s["model"], seq_len=c.s["seq_len"], save_every=10**9, keep_last=1, resume=True,
                                **c.s["pretrain"])))
    _mark(c.out / "pretrain")


def stage_sft(c: Ctx) -> None:
    _finished(sft(c.config(SFTConfig, "sft", data=c.paths["sft"], val_data=c.paths["sft_val"], init_from=str(c.out / "pretrain"),
                           out=str(c.out / "sft"), seq_len=c.s["seq_len"], save_every=10**9, keep_last=1, resume=True,
                           **c.s["sft"])))
    _mark(c.out / "sft")


# -- RLHF versions (§3.2.1, §3.2.3: RLHF-V1 ... V5) -----------------------------------------------------------------
# Each version: the latest model answers a new slice of the prompts twice per temperature; the world's judges (the
# annotators) rate pairs of those answers; the reward models are retrained on all preference data so far; rejection
# sampling draws K answers per new prompt from the latest model, keeps the best (with the best of every earlier
# version, re-scored), and fine-tunes the SFT model on them. PPO then runs on the last version's model.


def version_dir(c: Ctx, v: int) -> Path:
    return c.out / "rlhf" / f"v{v}"


def latest_model(c: Ctx, v: int) -> Path:
    """The model version v samples from: the SFT model for v1, else the previous version's rejection-sampling model."""
    return c.out / "sft" if v == 1 else version_dir(c, v - 1) / "rejection"


def reward_dirs(c: Ctx, v: int | None = None) -> dict[str, Path]:
    """The reward models of version v (default: the last). Margin-free ones exist for the last version only (the
    report's with/without-margin comparison, Table 28)."""
    v = v or c.s["versions"]
    margins = ("none", "small") if v == c.s["versions"] else ("small",)
    return {f"{kind} RM ({'margin' if m != 'none' else 'no margin'})": version_dir(c, v) / "reward" / f"{kind}-{m}"
            for kind in ("helpfulness", "safety") for m in margins}


def _rms(c: Ctx, v: int | None = None) -> dict:
    d = version_dir(c, v or c.s["versions"]) / "reward"
    return dict(reward_helpfulness=str(d / "helpfulness-small"), reward_safety=str(d / "safety-small"))


def _version_prompts(c: Ctx, v: int) -> Path:
    """Version v's new prompts: every V-th prompt of the world's prompts file, starting at v - 1."""
    path = version_dir(c, v) / "prompts.jsonl"
    if not path.is_file():
        lines = [ln for ln in Path(c.paths["prompts"]).read_text(encoding="utf-8").splitlines() if ln.strip()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(ln + "\n" for ln in lines[v - 1 :: c.s["versions"]]), encoding="utf-8")
    return path


def annotate_samples(c: Ctx, v: int) -> tuple[Path, Path]:
    """New preference pairs on the latest model's answers to version v's prompts, rated by the world's judges (the
    annotators); 20% of the prompts' pairs are held out to measure the reward models on the newest distribution.

    §3.2.1: each comparison is between "two responses to a given prompt ... sampled from two different model
    variants, and varying the temperature", and "it is important before a new Llama 2-Chat tuning iteration to
    gather new preference data using the latest Llama 2-Chat iterations". Each prompt gets ``pairs`` answers at
    each of two temperatures; answer i at the low temperature is compared with answer i at the high one, and when
    the judges find them equal, with the prompt's other answers in turn (a tie teaches the reward model nothing).
    """
    vdir = version_dir(c, v)
    train, test = vdir / "annotated.jsonl", vdir / "annotated_test.jsonl"
    if train.is_file() and test.is_file():
        return train, test
    a = c.s["annotate"]
    model, tok = load(latest_model(c, v), device=c.device)
    prompts = list(read_prompts(_version_prompts(c, v)))
    dialogs = [p.dialog for p in prompts]
    answers = []  # per temperature and i: one answer per prompt
    for temperature in a["temperatures"]:
        for i in range(a["pairs"]):
            sampling = StageSampling(temperature=temperature, top_p=1.0, max_new_tokens=a["max_new_tokens"], gen_batch=64)
            answers.append(answer_texts(model, tok, dialogs, sampling, seed=c.seed, purpose=f"annotate/v{v}/{temperature}/{i}"))
    rows: list[tuple[int, dict]] = []
    ties = 0
    for j, p in enumerate(prompts):
        cands = [ans[j] for ans in answers]
        order = [(i, a["pairs"] + i) for i in range(a["pairs"])]  # (low T answer i, high T answer i) first
        order += [(x, y) for x in range(len(cands)) for y in range(x + 1, len(cands)) if (x, y) not in order]
        used: set[int] = set()
        for _ in range(a["pairs"]):
            for x, y in order:
                if x in used or y in used or not cands[x] or not cands[y]:
                    continue
                pair = c.world.annotate(p.dialog, cands[x], cands[y], safety=p.safety)
                if pair is not None:
                    rows.append((j, {**pair, "version": v}))
                    used |= {x, y}
                    break
            else:
                ties += 1
    held = set(random.Random(c.seed * 1000 + v).sample(range(len(prompts)), len(prompts) // 5))
    for path, part in ((train, [r for j, r in rows if j not in held]), (test, [r for j, r in rows if j in held])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        tmp.replace(path)
    _say(f"  v{v}: annotated {len(rows)} pairs of {latest_model(c, v).name}'s answers to {len(prompts)} prompts "
         f"({ties} prompts' pairs tied); {sum(j in held for j, _ in rows)} held out")
    return train, test


def _train_reward_models(c: Ctx, v: int) -> None:
    """Version v's reward models, retrained from the SFT model on all preference data so far (§3.2.1)."""
    data = [c.paths["preferences"]] + [str(version_dir(c, u) / "annotated.jsonl") for u in range(1, v + 1)]
    for name, d in reward_dirs(c, v).items():
        if _done(d):
            continue
        kind, margin = d.name.split("-")
        _say(f"  v{v}: {name}")
        _finished(train_reward(c.config(RewardConfig, "reward", data=data, val_data=c.paths["preferences_heldout"],
                                        kind=kind, margin=margin, init_from=str(c.out / "sft"), out=str(d),
                                        seq_len=c.s["seq_len"], save_every=10**9, keep_last=1, tensorboard=False,
                                        resume=True, **c.s["reward"])))
        _mark(d)


def _fresh_accuracy(c: Ctx, v: int) -> dict:
    """The reward models' accuracy on version v's held-out fresh pairs (the newest model's answers), per rating:
    the previous version's models (before they saw this distribution) and this version's."""
    prefs = list(read_preferences(version_dir(c, v) / "annotated_test.jsonl"))
    out: dict = {}
    for label, u in (("before", v - 1), ("after", v)):
        if u < 1:
            continue
        for kind in ("helpfulness", "safety"):
            mine = [p for p in prefs if p.kind == kind]
            if mine:
                out[f"{kind} RM v{u}"] = evaluate_reward(str(version_dir(c, u) / "reward" / f"{kind}-small"), mine, device=c.device)
                out[f"{kind} RM v{u}"]["when"] = label
    return out


def _rejection_version(c: Ctx, v: int) -> None:
    r = dict(c.s["rejection"])
    temperature = r.pop("temperatures")[v - 1]
    previous = ",".join(str(version_dir(c, u) / "rejection" / "iter_1" / "kept.jsonl") for u in range(1, v))
    _finished(rejection(c.config(RejectionConfig, "rejection", prompts=str(_version_prompts(c, v)),
                                 init_from=str(c.out / "sft"), sample_from=str(latest_model(c, v)), previous=previous,
                                 iterations=1, temperatures=[temperature], out=str(version_dir(c, v) / "rejection"),
                                 seq_len=c.s["seq_len"], tensorboard=False, resume=True, **_rms(c, v), **r)))


def stage_rlhf(c: Ctx) -> None:
    for v in range(1, c.s["versions"] + 1):
        vdir = version_dir(c, v)
        if _done(vdir):
            continue
        _say(f"  RLHF version {v} of {c.s['versions']}")
        annotate_samples(c, v)
        _train_reward_models(c, v)
        (vdir / "rm_fresh_accuracy.json").write_text(json.dumps(_fresh_accuracy(c, v), indent=2))
        _rejection_version(c, v)
        _mark(vdir)
    _mark(c.out / "rlhf")


def stage_ppo(c: Ctx) -> None:
    _finished(ppo(c.config(PPOConfig, "ppo", prompts=c.paths["prompts"], val_prompts=c.paths["prompts_heldout"],
                           init_from=str(version_dir(c, c.s["versions"]) / "rejection"), out=str(c.out / "ppo"),
                           tensorboard=False, overwrite=True, **_rms(c),
                           **c.s["ppo"])))
    _mark(c.out / "ppo")


def stage_gatt(c: Ctx) -> None:
    _finished(gatt(c.config(GattConfig, "gatt", dialogs=c.paths["gatt_dialogs"], init_from=str(c.out / "ppo"), replay=c.paths["sft"],
                            reward_model=_rms(c)["reward_helpfulness"], out=str(c.out / "gatt"), seq_len=c.s["seq_len"],
                            tensorboard=False, resume=True, **c.s["gatt"])))
    final = c.out / "final"
    final.mkdir(parents=True, exist_ok=True)
    publish(c.out / "gatt", final)
    _mark(c.out / "gatt")


def checkpoints(c: Ctx) -> dict[str, Path]:
    """The chat model after each stage, in the order of the recipe."""
    out = {"SFT": c.out / "sft"}
    for v in range(1, c.s["versions"] + 1):
        out[f"RS v{v}"] = version_dir(c, v) / "rejection"
    out["PPO"] = c.out / "ppo"
    out["GAtt (final)"] = c.out / "final"
    return out


def stage_eval(c: Ctx) -> None:
    e = c.s["eval"]
    d = c.out / "eval"
    d.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"stages": {}, "reward_models": {}}
    items = read_eval_items(c.paths["eval"])
    heldout = list(read_prompts(c.paths["prompts_heldout"]))
    rms = load_reward_models(_rms(c)["reward_helpfulness"], _rms(c)["reward_safety"], c.device)

    # reward models: held-out accuracy per rating bucket, each on its own kind's test pairs (Tables 8 and 28)
    prefs = list(read_preferences(c.paths["preferences_heldout"]))
    for name, rd in reward_dirs(c).items():
        kind = rd.name.split("-")[0]
        metrics["reward_models"][name] = evaluate_reward(str(rd), [p for p in prefs if p.kind == kind], device=c.device)

    for stage, ckpt in checkpoints(c).items():
        _say(f"  evaluating {stage}")
        model, tok = load(ckpt, device=c.device)
        metrics["stages"][stage] = evaluate_chat_model(model, tok, c.world, items, heldout, rms, e["max_new_tokens"], c.seed)
    # win rates against SFT, judged by the world's judges (the analogue of the paper's human evaluation, §3.4.2)
    sft_scores = metrics["stages"]["SFT"]["judge_scores"]
    metrics["winrate"] = {f"{stage} vs SFT": win_rate(compare_answers(m["judge_scores"], sft_scores))
                          for stage, m in metrics["stages"].items() if stage != "SFT"}
    metrics["rm_fresh"] = {f"v{v}": json.loads((version_dir(c, v) / "rm_fresh_accuracy.json").read_text())
                           for v in range(1, c.s["versions"] + 1)}
    metrics["rs_selection"] = {f"v{v}": rs_selection(c, version_dir(c, v) / "rejection" / "iter_1" / "samples.jsonl")
                               for v in range(1, c.s["versions"] + 1)}
    metrics["ppo"] = [{k: r[k] for k in PPO_CURVES if k in r} for r in read_objects(c.out / "ppo" / "metrics.jsonl", missing_ok=True)]
    # best-of-K against K from the rejection-sampling iterations (Figure 7's shape)
    metrics["best_of_k"] = {}
    for v in range(1, c.s["versions"] + 1):
        st = json.loads((version_dir(c, v) / "rejection" / "iter_1" / "stats.json").read_text())
        metrics["best_of_k"][f"RS v{v} (T={st['temperature']})"] = st["best_of_k_curve"]
    # GAtt: adherence per turn with and without it (Figure 28's comparison)
    metrics["gatt"] = gatt_eval(GattEvalConfig(ckpts=[str(c.out / "ppo"), str(c.out / "final")], names=["without GAtt", "with GAtt"],
                                               dialogs=c.paths["gatt_dialogs"], out=str(d / "gatt"), n=e["gatt_probes"],
                                               turns=e["gatt_turns"], seed=c.seed, device=c.device))
    metrics["sample_chat"] = _sample_chat(c, items[:3], e["max_new_tokens"])
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _mark(d)


PPO_CURVES = ("step", "reward", "score_std", "kl", "clip_fraction", "entropy", "explained_variance", "adv_reward_corr",
              "heldout_reward")


def rs_selection(c: Ctx, samples: Path) -> dict:
    """How well the reward models chose among rejection sampling's K samples, judged by the world: the share of
    samples that are correct, the share of prompts with at least one correct sample (pass@K), and the share whose
    kept (highest-scored) sample is correct. Harmless task prompts only."""
    correct, any_ok, picked = [], [], []
    for rec in read_objects(samples, missing_ok=True):
        if c.world.is_secret_prompt(rec["prompt"]):
            continue
        ok = [c.world.is_correct(rec["prompt"], s["text"]) for s in rec["samples"]]
        best = max(range(len(ok)), key=lambda i: rec["samples"][i]["score"])
        correct += ok
        any_ok.append(any(ok))
        picked.append(ok[best])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"sample_correct": mean(correct), "pass_at_k": mean(any_ok), "picked_correct": mean(picked), "prompts": len(picked)}


def _sample_chat(c: Ctx, items: list[dict], max_new_tokens: int) -> list[dict]:
    """A multi-turn chat with the final model on a few of the evaluation prompts."""
    model, tok = load(c.out / "final", device=c.device)
    greedy = StageSampling(temperature=0.0, max_new_tokens=max_new_tokens)
    chat: list[dict] = []
    for it in items:
        chat.append({"role": "user", "content": it["dialog"][-1]["content"]})
        chat.append({"role": "assistant", "content": answer_texts(model, tok, [chat], greedy, purpose="chat")[0]})
    return chat


def stage_report(c: Ctx) -> None:
    write_report(c.out)
    _mark(c.out / "report")


RUNNERS = {name: globals()[f"stage_{name}"] for name in STAGES}
DIRS = {**{name: name for name in STAGES}, "prepare": "shards"}  # where each stage writes (and marks DONE)
CONFIGS = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig, "rejection": RejectionConfig,
           "ppo": PPOConfig, "gatt": GattConfig}


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """``STAGE.FIELD=VALUE`` items (``ppo.kl_beta=0.02``, ``sft.lr=1e-4``) grouped by stage, each checked against the
    stage's config; a field without a stage (``seed=1``) is an error naming the stages that take overrides."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not eq or not dot or stage not in CONFIGS:
            raise ConfigError(f"override {item!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(CONFIGS)} "
                              "(e.g. ppo.kl_beta=0.02)")
        apply_overrides(CONFIGS[stage](), [f"{name}={value}"])  # the field exists and the value reads as its type
        out.setdefault(stage, []).append(f"{name}={value}")
    return out


def run_pipeline(out: str | Path = "runs/toy", quick: bool = False, from_stage: str | None = None, seed: int = 0,
                 device: str = "cpu", overrides: list[str] | None = None, size: str | None = None) -> Path:
    """Run (or resume) the whole recipe; returns the path of report.md. ``size``: quick, default or large (``quick``
    is size="quick"); ``overrides``: STAGE.FIELD=VALUE items."""
    if from_stage and from_stage not in STAGES:
        raise ValueError(f"--from {from_stage!r}: expected one of {', '.join(STAGES)}")
    stage_overrides = parse_overrides(list(overrides or []))
    out = Path(out)
    if quick and size not in (None, "quick"):
        raise ValueError(f"--quick and --size {size} disagree; give one of them")
    size = size or ("quick" if quick else "default")
    if size not in SIZES:
        raise ValueError(f"size {size!r}: expected one of {', '.join(SIZES)}")
    if size == "large" and not device.startswith("cuda"):
        _say("note: the large size is meant for one GPU (--device cuda); on a CPU it takes hours")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "pipeline.json"
    if marker.is_file():
        prev = read_pipeline_marker(marker)
        if prev.get("size") != size or prev.get("seed") != seed:
            raise ValueError(f"{out} holds a {prev.get('size')} run with seed {prev.get('seed')}; use another --out "
                             f"(or delete it) for a {size} run with seed {seed}")
        if prev.get("overrides", {}) != stage_overrides:
            _say(f"note: {out} was started with overrides {prev.get('overrides', {})}; finished stages keep them "
                 "(use --from STAGE to redo a stage with the new ones)")
    marker.write_text(json.dumps({"size": size, "seed": seed, "device": device, "overrides": stage_overrides,
                                  "stages": list(STAGES)}))
    s = SIZES[size]
    c = Ctx(out, size, seed, s, world=pipeline_world(seed, s["world"]), device=device,
            overrides=stage_overrides)
    forced = STAGES[STAGES.index(from_stage):] if from_stage else ()
    for name in forced:  # redo this stage and every later one
        shutil.rmtree(out / DIRS[name], ignore_errors=True)
        if name == "gatt":
            shutil.rmtree(out / "final", ignore_errors=True)
    t_start = time.time()
    todo = [name for name in STAGES if not _done(out / DIRS[name])]
    ran_expected = 0.0  # expected seconds of the stages run so far, to scale the estimate to this machine's pace
    for i, name in enumerate(STAGES):
        stage_dir = out / DIRS[name]
        if name != "world" and c.paths is None:
            c.paths = json.loads((out / "world" / "DONE").read_text())
        if _done(stage_dir):
            _say(f"[{i + 1}/{len(STAGES)}] {name}: done, skipped")
            continue
        elapsed = time.time() - t_start
        _say(f"[{i + 1}/{len(STAGES)}] {name} (pipeline {elapsed / 60:.1f} min so far, {_eta(s, todo[todo.index(name):], elapsed, ran_expected)})")
        t0 = time.time()
        RUNNERS[name](c)
        ran_expected += s["seconds"].get(name, 0)
        _say(f"[{i + 1}/{len(STAGES)}] {name}: {time.time() - t0:.0f} s")
    _say(f"pipeline: {(time.time() - t_start) / 60:.1f} min")
    return out / "report.md"


def _eta(s: dict, remaining: list[str], elapsed: float, ran_expected: float) -> str:
    """Time left: the stage times measured on the reference 2-core machine, scaled by this run's pace so far."""
    pace = elapsed / ran_expected if ran_expected > 30 else 1.0
    left = pace * sum(s["seconds"].get(n, 0) for n in remaining)
    return f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"
