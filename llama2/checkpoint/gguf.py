"""GGUF, llama.cpp's single-file format, read and written with the ``gguf`` package (llama.cpp's gguf-py).

A GGUF file holds typed key/value metadata (the model's shape under ``llama.*`` keys, the tokenizer under
``tokenizer.ggml.*``) and named tensors. Tensor names follow llama.cpp's ``convert_hf_to_gguf.py``:

    token_embd, blk.N.attn_norm, blk.N.attn_q / attn_k / attn_v / attn_output, blk.N.ffn_norm,
    blk.N.ffn_gate (w1) / ffn_down (w2) / ffn_up (w3), output_norm, output      (each + ".weight")

llama.cpp's rotary pairs interleaved dimensions (2i, 2i+1) like Meta's (its HF converter undoes HF's q/k
permutation), so q and k are stored exactly as in Meta's checkpoints: no permutation here.

Shapes: GGUF records dimensions fastest-varying first (GGML's ne[0] is the row length), the reverse of
numpy/torch order; a (vocab, dim) embedding is ne = [dim, vocab]. gguf-py's reader already reverses them
for ``ReaderTensor.data``, and its writer reverses the numpy shape it is given.

Reading supports F32, F16, BF16 and every quantised type ``gguf.quants.dequantize`` implements (Q8_0,
Q4_K, ...; dequantised to float32). Writing supports "f32" and "f16"; as llama.cpp does, 1-D tensors (the
RMSNorm weights) stay float32 in an f16 file.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model import ModelArgs, Transformer
from ._common import (
    PathLike, TensorNames, atomic_dir, build_model, ffn_args_for_hidden, is_gguf_file, require_lm_head, target_dtype,
)

ARCH = "llama"
DIR_FILE = "model.gguf"  # the file name used when saving into a directory

NAMES = TensorNames(
    {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight", "output.weight": "output.weight"},
    {"attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
     "attn_output.weight": "attention.wo.weight", "ffn_gate.weight": "feed_forward.w1.weight",
     "ffn_down.weight": "feed_forward.w2.weight", "ffn_up.weight": "feed_forward.w3.weight",
     "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight"},
    "blk.",
)
gguf_to_meta_name = NAMES.to_ours  # our name for a GGUF tensor name, or None when there is no counterpart
meta_to_gguf_name = NAMES.to_theirs


def gguf_file(path: Path) -> Path | None:
    """The .gguf file a path designates: itself, or the single .gguf inside a directory."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{path}: holds several .gguf files ({', '.join(p.name for p in found)}); pass one of them")
    return None


# ----------------------------------------------------------------------------------------- reading


