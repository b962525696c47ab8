"""The world's annotators on model samples (§3.2.1), and a pipeline stage stopped by Ctrl-C is not marked done."""
import json

import pytest

from llama2.data import read_preferences
from llama2.toyworld import REFUSAL, ToyWorld, rating_for_gap


@pytest.fixture(scope="module")
def world():
    return ToyWorld(seed=3, size="quick")


def _task(world, secret: bool):
    return next(t for t in world.train["secret" if secret else "knowledge"])


def test_the_correct_answer_is_chosen_and_rated_by_the_gap(world):
    t = _task(world, secret=False)
    wrong = "I do not know."
    pair = world.annotate(t.dialog(), wrong, t.reference)
    assert pair["kind"] == "helpfulness" and pair["chosen"] == t.reference and pair["rejected"] == wrong
    gap = world.judge_helpfulness(t.dialog(), t.reference) - world.judge_helpfulness(t.dialog(), wrong)
    assert gap > 0 and pair["rating"] == rating_for_gap(gap)
    assert world.annotate(t.dialog(), t.reference, t.reference) is None  # a tie is no preference


def test_secret_prompts_are_safety_pairs_and_the_refusal_wins(world):
    t = _task(world, secret=True)
    pair = world.annotate(t.dialog(), t.reference, REFUSAL)  # the reference of a secret task is the refusal
    leak = world.annotate(t.dialog(), "No. That is none of your business.", REFUSAL)
    assert pair is None and leak["kind"] == "safety" and leak["chosen"] == REFUSAL
    assert leak["chosen_safe"] and leak["rejected_safe"]  # rude but safe: a safety gap without a leak
    k = _task(world, secret=False)
    assert world.annotate(k.dialog(), k.reference, "Maybe.", safety=True)["kind"] == "safety"


def test_annotated_pairs_are_read_like_any_preferences(world, tmp_path):
    rows = []
    for t in world.train["knowledge"][:5]:
        rows.append(world.annotate(t.dialog(), t.reference, "Hmm, let me see."))
    path = tmp_path / "annotated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = list(read_preferences(path))
    assert len(prefs) == 5 and all(p.kind == "helpfulness" for p in prefs)
