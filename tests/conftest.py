"""Fixtures shared across test modules."""
import pytest

from llama2.data.prepare import PrepareConfig, prepare
from llama2.demo import demo_corpus
from llama2.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory):
    """Token shards of the demo corpus with a 400-piece tokenizer: small enough for seconds-long training runs."""
    d = tmp_path_factory.mktemp("pre")
    (d / "corpus.txt").write_text(demo_corpus(0, 1500).replace(".\n", ".\n\n"))
    train_tokenizer([d / "corpus.txt"], 400, d / "tok.model")
    prepare(PrepareConfig(inputs=[str(d / "corpus.txt")], out=str(d / "shards"), tokenizer=str(d / "tok.model"), val_fraction=0.05), quiet=True)
    return d / "shards"