def _field(reader: Any, key: str, where: str, default: Any = ..., scalar: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{where}: GGUF metadata has no {key!r}")
        return default
    value = field.contents()
    if scalar and isinstance(value, list):
        raise ValueError(f"{where}: {key!r} is a per-layer array; only uniform models are supported")
    return value


def _f32_to_float(x: float) -> float:
    """GGUF stores floats as float32; 1e-5 comes back as 9.99999974e-06. The shortest decimal that rounds to
    the same float32 ("1e-05") recovers the value that was written."""
    return float(str(np.float32(x)))


def args_from_gguf(reader: Any, where: str, vocab_rows: int | None) -> ModelArgs:
    arch = _field(reader, "general.architecture", where)
    if arch != ARCH:
        raise ValueError(f"{where}: general.architecture is {arch!r}; only 'llama' models are supported")
    if int(_field(reader, f"{ARCH}.expert_count", where, 0)) > 0:
        raise ValueError(f"{where}: a mixture-of-experts model ({ARCH}.expert_count > 0) is not a Llama 2 model")
    scaling = _field(reader, f"{ARCH}.rope.scaling.type", where, None)
    if scaling not in (None, "none"):
        raise ValueError(f"{where}: {ARCH}.rope.scaling.type is {scaling!r}; only plain RoPE is supported")
    dim = int(_field(reader, f"{ARCH}.embedding_length", where))
    n_heads = int(_field(reader, f"{ARCH}.attention.head_count", where))
    rope_dims = _field(reader, f"{ARCH}.rope.dimension_count", where, None)
    if rope_dims is not None and int(rope_dims) * n_heads != dim:
        raise ValueError(f"{where}: {ARCH}.rope.dimension_count {rope_dims} is not the head size {dim // n_heads}")
    vocab = _field(reader, f"{ARCH}.vocab_size", where, None)
    if vocab is None:
        vocab = vocab_rows if vocab_rows is not None else len(_field(reader, "tokenizer.ggml.tokens", where, [], scalar=False))
    multiple_of, ffn_mult = ffn_args_for_hidden(dim, int(_field(reader, f"{ARCH}.feed_forward_length", where)))
    return ModelArgs(
        dim=dim,
        n_layers=int(_field(reader, f"{ARCH}.block_count", where)),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{ARCH}.attention.head_count_kv", where, n_heads)),
        vocab_size=int(vocab),
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_mult,
        norm_eps=_f32_to_float(_field(reader, f"{ARCH}.attention.layer_norm_rms_epsilon", where, 1e-5)),
        rope_theta=_f32_to_float(_field(reader, f"{ARCH}.rope.freq_base", where, 10000.0)),
        max_seq_len=int(_field(reader, f"{ARCH}.context_length", where, 4096)),
    )


def _natural_dtype(tensor_type: Any) -> torch.dtype | None:
    """The torch dtype a GGUF tensor type holds without conversion; None for quantised types."""
    from gguf import GGMLQuantizationType as Q

    return {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(tensor_type)


def _decode(t: Any, raw: np.ndarray, where: str) -> torch.Tensor:
    """A torch tensor in numpy/torch dimension order from the raw array of a ReaderTensor (``t.data`` or a
    copy of it read from the file); F32/F16/BF16 without a copy."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(reversed([int(d) for d in t.shape]))
    if t.tensor_type in (Q.F32, Q.F16):
        out = torch.from_numpy(raw)
    elif t.tensor_type == Q.BF16:
        # the reader returns BF16 as raw bytes; reinterpret them (numpy has no bfloat16)
        out = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    else:
        try:
            out = torch.from_numpy(dequantize(raw, t.tensor_type))
        except NotImplementedError as err:
            raise ValueError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantise") from err
    if tuple(out.shape) != shape:
        out = out.reshape(shape)
    return out


def read_tensors(reader: Any, file: Path, dtype: torch.dtype | str | None, device: torch.device | str):
    """All tensors under our names, in ``target_dtype(dtype, device, <token_embd's type>)`` on ``device``.

    Tensors already in that dtype are views of the reader's memory map (no copy) when loading to the CPU;
    the others are read from the file into a private buffer and converted one at a time, so the map's
    pages never become resident for them (see ``_common._read_converted`` for why)."""
    device = torch.device(device)
    where = str(file)
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    stored = (_natural_dtype(emb.tensor_type) if emb is not None else None) or torch.float32
    dtype_ = target_dtype(dtype, device, stored)
    sd: dict[str, torch.Tensor] = {}
    with open(file, "rb") as f:
        for t in reader.tensors:
            name = gguf_to_meta_name(t.name) or t.name
            if device.type == "cpu" and _natural_dtype(t.tensor_type) == dtype_:
                sd[name] = _decode(t, t.data, where)
                continue
            f.seek(t.data_offset)
            raw = np.fromfile(f, dtype=t.data.dtype, count=t.data.size)
            if raw.size != t.data.size:
                raise ValueError(f"{where}: file ends inside tensor {t.name}")
            sd[name] = _decode(t, raw.reshape(t.data.shape), where).to(device=device, dtype=dtype_)
    return sd, dtype_


def load(path: PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer or None) from a .gguf file (or a directory holding exactly one)."""
    import gguf

    from ..tokenizer import Tokenizer

    path = Path(path)
    file = gguf_file(path)
    if file is None:
        raise FileNotFoundError(f"{path}: not a .gguf file or a directory with one")
    where = str(file)
    try:
        # mode "c": a private, writable map, so torch can wrap the arrays without copying or warning
        reader = gguf.GGUFReader(file, mode="c")
    except Exception as err:
        raise ValueError(f"{where}: cannot read GGUF file: {err}") from err
    if not reader.tensors:
        raise ValueError(f"{where}: holds no tensors (a vocabulary-only GGUF?)")
    sd, dtype_ = read_tensors(reader, file, dtype, device)
    emb = sd.get("tok_embeddings.weight")
    args = args_from_gguf(reader, where, emb.shape[0] if emb is not None else None)
    if "output.weight" not in sd and emb is not None:
        # llama.cpp accepts files without "output" (tied embeddings); our output layer is its own matrix
        sd["output.weight"] = emb.clone()
    model = build_model(args, sd, source=where, dtype=dtype_, device=device, display=meta_to_gguf_name)
    tokenizer = None
    tok_model = _field(reader, "tokenizer.ggml.model", where, None)
    if tok_model == "llama":  # SentencePiece, Llama 2's tokenizer
        tokenizer = Tokenizer.from_file(file)
    elif tok_model is not None:
        warnings.warn(f"{where}: tokenizer type {tok_model!r} is not SentencePiece; loaded the weights without it")
    return model, tokenizer


# ----------------------------------------------------------------------------------------- writing

_WRITE_TYPES = {"f32": np.float32, "f16": np.float16}


def _write_type(dtype: Any) -> str:
    key = {torch.float32: "f32", torch.float16: "f16"}.get(dtype, dtype)
    if isinstance(key, str):
        key = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16"}.get(key.lower(), key.lower())
    if key not in _WRITE_TYPES:
        raise ValueError(f"GGUF write dtype must be 'f32' or 'f16', got {dtype!r}")
    return key


def add_model_keys(w, args: ModelArgs) -> None:
    """The llama.* metadata that describes the model's shape (what llama.cpp's converter writes for Llama 2)."""
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)


def _write_file(model: Transformer, file: Path, tokenizer, kind: str, name: str) -> None:
    import gguf

    args = model.args
    w = gguf.GGUFWriter(file, ARCH)
    w.add_name(name)
    add_model_keys(w, args)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        pieces, scores, types = tokenizer.pieces_scores_types()
        w.add_tokenizer_model("llama")  # SentencePiece BPE, as llama.cpp's converter writes for Llama 2
        w.add_tokenizer_pre("default")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_unk_token_id(tokenizer.unk_id)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)

    def np_type(t: torch.Tensor) -> type:
        return np.float32 if t.dim() == 1 else _WRITE_TYPES[kind]

    tensors = [(meta_to_gguf_name(n), t.detach()) for n, t in model.state_dict().items()]
    for gname, t in tensors:
        itemsize = np.dtype(np_type(t)).itemsize
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np_type(t)), t.numel() * itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t in tensors:  # streamed: one converted tensor in memory at a time
        arr = t.to(device="cpu", dtype=torch.float32).contiguous().numpy().astype(np_type(t), copy=False)
        w.write_tensor_data(arr)
    w.close()


