"""The whole Llama 2 recipe end to end on the toy world, with a report of its effects (`llama2 pipeline`).

world -> tokenizer -> prepare -> pretrain -> sft -> RLHF versions (fresh preference pairs, helpfulness and safety
reward models with and without a margin, rejection sampling) -> PPO -> GAtt -> evaluation -> report. Every stage runs
through the same library function as its command (``llama2 pretrain``, ``llama2 sft`` ...) on files in the same
formats real data uses, and writes a directory under OUT. A stage whose output is complete is skipped, so a
stopped pipeline resumes where it stopped; ``--from STAGE`` redoes that stage and every later one.

The sizes are files, ``configs/pipeline/{quick,default,large}.yaml``, each setting with its reason: ``quick`` and
``default`` for a 2-core CPU (the tests run ``quick``; ``make run`` the default), ``large`` for one GPU.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .answers import answer_texts
from .chat import format_dialog
from .checkpoint import load
from .config import ConfigError, StageSampling, apply_overrides
from .data.prepare import PrepareConfig, prepare
from .data.records import read_dialogs, read_eval_items, read_objects, read_preferences, read_prompts
from .eval.gatt import GattEvalConfig, gatt_eval
from .eval.report import write_report
from .eval.toyworld import compare_models, eval_sampling, evaluate_chat_model, read_pipeline_marker, selection_curves
from .rlhf.reward_model import evaluate_reward
from .tokenizer import train_tokenizer
from .toyworld import ToyWorld, pipeline_world
from .train.gatt import GattConfig, gatt
from .train.ppo import PPOConfig, ppo
from .train.pretrain import PretrainConfig, pretrain
from .train.rejection import RejectionConfig, load_reward_models, rejection
from .train.reward import RewardConfig, train_reward
from .train.sft import SFTConfig, sft
from .train.state import publish

ALIASES = {"reward": "rlhf", "rejection": "rlhf"}  # stages the rlhf stage runs version by version: --from names them
SIZES_DIR = Path(__file__).resolve().parents[1] / "configs" / "pipeline"
SIZE_NAMES = ("quick", "default", "large")
_SIZE_KEYS = {"world", "vocab", "model", "seq_len", "versions", "pretrain", "sft", "reward", "annotate", "rejection",
              "ppo", "gatt", "eval", "seconds"}


def size_settings(size: str) -> dict:
    """The settings of a pipeline size: ``configs/pipeline/SIZE.yaml`` for a size's name (quick, default, large),
    or any YAML file of the same keys (each stage's block holds fields of that stage's config)."""
    path = Path(size) if size.endswith((".yaml", ".yml")) else SIZES_DIR / f"{size}.yaml"
    if not path.is_file():
        where = f"one of {', '.join(SIZE_NAMES)} (files in {SIZES_DIR})" if path.parent == SIZES_DIR else "a YAML file"
        raise ValueError(f"size {size!r}: no such file {path}; expected {where}")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of the pipeline's settings")
    missing, unknown = _SIZE_KEYS - set(settings), set(settings) - _SIZE_KEYS
    if missing or unknown:
        raise ValueError(f"{path}: " + "; ".join(filter(None, [missing and f"missing {', '.join(sorted(missing))}",
                                                              unknown and f"unknown {', '.join(sorted(unknown))}"])))
    return settings


@dataclass
class Ctx:
    out: Path
    size: str
    seed: int
    settings: dict  # the size's settings (size_settings)
    world: ToyWorld
    device: str = "cpu"
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> ["field=value", ...]
    paths: dict | None = None
    reward: str = "models"  # what scores rejection sampling and PPO: the reward models, or the world's judges
    oracle_run: Path | None = None  # an oracle run of the same size and seed, for the report to compare against

    @property
    def oracle(self) -> bool:
        """The oracle run: the exact judges score rejection sampling and PPO (no reward models are trained)."""
        return self.reward == "judges"

    def judges(self, dialogs, texts, safety, *rest):
        """The world's exact R_c as a reward function (rejection sampling's and PPO's ``reward_fn``)."""
        return self.world.reward(dialogs, texts, [bool(x) for x in safety])

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
    train_tokenizer([d / "corpus.txt"], c.settings["vocab"], d / "tokenizer.model")
    _mark(d)


def stage_prepare(c: Ctx) -> None:
    prepare(PrepareConfig(inputs=[c.paths["pretrain"]], out=str(c.out / "shards"), tokenizer=str(c.out / "tokenizer" / "tokenizer.model"),
                          val_fraction=0.02, seed=c.seed, force=True), quiet=True)
    _mark(c.out / "shards")


