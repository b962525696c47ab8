"""Fixtures shared across the test folders (which mirror the package: tests/data, tests/train, tests/rlhf, ...).

* ``vocab_path`` / ``llama_tokenizer``: the real Llama 2 vocabulary (32,000 pieces, from llama.cpp's test files);
* ``pretrain_shards``: token shards of the demo corpus with a 400-piece tokenizer (``tiny_tokenizer``), small
  enough for seconds-long training runs;
* ``tiny_policy``: a toy-tiny language model with that tokenizer, saved as a native checkpoint (a fresh copy per
  test, so a test may train it), and ``write_prompts`` for a prompts JSONL file;
* ``one_thread``: tiny models on a shared 2-core machine run faster on one intra-op thread;
* ``cli_overrides``: a stage config as the ``key=value`` items of its command line (to run it in a subprocess).
"""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.checkpoint import save
from llama2.config import flat_fields
from llama2.data.prepare import PrepareConfig, prepare
from llama2.demo import demo_corpus
from llama2.tokenizer import Tokenizer, train_tokenizer

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def vocab_path() -> Path:
    return ASSETS / "ggml-vocab-llama-spm.gguf"


@pytest.fixture(scope="session")
def llama_tokenizer(vocab_path) -> Tokenizer:
    return Tokenizer.from_file(vocab_path)


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory):
    """Token shards of the demo corpus with a 400-piece tokenizer: small enough for seconds-long training runs."""
    d = tmp_path_factory.mktemp("pre")
    (d / "corpus.txt").write_text(demo_corpus(0, 1500).replace(".\n", ".\n\n"))
    train_tokenizer([d / "corpus.txt"], 400, d / "tok.model")
    prepare(PrepareConfig(inputs=[str(d / "corpus.txt")], out=str(d / "shards"), tokenizer=str(d / "tok.model"), val_fraction=0.05), quiet=True)
    return d / "shards"


@pytest.fixture(scope="session")
def tiny_tokenizer(pretrain_shards) -> Tokenizer:
    return Tokenizer.from_file(pretrain_shards.parent / "tok.model")


@pytest.fixture
def tiny_policy(tmp_path, tiny_tokenizer) -> Path:
    """A toy-tiny language model (seed 0) with the 400-piece tokenizer, saved at tmp_path/policy."""
    model = Transformer(ModelArgs.from_preset("toy-tiny", vocab_size=tiny_tokenizer.vocab_size)).init_weights(seed=0)
    return save(model, tmp_path / "policy", tokenizer=tiny_tokenizer)


@pytest.fixture
def write_prompts():
    """write_prompts(path, subjects, safety=lambda i: False): a prompts JSONL, one "Tell me about X." per subject."""

    def write(path: Path, subjects, safety=lambda i: False) -> Path:
        path.write_text("".join(json.dumps({"dialog": [{"role": "user", "content": f"Tell me about {w}."}],
                                            "safety": bool(safety(i))}) + "\n" for i, w in enumerate(subjects)))
        return path

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads cost far more than they save. A test module uses it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (set up before its other module fixtures)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _to_overrides(cfg) -> list[str]:
    """The config as ``key=value`` strings, by the names a command line takes (the inverse of
    ``llama2.config.apply_overrides``): every top-level field, then every group's fields."""
    flat = flat_fields(type(cfg))
    out = []
    for name, path in flat.items():
        if "." in name and flat.get(name.split(".")[-1]) == path:  # a group field that also has a plain name: once
            continue
        value = getattr(cfg, path[0]) if len(path) == 1 else getattr(getattr(cfg, path[0]), path[1])
        if dataclasses.is_dataclass(value):
            continue
        text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else ("none" if value is None else str(value))
        out.append(f"{name}={text}")
    return out


@pytest.fixture(scope="session")
def cli_overrides():
    return _to_overrides
