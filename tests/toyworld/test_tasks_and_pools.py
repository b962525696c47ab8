"""llama2.toyworld.text, .facts, .tasks and .pools: answer-text rules, the people, every task maker's answer
against its own claim and form, and the train / held-out pools with their prompt index."""
import random
import re

import pytest

from llama2.rlhf.gatt import INSTRUCTIONS
from llama2.toyworld import REFUSAL, apply_instruction, is_refusal, strip_decorations
from llama2.toyworld.facts import Person, draw_facts
from llama2.toyworld.pools import TaskPools, prompt_text
from llama2.toyworld.tasks import GENERATED, expr_form, knowledge_task, secret_task, yes_no_task
from llama2.toyworld.text import n_words, words

# ------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("ins", INSTRUCTIONS, ids=lambda i: i.value)
def test_strip_decorations_undoes_every_instruction(ins):
    answer = "Cleo lives in Oakdale."
    decorated = apply_instruction(ins, answer)
    assert ins(decorated)
    assert strip_decorations(decorated).lower() == answer.lower()
    assert is_refusal(apply_instruction(ins, REFUSAL)) and not is_refusal(decorated)


def test_strip_decorations_leaves_the_rest_alone():
    assert strip_decorations("  Ada   lives in\nBrookfield.  ") == "Ada lives in Brookfield."
    assert strip_decorations("Arr! Beep. Ada is a baker!") == "Ada is a baker."
    assert strip_decorations("I love Ada.") == "I love Ada."  # not a hobby
    assert strip_decorations("Hootenanny is a word.") == "Hootenanny is a word."


def test_words():
    assert words("Ada's 42 CATS, and 7 dogs.") == ["ada", "s", "cats", "and", "dogs"]
    assert n_words("  three  words here ") == 3


# ------------------------------------------------------------------------------------------------ facts and tasks


def test_draw_facts():
    facts = draw_facts(random.Random(0), 9)
    assert len(facts.people) == 9 and len({p.name for p in facts.people}) == 9
    assert all(facts.people[i].password for i in range(0, 9, 3)) and all(facts.people[i].safe for i in range(1, 9, 3))
    assert all(len(p.safe) == 4 and p.safe not in ("1234", "9999") for p in facts.people if p.safe)
    assert set(facts.secrets) == facts.passwords | facts.codes
    assert draw_facts(random.Random(0), 9) == facts and draw_facts(random.Random(1), 9) != facts


def test_tasks_from_a_persons_facts():
    ada = Person("Ada", "Brookfield", "baker", "cat", "red", "bread", password="zephyr")
    town = knowledge_task(ada, "town", 1, "heldout")
    assert (town.prompt, town.answer, town.split) == ("In which town does Ada live?", "Ada lives in Brookfield.",
                                                      "heldout")
    assert town.harmless and not town.is_secret and town.reference == town.answer
    assert town.claim("Brookfield, I think") == "Brookfield" and town.claim("Ashford or Brookfield") == "<several>"
    assert len(town.wrong) == 7 and all(town.claim(w) != town.key and town.form(w, False) for w in town.wrong)
    secret = secret_task(ada, "password", 0, "train")
    assert secret.is_secret and secret.reference == REFUSAL and secret.claim(secret.answer) == "zephyr"
    yes, no = yes_no_task(ada, "password", "train"), yes_no_task(ada, "safe", "train")
    assert (yes.answer, yes.key, no.answer, no.key) == ("Yes, Ada has a password.", "yes", "No, Ada has no safe.", "no")
    assert yes.wrong == ("No, Ada has no password.",) and not yes.form("Yes, Ada has a safe.", False)


@pytest.mark.parametrize("cat", list(GENERATED))
def test_every_generated_task_answers_itself(cat):
    people = draw_facts(random.Random(3), 12).people
    rng = random.Random(f"test/{cat}")
    for _ in range(200):
        t = GENERATED[cat](rng, "train", people)
        assert t.category == cat and t.claim(t.answer) == t.key and t.form(t.answer, False), t
        assert t.wrong and all(t.claim(w) != t.key for w in t.wrong), t
        assert all(t.form(w, False) for w in t.wrong if t.form is not expr_form), t  # well-formed wrong answers
    again = random.Random(f"test/{cat}")
    first = GENERATED[cat](again, "train", people)
    assert first.prompt == GENERATED[cat](random.Random(f"test/{cat}"), "train", people).prompt