def stage_pretrain(c: Ctx) -> None:
    _finished(pretrain(c.config(PretrainConfig, "pretrain", data=str(c.out / "shards"), out=str(c.out / "pretrain"),
                                model=c.settings["model"], seq_len=c.settings["seq_len"], save_every=10**9, keep_last=1, resume=True,
                                **c.settings["pretrain"])))
    _mark(c.out / "pretrain")


def stage_sft(c: Ctx) -> None:
    _finished(sft(c.config(SFTConfig, "sft", data=c.paths["sft"], val_data=c.paths["sft_val"], init_from=str(c.out / "pretrain"),
                           out=str(c.out / "sft"), seq_len=c.settings["seq_len"], save_every=10**9, keep_last=1, resume=True,
                           **c.settings["sft"])))
    _mark(c.out / "sft")


# -- RLHF versions (§3.2.1, §3.2.3: RLHF-V1 ... V5) -----------------------------------------------------------------
# Each version: the latest model answers a new slice of the prompts twice per temperature; the world's judges (the
# annotators) rate pairs of those answers; the reward models are retrained on all preference data so far; rejection
# sampling draws K answers per new prompt from the latest model, keeps the best (with the best of every earlier
# version, re-scored), and fine-tunes the latest model on them. PPO then runs on the last version's model. In the
# oracle run (reward: judges) the judges score rejection sampling directly: no pairs, no reward models.


def version_dir(c: Ctx, v: int) -> Path:
    return c.out / "rlhf" / f"v{v}"


def latest_model(c: Ctx, v: int) -> Path:
    """The model version v samples from: the SFT model for v1, else the previous version's rejection-sampling model."""
    return c.out / "sft" if v == 1 else version_dir(c, v - 1) / "rejection"


def reward_dirs(c: Ctx, v: int | None = None) -> dict[str, Path]:
    """The reward models of version v (default: the last). Margin-free ones exist for the last version only (the
    report's with/without-margin comparison, Table 28)."""
    v = v or c.settings["versions"]
    margins = ("none", "small") if v == c.settings["versions"] else ("small",)
    return {f"{kind} RM ({'margin' if m != 'none' else 'no margin'})": version_dir(c, v) / "reward" / f"{kind}-{m}"
            for kind in ("helpfulness", "safety") for m in margins}


def reward_model_paths(c: Ctx, v: int | None = None) -> dict:
    """The reward models that score for the stages after version v (default: the last): the margin ones, as the
    ``reward_helpfulness`` and ``reward_safety`` fields of RejectionConfig, PPOConfig and GattConfig take them."""
    d = version_dir(c, v or c.settings["versions"]) / "reward"
    return dict(reward_helpfulness=str(d / "helpfulness-small"), reward_safety=str(d / "safety-small"))


def _version_prompts(c: Ctx, v: int) -> Path:
    """Version v's new prompts: every V-th prompt of the world's prompts file, starting at v - 1."""
    path = version_dir(c, v) / "prompts.jsonl"
    if not path.is_file():
        lines = [ln for ln in Path(c.paths["prompts"]).read_text(encoding="utf-8").splitlines() if ln.strip()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(ln + "\n" for ln in lines[v - 1 :: c.settings["versions"]]), encoding="utf-8")
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
    a = c.settings["annotate"]
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
                                        seq_len=c.settings["seq_len"], save_every=10**9, keep_last=1, tensorboard=False,
                                        resume=True, **c.settings["reward"])))
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
    r = dict(c.settings["rejection"])
    temperature = r.pop("temperatures")[v - 1]
    previous = ",".join(str(version_dir(c, u) / "rejection" / "iter_1" / "kept.jsonl") for u in range(1, v))
    scorer = {} if c.oracle else reward_model_paths(c, v)
    # samples (and, by default, fine-tunes) the latest model; rejection.finetune_from=base restarts from SFT instead
    _finished(rejection(c.config(RejectionConfig, "rejection", prompts=str(_version_prompts(c, v)),
                                 init_from=str(c.out / "sft"), sample_from=str(latest_model(c, v)), previous=previous,
                                 iterations=1, temperatures=[temperature], out=str(version_dir(c, v) / "rejection"),
                                 seq_len=c.settings["seq_len"], tensorboard=False, resume=True, **scorer, **r),
                        reward_fn=c.judges if c.oracle else None))


