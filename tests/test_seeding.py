"""Seeds are the same in every process: derive_seed hashes its parts with BLAKE2b, never with Python's salted
hash(), so held-out samples, data order and early stopping do not change from run to run."""
import os
import subprocess
import sys
from pathlib import Path

from llama2.seeding import derive_seed, epoch_stream

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("from llama2.seeding import derive_seed, epoch_stream;"
         "print(derive_seed(0, 'ppo/heldout'), derive_seed(3, 'rejection', 2, 1), epoch_stream(10, 4, 0, 2, 'sft/rows'))")


def _in_a_fresh_process(hash_seed: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout


def test_two_processes_with_different_hash_salts_derive_the_same_seeds():
    a, b = _in_a_fresh_process("1"), _in_a_fresh_process("2")
    assert a == b
    assert a.split()[0] == str(derive_seed(0, "ppo/heldout"))


def test_seeds_separate_purposes_and_indices():
    seeds = {derive_seed(0, p, i) for p in ("a", "b") for i in range(50)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "x", 1) != derive_seed(1, "x", 1) != derive_seed(0, "x", "1")


def test_epoch_stream_visits_every_item_once_per_epoch():
    stream = [i for step in range(5) for i in epoch_stream(7, 7, 0, step, "t")]
    for e in range(5):
        assert sorted(stream[7 * e : 7 * e + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a new order each epoch


SAMPLE = """
import torch
from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.config import StageSampling
from llama2.answers import answer_texts
torch.set_num_threads(1)
tok = Tokenizer.from_file({vocab!r})
model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16,
                              max_seq_len=64)).init_weights(std=0.5, seed=1)
dialogs = [[{{"role": "user", "content": w}}] for w in ("Hello there", "Tell me a story", "Why?")]
print(answer_texts(model, tok, dialogs, StageSampling(temperature=1.0, max_new_tokens=8), seed=0, purpose="ppo/heldout"))
"""


def test_two_processes_draw_the_same_held_out_samples(vocab_path):
    code = SAMPLE.format(vocab=str(vocab_path))
    outs = []
    for salt in ("3", "4"):
        env = dict(os.environ, PYTHONHASHSEED=salt, PYTHONPATH=str(ROOT))
        outs.append(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)
    assert outs[0] == outs[1] and len(outs[0]) > 10
