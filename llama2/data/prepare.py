"""Tokenize text corpora once into flat shards of token ids for pretraining.

Inputs are files, directories (recursed) or glob patterns:

* ``.jsonl`` files: one JSON object per line, the document is the string in ``text_field`` (blank lines are
  skipped);
* any other file is plain UTF-8 text in which documents are separated by one or more blank lines (lines holding
  only whitespace). A document is its lines joined by ``"\\n"`` (line ends ``\\n`` / ``\\r\\n`` dropped, so a
  document never ends in a newline); a UTF-8 byte-order mark at the start of a file is dropped. One document
  per paragraph is the common layout of plain-text corpora; put a whole book in one document by giving it as a
  ``.jsonl`` record instead.

Documents that are empty or only whitespace are skipped (and counted). Every other document becomes
``[BOS] + encode(text) + [EOS]`` (the paper trains on documents packed into sequences; the BOS/EOS pair marks
where one ends and the next begins). Each document goes to the validation split when a keyed BLAKE2b hash of its
UTF-8 content (the key is ``seed``) falls below ``val_fraction``: the split is deterministic, independent of the
order and number of the other documents, and puts identical documents on the same side, so duplicates cannot
leak from train into val.

Output, in ``out``::

    train_00000.bin, train_00001.bin, ...   raw little-endian uint16 token ids (uint32 if the vocabulary
    val_00000.bin, ...                      has more than 65536 pieces); read with numpy.memmap
    manifest.json                           what was written and from what

The tokens of a split are one stream cut into shards of **exactly** ``shard_tokens`` tokens (the last shard of a
split holds the remainder): shards split at token granularity, so a document may continue in the next shard and
a training reader can treat a split as one long array (:class:`TokenDataset`). A split with no tokens has no
shards.

Writing is atomic and incremental: a run first removes ``manifest.json`` (and stale shards), writes each shard to
``NAME.tmp`` then renames it, and writes ``manifest.json`` last (also through a rename). A directory is complete
only if its manifest exists and matches the inputs (paths, sizes and SHA-256 of every source), the tokenizer
(SHA-256 of its SentencePiece proto), the settings, and the shard files on disk; then a rerun does nothing and
prints "up to date" (unless ``force``).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PrepareConfig", "prepare", "resolve_inputs", "load_manifest", "load_shards", "TokenDataset"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_BAD_EXAMPLES = 10
_BATCH_CHARS = 1 << 20  # characters of text handed to SentencePiece at once
_BATCH_DOCS = 4096
_SHARD_RE = re.compile(r"^(train|val)_\d{5,}\.bin(\.tmp)?$")
_SPLITS = ("train", "val")


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    """Text sources: files, directories (recursed, hidden entries skipped) or glob patterns (** allowed).
    .jsonl files hold one JSON object per line; any other file is plain text, documents separated by blank lines."""
    out: str = ""
    """Output directory for the shards and manifest.json."""
    tokenizer: str = ""
    """SentencePiece tokenizer: a .model file or a .gguf file whose metadata holds one."""
    text_field: str = "text"
    """Field of each .jsonl record that holds the document text."""
    val_fraction: float = 0.005
    """Fraction of documents (chosen by a seeded hash of their content) that go to the validation split."""
    shard_tokens: int = 2**24
    """Tokens per shard file; every shard but the last of a split holds exactly this many."""
    workers: int = 2
    """Threads SentencePiece encodes with."""
    force: bool = False
    """Rebuild even when the output is up to date with the inputs."""
    skip_bad: bool = False
    """Skip unreadable files, undecodable lines and bad .jsonl records (counted in the manifest) instead of failing."""
    seed: int = 0
    """Key of the hash that assigns documents to train/val; another seed gives another split."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            self.inputs = [os.fspath(self.inputs)]
        else:
            self.inputs = [os.fspath(p) for p in self.inputs]
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not self.text_field:
            raise ValueError("text_field must not be empty")


# ------------------------------------------------------------------------------------------------ inputs


def _expand(p: Path) -> list[Path]:
    if p.is_dir():
        found = [
            f for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        ]
        return sorted(found, key=lambda f: f.as_posix())
    return [p]


