"""Training on 2 processes (gloo on CPU, under torchrun) equals training on 1 with the same global batch, and
checkpoints move between rank counts in both directions, for FSDP2 and DDP."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama2 import Llama
from llama2.train.pretrain import PretrainConfig, pretrain

# fp32 sums taken in a different order (per-rank partial gradients, then a reduce) differ in the last bits;
# through a few AdamW steps that stays far below this.
TOL = 2e-4


def settings(shards, out, **kw):
    base = dict(data=str(shards), out=str(out), model="toy-tiny", seq_len=64, micro_batch=2, batch_tokens=512,
                max_steps=6, save_every=3, eval_every=3, eval_batches=3, warmup_steps=2, lr=3e-3, keep_last=3,
                tensorboard=False)
    base.update(kw)
    return base


def torchrun(tmp_path, command="pretrain", **kw):
    """`llama2 COMMAND` on 2 processes; returns the metrics of the steps it ran."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llama2.cli",
           command, *[f"{k}={v}" for k, v in kw.items()]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(l) for l in open(os.path.join(kw["out"], "metrics.jsonl"))]


@pytest.fixture(scope="module")
def single(pretrain_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    return out, pretrain(PretrainConfig(**settings(pretrain_shards, out)))["history"]  # 4 micro-batches of 2


def close(a, b, key="loss"):
    return [abs(x[key] - y[key]) for x, y in zip(a, b)]


def test_fsdp_two_ranks_equal_one_and_its_checkpoint_resumes_alone(pretrain_shards, single, tmp_path):
    _, ref = single
    out = tmp_path / "fsdp"
    recs = torchrun(tmp_path, **settings(pretrain_shards, out, strategy="fsdp"))
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    print("fsdp vs single, max |loss diff|:", max(close(recs, ref)))
    assert max(close(recs, ref)) < TOL, (recs, ref)
    assert max(close([recs[2], recs[5]], [ref[2], ref[5]], "val_loss")) < TOL
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.3  # it did learn: the comparison is not between two flat lines
    # the 2-rank checkpoint of step 3, resumed in one process, continues like the single run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_000003", resumed / "checkpoints" / "step_000003")
    hist = pretrain(PretrainConfig(**settings(pretrain_shards, resumed, resume=True)))["history"]
    assert [r["step"] for r in hist] == [4, 5, 6]
    assert max(close(hist, ref[3:])) < TOL
    # the published output of the 2-rank run is an ordinary model directory, equal to the single run's
    a, b = Llama.from_pretrained(out).model.state_dict(), Llama.from_pretrained(single[0]).model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_ddp_resumes_a_single_process_checkpoint_on_two_ranks(pretrain_shards, single, tmp_path):
    ref_out, ref = single
    out = tmp_path / "ddp"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref_out / "checkpoints" / "step_000003", out / "checkpoints" / "step_000003")
    recs = torchrun(tmp_path, **settings(pretrain_shards, out, strategy="ddp", resume="true"))
    assert [r["step"] for r in recs] == [4, 5, 6]
    print("ddp resumed vs single, max |loss diff|:", max(close(recs, ref[3:])))
    assert max(close(recs, ref[3:])) < TOL


def test_strategy_single_refuses_several_processes(monkeypatch):
    from llama2.dist import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="strategy=single"):
        init_distributed("single", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        init_distributed("zero3", "cpu")


def test_sft_on_two_ranks_equals_one(pretrain_shards, tmp_path):
    """Packed rows of different answer-token counts on each rank: the loss is still the global per-token mean."""
    from llama2.train.sft import SFTConfig, sft

    dialogs = tmp_path / "d.jsonl"
    lines = [{"dialog": [{"role": "user", "content": f"Say {w} {i} times."},
                         {"role": "assistant", "content": " ".join([w] * (i + 1)) + "."}]}
             for i, w in enumerate(["yes", "no", "maybe", "Ada", "Bob", "tea", "sky", "red"])]
    dialogs.write_text("".join(json.dumps(l) + "\n" for l in lines))
    kw = dict(data=str(dialogs), tokenizer=str(pretrain_shards.parent / "tok.model"), model="toy-tiny", seq_len=32,
              batch_size=4, micro_batch=1, epochs=3, lr=3e-3, val_fraction=0.25, tensorboard=False, save_every=1000)
    ref = sft(SFTConfig(out=str(tmp_path / "one"), **kw))["history"]
    recs = torchrun(tmp_path, "sft", out=str(tmp_path / "two"), strategy="fsdp", **kw)
    assert len(recs) == len(ref) >= 3
    print("sft fsdp vs single, max |loss diff|:", max(close(recs, ref)))
    assert max(close(recs, ref)) < TOL and abs(recs[-1]["val_loss"] - ref[-1]["val_loss"]) < TOL


@pytest.fixture
def rl_setup(pretrain_shards, tmp_path):
    from llama2 import ModelArgs, Transformer
    from llama2.checkpoint import save
    from llama2.rlhf.reward_model import reward_model_from_chat
    from llama2.tokenizer import Tokenizer

    tok = Tokenizer.from_file(pretrain_shards.parent / "tok.model")
    policy = Transformer(ModelArgs.from_preset("toy-tiny", vocab_size=tok.vocab_size)).init_weights(seed=0)
    save(policy, tmp_path / "policy", tokenizer=tok)
    save(reward_model_from_chat(policy, seed=1), tmp_path / "rm", tokenizer=tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"dialog": [{"role": "user", "content": f"Tell me about {w}."}], "safety": i % 2 == 0})
                               + "\n" for i, w in enumerate(["Ada", "Bob", "the sea", "tea", "a boat", "rain"])))
    return tmp_path


def test_rejection_and_ppo_run_on_two_ranks(rl_setup):
    """Sampling sharded by rank, gathered on rank 0; fine-tuning under FSDP (rejection) and DDP (PPO)."""
    tmp = rl_setup
    common = dict(prompts=str(tmp / "prompts.jsonl"), init_from=str(tmp / "policy"), reward_helpfulness=str(tmp / "rm"),
                  reward_safety=str(tmp / "rm"), max_new_tokens=4, tensorboard="false")
    torchrun(tmp, "rejection", out=str(tmp / "rs"), iterations=1, k=2, seq_len=64, batch_size=4, micro_batch=1,
             epochs=1, strategy="fsdp", **common)
    samples = [json.loads(l) for l in (tmp / "rs" / "iter_1" / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in samples) == list(range(6))  # every prompt sampled once, by one rank or the other
    assert Llama.from_pretrained(tmp / "rs").model is not None
    recs = torchrun(tmp, "ppo", out=str(tmp / "ppo"), iterations=2, rollout_batch=8, minibatch=4, micro_batch=2,
                    val_fraction=0.34, eval_every=1, patience=0, strategy="ddp", **common)
    assert [r["iteration"] for r in recs] == [1, 2]
    assert all(0 < r["reward"] < 1 and "heldout_reward" in r for r in recs)
    assert Llama.from_pretrained(tmp / "ppo").model is not None
