"""SentencePiece tokenizer for Llama 2.

The Llama 2 paper (Touvron et al., 2023, §2.1) reuses the Llama 1 tokenizer:
a SentencePiece BPE model with a 32k vocabulary; "we split all numbers into
individual digits and use bytes to decompose unknown UTF-8 characters".
Meta's reference code (``llama/tokenizer.py``) is a thin wrapper around
``sentencepiece.SentencePieceProcessor`` and so is :class:`Tokenizer` here.

Besides Meta's ``tokenizer.model`` files, a tokenizer can be read from the
metadata of a GGUF file (llama.cpp's format), which stores the vocabulary as
parallel arrays of pieces, scores and token types.  Those arrays are enough to
rebuild an equivalent SentencePiece ``ModelProto``: SentencePiece's BPE encoder
only needs the pieces, their scores (merge priority) and their types, plus the
normalizer settings, which are fixed for Llama.
"""

from __future__ import annotations

import contextlib
import io
import operator
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

__all__ = ["Tokenizer", "train_tokenizer"]

PathLike = str | os.PathLike[str]

# GGUF token types (gguf.TokenType / llama.cpp's llama_token_type) use the same
# integer values as SentencePiece's ModelProto.SentencePiece.Type enum:
# 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_VALID_PIECE_TYPES = frozenset(sp_pb2.ModelProto.SentencePiece.Type.values())

# Number of byte-fallback pieces <0x00>..<0xFF> and of special pieces
# (<unk>, <s>, </s>) that every Llama-style vocabulary contains.
_NUM_BYTE_PIECES = 256
_NUM_SPECIAL_PIECES = 3