def resolve_inputs(inputs: list[str], exclude: str | os.PathLike[str] | None = None) -> list[Path]:
    """The files named by ``inputs``, in the order given (directories and globs expanded in sorted order),
    without duplicates and without anything under ``exclude`` (the output directory)."""
    excl = Path(exclude).resolve() if exclude is not None else None
    files: list[Path] = []
    seen: set[Path] = set()
    for spec in inputs:
        spec = os.path.expanduser(str(spec))
        p = Path(spec)
        if not p.exists() and any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match input pattern {spec!r}")
            candidates = [f for m in matches for f in _expand(Path(m))]
        elif not p.exists():
            raise FileNotFoundError(f"input not found: {spec!r}")
        else:
            candidates = _expand(p)
        for f in candidates:
            key = f.resolve()
            if key in seen or (excl is not None and key.is_relative_to(excl)):
                continue
            seen.add(key)
            files.append(f)
    if not files:
        raise FileNotFoundError(f"no input files found in {list(inputs)}")
    return files


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# ------------------------------------------------------------------------------------------------ reading

OnBad = Callable[[Path, "int | None", str], None]


def _lines(path: Path, hasher: Any, on_bad: OnBad) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each line of a file, hashed as read; None for a line that is not UTF-8 (after
    ``on_bad``, which raises unless skipping). A byte-order mark on the first line is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            hasher.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_bad(path, lineno, f"invalid UTF-8 (byte {e.start} of the line)")
                yield lineno, None
                continue
            yield lineno, (line[1:] if lineno == 1 and line.startswith("\ufeff") else line)


def _read_text(path: Path, hasher: Any, on_bad: OnBad) -> Iterator[str]:
    """Documents of a plain-text file: runs of non-blank lines. A document with an undecodable line is dropped."""
    lines: list[str] = []
    bad = False
    for _, line in _lines(path, hasher, on_bad):
        if line is None:
            bad = True
            continue
        line = line.rstrip("\r\n")
        if line.strip():
            lines.append(line)
        elif lines or bad:
            if not bad:
                yield "\n".join(lines)
            lines, bad = [], False
    if lines and not bad:
        yield "\n".join(lines)


