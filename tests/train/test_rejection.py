"""Rejection sampling end to end on a tiny policy and a tiny reward model: K scored samples per prompt, the best
of all iterations kept, a fine-tuned checkpoint per iteration, and a stopped run resumes without redoing work."""
import json

import pytest
import torch

from llama2 import Llama, RewardModel
from llama2.checkpoint import save
from llama2.rlhf.reward_model import reward_model_from_chat
from llama2.train.rejection import RejectionConfig, rejection


@pytest.fixture
def setup(tmp_path, tiny_tokenizer, tiny_policy, write_prompts):
    torch.set_num_threads(1)
    policy = Llama.from_pretrained(tiny_policy).model
    save(reward_model_from_chat(policy, seed=1), tmp_path / "rm", tokenizer=tiny_tokenizer)
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["Ada", "Bob", "the sea", "tea", "a boat"])
    cfg = RejectionConfig(prompts=str(prompts), init_from=str(tmp_path / "policy"), reward_helpfulness=str(tmp_path / "rm"),
                          out=str(tmp_path / "rs"), iterations=2, k=4, temperatures=[1.0, 1.2], max_new_tokens=6,
                          seq_len=64, batch_size=4, micro_batch=2, epochs=1, lr=1e-3, tensorboard=False)
    yield cfg, tmp_path
    torch.set_num_threads(2)


