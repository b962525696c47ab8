"""This project's own checkpoint format: the model's state dict (Meta's tensor names) in safetensors, plus
``llama2.json`` holding the full ModelArgs, plus ``tokenizer.model`` when there is a tokenizer.

    ckpt/
      llama2.json          {"format": "llama2-native", "version": 1, "model_args": {...}}
      model.safetensors    (or model-0000i-of-0000N.safetensors + model.safetensors.index.json)
      tokenizer.model      (optional)

Unlike the other formats it describes every model this package can build, the scalar-head reward and value
models of §3.2.2 included, and it keeps every ModelArgs field (max_seq_len, multiple_of, ...) exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model import ModelArgs, Transformer
from ._common import PathLike, atomic_dir, build_model, check_tokenizer, read_safetensors, resolve_dtype, write_json, write_safetensors

FORMAT_NAME = "llama2-native"
VERSION = 1
CONFIG_FILE = "llama2.json"
TOKENIZER_FILE = "tokenizer.model"


def is_native(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def read_args(path: Path) -> ModelArgs:
    config_path = path / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"{config_path}: 'format' is {config.get('format')!r}, expected {FORMAT_NAME!r}")
    version = config.get("version")
    if version != VERSION:
        raise ValueError(f"{config_path}: format version {version!r} is not supported (this code reads version {VERSION})")
    if not isinstance(config.get("model_args"), dict):
        raise ValueError(f"{config_path}: no 'model_args' object")
    try:
        return ModelArgs(**config["model_args"])
    except TypeError as err:  # an unknown field, e.g. from a newer version of this package
        raise ValueError(f"{config_path}: bad model_args: {err}") from err


def load(path: PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer or None) from a native checkpoint directory."""
    from ..tokenizer import Tokenizer

    path = Path(path)
    args = read_args(path)
    sd, where, dtype_ = read_safetensors(path, dtype, device)
    model = build_model(args, sd, source=where, dtype=dtype_, device=device)
    tok_path = path / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    return model, tokenizer


def save(model: Transformer, path: PathLike, tokenizer=None, *, dtype: torch.dtype | str | None = None,
         max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to the directory ``path``.

    dtype: convert the weights on the way out (default: as they are). max_shard_bytes: split the
    safetensors into shards of at most this size, with an index (default: one file). overwrite: replace an
    existing checkpoint directory (see ``atomic_dir``)."""
    check_tokenizer(model, tokenizer)
    config = {"format": FORMAT_NAME, "version": VERSION, "model_args": model.args.to_dict()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(
            tmp, model.state_dict().items(), max_shard_bytes=max_shard_bytes, dtype=resolve_dtype(dtype)
        )
        write_json(tmp / CONFIG_FILE, config)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
    return Path(path)
