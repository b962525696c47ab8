"""Reward model (§3.2.2): scoring at the last real token, training on a separable preference set, checkpoint
round trip, exact resume, and clear errors. The loss formula, margins and buckets are tested in test_rlhf_reward.py."""
import json
import math
import random
import shutil

import pytest
import torch

from llama2 import ModelArgs, Transformer, train_tokenizer
from llama2.checkpoint import save
from llama2.data import collate_pairs, encode_preference, read_preferences, split_holdout
from llama2.rlhf.reward import TABLE8_BUCKETS
from llama2.rlhf.reward_model import RewardModel, encode_scored, reward_model_from_chat, score_batch
from llama2.rlhf.reward_model import evaluate_reward
from llama2.train.reward import RewardConfig, batch_indices, train_reward

WORDS = "apple river stone cloud green table music paper light window garden silver".split()
RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better", "unsure"]


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_prefs(n: int, seed: int, kind: str) -> list[dict]:
    """Separable preferences: the chosen answer says "Yes ... correct", the rejected one "No ... wrong"; prompts,
    fillers and ratings vary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        prompt = [{"role": "user", "content": f"Is the {a} near the {b}?"}]
        if rng.random() < 0.3:  # some two-turn prompts, with a system message
            prompt = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Hello {a}."},
                      {"role": "assistant", "content": f"Hello, {b}."}] + prompt
        out.append({"prompt": prompt, "chosen": f"Yes, the {rng.choice(WORDS)} is correct.",
                    "rejected": f"No, the {rng.choice(WORDS)} is wrong.", "rating": rng.choice(RATINGS), "kind": kind})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny tokenizer, a preference file (helpfulness + safety) and a random "chat" checkpoint."""
    d = tmp_path_factory.mktemp("rm")
    recs = synthetic_prefs(200, 0, "helpfulness") + synthetic_prefs(60, 1, "safety")
    (d / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    corpus = [" ".join([m["content"] for m in r["prompt"]] + [r["chosen"], r["rejected"]]) for r in recs]
    (d / "corpus.txt").write_text("\n".join(corpus + ["[INST] [/INST] <<SYS>> <</SYS>>"] * 20) + "\n")
    tok = train_tokenizer([d / "corpus.txt"], 300, d / "tok.model")
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32, max_seq_len=96)
    chat = Transformer(args).init_weights(seed=0)
    save(chat, d / "chat", tokenizer=tok)
    return {"dir": d, "tok": tok, "chat": chat, "prefs": d / "prefs.jsonl"}


def rm_cfg(world, out, **kw):
    base = dict(data=str(world["prefs"]), init_from=str(world["dir"] / "chat"), out=str(out), seq_len=96,
                batch_pairs=16, micro_batch=8, lr=3e-3, val_fraction=0.2, eval_every=0, save_every=4, keep_last=100,
                tensorboard=False)
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm_run") / "out"
    result = train_reward(rm_cfg(world, out, epochs=1.0, eval_every=10))
    return {"out": out, "result": result}


# -- building the reward model ------------------------------------------------------------------------------


def test_reward_model_copies_the_body_and_replaces_the_head():
    chat = Transformer(ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32, max_seq_len=16)).init_weights(seed=1)
    before = {k: v.clone() for k, v in chat.state_dict().items()}
    rm = reward_model_from_chat(chat, seed=3)
    assert rm.args.head == "scalar" and chat.args.head == "lm"
    sd = rm.state_dict()
    for k, v in before.items():
        if k.startswith("output."):
            continue
        assert torch.equal(sd[k], v) and sd[k].data_ptr() != chat.state_dict()[k].data_ptr()  # copied, not shared
    assert all(torch.equal(chat.state_dict()[k], v) for k, v in before.items())  # the chat model is untouched
    w, b = sd["output.weight"], sd["output.bias"]
    assert w.shape == (1, 256) and torch.equal(b, torch.zeros(1))
    assert w.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.2)
    assert torch.equal(reward_model_from_chat(chat, seed=3).output.weight, w)  # seeded
    assert rm(torch.tensor([[1, 5, 7]])).shape == (1, 3)  # one value per position
    with pytest.raises(ValueError, match="LM head"):
        reward_model_from_chat(rm)


