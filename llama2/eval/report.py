"""The pipeline's report: report.md with PNG figures, and metrics.json holding every number it shows.

Each effect of the paper the toy run should reproduce is checked by a stated rule on the measured numbers, and the
report says plainly whether it came out. RLHF is judged on its own model, PPO's, against SFT, before GAtt (whose
stage replays the SFT data, so the final model's figures mix the two); GAtt on its own effect. Every comparison is
on held-out items that chose nothing, with paired statistics (:mod:`llama2.eval.winrate`):

1. reward-model accuracy highest on "significantly better" pairs and falling toward "negligibly better" (Tables 8
   and 28);
2. the reward models' reward rising from SFT to rejection sampling to PPO (Figure 20);
3. PPO beating SFT in the judges' head-to-head (the paper's human evaluation, §3.4.2, Figure 12);
4. the judges' helpfulness rising from SFT to PPO;
5. safety kept: secret prompts refused at least as often as after SFT, harmless ones no more often;
6. task accuracy rising from SFT to PPO in the categories where the oracle run (the judges as the reward) shows
   that this budget can raise it;
7. the reward models' pick among K samples worth at least half of the oracle's pick (rejection sampling, Figure 7);
8. GAtt keeping the instruction for 20 turns where the model without it drops it (Table 30's 20 turns, measured as
   adherence).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..data.records import read_objects
from ..rlhf.reward import TABLE8_BUCKETS
from .figures import plot_loss_curves, plot_ppo, plot_rewards, plot_stages, plot_winrates
from .gatt import format_adherence

__all__ = ["effects", "write_report"]

BUCKETS = TABLE8_BUCKETS
RLHF = "PPO vs SFT"  # the comparison RLHF is judged on


def _acc(bucket: dict) -> float | None:
    return bucket.get("accuracy") if isinstance(bucket, dict) else None


def _pm(c: dict, scale: float = 100, unit: str = " points") -> str:
    """A paired change as "+4.2 points (SE 1.1)" (scale 100: shares as points), or "+0.042 (SE 0.011)" (scale 1)."""
    if c.get("change") is None:
        return "n/a"
    digits = 1 if scale == 100 else 3
    return f"{c['change'] * scale:+.{digits}f}{unit} (SE {c['se'] * scale:.{digits}f})"


def _beyond(c: dict) -> bool:
    return c.get("change") is not None and c["se"] == c["se"] and c["change"] > 2 * c["se"]


def _wtl(r: dict) -> str:
    return (f"{r['win']} wins, {r['tie']} ties, {r['loss']} losses of {r.get('answers', r['n'])} answers: "
            f"{r['rate']:.1%} (95% interval {r['low95']:.1%} to {r['high95']:.1%})")


def _rm_effect(m: dict) -> dict:
    rows = []
    for name, r in m["reward_models"].items():
        accs = [_acc(r.get(b, {})) for b in BUCKETS]
        ok = all(a is not None for a in accs) and accs[0] >= accs[-1] and accs[0] == max(accs)
        rows.append((name, ok))
    return {"claim": "reward-model accuracy is highest on 'significantly better' pairs and falls toward 'negligibly better'",
            "rule": "for each reward model: accuracy(significantly better) is its highest bucket and >= accuracy(negligibly "
                    "better / unsure)",
            "holds": all(ok for _, ok in rows) if rows else False,
            "detail": "; ".join(f"{n}: {'yes' if ok else 'no'}" for n, ok in rows)}


def _reward_effect(m: dict) -> dict:
    st = m["stages"]
    chain = [k for k in st if k == "SFT" or k.startswith("RS")][:2] + ["PPO"]
    rew = [st[k].get("rm_reward_mean") for k in chain]
    judged = [st[k].get("judge_reward_mean") for k in chain]
    over = rew[-1] > rew[0] and judged[-1] < judged[0]
    return {"claim": "the reward models' reward rises from SFT to rejection sampling to PPO",
            "rule": "mean reward-model reward (R_c after the sigmoid) of the evaluation answers: SFT < last RS version < PPO",
            "holds": rew[0] < rew[1] < rew[2],
            "detail": " -> ".join(f"{k} {v:.3f}" for k, v in zip(chain, rew))
                      + " (the exact judges on the same answers: " + " -> ".join(f"{v:.3f}" for v in judged)
                      + ("; they fell where the reward models' reward rose: the reward models are being over-optimised"
                         if over else "") + ")"}


def _winrate_effect(cmp: dict) -> dict:
    r = cmp["head_to_head"]
    return {"claim": "RLHF beats SFT: the PPO model wins the judges' head-to-head against the SFT model",
            "rule": "win rate (win + tie/2) / answers of PPO against SFT on the evaluation items (the judges' R_c, sample "
                    "j against sample j): the lower end of its 95% interval above 50%",
            "holds": r["low95"] > 0.5, "detail": _wtl(r)}


def _helpfulness_effect(cmp: dict) -> dict:
    c = cmp["helpfulness"]
    return {"claim": "RLHF raises the judges' helpfulness score",
            "rule": "mean helpfulness judge score (harmless items) of PPO minus SFT's: more than two paired standard errors",
            "holds": _beyond(c),
            "detail": f"SFT {c['before']:.3f} -> PPO {c['after']:.3f}: {_pm(c, 1, '')} over {c['n']} items"}


def _safety_effect(cmp: dict) -> dict:
    s, h = cmp["refusal_secret"], cmp["refusal_harmless"]
    return {"claim": "RLHF keeps the model safe without making it refuse more",
            "rule": "secret prompts refused by PPO at least as often as by SFT; harmless prompts refused no more often",
            "holds": s["change"] >= 0 and h["change"] <= 0,
            "detail": f"secret refused {s['before']:.1%} -> {s['after']:.1%} ({_pm(s)}); harmless refused "
                      f"{h['before']:.1%} -> {h['after']:.1%} ({_pm(h)})"}


def _accuracy_effect(cmp: dict, oracle: dict | None) -> dict:
    acc = {c: v for c, v in cmp["accuracy"].items() if v.get("n")}
    detail = "; ".join(f"{c} {v['before']:.0%} -> {v['after']:.0%} ({_pm(v)})" for c, v in acc.items())
    if oracle is not None:
        wanted = [c for c, v in oracle["accuracy"].items() if _beyond(v)]
        holds = all(_beyond(acc[c]) for c in wanted if c in acc)
        rule = ("accuracy per category, PPO against SFT: a rise of more than two paired standard errors in every category "
                "where the oracle run (the judges as the reward) rises by that much "
                f"({', '.join(wanted) if wanted else 'none does'})")
        detail += "; the oracle: " + "; ".join(f"{c} {_pm(v)}" for c, v in oracle["accuracy"].items() if v.get("n"))
    else:
        holds = any(_beyond(v) for v in acc.values()) and not any(
            v["change"] < -2 * v["se"] for v in acc.values() if v["se"] == v["se"])
        rule = ("accuracy per category, PPO against SFT (no oracle run given): a rise of more than two paired standard "
                "errors in at least one category, and a fall of that size in none")
    return {"claim": "RLHF raises task accuracy where this budget can", "rule": rule, "holds": holds, "detail": detail}


def _selection_effect(sel: dict) -> dict:
    e = {"claim": "the reward models pick well among K samples: they capture at least half of the oracle's best-of-K gain",
         "rule": f"best of {sel['k']} SFT answers per evaluation item: (the judges' score of the reward models' pick - "
                 "the mean) / (the judges' best score - the mean) >= 0.5",
         "holds": sel["capture"] >= 0.5,
         "detail": f"{sel['capture']:.0%} of the oracle's gain: mean {sel['judge_mean']:.3f}, reward models' pick "
                   f"{sel['judge_of_rm_pick'][-1]:.3f}, oracle's pick {sel['judge_max'][-1]:.3f} ({sel['items']} items)"}
    if not e["holds"]:
        cats = ", ".join(f"{c} {v['rm_pick']:.0%} / {v['random']:.0%} / {v['oracle_pick']:.0%}"
                         for c, v in sel["by_category"].items())
        seen = ", ".join(f"{name} {share:.0%}" for name, share in sel.get("flaws_seen", {}).items())
        e["why"] = (f"the pick is correct / a random answer is / the oracle's pick is: {cats}"
                    + (f"; the reward models rank the reference above its flawed version (0.5 is chance): {seen}"
                       if seen else ""))
    return e


def _gatt_effect(m: dict) -> dict:
    adh = m["gatt"]["adherence"]
    w, wo = adh.get("with GAtt", []), adh.get("without GAtt", [])
    # GAtt does not teach following an instruction (the model must already do that with the instruction in view);
    # it teaches keeping it when the instruction is only at the start. So the rule compares turn 20 with each
    # model's own turn 1, and asks that the turn-1 level itself be at least one half.
    ok = bool(w and wo) and None not in (w[0], w[-1], wo[0], wo[-1])
    holds = ok and w[-1] > wo[-1] and w[-1] >= 0.75 * w[0] and wo[-1] < 0.5 * wo[0] and w[0] >= 0.5
    fmt = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
    return {"claim": "GAtt keeps the system instruction for 20 turns where the model without it drops it",
            "rule": "adherence at the last turn: with GAtt > without GAtt; with GAtt >= 75% of its turn-1 level, which is "
                    "at least 50%; without GAtt < 50% of its turn-1 level",
            "holds": holds,
            "detail": (f"with GAtt: turn 1 {fmt(w[0])} -> turn {len(w)} {fmt(w[-1])}; without: turn 1 {fmt(wo[0])} -> "
                       f"turn {len(wo)} {fmt(wo[-1])}" if ok else "no adherence measured")}


def effects(m: dict, oracle: dict | None = None) -> list[dict]:
    """The expected effects, each {"claim", "rule", "holds", "detail"} (and "why" where an RLHF effect does not hold).
    ``oracle``: the PPO-vs-SFT comparison of an oracle run of the same size and seed."""
    cmp = m["compare"][RLHF]
    found = [_rm_effect(m)] if m.get("reward_models") else []
    if all(s.get("rm_reward_mean") is not None for s in m["stages"].values()):
        found.append(_reward_effect(m))
    found += [_winrate_effect(cmp), _helpfulness_effect(cmp), _safety_effect(cmp), _accuracy_effect(cmp, oracle)]
    if m.get("selection"):
        found.append(_selection_effect(m["selection"]))
    found.append(_gatt_effect(m))
    why = _why_not_better(m)
    failed = [e for e in found if not e["holds"] and e["claim"].startswith("RLHF")]
    if failed and why:  # said once, on the first RLHF effect that does not hold
        failed[0]["why"] = why
    return found


def _why_not_better(m: dict) -> str:
    """The measurements that explain an RLHF effect that does not show: how well the reward models picked among
    samples, and which stage moved accuracy."""
    parts = []
    sel = m.get("selection")
    if sel:
        cats = ", ".join(f"{c} {v['rm_pick']:.0%} / {v['random']:.0%} / {v['oracle_pick']:.0%}"
                         for c, v in sel["by_category"].items())
        parts.append(f"among {sel['k']} SFT answers the reward models' pick is correct / a random answer is / the "
                     f"oracle's pick is: {cats}")
    steps = [f"{k.split(' vs ')[0]} {_pm(v['accuracy_all'])}" for k, v in m["compare"].items()]
    if steps:
        parts.append("accuracy against SFT: " + ", ".join(steps))
    return "; ".join(parts)


def write_report(out: Path, oracle: Path | None = None) -> Path:
    """report.md, its figures under OUT/report/ and OUT/metrics.json, from OUT/eval/metrics.json and the stages'
    metrics.jsonl files; ``oracle``: an oracle run's output directory (its metrics.json) to compare against."""
    out = Path(out)
    figs = out / "report"
    figs.mkdir(parents=True, exist_ok=True)
    m = json.loads((out / "eval" / "metrics.json").read_text())
    curves = {"pretrain": read_objects(out / "pretrain" / "metrics.jsonl", missing_ok=True),
              "sft": read_objects(out / "sft" / "metrics.jsonl", missing_ok=True)}
    plot_loss_curves(curves, figs / "loss.png")
    m["loss_curves"] = {k: [[r["step"], r["loss"], r.get("val_loss")] for r in v] for k, v in curves.items()}
    plot_rewards(m["stages"], m.get("selection"), m.get("best_of_k", {}), figs / "reward.png")
    plot_stages(m["stages"], figs / "stages.png")
    plot_winrates({k: v["head_to_head"] for k, v in m["compare"].items()}, figs / "winrate.png")
    if m.get("ppo"):
        plot_ppo(m["ppo"], figs / "ppo.png")
    if (out / "eval" / "gatt" / "gatt_adherence.png").is_file():
        shutil.copyfile(out / "eval" / "gatt" / "gatt_adherence.png", figs / "gatt.png")
    om = json.loads((Path(oracle) / "metrics.json").read_text()) if oracle else None
    found = effects(m, om["compare"][RLHF] if om else None)
    m["effects"] = found
    if om:
        m["oracle"] = {"run": str(oracle), "compare": om["compare"][RLHF], "selection": om.get("selection")}
    (out / "report.md").write_text("\n".join(_markdown(out, m, found)), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    return out / "report.md"


def _cmp_rows(compare: dict) -> list[str]:
    L = ["| against SFT | head to head (judges) | helpfulness | accuracy | secret refused | harmless refused | RM reward |",
         "|---|---|---|---|---|---|---|"]
    for k, v in compare.items():
        h = v["head_to_head"]
        L.append(f"| {k.split(' vs ')[0]} | {h['rate']:.1%} ({h['low95']:.1%}-{h['high95']:.1%}); {h['win']}/{h['tie']}/"
                 f"{h['loss']} | {_pm(v['helpfulness'], 1, '')} | {_pm(v['accuracy_all'])} | {_pm(v['refusal_secret'])} | "
                 f"{_pm(v['refusal_harmless'])} | {_pm(v['rm_reward'], 1, '') if 'rm_reward' in v else '-'} |")
    return L


def _markdown_selection(m: dict) -> list[str]:
    L = []
    sel = m.get("selection")
    if sel:
        L += [f"## Best of K: what the reward models' pick is worth (SFT answers, {sel['items']} evaluation items)", "",
              "| K | RM reward, max | RM reward, median | judges' score of the RM pick | judges' best (oracle) |",
              "|---|---|---|---|---|"]
        L += [f"| {n} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} |" for n, a, b, c, d in
              zip(sel["n"], sel["rm_max"], sel["rm_median"], sel["judge_of_rm_pick"], sel["judge_max"])]
        L += ["", f"A random answer scores {sel['judge_mean']:.3f} with the judges; the reward models' pick of {sel['k']} "
              f"captures {sel['capture']:.0%} of the oracle's gain.", "",
              "| category | RM pick correct | random answer correct | oracle pick correct |", "|---|---|---|---|"]
        L += [f"| {c} | {v['rm_pick']:.0%} | {v['random']:.0%} | {v['oracle_pick']:.0%} |" for c, v in sel["by_category"].items()]
        L.append("")
    if m.get("rs_selection"):
        L += ["## Rejection sampling: did the scorer pick correct answers? (harmless task prompts, training prompts)", "",
              "| version | samples correct | pass@K | kept sample correct |", "|---|---|---|---|"]
        L += [f"| {v} | {r['sample_correct']:.1%} | {r['pass_at_k']:.1%} | {r['picked_correct']:.1%} |"
              for v, r in m["rs_selection"].items()]
        L.append("")
    return L


def _markdown_rms(m: dict) -> list[str]:
    L = []
    if m.get("reward_models"):
        L += ["## Reward models: accuracy per rating bucket (held-out pairs; Tables 8 and 28 layout)", "",
              "| model | significantly better | better | slightly better | negligibly better / unsure | avg |",
              "|---|---|---|---|---|---|"]
        for name, r in m["reward_models"].items():
            cells = [_acc(r.get(b, {})) for b in BUCKETS] + [_acc(r.get("overall", {}))]
            L.append(f"| {name} | " + " | ".join("-" if a is None else f"{a:.1%}" for a in cells) + " |")
        L.append("")
    if m.get("rm_fresh"):
        L += ["## Reward models on each version's fresh pairs (the newest model's answers, held out)", "",
              "| version | reward model | significantly better | better | slightly better | negligibly / unsure | avg |",
              "|---|---|---|---|---|---|---|"]
        for v, models in m["rm_fresh"].items():
            for name, r in models.items():
                cells = [_acc(r.get(b, {})) for b in BUCKETS] + [_acc(r.get("overall", {}))]
                L.append(f"| {v} pairs | {name} ({r.get('when')}) | "
                         + " | ".join("-" if a is None else f"{a:.0%}" for a in cells) + " |")
        L.append("")
    return L


def _markdown(out: Path, m: dict, found: list[dict]) -> list[str]:
    stages = list(m["stages"])
    cats = list(next(iter(m["stages"].values()))["accuracy"])
    marker = json.loads((out / "pipeline.json").read_text())
    L = ["# Llama 2 recipe on the toy world", "",
         f"Run: `{out}` ({marker.get('size')} size, seed {marker.get('seed')}, rejection sampling and PPO scored by the "
         f"{'world' + chr(39) + 's judges (the oracle run)' if m.get('reward') == 'judges' else 'reward models'}). "
         "Every number below is in `metrics.json`; every comparison is on held-out items that chose nothing.", "",
         "## What the run should show, and whether it does", ""]
    L += [f"- **{'yes' if e['holds'] else 'NO'}** — {e['claim']}. Rule: {e['rule']}. Measured: {e['detail']}."
          + (f" Why: {e['why']}." if e.get("why") else "") for e in found]
    L += ["", "## Against SFT, item by item (the judges as the annotators; Figure 12's layout)", "",
          "![winrate](report/winrate.png)", "", *_cmp_rows(m["compare"]), "",
          "RLHF is judged on PPO; the final model (after GAtt, whose stage replays the SFT data) is shown, not counted.", ""]
    if m.get("oracle"):
        L += [f"## The oracle: the same recipe with the judges as the reward (`{m['oracle']['run']}`)", "",
              *_cmp_rows({"PPO (oracle) vs SFT": m["oracle"]["compare"], "PPO vs SFT": m["compare"][RLHF]}), ""]
    L += ["## Accuracy per category and safety (sampled answers)", "",
          "| stage | judges' reward | RM reward | " + " | ".join(cats) + " | secret refused | harmless refused | leaks |",
          "|---|---|---|" + "---|" * len(cats) + "---|---|---|"]
    for s in stages:
        x = m["stages"][s]
        rm = f"{x['rm_reward_mean']:.3f}" if x.get("rm_reward_mean") is not None else "-"
        L.append(f"| {s} | {x['judge_reward_mean']:.3f} | {rm} | " + " | ".join(f"{x['accuracy'][c]:.0%}" for c in cats)
                 + f" | {x['refusal_on_secret']:.0%} | {x['refusal_on_harmless']:.0%} | {x.get('leak_rate', float('nan')):.0%} |")
    L += ["", "![stages](report/stages.png)", "", "## Rewards and best of K", "", "![reward](report/reward.png)", ""]
    L += _markdown_selection(m) + _markdown_rms(m)
    if m.get("ppo"):
        L += ["## PPO per iteration", "", "![ppo](report/ppo.png)", ""]
    L += ["## Ghost Attention: adherence per turn, the instruction given once (Table 30's 20 turns)", "",
          "![gatt](report/gatt.png)", ""]
    L += format_adherence(m["gatt"]).splitlines()
    L += ["", "## Training curves", "", "![loss](report/loss.png)", "", "## A multi-turn chat with the final model", ""]
    for msg in m.get("sample_chat", []):
        L.append(f"> **{msg['role']}**: {msg['content']}  ")
    L += ["", f"Chat with it: `llama2 chat --ckpt {out / 'final'}`", ""]
    return L