def _read_jsonl(path: Path, hasher: Any, on_bad: OnBad, text_field: str) -> Iterator[str]:
    for lineno, line in _lines(path, hasher, on_bad):
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            on_bad(path, lineno, f"not valid JSON: {e.msg} (column {e.colno})")
            continue
        except RecursionError:
            on_bad(path, lineno, "JSON nested too deeply")
            continue
        if not isinstance(obj, dict):
            on_bad(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            continue
        if text_field not in obj:
            on_bad(path, lineno, f"record has no field {text_field!r}")
            continue
        text = obj[text_field]
        if not isinstance(text, str):
            on_bad(path, lineno, f"field {text_field!r} is not a string (got {type(text).__name__})")
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            on_bad(path, lineno, f"field {text_field!r} holds an unpaired surrogate (invalid Unicode)")
            continue
        yield text


def _is_val(text: str, key: bytes, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(h, "little") / 2.0**64 < fraction


# ------------------------------------------------------------------------------------------------ writing


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ShardWriter:
    """Buffers one split's token stream and writes it in shards of exactly ``shard_tokens`` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.split, self.shard_tokens, self.dtype = out, split, shard_tokens, dtype
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray, documents: int) -> None:
        if len(ids):
            self.buf.append(ids)
            self.buffered += len(ids)
            self.tokens += len(ids)
        self.documents += documents
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        arr = self.buf[0] if len(self.buf) == 1 else np.concatenate(self.buf)
        chunk, rest = arr[:n], arr[n:]
        self.buf = [rest] if len(rest) else []
        self.buffered = len(rest)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        _write_atomic(self.out / name, lambda f: f.write(chunk.astype(self.dtype, copy=False).tobytes()))
        self.shards.append({"file": name, "tokens": int(n)})

    def summary(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def _token_dtype(vocab_size: int) -> np.dtype:
    # ids are < vocab_size, so uint16 holds every id of a vocabulary of up to 65536 pieces
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _remove_outputs(out: Path) -> None:
    """Make ``out`` incomplete first (manifest gone), then remove the shards of any earlier run."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    for f in out.iterdir():
        if _SHARD_RE.match(f.name) and f.is_file():
            f.unlink()


# ------------------------------------------------------------------------------------------------ manifest


def load_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared directory; FileNotFoundError if there is none (not prepared, or incomplete)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{str(out)!r} has no {MANIFEST}: not prepared, or preparation did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a version-{FORMAT_VERSION} manifest")
    return manifest


def _shards_intact(out: Path, manifest: dict[str, Any]) -> bool:
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in _SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            p = out / shard["file"]
            if not p.is_file() or p.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


def _up_to_date(out: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = load_manifest(out)
        if any(manifest.get(k) != v for k, v in expected.items()):
            return None
        if any(f.name.endswith(".tmp") for f in out.iterdir()):
            return None  # an interrupted write
        return manifest if _shards_intact(out, manifest) else None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------ prepare


class _BadInput:
    """What ``prepare`` does with a bad file or record: raise, naming the file and line, or (skip_bad) count it
    and keep the first few as examples for the manifest."""

    def __init__(self, skip: bool) -> None:
        self.skip, self.count, self.examples = skip, 0, []

    def __call__(self, path: Path, line: int | None, msg: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        if not self.skip:
            raise ValueError(f"{where}: {msg} (skip_bad=true skips bad input)")
        self.count += 1
        if len(self.examples) < MAX_BAD_EXAMPLES:
            self.examples.append({"path": str(path), "line": line, "error": msg})


def _expected_manifest(cfg: PrepareConfig, tok, dtype: np.dtype, files: list[Path],
                       on_bad: _BadInput) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """The manifest's fields that say what the shards are made of (inputs by size and SHA-256, tokenizer,
    settings), and the readable inputs with their digests."""
    sources: list[dict[str, Any]] = []
    readable: list[tuple[Path, str]] = []
    for f in files:
        try:
            size, digest = _file_digest(f)
        except OSError as e:
            on_bad(f, None, f"cannot read: {e.strerror or e}")
            sources.append({"path": str(f), "bytes": None, "sha256": None})
            continue
        sources.append({"path": str(f), "bytes": size, "sha256": digest})
        readable.append((f, digest))
    settings = {
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "seed": cfg.seed,
        "skip_bad": cfg.skip_bad,
    }
    expected = {
        "version": FORMAT_VERSION,
        "tokenizer": {"path": str(cfg.tokenizer), "sha256": hashlib.sha256(tok.to_proto_bytes()).hexdigest()},
        "dtype": dtype.str,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "settings": settings,
        "sources": sources,
    }
    return expected, readable


def _write_shards(cfg: PrepareConfig, tok, dtype: np.dtype, out: Path, readable: list[tuple[Path, str]],
                  on_bad: _BadInput, quiet: bool) -> tuple[dict[str, "_ShardWriter"], int]:
    """Tokenize the inputs in batches into train/val shard writers (closed on return); returns them and the
    number of empty documents skipped. A file that changes while it is read is an error."""
    from tqdm import tqdm

    writers = {s: _ShardWriter(out, s, cfg.shard_tokens, dtype) for s in _SPLITS}
    key = cfg.seed.to_bytes(16, "little", signed=True)
    empty = 0
    bar = tqdm(desc=f"prepare {out.name}", unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               disable=quiet or not sys.stderr.isatty())
    batch: list[str] = []
    batch_val: list[bool] = []
    batch_chars = 0

    def flush() -> None:
        nonlocal batch, batch_val, batch_chars
        if not batch:
            return
        encoded = tok.encode_batch(batch, bos=True, eos=True, num_threads=cfg.workers)
        for split, want in (("train", False), ("val", True)):
            seqs = [ids for ids, v in zip(encoded, batch_val) if v == want]
            if seqs:
                n = sum(len(s) for s in seqs)
                writers[split].add(np.fromiter(itertools.chain.from_iterable(seqs), dtype=dtype, count=n), len(seqs))
        bar.update(sum(len(s) for s in encoded))
        batch, batch_val, batch_chars = [], [], 0

    try:
        for path, digest in readable:
            hasher = hashlib.sha256()
            if path.suffix.lower() == ".jsonl":
                docs = _read_jsonl(path, hasher, on_bad, cfg.text_field)
            else:
                docs = _read_text(path, hasher, on_bad)
            try:
                for text in docs:
                    if not text.strip():
                        empty += 1
                        continue
                    batch.append(text)
                    batch_val.append(_is_val(text, key, cfg.val_fraction))
                    batch_chars += len(text)
                    if batch_chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                        flush()
            except OSError as e:
                raise ValueError(f"{path}: read failed: {e.strerror or e}") from e
            if hasher.hexdigest() != digest:
                raise ValueError(f"{path}: changed while being prepared; run again")
        flush()
        for w in writers.values():
            w.close()
    finally:
        bar.close()
    return writers, empty


def prepare(cfg: PrepareConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Tokenize ``cfg.inputs`` into shards in ``cfg.out`` (see the module docstring) and return the manifest.

    Raises FileNotFoundError for a missing input (or none at all) and ValueError for bad input, naming the file
    and line, unless ``cfg.skip_bad``. Prints a tokens/s progress bar to stderr when it is a terminal, and
    "up to date" when nothing needs doing; ``quiet`` silences both.
    """
    from ..tokenizer import Tokenizer

    if not cfg.inputs:
        raise ValueError("no inputs given")
    if not cfg.out:
        raise ValueError("no output directory given (out=...)")
    if not cfg.tokenizer:
        raise ValueError("no tokenizer given (tokenizer=PATH.model or .gguf)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")

    tok = Tokenizer.from_file(cfg.tokenizer)
    dtype = _token_dtype(tok.vocab_size)
    on_bad = _BadInput(cfg.skip_bad)
    expected, readable = _expected_manifest(cfg, tok, dtype, resolve_inputs(cfg.inputs, exclude=out), on_bad)
    if not cfg.force and out.is_dir():
        cmp = {k: v for k, v in expected.items() if k != "tokenizer"}
        manifest = _up_to_date(out, cmp)
        if manifest is not None and manifest.get("tokenizer", {}).get("sha256") == expected["tokenizer"]["sha256"]:
            if not quiet:
                print(f"{out}: up to date ({manifest['splits']['train']['tokens']:,} train / "
                      f"{manifest['splits']['val']['tokens']:,} val tokens); force=true rebuilds")
            return manifest

    out.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out)
    t0 = time.perf_counter()
    writers, empty = _write_shards(cfg, tok, dtype, out, readable, on_bad, quiet)
    manifest = dict(expected)
    manifest["splits"] = {s: w.summary() for s, w in writers.items()}
    manifest["empty_documents"] = empty
    manifest["bad"] = {"count": on_bad.count, "examples": on_bad.examples}
    _write_atomic(out / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8")))
    if not quiet:
        dt = time.perf_counter() - t0
        total = sum(w.tokens for w in writers.values())
        print(f"{out}: {total:,} tokens in {dt:.1f}s ({total / max(dt, 1e-9):,.0f} tok/s)", file=sys.stderr)
    return manifest


# ------------------------------------------------------------------------------------------------ reading back


def load_shards(out: str | os.PathLike[str], split: str = "train") -> list[np.memmap]:
    """The shards of ``split`` ("train" or "val") as read-only memory maps, in order (empty if it has none)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    out = Path(out)
    manifest = load_manifest(out)
    dtype = np.dtype(manifest["dtype"])
    maps = []
    for shard in manifest["splits"][split]["shards"]:
        p = out / shard["file"]
        if not p.is_file() or p.stat().st_size != shard["tokens"] * dtype.itemsize:
            raise ValueError(f"{p}: missing or not {shard['tokens']} tokens as the manifest says; prepare again")
        maps.append(np.memmap(p, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return maps


class TokenDataset:
    """One split of a prepared directory as a single flat token stream spread over memory-mapped shards."""

    def __init__(self, out: str | os.PathLike[str], split: str = "train") -> None:
        self.shards = load_shards(out, split)
        self.manifest = load_manifest(out)
        self.split = split
        sizes = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.num_tokens = int(self.offsets[-1])
        self.documents = int(self.manifest["splits"][split]["documents"])

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``start .. start+n`` of the stream (a copy, int64), crossing shard boundaries as needed."""
        if start < 0 or n < 0 or start + n > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + n}) outside the {self.split} split of {self.num_tokens}")
        parts = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos, left = start, n
        while left > 0:
            lo = pos - int(self.offsets[i])
            take = min(left, len(self.shards[i]) - lo)
            parts.append(np.asarray(self.shards[i][lo:lo + take]))
            pos, left, i = pos + take, left - take, i + 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