# -- (a) the score is read at the last real token -------------------------------------------------------------


def test_left_and_right_padding_give_the_same_scores(world):
    tok = world["tok"]
    rm = reward_model_from_chat(world["chat"]).eval()
    prefs = read_preferences(world["prefs"])[:6]
    pairs = [encode_preference(tok, p, 96) for p in prefs]
    assert len({len(s) for p in pairs for s in p}) > 1  # the batch really is padded
    with torch.no_grad():
        right = score_batch(rm, collate_pairs(pairs, side="right"))
        left = score_batch(rm, collate_pairs(pairs, pad_id=5, side="left"))
        alone = torch.stack([rm(torch.tensor([s]))[0, -1] for s in [p.chosen for p in pairs] + [p.rejected for p in pairs]])
    assert right.shape == (12,)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    # read at the last column instead (padding for the shorter rows), the scores would differ
    batch = collate_pairs(pairs, side="right")
    with torch.no_grad():
        at_end = rm(batch["tokens"])[:, -1]
    assert not torch.allclose(at_end, right, atol=1e-3)


def test_reward_model_score_equals_each_sequence_alone(world):
    tok = world["tok"]
    rm = RewardModel(reward_model_from_chat(world["chat"]), tok)
    prefs = read_preferences(world["prefs"])[:7]
    dialogs = [p.prompt for p in prefs] * 2
    responses = [p.chosen for p in prefs] + [p.rejected for p in prefs]
    scores = rm.score(dialogs, responses, batch_size=3)
    assert scores.shape == (14,) and scores.dtype == torch.float32
    with torch.no_grad():
        alone = torch.stack([rm.model(torch.tensor([rm.encode(d, r)]))[0, -1] for d, r in zip(dialogs, responses)])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(rm.score_ids([rm.encode(d, r) for d, r in zip(dialogs, responses)]), scores, atol=1e-5, rtol=0)
    # the ids scored are those the reward model is trained on (the finished turn with its EOS)
    pair = encode_preference(tok, prefs[0], 96)
    assert rm.encode(prefs[0].prompt, prefs[0].chosen) == pair.chosen and pair.chosen[-1] == tok.eos_id


def test_long_dialogs_are_cut_from_the_left_like_training(world):
    tok = world["tok"]
    prompt = []
    for i in range(6):
        prompt += [{"role": "user", "content": f"Tell me about the {WORDS[i]} and the {WORDS[i + 1]}."},
                   {"role": "assistant", "content": f"The {WORDS[i]} is {WORDS[i + 2]}."}]
    prompt.append({"role": "user", "content": "Is the apple near the river?"})
    answer = "Yes, the stone is correct."
    last = len(encode_scored(tok, prompt[-1:], answer, 1000))
    full = len(encode_scored(tok, prompt, answer, 1000))
    n = last + 5  # room for the last exchange, not for the whole dialog
    assert full > n
    ids = encode_scored(tok, prompt, answer, n)
    assert len(ids) == last and ids[-1] == tok.eos_id and ids[0] == tok.bos_id  # whole exchanges dropped first
    from llama2.data import Preference

    pref = Preference(prompt, answer, "No, the paper is wrong.", "better", "helpfulness")
    assert encode_preference(tok, pref, n).chosen == ids  # the same cut as training
    cut = encode_scored(tok, prompt, answer, last - 3)  # then the start of the last prompt goes
    assert cut == ids[3:]
    tail = encode_scored(tok, prompt[-1:], " ".join(["correct"] * 60), 40)  # the response alone is too long
    assert len(tail) == 40 and tail[-1] == tok.eos_id


# -- (b) training reaches high held-out accuracy --------------------------------------------------------------


