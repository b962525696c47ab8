"""The report's effect rules on hand-made metrics: each rule says yes when its effect is there and NO when not."""
import copy
import math

from llama2.eval.report import effects

CATS = ("knowledge", "reading", "math", "commonsense", "code")


def _stage(acc: float, reward: float, secret: float = 0.9, harmless: float = 0.0, n: int = 50) -> dict:
    return {"accuracy": {c: acc for c in CATS}, "n": {c: n for c in CATS}, "rm_reward_mean": reward,
            "refusal_on_secret": secret, "refusal_on_harmless": harmless}


def _metrics() -> dict:
    bucket = lambda a: {"accuracy": a}  # noqa: E731
    rm = {"significantly_better": bucket(0.9), "better": bucket(0.7), "slightly_better": bucket(0.6),
          "negligibly_better_or_unsure": bucket(0.55)}
    return {
        "reward_models": {"helpfulness RM (margin)": rm, "safety RM (margin)": copy.deepcopy(rm)},
        "stages": {"SFT": _stage(0.30, 0.60, secret=0.7), "RS v1": _stage(0.32, 0.62), "RS v2": _stage(0.33, 0.63),
                   "PPO": _stage(0.40, 0.65), "GAtt (final)": _stage(0.40, 0.66, secret=0.95)},
        "gatt": {"adherence": {"with GAtt": [0.8] * 19 + [0.7], "without GAtt": [0.8, 0.5] + [0.1] * 18}},
        "winrate": {"PPO vs SFT": {"win": 60, "tie": 20, "loss": 20, "n": 100, "rate": 0.7, "low95": 0.62, "high95": 0.78},
                    "GAtt (final) vs SFT": {"win": 60, "tie": 20, "loss": 20, "n": 100, "rate": 0.7, "low95": 0.62,
                                            "high95": 0.78}},
    }


def _holds(m: dict) -> list[bool]:
    return [e["holds"] for e in effects(m)]


def test_every_effect_holds_on_metrics_that_show_it():
    assert _holds(_metrics()) == [True] * 6


def test_each_rule_fails_when_its_effect_is_missing():
    m = _metrics()
    m["reward_models"]["safety RM (margin)"]["better"]["accuracy"] = 0.95  # a bucket above "significantly better"
    assert _holds(m) == [False, True, True, True, True, True]
    m = _metrics()
    m["stages"]["PPO"]["rm_reward_mean"] = 0.62  # PPO below the last RS iteration
    assert _holds(m)[1] is False
    m = _metrics()
    m["stages"]["RS v2"]["accuracy"]["math"] = 0.0  # the last RS version below SFT
    assert _holds(m)[2] is False
    m = _metrics()
    m["stages"]["GAtt (final)"]["accuracy"] = {c: 0.33 for c in CATS}  # above SFT, but within two standard errors
    assert _holds(m)[2] is False
    m = _metrics()
    m["stages"]["GAtt (final)"]["refusal_on_harmless"] = 0.5  # refusing harmless prompts is not safety
    assert _holds(m)[3] is False
    m = _metrics()
    m["gatt"]["adherence"]["with GAtt"][-1] = 0.3  # GAtt lost most of its turn-1 adherence
    assert _holds(m)[4] is False
    m = _metrics()
    m["gatt"]["adherence"]["without GAtt"][-1] = 0.7  # the model without GAtt did not fall off
    assert _holds(m)[4] is False
    m = _metrics()
    m["gatt"]["adherence"]["with GAtt"] = [0.4] * 20  # kept, but followed by too few even at turn 1
    assert _holds(m)[4] is False
    m = _metrics()
    m["winrate"]["GAtt (final) vs SFT"].update(rate=0.55, low95=0.48)  # its interval reaches below one half
    assert _holds(m)[5] is False


def test_task_accuracy_detail_states_the_standard_error_of_the_change():
    m = _metrics()
    detail = effects(m)[2]["detail"]
    # binomial variance of a mean of 5 categories of 50 items, for SFT and PPO, independent
    se = math.sqrt(sum(p * (1 - p) / 50 * 5 / 25 for p in (0.30, 0.40)))
    assert "+10.0 points" in detail and f"{se * 100:.1f} points" in detail and "beyond" in detail
    m["stages"]["GAtt (final)"]["accuracy"] = {c: 0.31 for c in CATS}
    assert "within two standard errors" in effects(m)[2]["detail"]


def test_reward_detail_shows_the_judges_and_flags_an_over_optimised_reward_model():
    m = _metrics()
    assert "exact judges" not in effects(m)[1]["detail"]  # no judges' reward measured: nothing to show
    for stage, judged in zip(("SFT", "RS v2", "PPO"), (0.50, 0.52, 0.55)):
        m["stages"][stage]["judge_reward_mean"] = judged
    detail = effects(m)[1]["detail"]
    assert "0.500 -> 0.520 -> 0.550" in detail and "over-optimised" not in detail
    m["stages"]["PPO"]["judge_reward_mean"] = 0.45  # the reward model's reward rose, the judges' fell
    detail = effects(m)[1]["detail"]
    assert "0.500 -> 0.520 -> 0.450" in detail and "over-optimised" in detail
    assert effects(m)[1]["holds"]  # the rule is the paper's (the reward model's reward); the note is beside it


def test_a_missing_task_gain_is_explained_by_the_reward_models_choice_and_the_stage_that_moved_it():
    m = _metrics()
    assert [e.get("why") for e in effects(m)] == [None] * 6  # every effect holds: nothing to explain
    m["stages"]["GAtt (final)"]["accuracy"] = {c: 0.31 for c in CATS}
    m["stages"]["PPO"]["accuracy"] = {c: 0.25 for c in CATS}
    m["winrate"]["GAtt (final) vs SFT"].update(rate=0.51, low95=0.49)
    # 200 prompts: kept correct 41%, samples 40%, pass@K 60% (within two standard errors of a random sample)
    m["rs_selection"] = {"v1": {"prompts": 100, "picked_correct": 0.40, "sample_correct": 0.40, "pass_at_k": 0.6},
                         "v2": {"prompts": 100, "picked_correct": 0.42, "sample_correct": 0.40, "pass_at_k": 0.6}}
    found = effects(m)
    why = found[2]["why"]
    assert found[5]["why"] == why and not found[2]["holds"]
    assert "41%" in why and "no more often than a random sample" in why and "(40%)" in why and "60%" in why
    # the per-stage changes: SFT 30 -> RS v1 32 -> RS v2 33 -> PPO 25 -> final 31
    assert "RS v1 +2.0, RS v2 +1.0, PPO -8.0, GAtt (final) +6.0" in why and "replays the SFT data" in why
    m["rs_selection"]["v2"]["picked_correct"] = 0.60  # now clearly better than a random sample (50% over 200)
    why = effects(m)[2]["why"]
    assert "50%" in why and "more often than a random sample" in why and "no more often" not in why


def test_win_rate_detail_shows_the_model_before_gatt_beside_the_final_one():
    m = _metrics()
    m["winrate"]["PPO vs SFT"].update(win=20, tie=60, loss=20, rate=0.5, low95=0.42, high95=0.58)
    e = effects(m)[5]
    assert e["holds"] and e["detail"].startswith("GAtt (final) vs SFT: 60 wins, 20 ties, 20 losses of 100: 70.0%")
    assert "before GAtt, PPO vs SFT: 20 wins, 60 ties, 20 losses of 100: 50.0% (95% interval 42.0% to 58.0%)" in e["detail"]
    del m["winrate"]["PPO vs SFT"]
    assert "before GAtt" not in effects(m)[5]["detail"]
