"""Hugging Face ``transformers`` Llama format (``LlamaForCausalLM.save_pretrained`` with safetensors).

    config.json                      model_type "llama", hidden_size, intermediate_size, ...
    model.safetensors                or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    tokenizer.model                  SentencePiece model (+ tokenizer_config.json, special_tokens_map.json)

Names map one to one onto Meta's (see ``HF_TO_META``). One layout differs: HF's converter
(transformers/models/llama/convert_llama_weights_to_hf.py, ``permute``) reorders the rows of wq and wk
within each head so that HF's ``rotate_half`` rotary, which pairs dimension i with i + head_dim/2, computes
what Meta's rotary computes on interleaved pairs (2i, 2i+1):

    hf = meta.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(heads * head_dim, dim)

with heads = n_heads for q_proj and n_kv_heads for k_proj. Loading applies the inverse, saving the permutation.

``pytorch_model.bin`` checkpoints are pickles; they are refused rather than unpickled: convert them to
safetensors first.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model import ModelArgs, Transformer
from ._common import (
    PathLike, TensorNames, atomic_dir, build_model, check_tokenizer, dtype_name, ffn_args_for_hidden,
    read_safetensors, require_lm_head, resolve_dtype, write_json, write_safetensors,
)

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' long-standing default max_shard_size, "5GB"

NAMES = TensorNames(
    {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
     "lm_head.weight": "output.weight"},
    {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
     "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
     "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
     "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
     "post_attention_layernorm.weight": "ffn_norm.weight"},
    "model.layers.",
)
hf_to_meta_name = NAMES.to_ours  # our name for an HF tensor name, or None when there is no counterpart
meta_to_hf_name = NAMES.to_theirs


def permute_for_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved rotary row order -> HF's half-split order (HF's converter's ``permute``)."""
    out, inp = w.shape
    return w.view(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``permute_for_hf``."""
    out, inp = w.shape
    return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def is_hf(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def args_from_config(config: dict, where: str) -> ModelArgs:
    """ModelArgs from a config.json, refusing what our model cannot represent."""
    if config.get("model_type") != "llama":
        raise ValueError(f"{where}: model_type is {config.get('model_type')!r}; only 'llama' checkpoints are supported")
    problems = []
    if config.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings is true (Llama 2 has a separate output matrix)")
    if config.get("attention_bias", False):
        problems.append("attention_bias is true (Llama 2's projections have no biases)")
    if config.get("mlp_bias", False):
        problems.append("mlp_bias is true (Llama 2's feed-forward has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.get('hidden_act')!r}, not 'silu' (SwiGLU)")
    if config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling is set ({config['rope_scaling']!r}); only plain RoPE is supported")
    # transformers 5 folds rope_theta and rope_scaling into "rope_parameters".
    rope_params = config.get("rope_parameters") or {}
    if rope_params.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type is {rope_params.get('rope_type')!r}; only 'default' RoPE is supported")
    dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads != dim:
        problems.append(f"head_dim {head_dim} is not hidden_size / num_attention_heads = {dim / n_heads:g}")
    if problems:
        raise ValueError(f"{where}: cannot represent this model: " + "; ".join(problems))
    rope_theta = rope_params.get("rope_theta", config.get("rope_theta", 10000.0))
    multiple_of, ffn_mult = ffn_args_for_hidden(dim, int(config["intermediate_size"]))
    return ModelArgs(
        dim=dim,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        vocab_size=int(config["vocab_size"]),
        multiple_of=multiple_of,
        ffn_dim_multiplier=ffn_mult,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # 1e-6 is transformers' LlamaConfig default
        rope_theta=float(rope_theta),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),  # ditto
    )


def load(path: PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer or None) from a Hugging Face Llama directory with safetensors weights."""
    from ..tokenizer import Tokenizer

    path = Path(path)
    config_path = path / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    args = args_from_config(config, str(config_path))
    has_st = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    if not has_st:
        pickles = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        if pickles:
            raise ValueError(
                f"{path}: has only {', '.join(pickles)}, PyTorch pickle files, which this package does not load "
                "(unpickling can run arbitrary code). Convert them to safetensors first, e.g. "
                "LlamaForCausalLM.from_pretrained(path).save_pretrained(new_path, safe_serialization=True)."
            )
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json beside config.json")
    hf_sd, where, dtype_ = read_safetensors(path, dtype, device, reference="model.embed_tokens.weight")
    sd: dict[str, torch.Tensor] = {}
    for name in list(hf_sd):
        t = hf_sd.pop(name)
        if name.endswith("rotary_emb.inv_freq"):
            continue  # older transformers saved the rotary table as a buffer; derived state
        ours = hf_to_meta_name(name)
        if ours is None:
            sd[name] = t  # reported as unexpected by build_model, under its own name
            continue
        if ours.endswith("attention.wq.weight") and t.shape == (args.dim, args.dim):
            t = unpermute_from_hf(t, args.n_heads)
        elif ours.endswith("attention.wk.weight") and t.shape == (args.n_kv_heads * args.head_dim, args.dim):
            t = unpermute_from_hf(t, args.n_kv_heads)
        sd[ours] = t
    model = build_model(args, sd, source=where, dtype=dtype_, device=device, display=meta_to_hf_name)
    tok_path = path / TOKENIZER_FILE
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    return model, tokenizer


def config_json(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM. rope_theta/rope_scaling are written the transformers-4 way, which
    transformers 5 still reads (it folds them into rope_parameters); dtype under both its old key
    ("torch_dtype") and its new one ("dtype")."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "initializer_range": 0.02,
        "intermediate_size": args.hidden_dim,
        "max_position_embeddings": args.max_seq_len,
        "mlp_bias": False,
        "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers,
        "num_key_value_heads": args.n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": args.norm_eps,
        "rope_scaling": None,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def _tokenizer_files(tokenizer, args: ModelArgs) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json as in meta-llama/Llama-2-*-hf: the SentencePiece
    LlamaTokenizer adding BOS but not EOS (Meta's ``encode(bos=True, eos=False)``), no pad token.
    ``legacy: false`` as in those repos (it only changes how text right after a special token is split)."""
    special = {
        "bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
        "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
        "unk_token": tokenizer.id_to_piece(tokenizer.unk_id),
    }
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **special,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": args.max_seq_len,
        "padding_side": "right",
        "sp_model_kwargs": {},
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def hf_tensors(model: Transformer):
    """(HF name, tensor) for every weight, q/k rows permuted to HF's rotary layout."""
    args = model.args
    for name, t in model.state_dict().items():
        t = t.detach()
        if name.endswith("attention.wq.weight"):
            t = permute_for_hf(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_for_hf(t, args.n_kv_heads)
        yield meta_to_hf_name(name), t


def save(
    model: Transformer,
    path: PathLike,
    tokenizer=None,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a directory ``LlamaForCausalLM.from_pretrained`` loads.

    dtype: convert on the way out (default: the model's). max_shard_bytes: shard the safetensors above this
    size (default 5 GB, as transformers; None for one file)."""
    require_lm_head(model, "Hugging Face LlamaForCausalLM")
    check_tokenizer(model, tokenizer)
    dtype_ = resolve_dtype(dtype) or model.tok_embeddings.weight.dtype
    args = model.args
    generation_config = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    if tokenizer is not None:
        generation_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    config = config_json(args, dtype_)
    config.update(bos_token_id=generation_config["bos_token_id"], eos_token_id=generation_config["eos_token_id"])
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_safetensors(tmp, hf_tensors(model), max_shard_bytes=max_shard_bytes, dtype=dtype_)
        write_json(tmp / CONFIG_FILE, config)
        write_json(tmp / "generation_config.json", generation_config)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
            for name, obj in _tokenizer_files(tokenizer, args).items():
                write_json(tmp / name, obj)
    return Path(path)