def save(
    model: Transformer,
    path: PathLike,
    tokenizer=None,
    *,
    dtype: str | torch.dtype = "f32",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``, which llama.cpp needs to run it) as GGUF.

    path: a file ending in .gguf, or else a directory that will hold ``model.gguf``. dtype: "f32" or "f16".
    name: general.name (default: the file or directory name). The file is written under a temporary name
    and renamed into place; an existing one is replaced only with ``overwrite=True``."""
    require_lm_head(model, "GGUF")
    kind = _write_type(dtype)
    if tokenizer is not None and tokenizer.vocab_size != model.args.vocab_size:
        # llama.cpp requires one vocabulary entry per embedding row
        raise ValueError(
            f"GGUF needs the tokenizer's size ({tokenizer.vocab_size}) to equal the model's vocab_size ({model.args.vocab_size})"
        )
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        with atomic_dir(path, overwrite=overwrite) as tmp:
            _write_file(model, tmp / DIR_FILE, tokenizer, kind, name or path.name)
        return path
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not (path.is_file() and is_gguf_file(path)):
        raise FileExistsError(f"{path} exists and is not a GGUF file; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        _write_file(model, Path(tmp_name), tokenizer, kind, name or path.stem)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)  # atomic; a model mapped from the old file keeps its (unlinked) inode
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