class Tokenizer:
    """A Llama 2 tokenizer: a SentencePiece BPE model plus Meta's BOS/EOS handling.

    Construct with :meth:`from_file` (``.model`` or ``.gguf``) or
    :meth:`from_proto_bytes`.  The serialized ``ModelProto`` is the single
    source of truth; :meth:`to_proto_bytes` / :meth:`save` write it back out.
    """

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>") -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(model_proto)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{source}: not a valid SentencePiece model: {err}") from err
        self._sp = sp
        self._source = source
        # Meta's tokenizer asserts the processor's size; the Llama code also
        # relies on BOS and EOS existing (every sequence starts with BOS).
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise ValueError(
                f"{source}: SentencePiece model has no BOS/EOS pieces "
                f"(bos_id={sp.bos_id()}, eos_id={sp.eos_id()})"
            )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_file(cls, path: PathLike) -> Tokenizer:
        """Load a SentencePiece ``.model`` file or the tokenizer inside a ``.gguf`` file."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".model", ".gguf"):
            raise ValueError(
                f"cannot load a tokenizer from {str(p)!r}: unknown extension "
                f"{p.suffix!r} (expected '.model' or '.gguf')"
            )
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {str(p)!r}")
        if suffix == ".model":
            return cls(p.read_bytes(), source=str(p))
        return cls(_proto_from_gguf(p).SerializeToString(), source=str(p))

    @classmethod
    def from_proto_bytes(cls, model_proto: bytes) -> Tokenizer:
        """Build from a serialized SentencePiece ``ModelProto`` (the content of a ``.model`` file)."""
        return cls(bytes(model_proto))

    def to_proto_bytes(self) -> bytes:
        """The serialized SentencePiece ``ModelProto``; byte-identical to a ``.model`` file."""
        return self._sp.serialized_model_proto()

    def save(self, path: PathLike) -> Path:
        """Write the model as a SentencePiece ``.model`` file (parent directories are created)."""
        p = Path(path)
        if p.suffix != ".model":
            raise ValueError(f"tokenizer must be saved with a '.model' extension, got {str(p)!r}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.to_proto_bytes())
        return p

    def pieces_scores_types(self) -> tuple[list[str], list[float], list[int]]:
        """The vocabulary as parallel lists, in id order, e.g. for writing GGUF metadata.

        The types are SentencePiece piece types, which share their integer
        values with GGUF token types (1 normal ... 6 byte).
        """
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(self.to_proto_bytes())
        pieces = [p.piece for p in proto.pieces]
        scores = [float(p.score) for p in proto.pieces]
        types = [int(p.type) for p in proto.pieces]
        return pieces, scores, types

    # ------------------------------------------------------------- properties

    vocab_size = property(lambda self: self._sp.get_piece_size())
    bos_id = property(lambda self: self._sp.bos_id())
    eos_id = property(lambda self: self._sp.eos_id())
    unk_id = property(lambda self: self._sp.unk_id())
    # -1 for Llama 2: the vocabulary has no padding piece (Meta pads with -1 and masks it)
    pad_id = property(lambda self: self._sp.pad_id())

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, unk_id={self.unk_id}, "
            f"pad_id={self.pad_id})"
        )

    # ------------------------------------------------------- encode / decode

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode ``text``; optionally prepend BOS / append EOS (as Meta's ``Tokenizer.encode``).

        Special pieces are never recognised inside ``text``: the string
        ``"<s>"`` encodes as ordinary characters, as in Meta's code.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        _check_unicode(text)
        ids: list[int] = self._sp.encode(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self,
        texts: Sequence[str],
        bos: bool = False,
        eos: bool = False,
        *,
        num_threads: int = -1,
    ) -> list[list[int]]:
        """Encode many texts; SentencePiece spreads a batch over ``num_threads`` threads (-1: all cores)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: item {i} is a {type(text).__name__}, not a str")
            _check_unicode(text, f"item {i}: ")
        if not texts:
            return []
        batch: list[list[int]] = self._sp.encode(texts, num_threads=num_threads)
        return [self._wrap(ids, bos, eos) for ids in batch]

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Decode token ids (a list, or a 1-D tensor / array) back to text.

        Control ids (BOS, EOS) decode to nothing, as in SentencePiece and hence
        Meta's ``Tokenizer.decode``.  Ids outside the vocabulary, including
        Meta's pad value -1, are rejected rather than silently dropped.
        """
        id_list = _as_id_list(ids)
        n = self.vocab_size
        if id_list and (min(id_list) < 0 or max(id_list) >= n):
            pos, bad = next((p, i) for p, i in enumerate(id_list) if not 0 <= i < n)
            raise ValueError(f"decode: id {bad} at position {pos} is outside the vocabulary [0, {n})")
        return self._sp.decode(id_list)

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece for ``token_id`` (e.g. ``'▁Hello'``, ``'<0x0A>'``)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """The id of ``piece``, or ``unk_id`` if the vocabulary does not contain it."""
        return self._sp.piece_to_id(piece)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids


def _check_unicode(text: str, where: str = "") -> None:
    """A str holding a lone surrogate (from a JSON "\\ud800", or bytes decoded with surrogateescape) is not valid
    Unicode and SentencePiece cannot take it: say so and where, rather than fail inside the C++ binding."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}the text is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                         f"{e.start} (near {text[max(0, e.start - 20):e.start]!r})") from None


def _as_id_list(ids: Sequence[int] | Any) -> list[int]:
    """Accept a list/tuple of ints or anything with ``tolist`` (torch tensor, numpy array)."""
    if hasattr(ids, "tolist"):
        ndim = getattr(ids, "ndim", 1)
        if ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got {ndim} dimensions")
        ids = ids.tolist()
    out: list[int] = []
    for i in ids:
        if isinstance(i, bool):
            raise TypeError("decode expects integer ids, got bool")
        try:
            out.append(operator.index(i))  # int, numpy integer, 0-d integer tensor
        except TypeError:
            raise TypeError(f"decode expects integer ids, got {type(i).__name__}") from None
    return out


# --------------------------------------------------------------------- GGUF


def _gguf_field(reader: Any, key: str, path: Path, *, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"{str(path)!r}: GGUF metadata has no field {key!r}")
        return None
    return field.contents()


