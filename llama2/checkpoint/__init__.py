"""Checkpoints: load and save a Transformer (with its tokenizer) in four formats.

* ``"native"``: this package's format (safetensors + ``llama2.json``); describes every model we build,
  scalar-head reward/value models included. See ``native.py``.
* ``"meta"``: Meta's release format (``params.json`` + ``consolidated.NN.pth`` model-parallel shards).
* ``"hf"``: Hugging Face transformers' ``LlamaForCausalLM`` directory (safetensors only).
* ``"gguf"``: llama.cpp's single-file format.

>>> model, tokenizer = load("llama-2-7b")                  # format detected from the files
>>> save(model, "out/7b-hf", format="hf", tokenizer=tokenizer)

Loading builds the model on the meta device and assigns the file's (memory-mapped) tensors to it, so peak
memory stays near one copy of the weights; see ``_common.py``. Saving writes into a temporary directory
that is renamed into place; an existing checkpoint is replaced only with ``overwrite=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import gguf as _gguf
from . import hf as _hf
from . import meta as _meta
from . import native as _native
from ._common import PathLike, fsync_dir, fsync_file

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Transformer
    from ..tokenizer import Tokenizer

__all__ = ["FORMATS", "detect", "load", "save", "fsync_file", "fsync_dir"]

FORMATS: tuple[str, ...] = ("native", "meta", "hf", "gguf")
_MODULES = {"native": _native, "meta": _meta, "hf": _hf, "gguf": _gguf}
_ALIASES = {"huggingface": "hf", "transformers": "hf", "llama.cpp": "gguf", "llamacpp": "gguf"}

_LOOKED_FOR = (
    "llama2.json (native), params.json + consolidated.NN.pth (Meta), "
    "config.json + model.safetensors (Hugging Face), a single *.gguf file (GGUF)"
)


def _format_name(fmt: str) -> str:
    key = _ALIASES.get(fmt.lower(), fmt.lower())
    if key not in _MODULES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return key


def detect(path: PathLike) -> str:
    """Which format the checkpoint at ``path`` is in: "native", "meta", "hf" or "gguf".

    A directory is recognised by its marker file, checked in this order: llama2.json, params.json,
    config.json, a single .gguf file; a file by its .gguf extension."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}: the path does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise ValueError(f"{p} is a file but not a .gguf file; other formats are directories. Looked for: {_LOOKED_FOR}")
    if _native.is_native(p):
        return "native"
    if _meta.is_meta(p):
        return "meta"
    if _hf.is_hf(p):
        return "hf"
    if _gguf.gguf_file(p) is not None:
        return "gguf"
    entries = sorted(e.name for e in p.iterdir())
    shown = ", ".join(entries[:10]) + (f", ... ({len(entries)} entries)" if len(entries) > 10 else "")
    raise ValueError(f"no checkpoint found in {p} (contents: {shown or 'empty'}). Looked for: {_LOOKED_FOR}")


def load(
    path: PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> "tuple[Transformer, Tokenizer | None]":
    """Load a checkpoint in any supported format: ``(model, tokenizer or None)``.

    dtype: torch dtype or "float32"/"bfloat16"/"float16"; None means float32 on the CPU (which has no fast
    bf16/fp16 matmuls) and the checkpoint's stored dtype on other devices. The model's train/eval mode is
    left to the caller (``Llama.from_pretrained`` calls ``eval()``). On the CPU, weights already in the
    requested dtype stay memory-mapped from the checkpoint files (see ``_common.py``)."""
    fmt = detect(path)
    model, tokenizer = _MODULES[fmt].load(path, dtype=dtype, device=device)
    check_finite(model, path)
    return model, tokenizer


def check_finite(model: "Transformer", where: PathLike = "model") -> None:
    """Refuse weights holding NaN or inf (a checkpoint saved from a diverged run, or corrupt bytes that decode as
    NaN): such a model can only produce garbage, and says nothing about why. One pass over the weights."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"{where}: {len(bad)} tensor(s) hold NaN or inf values ({shown}); the checkpoint is corrupt "
                         "or was saved from a diverged run")


def save(
    model: "Transformer",
    path: PathLike,
    format: str = "native",
    tokenizer: "Tokenizer | None" = None,
    **kwargs,
) -> Path:
    """Save ``model`` (and ``tokenizer``) in ``format``; returns the path written.

    Format-specific keyword arguments: ``overwrite`` (all), ``dtype`` (all; "f32"/"f16" for GGUF),
    ``max_shard_bytes`` (native, hf), ``shards`` (meta), ``name`` (gguf)."""
    fmt = _format_name(format)
    return _MODULES[fmt].save(model, path, tokenizer, **kwargs)
