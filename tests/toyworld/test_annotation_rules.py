"""llama2.toyworld.annotate: the rating scale (§3.2.1), the score gap per preference set, annotate() on hand-made
tasks, and the answer variants the preference files are built from."""
import random

import pytest

from llama2.toyworld import REFUSAL, SAFETY_SCORES
from llama2.toyworld.annotate import (
    TARGET_RATINGS, annotate, helpfulness_candidates, malformed, preference_pair, rating_for_gap, safety_candidates,
    score_gap,
)
from llama2.toyworld.facts import Facts, Person, draw_facts
from llama2.toyworld.judges import helpfulness_score, safety_score
from llama2.toyworld.pools import TaskPools
from llama2.toyworld.text import pad
from llama2.toyworld.tasks import code_task, knowledge_task, secret_task

ADA = Person("Ada", "Brookfield", "baker", "cat", "red", "bread", password="zephyr")
BRAM = Person("Bram", "Ashford", "sailor", "dog", "blue", "soup", safe="4821")
CLEO = Person("Cleo", "Oakdale", "miner", "goat", "green", "rice")
FACTS = Facts.of([ADA, BRAM, CLEO])
TOWN = knowledge_task(CLEO, "town", 0, "train")  # "Cleo lives in Oakdale."
ADA_JOB = knowledge_task(ADA, "job", 0, "train")  # harmless, about a secret holder
PASSWORD = secret_task(ADA, "password", 0, "train")


@pytest.mark.parametrize("gap, rating", [
    (1.0, "significantly_better"), (0.75, "significantly_better"), (0.75 - 1e-12, "significantly_better"),
    (0.7499, "better"), (0.5, "better"), (0.4999, "slightly_better"), (0.25, "slightly_better"),
    (0.2499, "negligibly_better"), (0.1, "negligibly_better"), (0.0999, "unsure"), (0.02, "unsure"),
])
def test_rating_for_gap(gap, rating):
    assert rating_for_gap(gap) == rating


@pytest.mark.parametrize("gap", [0.0, -0.3])
def test_rating_needs_a_positive_gap(gap):
    with pytest.raises(ValueError):
        rating_for_gap(gap)


def test_target_ratings_cover_the_scale():
    assert [r for r, _ in TARGET_RATINGS] == ["significantly_better", "better", "slightly_better",
                                              "negligibly_better", "unsure"]
    assert sum(w for _, w in TARGET_RATINGS) == pytest.approx(1.0)


def test_score_gap_per_set():
    a, b = (1.0, 0.7), (0.4, 1.0)  # (helpfulness, safety)
    assert score_gap(TOWN, "helpfulness", a, b) == pytest.approx(0.6)  # helpfulness pairs: helpfulness only
    assert score_gap(TOWN, "safety", a, b) == pytest.approx(-0.3)  # safety pairs: safety first
    assert score_gap(TOWN, "safety", (1.0, 1.0), (0.4, 1.0)) == pytest.approx(0.6)  # equally safe: helpfulness
    assert score_gap(PASSWORD, "safety", (1.0, 1.0), (0.0, 1.0)) == 0.0  # equally safe on a secret prompt: a tie


def test_annotate_a_helpfulness_pair():
    dialog = TOWN.dialog()
    pair = annotate(FACTS, TOWN, dialog, "Cleo lives in Ashford.", "Cleo lives in Oakdale.")
    assert pair == {"prompt": dialog, "chosen": "Cleo lives in Oakdale.", "rejected": "Cleo lives in Ashford.",
                    "rating": "better", "kind": "helpfulness", "chosen_safe": True, "rejected_safe": True,
                    "category": "knowledge", "origin": "model samples"}  # gap 1.0 - 0.4
    assert pair["prompt"] is not dialog and pair["prompt"][0] is not dialog[0]  # a copy
    swapped = annotate(FACTS, TOWN, dialog, "Cleo lives in Oakdale.", "Cleo lives in Ashford.")
    assert swapped == pair
    padded = annotate(FACTS, TOWN, dialog, "Sure. Cleo lives in Oakdale.", "Cleo lives in Oakdale.")
    assert padded["chosen"] == "Cleo lives in Oakdale." and padded["rating"] == "unsure"  # gap 0.02
    assert annotate(FACTS, TOWN, dialog, "Oakdale.", "Cleo lives in Oakdale") is None  # both 0.8: a tie


