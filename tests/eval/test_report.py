"""The report's effect rules on hand-made metrics: each rule says yes when its effect is there and NO when not, and
RLHF's effects are read from PPO against SFT, never from the final model."""
import copy

from llama2.eval.report import effects

CATS = ("knowledge", "reading", "math", "commonsense", "code")


def _change(before: float, after: float, se: float, n: int = 120) -> dict:
    c = after - before
    return {"before": before, "after": after, "change": c, "se": se, "low95": c - 1.96 * se, "high95": c + 1.96 * se,
            "n": n}


def _cmp(rate=0.6, low=0.55, helpful=(0.60, 0.68, 0.02), acc=(0.40, 0.50, 0.03), secret=(0.95, 0.98), harmless=(0.06, 0.01)):
    return {"head_to_head": {"win": 300, "tie": 900, "loss": 100, "answers": 1300, "n": 650, "rate": rate, "low95": low,
                             "high95": 2 * rate - low},
            "helpfulness": _change(*helpful),
            "accuracy": {c: _change(*acc) for c in CATS}, "accuracy_all": _change(*acc, n=600),
            "refusal_secret": _change(*secret, 0.01, 40), "refusal_harmless": _change(*harmless, 0.005, 620)}


def _stage(reward: float, judged: float) -> dict:
    return {"rm_reward_mean": reward, "judge_reward_mean": judged, "accuracy": {c: 0.4 for c in CATS},
            "refusal_on_secret": 0.95, "refusal_on_harmless": 0.0}


def _metrics() -> dict:
    bucket = lambda a: {"accuracy": a}  # noqa: E731
    rm = {"significantly_better": bucket(0.9), "better": bucket(0.7), "slightly_better": bucket(0.6),
          "negligibly_better_or_unsure": bucket(0.55)}
    return {
        "reward_models": {"helpfulness RM (margin)": rm, "safety RM (margin)": copy.deepcopy(rm)},
        "stages": {"SFT": _stage(0.60, 0.50), "RS v3": _stage(0.62, 0.52), "PPO": _stage(0.65, 0.55),
                   "GAtt (final)": _stage(0.66, 0.56)},
        "compare": {"RS v3 vs SFT": _cmp(), "PPO vs SFT": _cmp(), "GAtt (final) vs SFT": _cmp()},
        "selection": {"k": 8, "items": 240, "capture": 0.6, "judge_mean": 0.5, "judge_of_rm_pick": [0.5, 0.56],
                      "judge_max": [0.5, 0.6],
                      "by_category": {c: {"rm_pick": 0.5, "random": 0.4, "oracle_pick": 0.7, "n": 40} for c in CATS}},
        "gatt": {"adherence": {"with GAtt": [0.8] * 19 + [0.7], "without GAtt": [0.8, 0.5] + [0.1] * 18}},
    }


def _holds(m: dict, oracle=None) -> dict[str, bool]:
    return {e["claim"].split(":")[0].split(" (")[0][:40]: e["holds"] for e in effects(m, oracle)}


def test_every_effect_holds_on_metrics_that_show_it():
    found = effects(_metrics())
    assert len(found) == 8 and all(e["holds"] for e in found), [e["claim"] for e in found if not e["holds"]]
    assert [e.get("why") for e in found] == [None] * 8  # nothing to explain


def test_each_rule_fails_when_its_effect_is_missing():
    def fails(change, index):
        m = _metrics()
        change(m)
        found = effects(m)
        assert not found[index]["holds"] and sum(not e["holds"] for e in found) == 1, found[index]["claim"]

    fails(lambda m: m["reward_models"]["safety RM (margin)"]["better"].update(accuracy=0.95), 0)
    fails(lambda m: m["stages"]["PPO"].update(rm_reward_mean=0.61), 1)
    fails(lambda m: m["compare"]["PPO vs SFT"]["head_to_head"].update(rate=0.52, low95=0.49), 2)
    fails(lambda m: m["compare"]["PPO vs SFT"].update(helpfulness=_change(0.60, 0.63, 0.02)), 3)  # within 2 SE
    fails(lambda m: m["compare"]["PPO vs SFT"].update(refusal_secret=_change(0.95, 0.94, 0.01)), 4)
    fails(lambda m: m["compare"]["PPO vs SFT"].update(refusal_harmless=_change(0.02, 0.03, 0.01)), 4)
    fails(lambda m: m["compare"]["PPO vs SFT"]["accuracy"].update(
        {c: _change(0.4, 0.42, 0.03) for c in CATS}), 5)  # no category beyond two standard errors
    fails(lambda m: m["compare"]["PPO vs SFT"]["accuracy"].update(math=_change(0.4, 0.2, 0.03)), 5)  # a clear fall
    fails(lambda m: m["selection"].update(capture=0.3), 6)
    fails(lambda m: m["gatt"]["adherence"]["with GAtt"].__setitem__(-1, 0.3), 7)
    fails(lambda m: m["gatt"]["adherence"]["without GAtt"].__setitem__(-1, 0.7), 7)


def test_rlhf_is_judged_on_ppo_not_on_the_final_model():
    """A win that only comes with the GAtt stage (its replay of the SFT data) is not RLHF's."""
    m = _metrics()
    m["compare"]["PPO vs SFT"] = _cmp(rate=0.49, low=0.46, helpful=(0.6, 0.6, 0.02), acc=(0.4, 0.4, 0.03))
    found = effects(m)
    assert not found[2]["holds"] and not found[3]["holds"] and not found[5]["holds"]
    assert "why" in found[2] and "GAtt (final) +10.0 points" in found[2]["why"]  # the final model's change is shown
    m = _metrics()
    m["compare"]["GAtt (final) vs SFT"] = _cmp(rate=0.4, low=0.35)
    assert all(e["holds"] for e in effects(m))


def test_the_accuracy_rule_follows_the_oracle_categories():
    """With an oracle run, accuracy must rise beyond two standard errors exactly where the oracle's does."""
    m = _metrics()
    oracle = _cmp()
    oracle["accuracy"] = {c: _change(0.4, 0.6 if c in ("knowledge", "code") else 0.41, 0.03) for c in CATS}
    m["compare"]["PPO vs SFT"]["accuracy"] = {c: _change(0.4, 0.5 if c == "knowledge" else 0.41, 0.03) for c in CATS}
    e = effects(m, oracle)[5]
    assert not e["holds"] and "knowledge, code" in e["rule"]  # code rises with the oracle but not here
    m["compare"]["PPO vs SFT"]["accuracy"]["code"] = _change(0.4, 0.5, 0.03)
    assert effects(m, oracle)[5]["holds"]
    oracle["accuracy"] = {c: _change(0.4, 0.41, 0.03) for c in CATS}
    e = effects(m, oracle)[5]
    assert e["holds"] and "none does" in e["rule"]


def test_an_oracle_run_has_no_reward_model_effects():
    m = _metrics()
    m["reward_models"] = {}
    del m["selection"]
    for s in m["stages"].values():
        s["rm_reward_mean"] = None
    claims = [e["claim"] for e in effects(m)]
    assert len(claims) == 5 and not any("reward models" in c for c in claims)


def test_reward_detail_flags_an_over_optimised_reward_model():
    m = _metrics()
    assert "over-optimised" not in effects(m)[1]["detail"]
    m["stages"]["PPO"]["judge_reward_mean"] = 0.45  # the reward models' reward rose, the judges' fell
    e = effects(m)[1]
    assert "0.500 -> 0.520 -> 0.450" in e["detail"] and "over-optimised" in e["detail"] and e["holds"]