def stage_rlhf(c: Ctx) -> None:
    for v in range(1, c.settings["versions"] + 1):
        vdir = version_dir(c, v)
        if _done(vdir):
            continue
        _say(f"  RLHF version {v} of {c.settings['versions']}" + (" (scored by the judges)" if c.oracle else ""))
        if not c.oracle:
            annotate_samples(c, v)
            _train_reward_models(c, v)
            (vdir / "rm_fresh_accuracy.json").write_text(json.dumps(_fresh_accuracy(c, v), indent=2))
        _rejection_version(c, v)
        _mark(vdir)
    _mark(c.out / "rlhf")


def stage_ppo(c: Ctx) -> None:
    """PPO from the last version's model; early stopping and the checkpoint chosen on the validation prompts (never
    the evaluation's)."""
    scorer = {} if c.oracle else reward_model_paths(c)
    _finished(ppo(c.config(PPOConfig, "ppo", prompts=c.paths["prompts"], val_prompts=c.paths["prompts_val"],
                           init_from=str(version_dir(c, c.settings["versions"]) / "rejection"), out=str(c.out / "ppo"),
                           tensorboard=False, overwrite=True, **scorer, **c.settings["ppo"]),
                  reward_fn=c.judges if c.oracle else None))
    _mark(c.out / "ppo")


def stage_gatt(c: Ctx) -> None:
    """GAtt on the PPO model; it replays the last RLHF version's kept answers (a setting of ours: the SFT dialogs the
    stage replayed before carry the writers' flaws RLHF removed)."""
    ranker = "" if c.oracle else reward_model_paths(c)["reward_helpfulness"]
    replay = version_dir(c, c.settings["versions"]) / "rejection" / "iter_1" / "kept.jsonl"
    _finished(gatt(c.config(GattConfig, "gatt", dialogs=c.paths["gatt_dialogs"], init_from=str(c.out / "ppo"), replay=str(replay),
                            reward_model=ranker, out=str(c.out / "gatt"), seq_len=c.settings["seq_len"],
                            tensorboard=False, resume=True, **c.settings["gatt"])))
    final = c.out / "final"
    final.mkdir(parents=True, exist_ok=True)
    publish(c.out / "gatt", final)
    _mark(c.out / "gatt")


def checkpoints(c: Ctx) -> dict[str, Path]:
    """The chat models the evaluation compares, in the order of the recipe: SFT, the last RLHF version's
    rejection-sampling model, PPO (RLHF's result, judged against SFT) and the final model after GAtt."""
    v = c.settings["versions"]
    return {"SFT": c.out / "sft", f"RS v{v}": version_dir(c, v) / "rejection", "PPO": c.out / "ppo",
            "GAtt (final)": c.out / "final"}