def _proto_from_gguf(path: Path) -> sp_pb2.ModelProto:
    """Rebuild Llama's SentencePiece ``ModelProto`` from a GGUF file's tokenizer metadata.

    llama.cpp's converter stores the ``tokenizer.model`` pieces, scores and
    types verbatim (``tokenizer.ggml.model == "llama"`` means "SentencePiece
    BPE"), so the proto below encodes exactly like Meta's file; the normalizer
    and trainer settings are those of Meta's model (identity normalization,
    dummy prefix, no whitespace collapsing, byte fallback, split digits).
    """
    import gguf  # imported lazily: only needed for .gguf files

    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/struct errors on bad files
        raise ValueError(f"{str(path)!r}: cannot read GGUF file: {err}") from err

    model = _gguf_field(reader, "tokenizer.ggml.model", path)
    if model != "llama":
        raise ValueError(
            f"{str(path)!r}: field 'tokenizer.ggml.model' is {model!r}; only the "
            "SentencePiece ('llama') tokenizer of Llama 2 is supported"
        )
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens", path)
    scores = _gguf_field(reader, "tokenizer.ggml.scores", path)
    types = _gguf_field(reader, "tokenizer.ggml.token_type", path)
    if not (len(tokens) == len(scores) == len(types)):
        raise ValueError(
            f"{str(path)!r}: tokenizer.ggml.tokens/scores/token_type have different "
            f"lengths ({len(tokens)}, {len(scores)}, {len(types)})"
        )

    def special_id(key: str, default: int) -> int:
        value = _gguf_field(reader, key, path, required=False)
        tid = default if value is None else int(value)
        if not 0 <= tid < len(tokens):
            raise ValueError(f"{str(path)!r}: field {key!r} = {tid} is outside the vocabulary")
        return tid

    unk_id = special_id("tokenizer.ggml.unknown_token_id", 0)
    bos_id = special_id("tokenizer.ggml.bos_token_id", 1)
    eos_id = special_id("tokenizer.ggml.eos_token_id", 2)
    pad_value = _gguf_field(reader, "tokenizer.ggml.padding_token_id", path, required=False)

    proto = sp_pb2.ModelProto()
    for i, (piece, score, ttype) in enumerate(zip(tokens, scores, types)):
        ttype = int(ttype)
        if ttype not in _VALID_PIECE_TYPES:
            raise ValueError(
                f"{str(path)!r}: field 'tokenizer.ggml.token_type' has invalid type {ttype} for id {i}"
            )
        sp_piece = proto.pieces.add()
        sp_piece.piece = piece
        sp_piece.score = float(score)
        sp_piece.type = ttype

    add_space_prefix = _gguf_field(reader, "tokenizer.ggml.add_space_prefix", path, required=False)
    remove_ws = _gguf_field(reader, "tokenizer.ggml.remove_extra_whitespaces", path, required=False)
    _set_llama_specs(proto, tokens, types, (unk_id, bos_id, eos_id), pad_value, add_space_prefix, remove_ws)
    _check_special_ids(proto, (unk_id, bos_id, eos_id), path)
    return proto


def _set_llama_specs(proto: sp_pb2.ModelProto, tokens, types, special: tuple[int, int, int], pad_value,
                     add_space_prefix, remove_ws) -> None:
    """The trainer and normalizer settings of Meta's model on ``proto`` (BPE, byte fallback, split digits,
    identity normalisation, a dummy prefix), with the special ids (unk, bos, eos) the GGUF names."""
    unk_id, bos_id, eos_id = special
    # Pad: Llama 2 has none (-1).  Only honour a GGUF pad id that names a
    # distinct control piece, which is what SentencePiece requires of a pad.
    pad_id = -1
    if pad_value is not None:
        pid = int(pad_value)
        if 0 <= pid < len(tokens) and pid not in (unk_id, bos_id, eos_id) and int(types[pid]) == 3:
            pad_id = pid

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    # SentencePiece resolves bos_id()/eos_id() through the piece strings, so
    # they must name the pieces at the GGUF ids.
    trainer.unk_piece = tokens[unk_id]
    trainer.bos_piece = tokens[bos_id]
    trainer.eos_piece = tokens[eos_id]
    if pad_id >= 0:
        trainer.pad_piece = tokens[pad_id]

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True if add_space_prefix is None else bool(add_space_prefix)
    normalizer.remove_extra_whitespaces = False if remove_ws is None else bool(remove_ws)
    normalizer.escape_whitespaces = True