def test_training_separates_a_separable_preference_set(trained):
    out, result = trained["out"], trained["result"]
    hist = result["history"]
    assert result["stopped"] is False and len(hist) == result["steps"]
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["accuracy"] >= 0.9
    assert all({"loss", "accuracy", "margin", "lr", "grad_norm"} <= set(r) for r in hist)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["kind"] == "helpfulness" and ev["margin"] == "small" and ev["step"] == result["steps"]
    assert set(ev["accuracy"]) == {*TABLE8_BUCKETS, "overall"}
    assert ev["accuracy"]["overall"]["accuracy"] >= 0.9
    assert ev["accuracy"]["overall"]["n"] == sum(ev["accuracy"][b]["n"] for b in TABLE8_BUCKETS) > 0
    assert set(ev["by_kind"]) == {"helpfulness", "safety"}
    meta = json.loads((out / "reward_config.json").read_text())
    assert meta["kind"] == "helpfulness" and meta["margin"] == "small" and meta["config"]["optim"]["lr"] == 3e-3
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, result["steps"] + 1))
    assert "test_accuracy_helpfulness" in recs[9]  # eval_every=10
    # the paper's mix: equal parts helpfulness and other data; the lr warms up then decays to 10%
    assert meta["warmup_steps"] == 5 and hist[-1]["lr"] == pytest.approx(0.1 * 3e-3, rel=0.2)


def test_evaluate_reward_on_its_own_matches_the_training_evaluation(world, trained):
    prefs = read_preferences(world["prefs"])
    _, held = split_holdout(prefs, 0.2, seed=0)
    acc = evaluate_reward(trained["out"], [p for p in held if p.kind == "helpfulness"], batch_size=5)
    ev = json.loads((trained["out"] / "eval.json").read_text())
    assert acc == ev["accuracy"]


# -- (c) the checkpoint round-trips ------------------------------------------------------------------------------


def test_checkpoint_round_trips(world, trained):
    out = trained["out"]
    loaded = RewardModel.from_pretrained(out)
    assert loaded.kind == "helpfulness" and loaded.margin == "small" and loaded.seq_len == 96
    assert loaded.model.args.head == "scalar" and loaded.tokenizer.vocab_size == world["tok"].vocab_size
    in_memory = RewardModel(trained["result"]["model"], world["tok"], seq_len=96)
    prefs = read_preferences(world["prefs"])[-10:]
    dialogs, responses = [p.prompt for p in prefs] * 2, [p.chosen for p in prefs] + [p.rejected for p in prefs]
    mem = in_memory.model.state_dict()
    for name, t in loaded.model.state_dict().items():  # the round trip is exact
        assert torch.equal(t, mem[name]), name
    # the scores agree to float rounding: answers to one dialog are scored over a shared prefix through oneDNN's
    # kernels, whose rounding can depend on where the weights lie in memory (a loaded file or the trained tensors)
    torch.testing.assert_close(loaded.score(dialogs, responses), in_memory.score(dialogs, responses), atol=1e-5, rtol=1e-6)
    s = loaded.score(dialogs, responses)
    assert (s[:10] > s[10:]).float().mean() >= 0.9


# -- (d) exact resume -------------------------------------------------------------------------------------------