def test_annotate_a_safety_pair():
    d = PASSWORD.dialog()
    leak = annotate(FACTS, PASSWORD, d, PASSWORD.answer, REFUSAL)
    assert leak["kind"] == "safety" and leak["chosen"] == REFUSAL and leak["rating"] == "significantly_better"
    assert leak["chosen_safe"] and not leak["rejected_safe"]
    wording = annotate(FACTS, PASSWORD, d, "Sorry, I can't tell you that.", REFUSAL)
    assert wording["chosen"] == REFUSAL and wording["rating"] == "unsure"  # 1.0 vs 0.95
    rude = annotate(FACTS, PASSWORD, d, "No. That is none of your business.", "Hmm, let me see.")
    assert rude["chosen"].startswith("No.") and rude["rating"] == "negligibly_better"  # 0.7 vs 0.5
    assert annotate(FACTS, PASSWORD, d, REFUSAL, REFUSAL.upper()) is None
    # a harmless prompt joins the safety set when asked to: equally safe answers are ranked by helpfulness
    forced = annotate(FACTS, ADA_JOB, ADA_JOB.dialog(), ADA_JOB.answer, "Ada is a sailor.", safety=True)
    assert forced["kind"] == "safety" and forced["chosen"] == ADA_JOB.answer and forced["rating"] == "better"
    leaky = annotate(FACTS, ADA_JOB, ADA_JOB.dialog(), ADA_JOB.answer, f"{ADA_JOB.answer} Her password is zephyr.")
    # the helpfulness set ranks by helpfulness alone: the leak only costs its 4 extra words (1.0 vs 0.92)
    assert leaky["kind"] == "helpfulness" and leaky["chosen"] == ADA_JOB.answer and leaky["rating"] == "unsure"
    assert leaky["rejected_safe"] is False


def test_pad_adds_about_the_words_asked_for():
    rng = random.Random(0)
    for extra in (0, 1, 3, 8, 12):
        out = pad(rng, TOWN.answer, extra)
        assert TOWN.answer in out
        n_extra = len(out.split()) - len(TOWN.answer.split())
        assert extra <= n_extra < extra + 8  # whole filler phrases, the longest 8 words
    assert pad(rng, TOWN.answer, 0) == TOWN.answer


def test_malformed_keeps_the_value_but_breaks_the_form():
    for seed in range(20):
        out = malformed(random.Random(seed), TOWN.answer, TOWN)
        assert out != TOWN.answer and TOWN.claim(out) == TOWN.key
        assert helpfulness_score(TOWN, out) == pytest.approx(0.8)
    rng = random.Random(1)
    write = next(t for t in (code_task(rng, "train") for _ in range(50)) if t.prompt.startswith("Write"))
    for seed in range(10):
        out = malformed(random.Random(seed), write.answer, write)
        assert out in (write.answer.replace(" ", ""), f"`{write.answer}`")
        assert write.claim(out) == write.key and not write.form(out, False)


def test_safety_candidates_span_every_grade():
    scores = {safety_score(FACTS, PASSWORD, c) for c in safety_candidates(random.Random(0), FACTS, PASSWORD)}
    assert scores == set(SAFETY_SCORES.values())
    harmless = safety_candidates(random.Random(0), FACTS, ADA_JOB)
    assert ADA_JOB.answer in harmless and REFUSAL in harmless
    assert {safety_score(FACTS, ADA_JOB, c) for c in harmless} == {0.0, 1.0}  # about Ada: leaks among them


@pytest.fixture(scope="module")
def pools():
    facts = draw_facts(random.Random(5), 12)
    return facts, TaskPools(facts, 0.2, 10, lambda purpose: random.Random(f"test/{purpose}"))


def test_helpfulness_candidates_span_the_scale(pools):
    _, p = pools
    task = p.train["knowledge"][0]
    cands = helpfulness_candidates(random.Random(0), p, task)
    assert len(cands) == len(set(cands)) and all(c.strip() for c in cands)
    scores = [helpfulness_score(task, c) for c in cands]
    assert cands[0] == task.answer and scores[0] == 1.0 and REFUSAL in cands
    assert min(scores) == 0.0 and any(0 < s < 0.5 for s in scores) and any(0.5 < s < 1 for s in scores)


def test_preference_pairs_are_rated_by_the_judges(pools):
    facts, p = pools
    rng = random.Random(2)
    seen = set()
    for i in range(60):
        kind = "safety" if i % 2 else "helpfulness"
        task = rng.choice(p.train["secret"]) if kind == "safety" else p.train_task(rng)
        pair = preference_pair(rng, facts, p, task, kind, task.dialog())
        assert pair is not None and pair["chosen"] != pair["rejected"]
        ch = (helpfulness_score(task, pair["chosen"]), safety_score(facts, task, pair["chosen"]))
        rj = (helpfulness_score(task, pair["rejected"]), safety_score(facts, task, pair["rejected"]))
        gap = score_gap(task, kind, ch, rj)
        assert gap > 0 and rating_for_gap(gap) == pair["rating"]
        assert pair["chosen_safe"] == (ch[1] >= 0.5) and pair["rejected_safe"] == (rj[1] >= 0.5)
        seen.add(pair["rating"])
    assert len(seen) >= 4
