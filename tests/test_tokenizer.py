"""Tests for llama2.tokenizer against llama.cpp's Llama 2 (SPM) vocabulary test vectors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llama2.tokenizer import Tokenizer, train_tokenizer

DATA = Path(__file__).parent / "assets"
VOCAB_GGUF = DATA / "ggml-vocab-llama-spm.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"


def _load_cases() -> list[tuple[str, list[int]]]:
    """Read llama.cpp's .inp/.out pairs the way tests/test-tokenizer-0 reads them.

    llama.cpp's generator (convert_hf_to_gguf_update.py) writes every input
    followed by "\\n__ggml_vocab_test__\\n", so the .inp file also *ends* with
    the separator: splitting on it leaves one empty string after the last case,
    which is not a case (llama.cpp's C++ reader stops when it reaches the end
    of the file).  Inputs may themselves be empty or consist of newlines
    ("\\n", "\\n\\n\\n", ...); splitting on the full separator keeps them.  The
    .out file has one line per case (" id id ...", without BOS), also ending
    with a newline.
    """
    inputs = (DATA / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    assert inputs[-1] == "", "the .inp file should end with the separator"
    inputs = inputs[:-1]
    lines = (DATA / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the .out file should end with a newline"
    lines = lines[:-1]
    assert len(inputs) == len(lines)
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, lines)]


CASES = _load_cases()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(VOCAB_GGUF)


def test_case_count() -> None:
    assert len(CASES) == 46


@pytest.mark.parametrize(
    ("text", "expected"), CASES, ids=[f"case{i:02d}-{text[:20]!r}" for i, (text, _) in enumerate(CASES)]
)
def test_llama_cpp_vectors(tok: Tokenizer, text: str, expected: list[int]) -> None:
    assert tok.encode(text) == expected
    # SentencePiece removes only the one dummy-prefix "▁" it added, so decoding
    # gives back the input exactly, leading spaces and newlines included.  (No
    # case in llama.cpp's vectors needs an exception to this rule.)
    assert tok.decode(expected) == text


def test_vocab_properties(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 32000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert tok.id_to_piece(3) == "<0x00>"
    plain = tok.encode("Hello world")
    assert tok.encode("Hello world", bos=True) == [1, *plain]
    assert tok.encode("Hello world", eos=True) == [*plain, 2]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, *plain, 2]


def test_decode_ignores_control_ids_and_accepts_tensors(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("Hello world", bos=True, eos=True)
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(torch.tensor(ids)) == "Hello world"
    assert tok.decode(tuple(torch.tensor(ids))) == "Hello world"  # 0-d tensors as items
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array(ids)) == "Hello world"
    with pytest.raises(TypeError):
        tok.decode([1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.tensor([ids]))
    with pytest.raises(ValueError, match="-1"):
        tok.decode([1, -1])  # Meta's pad value is not a token
    with pytest.raises(ValueError, match="32000"):
        tok.decode([32000])


def test_special_pieces_are_not_parsed_from_text(tok: Tokenizer) -> None:
    # As in Meta's code: "<s>" in user text is plain characters, never BOS.
    assert tok.bos_id not in tok.encode("<s> hi </s>")
    assert tok.decode(tok.encode("<s> hi </s>")) == "<s> hi </s>"


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = [text for text, _ in CASES]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts[:3], bos=True, eos=True) == [
        tok.encode(t, bos=True, eos=True) for t in texts[:3]
    ]
    assert tok.encode_batch([]) == []
    with pytest.raises(TypeError, match="item 1"):
        tok.encode_batch(["a", 3])  # type: ignore[list-item]


def test_gguf_proto_round_trips_through_model_file(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "sub" / "tokenizer.model")
    reloaded = Tokenizer.from_file(path)
    assert path.read_bytes() == tok.to_proto_bytes()
    assert reloaded.to_proto_bytes() == tok.to_proto_bytes()
    assert Tokenizer.from_proto_bytes(tok.to_proto_bytes()).vocab_size == 32000
    texts = [text for text, _ in CASES]
    assert reloaded.encode_batch(texts, bos=True) == tok.encode_batch(texts, bos=True)
    assert reloaded.pieces_scores_types() == tok.pieces_scores_types()
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.unk_id, reloaded.pad_id) == (1, 2, 0, -1)


def test_pieces_scores_types_match_gguf(tok: Tokenizer) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(VOCAB_GGUF)
    pieces, scores, types = tok.pieces_scores_types()
    assert pieces == reader.fields["tokenizer.ggml.tokens"].contents()
    assert scores == pytest.approx(reader.fields["tokenizer.ggml.scores"].contents())
    assert types == reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6}


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(path)


def test_missing_file(tmp_path: Path) -> None:
    for name in ("missing.model", "missing.gguf"):
        with pytest.raises(FileNotFoundError, match=name):
            Tokenizer.from_file(tmp_path / name)


def test_invalid_model_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.model"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="broken.model"):
        Tokenizer.from_file(path)


def test_gguf_without_llama_tokenizer(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*tokenizer\.ggml\.model"):
        Tokenizer.from_file(path)

    path = tmp_path / "no_tokenizer.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"no_tokenizer\.gguf.*tokenizer\.ggml\.model"):
        Tokenizer.from_file(path)


# ---------------------------------------------------------------- training


def _write_corpus(path: Path, n_lines: int = 400) -> None:
    """A deterministic English-like corpus with plenty of numbers, ASCII letters only."""
    rng = random.Random(1234)
    subjects = ["the cat", "a small dog", "my neighbour", "the old sailor", "every student",
                "the river", "our team", "the committee", "a tired farmer", "the library"]
    verbs = ["saw", "counted", "painted", "walked past", "remembered", "bought", "measured",
             "ignored", "described", "carried"]
    objects = ["the lighthouse", "three apples", "a blue bicycle", "the morning train",
               "seven letters", "the garden wall", "an empty box", "their homework"]
    tails = ["in the rain.", "before dinner.", "at {n} o'clock.", "near the station!",
             "without a word.", "on page {n}.", "for {n} dollars?", "in {n} minutes;"]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(0, 99999)
        line = (
            f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} "
            f"{rng.choice(tails).format(n=n)}  Item {rng.randint(0, 9999)}, code "
            f"{rng.randint(10, 99)}-{rng.randint(100, 999)}."
        )
        if rng.random() < 0.2:
            line = "    " + line  # some indentation, kept as-is (no whitespace collapsing)
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    _write_corpus(corpus)
    out = root / "nested" / "dir" / "tiny.model"
    return train_tokenizer([corpus], 320, out, user_defined_symbols=["<tool>"]), out


def test_train_vocab_and_special_ids(trained: tuple[Tokenizer, Path]) -> None:
    tok, out = trained
    assert out.is_file()
    assert tok.vocab_size == 320
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    pieces, _, types = tok.pieces_scores_types()
    assert pieces[3] == "<tool>" and types[3] == 4  # user-defined, placed after the specials
    byte_pieces = [p for p, t in zip(pieces, types) if t == 6]
    assert byte_pieces == [f"<0x{b:02X}>" for b in range(256)]
    # Reloading the written file gives the same tokenizer.
    assert Tokenizer.from_file(out).to_proto_bytes() == tok.to_proto_bytes()


def test_train_splits_digits(trained: tuple[Tokenizer, Path]) -> None:
    tok, _ = trained
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert pieces == ["▁", "1", "2", "3", "4", "5"]
    pieces = [tok.id_to_piece(i) for i in tok.encode("code 2024-07")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "0", "2", "4", "0", "7"]


def test_train_byte_fallback(trained: tuple[Tokenizer, Path]) -> None:
    tok, _ = trained
    text = "The cat saw 🦙 and Ω."  # neither character is in the training corpus
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    pieces = [tok.id_to_piece(i) for i in ids]
    llama_bytes = [f"<0x{b:02X}>" for b in "🦙".encode("utf-8")]
    start = pieces.index(llama_bytes[0])
    assert pieces[start : start + 4] == llama_bytes
    assert tok.decode(ids) == text


def test_train_round_trip(trained: tuple[Tokenizer, Path]) -> None:
    tok, _ = trained
    for text in ["The old sailor counted 42 apples.", "  two leading spaces", "a\n\tb  c", "", "Zebra-Quux #9!"]:
        assert tok.decode(tok.encode(text)) == text


def test_train_validation(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    _write_corpus(corpus, n_lines=20)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([corpus, missing], 300, tmp_path / "t.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([corpus], 259, tmp_path / "t.model")
    with pytest.raises(ValueError, match="no training files"):
        train_tokenizer([], 300, tmp_path / "t.model")
    with pytest.raises(ValueError, match=r"\.model"):
        train_tokenizer([corpus], 300, tmp_path / "t.bin")
    assert not (tmp_path / "t.model").exists()
