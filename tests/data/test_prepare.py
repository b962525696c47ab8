"""Tests for llama2.data.prepare: text/JSONL corpora -> token shards, with Meta's Llama 2 vocabulary."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llama2.config import describe, load_config
from llama2.data import PrepareConfig, TokenDataset, load_manifest, load_shards, prepare
from llama2.tokenizer import Tokenizer

VOCAB_GGUF = Path(__file__).resolve().parents[1] / "assets" / "ggml-vocab-llama-spm.gguf"

TXT_DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Llama 2 was pretrained on 2 trillion tokens.\nThis document has a second line.",
    "   indented first line, and 12345 digits",
    "Unicode: héllo wörld — 日本語のテキスト 🦙",
    "code:\n    def f(x):\n        return x + 1",
] + [f"Paragraph number {i}: some filler text about topic {i * 7 % 13}." for i in range(30)]
JSONL_DOCS = [f"JSON record {i} with \"quotes\", a tab\tand a newline\nin it." for i in range(25)] + [
    "short", "Ünïcödé record", "<s> is not a special token inside text </s>",
]


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> Path:
    """The GGUF vocabulary saved as a SentencePiece .model (the same proto; loading a .gguf takes ~1 s)."""
    path = tmp_path_factory.mktemp("tok") / "llama.model"
    Tokenizer.from_file(VOCAB_GGUF).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_model) -> Tokenizer:
    return Tokenizer.from_file(tok_model)


def write_corpus(d: Path, txt_docs=TXT_DOCS, jsonl_docs=JSONL_DOCS) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    txt = d / "a.txt"
    # documents separated by one or more blank lines (one of them whitespace-only), CRLF in one place
    body = ""
    for i, doc in enumerate(txt_docs):
        sep = "\n\n" if i % 3 else "\n  \n\n"
        body += doc + sep
    body = body.replace("second line.", "second line.\r", 1)  # "line.\r\n": the \r is a line end too
    txt.write_bytes(("\ufeff" + body).encode("utf-8"))
    jsonl = d / "b.jsonl"
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(jsonl_docs)]
    lines.insert(5, "")  # blank lines are allowed
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return txt, jsonl


def expected_docs(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    return [[tok.bos_id] + tok.encode(doc) + [tok.eos_id] for doc in docs]


def split_at_bos(tokens: np.ndarray, bos: int) -> list[list[int]]:
    starts = np.flatnonzero(tokens == bos).tolist()
    assert not len(tokens) or starts[:1] == [0]
    return [tokens[a:b].tolist() for a, b in zip(starts, starts[1:] + [len(tokens)])]


def read_split(out: Path, split: str) -> np.ndarray:
    shards = load_shards(out, split)
    return np.concatenate(shards) if shards else np.zeros(0, dtype=np.uint16)


def assert_covers(expected: list[list[int]], train: list[list[int]], val: list[list[int]]) -> None:
    """Every expected document is, in order, the next document of train or of val; nothing else is there."""
    ti = vi = 0
    for doc in expected:
        if ti < len(train) and train[ti] == doc:
            ti += 1
        elif vi < len(val) and val[vi] == doc:
            vi += 1
        else:
            raise AssertionError(f"document {doc[:8]}... missing or out of order")
    assert (ti, vi) == (len(train), len(val))


def cfg(tmp_path: Path, tok_model: Path, inputs, **kw) -> PrepareConfig:
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("shard_tokens", 100)
    return PrepareConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / "out"), tokenizer=str(tok_model), **kw)


def mtimes(out: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.suffix == ".bin"}


# ------------------------------------------------------------------------------------------------ content


def test_shards_hold_every_document_once(tmp_path, tok):
    txt, jsonl = write_corpus(tmp_path / "src")
    c = PrepareConfig(inputs=[str(txt), str(jsonl)], out=str(tmp_path / "out"), tokenizer=str(VOCAB_GGUF),
                      val_fraction=0.2, shard_tokens=100)
    m = prepare(c, quiet=True)
    out = tmp_path / "out"
    assert m == load_manifest(out)
    assert m["dtype"] == "<u2" and m["vocab_size"] == 32000 and (m["bos_id"], m["eos_id"]) == (1, 2)
    assert m["tokenizer"]["sha256"] and m["bad"] == {"count": 0, "examples": []}
    assert [s["path"] for s in m["sources"]] == [str(txt), str(jsonl)]

    expected = expected_docs(tok, TXT_DOCS + JSONL_DOCS)
    train = split_at_bos(read_split(out, "train"), tok.bos_id)
    val = split_at_bos(read_split(out, "val"), tok.bos_id)
    assert_covers(expected, train, val)
    assert 0 < len(val) < len(train)
    for split, docs in (("train", train), ("val", val)):
        info = m["splits"][split]
        assert info["documents"] == len(docs)
        assert info["tokens"] == sum(map(len, docs)) == sum(s["tokens"] for s in info["shards"])
        maps = load_shards(out, split)
        assert all(mm.dtype == np.uint16 for mm in maps)
        # shards are cut at exactly shard_tokens tokens; only the last of a split holds fewer
        assert [len(mm) for mm in maps[:-1]] == [100] * (len(maps) - 1) and 0 < len(maps[-1]) <= 100
        assert [s["file"] for s in info["shards"]] == [f"{split}_{i:05d}.bin" for i in range(len(maps))]
        for s in info["shards"]:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
    assert len(load_shards(out, "train")) > 3


def test_directory_and_glob_inputs(tmp_path, tok_model, tok):
    src = tmp_path / "src"
    write_corpus(src / "sub")
    (src / ".hidden.txt").write_text("never read\n", encoding="utf-8")
    by_dir = prepare(cfg(tmp_path / "d", tok_model, [src]), quiet=True)
    by_glob = prepare(cfg(tmp_path / "g", tok_model, [src / "**" / "*.txt", src / "sub" / "b.jsonl"]), quiet=True)
    assert [Path(s["path"]).name for s in by_dir["sources"]] == ["a.txt", "b.jsonl"]
    assert by_dir["sources"] == by_glob["sources"]
    for d in ("d", "g"):
        out = tmp_path / d / "out"
        got = split_at_bos(read_split(out, "train"), 1) + split_at_bos(read_split(out, "val"), 1)
        assert sorted(got) == sorted(expected_docs(tok, TXT_DOCS + JSONL_DOCS))


def test_long_document_spans_shards_and_token_dataset(tmp_path, tok_model, tok):
    txt = tmp_path / "long.txt"
    long_doc = " ".join(f"word{i}" for i in range(400))
    txt.write_text(long_doc + "\n\nshort one\n", encoding="utf-8")
    prepare(cfg(tmp_path, tok_model, [txt], val_fraction=0.0, shard_tokens=64), quiet=True)
    out = tmp_path / "out"
    flat = np.concatenate(expected_docs(tok, [long_doc, "short one"]))
    maps = load_shards(out, "train")
    assert len(maps) == -(-len(flat) // 64) and np.array_equal(np.concatenate(maps), flat)
    assert load_shards(out, "val") == [] and load_manifest(out)["splits"]["val"]["tokens"] == 0
    ds = TokenDataset(out, "train")
    assert len(ds) == len(flat) and ds.documents == 2
    assert np.array_equal(ds.read(50, 100), flat[50:150])  # crosses two shard boundaries
    assert np.array_equal(ds.read(0, len(flat)), flat)
    with pytest.raises(IndexError):
        ds.read(len(flat) - 1, 2)


def test_split_is_deterministic_and_seeded(tmp_path, tok_model):
    txt, jsonl = write_corpus(tmp_path / "src")
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(cfg(tmp_path / name, tok_model, [txt, jsonl], seed=seed), quiet=True)
        outs.append(read_split(tmp_path / name / "out", "val").tolist())
    assert outs[0] == outs[1] and outs[0] != outs[2]


# ------------------------------------------------------------------------------------------------ up to date


def test_rerun_is_noop_and_force_rewrites(tmp_path, tok_model, capsys):
    txt, jsonl = write_corpus(tmp_path / "src")
    c = cfg(tmp_path, tok_model, [txt, jsonl])
    first = prepare(c)
    out = tmp_path / "out"
    for f in out.iterdir():
        os.utime(f, ns=(10**9, 10**9))
    before = mtimes(out)
    capsys.readouterr()
    assert prepare(c) == first
    assert "up to date" in capsys.readouterr().out
    assert mtimes(out) == before and (out / "manifest.json").stat().st_mtime_ns == 10**9
    c.force = True
    assert prepare(c) == first  # same inputs, same bytes
    assert "up to date" not in capsys.readouterr().out
    after = mtimes(out)
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)


def test_changed_input_reprepares_and_removes_stale_shards(tmp_path, tok_model, tok, capsys):
    txt, jsonl = write_corpus(tmp_path / "src")
    c = cfg(tmp_path, tok_model, [txt, jsonl], val_fraction=0.0)
    first = prepare(c)
    out = tmp_path / "out"
    n_before = len(first["splits"]["train"]["shards"])
    write_corpus(tmp_path / "src", txt_docs=TXT_DOCS[:3], jsonl_docs=JSONL_DOCS[:2])
    capsys.readouterr()
    second = prepare(c)
    assert "up to date" not in capsys.readouterr().out
    assert second["sources"] != first["sources"]
    n_after = len(second["splits"]["train"]["shards"])
    assert n_after < n_before
    assert sorted(f.name for f in out.glob("train_*")) == [f"train_{i:05d}.bin" for i in range(n_after)]
    assert split_at_bos(read_split(out, "train"), 1) == expected_docs(tok, TXT_DOCS[:3] + JSONL_DOCS[:2])
    # a changed setting re-prepares too
    c.shard_tokens = 1000
    capsys.readouterr()
    assert len(prepare(c)["splits"]["train"]["shards"]) == 1
    assert "up to date" not in capsys.readouterr().out


def test_incomplete_output_is_not_up_to_date(tmp_path, tok_model, capsys):
    txt, jsonl = write_corpus(tmp_path / "src")
    c = cfg(tmp_path, tok_model, [txt, jsonl])
    first = prepare(c)
    out = tmp_path / "out"
    # no manifest: an interrupted run
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_shards(out, "train")
    capsys.readouterr()
    assert prepare(c) == first
    assert "up to date" not in capsys.readouterr().out
    # a leftover .tmp shard
    (out / "train_00003.bin.tmp").write_bytes(b"\0\0")
    assert prepare(c) == first
    assert "up to date" not in capsys.readouterr().out and not list(out.glob("*.tmp"))
    # a truncated shard
    with open(out / "val_00000.bin", "r+b") as f:
        f.truncate(2)
    assert prepare(c) == first
    assert "up to date" not in capsys.readouterr().out
    assert prepare(c) == first
    assert "up to date" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('["text", "a list"]', "expected a JSON object"),
        ('{"body": "no text field"}', "record has no field 'text'"),
        ('{"text": 42}', "field 'text' is not a string"),
    ],
)
def test_bad_jsonl_line(tmp_path, tok_model, tok, line, message):
    jsonl = tmp_path / "file.jsonl"
    good = ['{"text": "first"}', '{"text": "second"}', line, '{"text": "fourth"}']
    jsonl.write_text("\n".join(good) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"file.jsonl:3: {message}"):
        prepare(cfg(tmp_path, tok_model, [jsonl]), quiet=True)
    assert not (tmp_path / "out" / "manifest.json").exists()
    m = prepare(cfg(tmp_path, tok_model, [jsonl], skip_bad=True, val_fraction=0.0), quiet=True)
    assert m["bad"]["count"] == 1
    assert m["bad"]["examples"][0]["line"] == 3 and message in m["bad"]["examples"][0]["error"]
    assert split_at_bos(read_split(tmp_path / "out", "train"), 1) == expected_docs(tok, ["first", "second", "fourth"])


def test_invalid_utf8_names_the_file(tmp_path, tok_model, tok):
    txt = tmp_path / "broken.txt"
    txt.write_bytes(b"good document\n\nbad \xff\xfe bytes\nsame document\n\nlast document\n")
    with pytest.raises(ValueError, match=r"broken\.txt:3: invalid UTF-8"):
        prepare(cfg(tmp_path, tok_model, [txt]), quiet=True)
    m = prepare(cfg(tmp_path, tok_model, [txt], skip_bad=True, val_fraction=0.0), quiet=True)
    assert m["bad"]["count"] == 1 and m["splits"]["train"]["documents"] == 2
    assert split_at_bos(read_split(tmp_path / "out", "train"), 1) == expected_docs(tok, ["good document", "last document"])


def test_missing_inputs(tmp_path, tok_model):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare(cfg(tmp_path, tok_model, [tmp_path / "nope.txt"]), quiet=True)
    with pytest.raises(FileNotFoundError, match=r"no files match.*\*\.jsonl"):
        prepare(cfg(tmp_path, tok_model, [tmp_path / "*.jsonl"]), quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no input files"):
        prepare(cfg(tmp_path, tok_model, [tmp_path / "empty"]), quiet=True)
    with pytest.raises(ValueError, match="no inputs"):
        prepare(PrepareConfig(out=str(tmp_path / "o"), tokenizer=str(tok_model)), quiet=True)


# ------------------------------------------------------------------------------------------------ config


def test_config_from_overrides(tmp_path):
    c = load_config(PrepareConfig, None, ["inputs=a.txt,b/*.jsonl", "out=data/x", "shard_tokens=1024", "skip_bad=true"])
    assert c.inputs == ["a.txt", "b/*.jsonl"] and c.shard_tokens == 1024 and c.skip_bad is True
    assert "documents separated by blank lines" in describe(PrepareConfig)
    with pytest.raises(ValueError, match="val_fraction"):
        PrepareConfig(val_fraction=1.0)