def _check_special_ids(proto: sp_pb2.ModelProto, special: tuple[int, int, int], path: Path) -> None:
    """SentencePiece must see the same special ids (unk, bos, eos) as the GGUF fields name."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(proto.SerializeToString())
    except RuntimeError as err:
        raise ValueError(f"{str(path)!r}: GGUF tokenizer is not a valid SentencePiece model: {err}") from err
    got = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if got != special:
        raise ValueError(
            f"{str(path)!r}: special ids (unk, bos, eos) = {special} from the GGUF "
            f"fields do not match the piece types (SentencePiece resolves {got})"
        )


# ----------------------------------------------------------------- training


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Silence SentencePiece's C++ training log, which writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _checked_training_inputs(files: Iterable[PathLike], vocab_size: int, out: PathLike,
                             user_defined_symbols: Sequence[str]) -> tuple[list[Path], Path, list[str]]:
    """train_tokenizer's inputs checked before SentencePiece sees them: (files, the .model path, the symbols)."""
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("train_tokenizer: no training files given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"train_tokenizer: training file not found: {str(p)!r}")
        if "," in str(p):
            # SentencePiece's `input` flag is a comma-separated list.
            raise ValueError(f"train_tokenizer: file names must not contain ',': {str(p)!r}")
    symbols = list(user_defined_symbols)
    minimum = _NUM_BYTE_PIECES + _NUM_SPECIAL_PIECES + len(symbols) + 1
    if vocab_size < minimum:
        raise ValueError(
            f"train_tokenizer: vocab_size={vocab_size} is too small; it must hold the "
            f"{_NUM_BYTE_PIECES} byte-fallback pieces, {_NUM_SPECIAL_PIECES} special pieces "
            f"and {len(symbols)} user-defined symbols, so at least {minimum}"
        )
    out_path = Path(out)
    if out_path.suffix != ".model":
        raise ValueError(f"train_tokenizer: output must be a '.model' path, got {str(out_path)!r}")
    return paths, out_path, symbols


def train_tokenizer(
    files: Iterable[PathLike],
    vocab_size: int,
    out: PathLike,
    *,
    input_sentence_size: int = 10_000_000,
    num_threads: int = 2,
    character_coverage: float = 0.99995,
    max_sentence_length: int = 16_384,
    user_defined_symbols: Sequence[str] = (),
    verbose: bool = False,
) -> Tokenizer:
    """Train a SentencePiece BPE tokenizer with Llama 2's settings and write it to ``out``.

    The settings follow the paper (§2.1: BPE, numbers split into single digits,
    byte fallback for unknown UTF-8) and the ``trainer_spec`` /
    ``normalizer_spec`` stored in Meta's ``tokenizer.model``: identity
    normalization, a dummy ``▁`` prefix, whitespace kept as-is
    (``remove_extra_whitespaces=False``), whitespace-only pieces allowed
    (code indentation), pieces of at most 16 characters, and ids
    unk=0, bos=1, eos=2, pad=-1.

    ``character_coverage`` defaults to Meta's 0.99995: the rarest 0.005% of
    characters get no piece of their own.  With byte fallback they are still
    encoded losslessly as ``<0x..>`` byte pieces, so leaving them out spends the
    vocabulary on frequent text instead of on thousands of rare CJK/emoji
    characters; 1.0 would force a piece for every character ever seen.

    ``input_sentence_size`` caps how many lines (sampled at random) the trainer
    loads; Meta used 200M.  ``max_sentence_length`` is in bytes: SentencePiece
    skips longer lines during training, so it is set well above Meta's 4192 to
    keep paragraph-per-line corpora usable.  ``out`` is the ``.model`` path
    (parent directories are created).  SentencePiece's training log goes to
    stderr only when ``verbose`` is true.
    """
    paths, out_path, symbols = _checked_training_inputs(files, vocab_size, out, user_defined_symbols)
    options: dict[str, Any] = dict(
        input=[str(p) for p in paths],
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        max_sentencepiece_length=16,
        num_threads=num_threads,
        # §2.1: "we split all numbers into individual digits and use bytes
        # to decompose unknown UTF-8 characters".
        split_digits=True,
        byte_fallback=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        treat_whitespace_as_suffix=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=symbols,
        hard_vocab_limit=True,
    )
    model = io.BytesIO()
    with contextlib.nullcontext() if verbose else _stderr_to_devnull():
        # model_writer: receive the proto in memory instead of having
        # SentencePiece write <prefix>.model and <prefix>.vocab files.
        spm.SentencePieceTrainer.train(model_writer=model, **options)
    tokenizer = Tokenizer(model.getvalue(), source=str(out_path))
    tokenizer.save(out_path)
    return tokenizer
