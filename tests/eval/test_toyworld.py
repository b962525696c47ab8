"""llama2 eval --tasks toyworld on a checkpoint that is not inside a pipeline run, and the readers' errors."""
import json
import math

import pytest

from llama2.toyworld import pipeline_world
from llama2.data.records import read_eval_items
from llama2.eval.toyworld import read_pipeline_marker, toyworld_suite


def test_a_checkpoint_outside_a_pipeline_run_is_scored_on_the_default_world(tiny_policy):
    """No pipeline.json above the checkpoint: seed 0 and the default size (this used to pass seed=None on and
    fail); a fractional limit takes that share of the items, as lm-eval's --limit does."""
    r = toyworld_suite(tiny_policy, limit=3, max_new_tokens=4)
    assert set(r["accuracy"]) == {"knowledge", "reading", "math", "commonsense", "code"}
    assert r["n"]["total"] == 2 * 3  # two sampled answers an item
    n_items = len(pipeline_world(0, "default").data()["eval"])
    few = toyworld_suite(tiny_policy, limit=0.02, max_new_tokens=2)
    assert few["n"]["total"] == 2 * math.ceil(0.02 * n_items) < n_items  # 2% of the items, not all of them


def test_bad_files_are_named_with_their_line(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"dialog": [{"role": "user", "content": "hi"}], "category": "math"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:2: not valid JSON"):
        read_eval_items(bad)
    bad.write_text(json.dumps({"category": "math"}) + "\n")
    with pytest.raises(ValueError, match=r"eval.jsonl:1: .*dialog"):
        read_eval_items(bad)
    marker = tmp_path / "pipeline.json"
    marker.write_text("[1]")
    with pytest.raises(ValueError, match="pipeline.json: not a pipeline marker"):
        read_pipeline_marker(marker)


def test_two_evaluations_of_one_model_draw_the_same_answers_and_compare_as_equal(tiny_policy):
    """Common random numbers: the evaluation seeds by (seed, purpose, batch), not by model, so the same model gives
    the same answers twice and compares with itself as all ties and zero change (a paired design, not two samples);
    the reward models' best of K never beats the judges' own best."""
    from llama2.checkpoint import load
    from llama2.eval.toyworld import compare_models, eval_sampling, evaluate_chat_model, selection_curves
    from llama2.rlhf.reward_model import RewardModel, reward_model_from_chat

    world = pipeline_world(0, "quick")
    items = world.data()["eval"][:12]
    model, tok = load(tiny_policy)
    sampling = eval_sampling(max_new_tokens=6)
    a = evaluate_chat_model(model, tok, world, items, None, sampling, samples=2, seed=3)
    b = evaluate_chat_model(model, tok, world, items, None, sampling, samples=2, seed=3)
    assert a["per_item"] == b["per_item"] and len(a["per_item"]["judge"]) == 12
    assert all(len(x) == 2 for x in a["per_item"]["judge"])
    c = compare_models(items, a, b)
    assert c["head_to_head"]["tie"] == 24 and c["head_to_head"]["rate"] == pytest.approx(0.5)
    assert c["helpfulness"]["change"] == 0 and c["accuracy_all"]["change"] == 0
    other = evaluate_chat_model(model, tok, world, items, None, sampling, samples=2, seed=4)
    assert other["per_item"]["judge"] != a["per_item"]["judge"] or other["sample"] != a["sample"]
    rm = RewardModel(reward_model_from_chat(model, seed=0), tok)
    sel = selection_curves(model, tok, world, items, {"helpfulness": rm}, sampling, k=3, seed=3)
    assert sel["n"] == [1, 2, 3] and all(p <= m + 1e-9 for p, m in zip(sel["judge_of_rm_pick"], sel["judge_max"]))
    assert sel["judge_max"][0] == pytest.approx(sel["judge_of_rm_pick"][0])  # one answer: no choice to make
    assert set(sel["flaws_seen"]) == {"padding", "hedging", "refusal", "wrong"}
    assert all(0 <= v <= 1 for v in sel["flaws_seen"].values())