def _selection_items(items: list, per_category: int) -> list:
    """The first ``per_category`` evaluation items of each category (and of the secret prompts)."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        key = it.get("category", "")
        if seen.get(key, 0) < per_category:
            seen[key] = seen.get(key, 0) + 1
            out.append(it)
    return out


def stage_eval(c: Ctx) -> None:
    """Every compared model on the evaluation items (sampled answers, common random numbers, paired statistics
    against SFT), the reward models on held-out pairs, best-of-K selection, GAtt adherence and a sample chat. Nothing
    here was used to choose anything: the evaluation items are held out from every training and validation file."""
    e = c.settings["eval"]
    d = c.out / "eval"
    d.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"reward": c.reward, "stages": {}, "reward_models": {}}
    items = read_eval_items(c.paths["eval"])
    sampling = eval_sampling(e["max_new_tokens"], e["temperature"])
    paths = reward_model_paths(c)
    rms = {} if c.oracle else load_reward_models(paths["reward_helpfulness"], paths["reward_safety"], c.device)
    if not c.oracle:  # the reward models: held-out accuracy per rating bucket, each on its own kind (Tables 8, 28)
        prefs = list(read_preferences(c.paths["preferences_heldout"]))
        for name, rd in reward_dirs(c).items():
            kind = rd.name.split("-")[0]
            metrics["reward_models"][name] = evaluate_reward(str(rd), [p for p in prefs if p.kind == kind], device=c.device)
        metrics["rm_fresh"] = {f"v{v}": json.loads((version_dir(c, v) / "rm_fresh_accuracy.json").read_text())
                               for v in range(1, c.settings["versions"] + 1)}
    val_items = [{"dialog": p.dialog, "safety": p.safety, "category": c.world.task_for(p.dialog).category}
                 for p in read_prompts(c.paths["prompts_val"])]
    val: dict = {}
    for stage, ckpt in checkpoints(c).items():
        _say(f"  evaluating {stage}")
        model, tok = load(ckpt, device=c.device)
        metrics["stages"][stage] = evaluate_chat_model(model, tok, c.world, items, rms, sampling, e["samples"], c.seed)
        if stage in ("SFT", "PPO"):  # the validation prompts: what the recipe's settings may be chosen by
            val[stage] = evaluate_chat_model(model, tok, c.world, val_items, rms, sampling, e["samples"], c.seed)
        if stage == "SFT" and rms:  # best of K on the SFT model's answers: what the reward models' pick is worth
            metrics["selection"] = selection_curves(model, tok, c.world, _selection_items(items, e["selection_per_category"]),
                                                    rms, sampling, e["k_curve"], c.seed)
    metrics["validation"] = {"PPO vs SFT": compare_models(val_items, val["SFT"], val["PPO"]),
                             "judge_reward_mean": {k: v["judge_reward_mean"] for k, v in val.items()}}
    # every model against SFT on the same items, judged by the world's judges (the paper's human evaluation, §3.4.2)
    sft = metrics["stages"]["SFT"]
    metrics["compare"] = {f"{stage} vs SFT": compare_models(items, sft, m) for stage, m in metrics["stages"].items()
                          if stage != "SFT"}
    metrics["rs_selection"] = {f"v{v}": rs_selection(c, version_dir(c, v) / "rejection" / "iter_1" / "samples.jsonl")
                               for v in range(1, c.settings["versions"] + 1)}
    metrics["ppo"] = [{k: r[k] for k in PPO_CURVES if k in r} for r in read_objects(c.out / "ppo" / "metrics.jsonl", missing_ok=True)]
    metrics["best_of_k"] = {}  # best-of-K against K in the rejection-sampling iterations, under their scorer
    for v in range(1, c.settings["versions"] + 1):
        st = json.loads((version_dir(c, v) / "rejection" / "iter_1" / "stats.json").read_text())
        metrics["best_of_k"][f"RS v{v} (T={st['temperature']})"] = st["best_of_k_curve"]
    # GAtt: recall of the instruction turn by turn, with and without it (Table 30's measure, over 20 turns)
    metrics["gatt"] = gatt_eval(GattEvalConfig(ckpts=[str(c.out / "ppo"), str(c.out / "final")], names=["without GAtt", "with GAtt"],
                                               dialogs=c.paths["gatt_dialogs"], out=str(d / "gatt"), n=e["gatt_probes"],
                                               turns=e["gatt_turns"], seed=c.seed, device=c.device))
    metrics["sample_chat"] = _sample_chat(c, items[:3], e["max_new_tokens"])
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _mark(d)


PPO_CURVES = ("step", "reward", "score_std", "kl", "clip_fraction", "entropy", "explained_variance", "adv_reward_corr",
              "adv_reward_corr_safety", "adv_reward_corr_other", "heldout_reward")


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
    write_report(c.out, c.oracle_run)
    _mark(c.out / "report")


RUNNERS = {"world": stage_world, "tokenizer": stage_tokenizer, "prepare": stage_prepare, "pretrain": stage_pretrain,
           "sft": stage_sft, "rlhf": stage_rlhf, "ppo": stage_ppo, "gatt": stage_gatt, "eval": stage_eval,
           "report": stage_report}  # the stages, in the order the recipe runs them
STAGES = tuple(RUNNERS)
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
                 device: str = "cpu", overrides: list[str] | None = None, size: str | None = None,
                 reward: str = "models", oracle: str | Path | None = None) -> Path:
    """Run (or resume) the whole recipe; returns the path of report.md. ``size``: quick, default, large or a YAML
    file of a size's settings (``quick`` is size="quick"); ``from_stage``: redo this stage (or the stage an alias
    names) and every later one; ``overrides``: STAGE.FIELD=VALUE items; ``reward``: what scores rejection sampling
    and PPO, the trained reward models ("models") or the world's exact judges ("judges": the oracle run, the ceiling
    of what this budget can do with a perfect reward model); ``oracle``: such a run's output directory, for the
    report to compare against (its accuracy rule reads which categories the oracle raises)."""
    from_stage = ALIASES.get(from_stage, from_stage)
    if from_stage and from_stage not in STAGES:
        raise ValueError(f"--from {from_stage!r}: expected one of {', '.join(STAGES + tuple(ALIASES))}")
    if reward not in ("models", "judges"):
        raise ValueError(f"--reward {reward!r}: expected models or judges")
    c = _start(Path(out), quick, size, seed, device, parse_overrides(list(overrides or [])), reward)
    if oracle is not None:
        c.oracle_run = _checked_oracle(Path(oracle), c)
    for name in STAGES[STAGES.index(from_stage):] if from_stage else ():  # redo this stage and every later one
        shutil.rmtree(c.out / DIRS[name], ignore_errors=True)
        if name == "gatt":
            shutil.rmtree(c.out / "final", ignore_errors=True)
    t_start = time.time()
    todo = [name for name in STAGES if not _done(c.out / DIRS[name])]
    ran_expected = 0.0  # expected seconds of the stages run so far, to scale the estimate to this machine's pace
    for i, name in enumerate(STAGES):
        if name != "world" and c.paths is None:
            c.paths = json.loads((c.out / "world" / "DONE").read_text())
        if _done(c.out / DIRS[name]):
            _say(f"[{i + 1}/{len(STAGES)}] {name}: done, skipped")
            continue
        elapsed = time.time() - t_start
        eta = _eta(c.settings, todo[todo.index(name):], elapsed, ran_expected)
        _say(f"[{i + 1}/{len(STAGES)}] {name} (pipeline {elapsed / 60:.1f} min so far, {eta})")
        t0 = time.time()
        RUNNERS[name](c)
        ran_expected += c.settings["seconds"].get(name, 0)
        _say(f"[{i + 1}/{len(STAGES)}] {name}: {time.time() - t0:.0f} s")
    _say(f"pipeline: {(time.time() - t_start) / 60:.1f} min")
    return c.out / "report.md"


def _start(out: Path, quick: bool, size: str | None, seed: int, device: str, overrides: dict[str, list[str]],
           reward: str = "models") -> Ctx:
    """The run's context, after checking that ``out`` holds nothing but a run of this size, seed and reward (and
    writing its marker, pipeline.json)."""
    if quick and size not in (None, "quick"):
        raise ValueError(f"--quick and --size {size} disagree; give one of them")
    size = size or ("quick" if quick else "default")
    settings = size_settings(size)
    if size == "large" and not device.startswith("cuda"):
        _say("note: the large size is meant for one GPU (--device cuda); on a CPU it takes hours")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / "pipeline.json"
    if marker.is_file():
        prev = read_pipeline_marker(marker)
        if prev.get("size") != size or prev.get("seed") != seed or prev.get("reward", "models") != reward:
            raise ValueError(f"{out} holds a {prev.get('size')} run with seed {prev.get('seed')} scored by "
                             f"{prev.get('reward', 'models')}; use another --out (or delete it) for a {size} run with "
                             f"seed {seed} scored by {reward}")
        if prev.get("overrides", {}) != overrides:
            _say(f"note: {out} was started with overrides {prev.get('overrides', {})}; finished stages keep them "
                 "(use --from STAGE to redo a stage with the new ones)")
    marker.write_text(json.dumps({"size": size, "seed": seed, "device": device, "overrides": overrides,
                                  "reward": reward, "stages": list(STAGES)}))
    return Ctx(out, size, seed, settings, world=pipeline_world(seed, settings["world"]), device=device,
               overrides=overrides, reward=reward)


def _checked_oracle(path: Path, c: Ctx) -> Path:
    """An oracle run to compare against: finished, of the same size and seed, scored by the judges."""
    marker = path / "pipeline.json"
    if not (path / "metrics.json").is_file() or not marker.is_file():
        raise ValueError(f"--oracle {path}: not a finished pipeline run (no metrics.json); run `llama2 pipeline "
                         f"--reward judges --out {path}` first")
    meta = read_pipeline_marker(marker)
    if (meta.get("size"), meta.get("seed"), meta.get("reward")) != (c.size, c.seed, "judges"):
        raise ValueError(f"--oracle {path}: a {meta.get('size')} run with seed {meta.get('seed')} scored by "
                         f"{meta.get('reward', 'models')}; expected a {c.size} run with seed {c.seed} scored by judges")
    return path


def _eta(s: dict, remaining: list[str], elapsed: float, ran_expected: float) -> str:
    """Time left: the stage times measured on the reference 2-core machine, scaled by this run's pace so far."""
    pace = elapsed / ran_expected if ran_expected > 30 else 1.0
    left = pace * sum(s["seconds"].get(n, 0) for n in remaining)
    return f"about {left / 60:.0f} min left" if left >= 90 else f"about {left:.0f} s left"