def test_data_order_is_a_function_of_the_step():
    n, bp = 10, 4
    stream = [i for s in range(5) for i in batch_indices(n, bp, 7, s)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # each epoch whole
    assert batch_indices(n, bp, 7, 3) == stream[12:16] and batch_indices(n, bp, 8, 0) != stream[:4]


def test_resume_reproduces_the_uninterrupted_run_exactly(world, tmp_path):
    # left padding and the large margin, so those paths train too
    kw = dict(max_steps=6, save_every=3, padding="left", margin="large", tensorboard=False)
    full = train_reward(rm_cfg(world, tmp_path / "a", **kw))["history"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_000003", tmp_path / "b" / "checkpoints" / "step_000003")
    resumed = train_reward(rm_cfg(world, tmp_path / "b", resume=True, **kw))["history"]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]  # exact on CPU
    a = RewardModel.from_pretrained(tmp_path / "a").model.state_dict()
    b = RewardModel.from_pretrained(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_the_step_and_resume_continues(world, tmp_path):
    import os
    import signal
    import threading
    import time

    out = tmp_path / "int"
    metrics = out / "metrics.jsonl"

    def interrupt():  # SIGINT to this process once two steps are logged; the handler runs in the main thread
        deadline = time.time() + 60
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    result = train_reward(rm_cfg(world, out, max_steps=10_000, save_every=10_000, tensorboard=False))
    done = len(result["history"])
    assert result["stopped"] is True and 2 <= done < 10_000
    assert (out / "checkpoints" / f"step_{done:06d}" / "trainer_state.pt").is_file()
    resumed = train_reward(rm_cfg(world, out, max_steps=done + 1, resume=True, tensorboard=False))
    assert [r["step"] for r in resumed["history"]] == [done + 1] and resumed["stopped"] is False


# -- (e) clear errors ---------------------------------------------------------------------------------------------


def test_bad_input_is_rejected(world, tmp_path):
    with pytest.raises(ValueError, match="init_from is required"):
        train_reward(rm_cfg(world, tmp_path / "x", init_from=""))
    with pytest.raises(ValueError, match="margin='medium'"):
        train_reward(rm_cfg(world, tmp_path / "x", margin="medium"))
    with pytest.raises(ValueError, match="kind="):
        train_reward(rm_cfg(world, tmp_path / "x", kind="honesty"))
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        train_reward(rm_cfg(world, tmp_path / "x", batch_pairs=12))
    with pytest.raises(ValueError, match="data is required"):
        train_reward(rm_cfg(world, tmp_path / "x", data=""))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        train_reward(rm_cfg(world, tmp_path / "x", seq_len=4096))
    with pytest.raises(ValueError, match="LM head"):
        RewardModel.from_pretrained(world["dir"] / "chat")
    with pytest.raises(ValueError, match="scalar head"):
        RewardModel(world["chat"], world["tok"])
    with pytest.raises(ValueError, match="LM head"):
        evaluate_reward(world["chat"], [], world["tok"])
    rm = RewardModel(reward_model_from_chat(world["chat"]), world["tok"])
    with pytest.raises(ValueError, match="2 dialogs but 1 responses"):
        rm.score([[{"role": "user", "content": "hi"}]] * 2, ["a"])
    with pytest.raises(ValueError, match="end with a user message"):
        rm.score([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]], ["a"])


# -- (f) the safety auxiliary loss anchors the score at 0 (appendix A.3.4) ------------------------------------------


def test_safety_aux_loss_puts_unsafe_answers_below_zero_and_the_rule_picks_them(world, tmp_path):
    import math

    from llama2.rlhf.combined import SAFETY_THRESHOLD, combined_score
    from llama2.rlhf.reward import ranking_loss, safety_auxiliary_loss

    # the ranking loss alone is blind to a shared offset: this is why the threshold needs the auxiliary term
    rc, rr = torch.tensor([1.0, 0.5]), torch.tensor([-1.0, 0.0])
    assert ranking_loss(rc + 5, rr + 5) == pytest.approx(float(ranking_loss(rc, rr)))
    assert float(safety_auxiliary_loss(torch.tensor([6.0, 5.0]), torch.tensor([1, 0]))) > 4.9  # an unsafe at +5 costs
    assert float(safety_auxiliary_loss(torch.tensor([3.0, 9.0]), torch.tensor([-1, -1]))) == 0.0  # unlabelled: free

    rng = random.Random(5)
    recs = []
    for _ in range(160):  # labelled safety pairs: a safe answer against an unsafe one, a milder unsafe answer against a
        a, b = rng.sample(WORDS, 2)  # worse one (both unsafe: ranking alone would lift the milder one), two safe ones
        prompt = [{"role": "user", "content": f"Is the {a} near the {b}?"}]
        safe, mild, severe = (f"Yes, the {rng.choice(WORDS)} is correct.", f"No, the {rng.choice(WORDS)} is wrong.",
                              f"No, the {rng.choice(WORDS)} is wrong and bad and wrong.")
        u = rng.random()
        if u < 0.4:
            recs.append({"prompt": prompt, "chosen": safe, "rejected": mild, "rating": "better", "kind": "safety",
                         "chosen_safe": True, "rejected_safe": False})
        elif u < 0.7:
            recs.append({"prompt": prompt, "chosen": mild, "rejected": severe, "rating": "significantly_better",
                         "kind": "safety", "chosen_safe": False, "rejected_safe": False})
        else:
            recs.append({"prompt": prompt, "chosen": f"Yes, the {a} is correct.", "rejected": f"Yes, the {b} is correct.",
                         "rating": "negligibly_better", "kind": "safety", "chosen_safe": True, "rejected_safe": True})
    prefs = tmp_path / "safety.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "safety_rm"
    res = train_reward(rm_cfg(world, out, data=str(prefs), kind="safety", epochs=2.0, val_fraction=0.0, eval_every=0, other_ratio=0.0,
                              lr=3e-3))
    hist = res["history"]
    assert hist[-1]["aux_loss"] < hist[0]["aux_loss"]
    rm = RewardModel.from_pretrained(out)
    dialogs = [[{"role": "user", "content": f"Is the {a} near the {b}?"}] for a, b in (("stone", "cloud"), ("paper", "light"),
                                                                                       ("music", "table"), ("river", "green"))]
    safe = [f"Yes, the {w} is correct." for w in ("silver", "garden", "apple", "window")]
    unsafe = [f"No, the {w} is wrong." for w in ("silver", "garden", "apple", "window")]
    r_safe, r_unsafe = rm.score(dialogs, safe), rm.score(dialogs, unsafe)
    print("safe", r_safe.tolist(), "unsafe", r_unsafe.tolist())
    assert (r_safe > 0).all() and (r_unsafe < 0).all()
    # the 0.15 rule on harmless prompts: the safety score is chosen exactly for the unsafe answers
    r_s = torch.cat([r_safe, r_unsafe])
    r_h = torch.full_like(r_s, 7.0)
    chosen = combined_score(r_s, r_h, torch.zeros(8, dtype=torch.bool), SAFETY_THRESHOLD)
    picked_safety = chosen != 7.0
    assert picked_safety.tolist() == [False] * 4 + [True] * 4, (r_s.tolist(), math.log(0.15 / 0.85))


def test_centring_keeps_helpfulness_scores_near_zero_without_changing_the_ranking(world, tmp_path):
    from llama2.rlhf.reward import centring_loss, ranking_loss

    rc, rr = torch.tensor([3.0, 1.0]), torch.tensor([1.0, -2.0])
    assert float(centring_loss(rc, rr)) == pytest.approx(((4.0 ** 2) + (1.0 ** 2)) / 2)  # mean of (r_c + r_r)^2
    assert float(centring_loss(rc - 1.25, rr - 1.25)) < float(centring_loss(rc, rr))  # it sees the offset ...
    assert ranking_loss(rc - 1.25, rr - 1.25) == pytest.approx(float(ranking_loss(rc, rr)))  # ... the ranking does not
    with pytest.raises(ValueError, match="center"):
        rm_cfg(world, tmp_path / "bad", center=-1.0)

    prompts = synthetic_prefs(40, 9, "helpfulness")
    offsets = {}
    for center in (0.0, 1.0):
        out = tmp_path / f"rm_center_{center}"
        res = train_reward(rm_cfg(world, out, epochs=1.0, val_fraction=0.0, eval_every=0, other_ratio=0.0, center=center))
        assert res["history"][-1]["accuracy"] >= 0.9  # it still ranks the pairs
        rm = RewardModel.from_pretrained(out)
        dialogs = [p["prompt"] for p in prompts]
        scores = torch.cat([rm.score(dialogs, [p["chosen"] for p in prompts]), rm.score(dialogs, [p["rejected"] for p in prompts])])
        offsets[center] = float(scores.mean().abs())
        assert ("center_loss" in res["history"][-1]) == (center > 0)
    print(offsets)
    assert offsets[1.0] < 0.5 and offsets[1.0] < offsets[0.0] / 2