def test_keeps_the_best_of_all_iterations_and_fine_tunes(setup):
    cfg, tmp = setup
    result = rejection(cfg)
    assert [s["temperature"] for s in result["history"]] == [1.0, 1.2]
    rm = RewardModel.from_pretrained(tmp / "rm")
    seen = {}  # prompt id -> every (score, text) of every iteration
    for it in (1, 2):
        d = tmp / "rs" / f"iter_{it}"
        samples = [json.loads(l) for l in (d / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 5 and all(len(s["samples"]) == 4 for s in samples)
        for s in samples:
            seen.setdefault(s["id"], []).extend((x["score"], x["text"]) for x in s["samples"])
        kept = {r["id"]: r for r in map(json.loads, (d / "kept.jsonl").read_text().splitlines())}
        for pid, r in kept.items():
            assert r["score"] == max(sc for sc, _ in seen[pid])  # the best so far, over this and earlier iterations
            assert r["dialog"][-1]["content"] in [t for sc, t in seen[pid] if sc == r["score"]]
        # the stored scores are the reward model's (through the sigmoid)
        first = samples[0]
        fresh = torch.sigmoid(rm.score([json.loads((d / "samples.jsonl").read_text().splitlines()[0])["prompt"]] * 4,
                                       [x["text"] for x in first["samples"]]))
        assert fresh.tolist() == pytest.approx([x["score"] for x in first["samples"]], abs=1e-5)
        stats = json.loads((d / "stats.json").read_text())
        assert stats["mean_best_of_k"] >= stats["mean_reward"]
        assert stats["best_of_k_curve"][0] == pytest.approx(stats["mean_reward"], abs=1e-5)
        assert stats["best_of_k_curve"][-1] == pytest.approx(stats["mean_best_of_k"], abs=1e-5)
        assert (d / "model" / "llama2.json").is_file()
    # each iteration fine-tuned the model that sampled it (the paper's versions build on the latest model); OUT
    # holds the last
    for it, start in ((1, tmp / "policy"), (2, tmp / "rs" / "iter_1" / "model")):
        started = json.loads((tmp / "rs" / f"iter_{it}" / "model" / "sft_config.json").read_text())["init_from"]
        assert started == str(start)
    a = Llama.from_pretrained(tmp / "rs" / "iter_2" / "model").model.state_dict()
    b = Llama.from_pretrained(tmp / "rs").model.state_dict()
    c = Llama.from_pretrained(tmp / "rs" / "iter_1" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    # a rerun refuses to start over the finished run; resuming finds both iterations done and redoes nothing
    from dataclasses import replace

    with pytest.raises(FileExistsError, match="already holds a run"):
        rejection(cfg)
    again = rejection(replace(cfg, resume=True))
    assert again["history"] == result["history"]
    # overwrite removes the iterations too: both are sampled and fine-tuned again
    (tmp / "rs" / "iter_2" / "marker").write_text("old")
    rejection(replace(cfg, overwrite=True))
    assert not (tmp / "rs" / "iter_2" / "marker").exists() and (tmp / "rs" / "iter_2" / "stats.json").is_file()
    # our option: every iteration fine-tunes the base model afresh (sampling still from the newest)
    rejection(replace(cfg, finetune_from="base", out=str(tmp / "rs2"), iterations=2))
    started = json.loads((tmp / "rs2" / "iter_2" / "model" / "sft_config.json").read_text())["init_from"]
    assert started == str(tmp / "policy")


def test_bad_settings(setup):
    cfg, tmp = setup
    from dataclasses import replace

    with pytest.raises(ValueError, match="reward_helpfulness"):
        rejection(replace(cfg, reward_helpfulness=""))
    with pytest.raises(ValueError, match="k=0: expected >= 1"):
        rejection(replace(cfg, k=0))


def test_a_later_version_samples_new_prompts_and_keeps_the_earlier_best(setup, write_prompts):
    """RLHF versions: version 2 samples its own (new) prompts from the newest model, while the answers kept by
    version 1 stay in the kept set, re-scored by version 2's reward model."""
    from dataclasses import replace

    cfg, tmp = setup
    v1 = replace(cfg, iterations=1, out=str(tmp / "v1"))
    rejection(v1)
    new = write_prompts(tmp / "new.jsonl", ["the moon", "a kite"])
    v2 = replace(cfg, iterations=1, prompts=str(new), init_from=str(tmp / "v1"), previous=str(tmp / "v1" / "iter_1" / "kept.jsonl"),
                 out=str(tmp / "v2"))
    rejection(v2)
    kept1 = [json.loads(l) for l in (tmp / "v1" / "iter_1" / "kept.jsonl").read_text().splitlines()]
    kept2 = [json.loads(l) for l in (tmp / "v2" / "iter_1" / "kept.jsonl").read_text().splitlines()]
    samples2 = [json.loads(l) for l in (tmp / "v2" / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"][-1]["content"] for s in samples2] == ["Tell me about the moon.", "Tell me about a kite."]
    assert {json.dumps(r["dialog"]) for r in kept1} <= {json.dumps(r["dialog"]) for r in kept2}  # carried over
    assert len(kept2) == len(kept1) + 2
    rm = RewardModel.from_pretrained(tmp / "rm")
    r = kept1[0]
    fresh = float(torch.sigmoid(rm.score([r["dialog"][:-1]], [r["dialog"][-1]["content"]]))[0])
    assert next(k["score"] for k in kept2 if k["dialog"] == r["dialog"]) == pytest.approx(fresh, abs=1e-5)
    started = json.loads((tmp / "v2" / "iter_1" / "model" / "sft_config.json").read_text())["init_from"]
    assert started == str(tmp / "v1")  # version 2 fine-tunes the latest model, version 1's


def test_a_reward_function_scores_in_place_of_the_reward_models(setup):
    """The oracle run's hook: any (dialogs, answers, is-safety) -> R_c in (0, 1) picks the kept answers, no reward
    model needed; a scorer that prefers longer answers keeps the longest of each prompt's samples."""
    from dataclasses import replace

    cfg, tmp = setup
    calls = []

    def longer_is_better(dialogs, texts, safety):
        calls.append(len(texts))
        return torch.tensor([min(len(t), 50) / 51 + 0.01 for t in texts])

    cfg = replace(cfg, reward_helpfulness="", iterations=1, out=str(tmp / "oracle"))
    rejection(cfg, reward_fn=longer_is_better)
    assert calls and calls[0] == 5 * 4
    samples = [json.loads(l) for l in (tmp / "oracle" / "iter_1" / "samples.jsonl").read_text().splitlines()]
    kept = {json.loads(l)["id"]: json.loads(l) for l in (tmp / "oracle" / "iter_1" / "kept.jsonl").read_text().splitlines()}
    for s in samples:
        texts = [x["text"] for x in s["samples"] if x["text"]]
        if texts:
            assert len(kept[s["id"]]["dialog"][-1]["content"]) == max(min(len(t), 50) for t in texts) or \
                len(kept[s["id"]]["dialog"][-1]["content"]) >= 50
    with pytest.raises(ValueError, match="reward_helpfulness"):
        rejection(replace(cfg, out=str(tmp / "none")))  # neither reward models nor a function