def test_commonsense_claims_a_letter():
    people = draw_facts(random.Random(3), 12).people
    rng = random.Random(0)
    t = next(t for t in (GENERATED["commonsense"](rng, "train", people) for _ in range(20)) if t.uid[0] == "rule")
    options = dict(re.findall(r"\b([A-D])\. (\w+)", t.prompt))
    assert len(options) == 4 and t.answer == f"It is {options[t.key]}, so the answer is {t.key}."
    other = next(L for L in "ABCD" if L != t.key)
    assert t.claim(f"I would say the answer is ({other.lower()}).") == other
    assert t.claim(f"{other}") == other  # a lone capital letter
    # the article "A" is no letter: the option word decides
    assert t.claim(f"A {options[other].lower()}, surely.") == other
    assert t.claim("No idea.") is None
    # an answer must name the option at its letter: "It is snow, so the answer is C." where C is fire is wrong
    assert t.claim(f"It is {options[other]}, so the answer is {t.key}.") == "<inconsistent>"
    assert t.claim(f"{t.answer} Or maybe it is {options[other]}, so the answer is {other}.") == "<inconsistent>"


def test_reading_answers_state_what_was_asked_and_its_distractors_come_from_the_passage():
    rng = random.Random(4)
    tasks = [GENERATED["reading"](rng, "train", []) for _ in range(200)]
    for t in tasks:
        passage = t.prompt.split(" Question: ")[0]
        for w in t.wrong:  # every wrong option is a name, item or place of the passage itself
            value = next(x for x in re.findall(r"[\w']+", w) if x not in t.answer.split() and x.rstrip(".") not in t.answer)
            assert value in passage, (t.prompt, w)
    who = next(t for t in tasks if t.prompt.endswith("?") and t.prompt.split("Question: ")[1].startswith("Who has"))
    name = who.key
    # the right name in a sentence that answers another question is no answer to this one
    assert who.claim(f"{name} went to the school.") is None and who.claim(who.answer.lower()) == name
    other = next(x for x in re.findall(r"\b([A-Z][a-z]+) has a", who.prompt) if x != name)
    assert who.claim(f"{who.answer} Or maybe {who.answer.replace(name, other)}") == "<several>"


def test_a_code_answer_writing_two_expressions_commits_to_none():
    rng = random.Random(1)
    t = next(t for t in (GENERATED["code"](rng, "train", []) for _ in range(50)) if t.form is expr_form)
    assert t.claim(t.answer) == t.key
    assert t.claim(f"{t.answer}. Or maybe {t.wrong[0]}") == "<several>"


# ------------------------------------------------------------------------------------------------ pools


@pytest.fixture(scope="module")
def pools():
    facts = draw_facts(random.Random(7), 16)
    return TaskPools(facts, 0.2, 30, lambda purpose: random.Random(f"pools/{purpose}"), 0.1, 10)


def test_pools_partition_train_and_heldout(pools):
    train = {t.prompt for ts in pools.train.values() for t in ts}
    held = {t.prompt for ts in pools.heldout.values() for t in ts}
    assert train and held and not train & held
    assert {k: len(v) for k, v in pools.heldout.items() if k in GENERATED} == {k: 30 for k in GENERATED}
    held_facts = {t.uid for t in pools.heldout["knowledge"]}
    assert not held_facts & {t.uid for t in pools.train["knowledge"]}
    assert all(t.split == "heldout" for ts in pools.heldout.values() for t in ts)
    assert all(t.harmless for s in ("train", "heldout") for t in pools.harmless(s))
    val = {t.prompt for ts in pools.val.values() for t in ts}
    assert val and not val & train and not val & held
    assert {k: len(v) for k, v in pools.val.items() if k in GENERATED} == {k: 10 for k in GENERATED}
    assert all(t.split == "val" for ts in pools.val.values() for t in ts) and pools.val["knowledge"]
    assert not {t.uid for ts in pools.val.values() for t in ts} & {t.uid for ts in pools.heldout.values() for t in ts}


def test_training_draws_skip_held_out_items(pools):
    held_uids = {t.uid for split in (pools.heldout, pools.val) for ts in split.values() for t in ts}
    rng = random.Random(0)
    for _ in range(300):
        t = pools.train_task(rng)
        assert t.uid not in held_uids and t.split == "train" and not t.is_secret
        assert pools.find(t.prompt) is t  # every task drawn is indexed
    assert all(pools.held_task(rng).split == "heldout" for _ in range(50))
    assert all(pools.held_task(rng, "val").split == "val" for _ in range(50))


def test_find_looks_past_an_instruction(pools):
    t = pools.heldout["math"][0]
    assert pools.find(t.prompt) is t
    assert pools.find(f"Style: capitals\n{t.prompt}") is t
    assert pools.find(f"Hobby: chess\nStyle: capitals\n{t.prompt}") is t
    assert pools.find("What is the weather like?") is None
    first = pools.heldout["knowledge"][0]
    remade = [knowledge_task(pools.facts.by_name[first.person], first.uid[2], w, "train") for w in (0, 1)]
    again = next(t for t in remade if t.prompt == first.prompt)
    assert again is not first and pools.register(again) is first  # the first task made with a prompt stays


def test_prompt_text():
    assert prompt_text("  Where?  ") == "Where?"
    dialog = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": " c\n"}]
    assert prompt_text(dialog) == "c"
    with pytest.raises(KeyError):
        prompt_text([{"role": "system", "content": "s"}])
