"""The Llama 2 transformer (Touvron et al., 2023, §2.2 and Table 1), in one file.

A pre-norm decoder-only transformer: RMSNorm (Zhang & Sennrich, 2019), SwiGLU feed-forward (Shazeer, 2020),
rotary position embeddings (Su et al., 2021) and grouped-query attention (Ainslie et al., 2023; used by the
34B and 70B models). Parameter names and tensor layouts are Meta's (github.com/facebookresearch/llama,
llama/model.py), so a Meta checkpoint loads with ``strict=True``.

Shapes in comments: B batch, T new tokens, S keys (cached + new), H query heads, KV key/value heads,
D head_dim, C model dim.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops import fused_linear_cross_entropy, cpu_linear

if TYPE_CHECKING:  # pragma: no cover
    from .kv_cache import KVCache

__all__ = [
    "ModelArgs",
    "PRESETS",
    "RMSNorm",
    "precompute_rope",
    "apply_rope",
    "Attention",
    "FeedForward",
    "TransformerBlock",
    "Transformer",
    "ffn_hidden_dim",
    "causal_mask",
]


@dataclass
class ModelArgs:
    """Shape of a Llama 2 model. Field names follow Meta's params.json."""

    dim: int = 4096
    """Model (residual stream) width."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads; head_dim = dim / n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention: None or n_heads gives MHA, 1 gives MQA (§2.2, A.2.1)."""
    vocab_size: int = 32000
    """Vocabulary size (the Llama 2 tokenizer has 32000 pieces)."""
    multiple_of: int = 256
    """The SwiGLU hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Scales the SwiGLU hidden size (1.3 for 70B)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    max_seq_len: int = 4096
    """Context length (Llama 2 doubled Llama 1's 2048 to 4096, §2.2)."""
    head: str = "lm"
    """Output head: "lm" (next-token logits over the vocabulary) or "scalar" (one number per position, for
    reward and value models, §3.2.2: the LM head is replaced by a regression head)."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head not in ("lm", "scalar"):
            problems.append(f"head must be 'lm' or 'scalar', not {self.head!r}")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid ModelArgs: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        """A named shape (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_params_json(cls, path_or_dict: str | dict, vocab_size: int | None = None) -> "ModelArgs":
        """Read Meta's params.json. Its vocab_size is -1 when it means "take it from the tokenizer": then
        pass ``vocab_size`` (32000 for Llama 2 when omitted). Unknown keys are an error naming them."""
        if isinstance(path_or_dict, dict):
            params, where = dict(path_or_dict), "params"
        else:
            where = str(path_or_dict)
            with open(path_or_dict, encoding="utf-8") as f:
                params = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        if params.get("vocab_size", -1) in (-1, None):
            params["vocab_size"] = vocab_size if vocab_size is not None else 32000
        return cls(**params)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        """Parameter count by formula (checked against the module in the tests)."""
        c, kvd = self.dim, self.n_kv_heads * self.head_dim
        attn = c * c * 2 + c * kvd * 2  # wq, wo, wk, wv
        ffn = 3 * c * self.hidden_dim
        layer = attn + ffn + 2 * c
        out = self.vocab_size * c if self.head == "lm" else c + 1
        return self.vocab_size * c + self.n_layers * layer + c + out


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4*dim (so SwiGLU's three matrices cost what two 4*dim ones would),
    scaled by ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, ModelArgs] = {
    # The released Llama 2 shapes (Table 1; Meta's params.json). 7B and 13B use MHA, 70B uses GQA with 8 KV heads.
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    # NOT from the paper: Llama 2 34B was never released and the paper gives no shape beyond GQA. This is
    # Code Llama 34B's published shape, offered for experiments at that size.
    "llama2-34b-codellama-shape": ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.0),
    # Small shapes for CPU work and tests (ours, not the paper's).
    "toy-tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
    "toy-small": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=64, max_seq_len=512),
    "toy-25m": ModelArgs(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, vocab_size=8000, multiple_of=128, max_seq_len=1024),
    "bench-100m": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, multiple_of=256, max_seq_len=2048),
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input dtype (as Meta does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2): angle(t, i) = t * theta^(-2i / head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(t, inv_freq)  # (S, D/2), in float64 so large positions stay exact before the cast
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by angle(t, i), Meta's pairing (it views them as complex
    numbers; this is the same arithmetic in reals).

    x: (B, T, heads, D); cos, sin: (B or 1, T, 1, D/2).
    """
    xp = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, D/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(q_len, k_len) bool, True where query i (at absolute position k_len - q_len + i) may see key j."""
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)


class Attention(nn.Module):
    """Multi-head attention with grouped-query key/value heads (MHA when n_kv_heads == n_heads, MQA when 1)."""

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: "KVCache | None" = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = cpu_linear(self.wq, x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = cpu_linear(self.wk, x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, D)
        v = cpu_linear(self.wv, x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, start_pos, k, v)  # (B, S, KV, D), S = start_pos + T
        # SDPA wants heads before time; the transposes are views. GQA: each KV head serves n_heads/n_kv_heads
        # query heads, shared inside the kernel (enable_gqa) instead of copying K and V that many times.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T|S, D)
        # mask None: plain causal (the caller builds an explicit mask whenever cached keys precede T > 1 queries,
        # since SDPA's is_causal aligns to the top-left); one query (decoding) needs no mask at all.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return cpu_linear(self.wo, out)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(self.w2, F.silu(cpu_linear(self.w1, x)) * cpu_linear(self.w3, x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 2 model: embeddings, n_layers blocks, final RMSNorm, untied output head.

    ``head="lm"`` gives next-token logits (B, T, vocab); ``head="scalar"`` gives one value per position
    (B, T), the reward/value model of §3.2.2. Both share this body; only ``output`` differs.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        if args.head == "lm":
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        else:
            # A regression head. Our choice: with a bias, so a value model can learn an offset directly.
            self.output = nn.Linear(args.dim, 1, bias=True)
        # Rotary tables are derived state, not parameters: non-persistent buffers, never in a checkpoint.
        cos, sin = precompute_rope(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False

    # -- initialisation -------------------------------------------------------------------------------------
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "Transformer":
        """Random initialisation for training from scratch (normal(0, std); output projections of each
        residual branch scaled by 1/sqrt(2 n_layers) as in GPT-2, since the paper gives no scheme). Also
        recomputes the rotary tables, so a model built on the meta device can be materialised with
        ``to_empty`` and then initialised."""
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        resid_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name == "output.bias":
                    p.zero_()
                else:
                    s = resid_std if name.endswith(("wo.weight", "w2.weight")) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
        self.reset_rope()
        return self

    def reset_rope(self) -> None:
        cos, sin = precompute_rope(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos = cos.to(self.tok_embeddings.weight.device)
        self.rope_sin = sin.to(self.tok_embeddings.weight.device)

    # -- forward --------------------------------------------------------------------------------------------
    def _rope(self, T: int, start_pos: int, position_ids: torch.Tensor | None):
        if position_ids is None:
            if start_pos + T > self.args.max_seq_len:
                raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
            cos = self.rope_cos[start_pos : start_pos + T][None, :, None, :]  # (1, T, 1, D/2)
            sin = self.rope_sin[start_pos : start_pos + T][None, :, None, :]
        else:
            if int(position_ids.max()) >= self.args.max_seq_len:
                raise ValueError(f"position id {int(position_ids.max())} exceeds max_seq_len {self.args.max_seq_len}")
            cos = self.rope_cos[position_ids][:, :, None, :]  # (B, T, 1, D/2)
            sin = self.rope_sin[position_ids][:, :, None, :]
        return cos, sin

    def hidden_states(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: "KVCache | None" = None,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The body: final-normed hidden states (B, T, C).

        tokens: (B, T) ids. Without ``cache``, a full causal pass (training). With ``cache``, the tokens sit at
        positions start_pos.. and their keys/values are written into the cache, attending to everything
        cached before them. ``mask``: optional bool, broadcastable to (B, 1, T, S), True where a query may
        attend to a key (S = start_pos + T with a cache, else T); it replaces the causal mask, so it must be
        causal itself (see ``causal_mask``); use it for padding or for packed documents. ``position_ids``:
        optional (B, T) rotary positions (default start_pos + arange(T)), for left padding or packing.
        """
        B, T = tokens.shape
        cos, sin = self._rope(T, start_pos, position_ids)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S)
        if mask is None and cache is not None and start_pos > 0 and T > 1:
            mask = causal_mask(T, start_pos + T, device=tokens.device)  # built once, shared by every layer
        h = self.tok_embeddings(tokens)  # (B, T, C)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, start_pos)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: "KVCache | None" = None,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        last_only: bool = False,
        *,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for the LM head, values (B, T) for the scalar head. ``last_only`` computes the
        head for the last position only (B, 1, ...), which is all decoding needs. ``select`` (B, T) bool computes
        it only where True, returned as (N, ...) in row-major order (PPO reads the answer positions alone).

        With ``targets`` (B, T) (LM head only), returns instead the scalar mean next-token cross-entropy over the
        positions whose target is not ``ignore_index``; targets[b, t] is the label of position t (the caller
        shifts). The head and the loss are fused (``llama2.ops.fused_linear_cross_entropy``), so the (B*T, vocab)
        logits are never kept for the backward. The loss is computed here rather than by the caller because
        under FSDP the root module's parameters (the output head among them) are only gathered inside forward.
        """
        if targets is not None and self.args.head != "lm":
            raise ValueError("targets need the LM head; this model has a scalar head")
        if targets is not None and last_only:
            raise ValueError("targets score every position; last_only cannot be combined with them")
        h = self.hidden_states(tokens, start_pos, cache, mask, position_ids)
        if targets is not None:
            return fused_linear_cross_entropy(h.flatten(0, 1), self.output.weight, targets.flatten(), ignore_index)
        if last_only:
            h = h[:, -1:]
        elif select is not None:
            h = h[select]  # (N, C)
        out = cpu_linear(self.output, h)
        if self.args.head == "scalar":
            out = out.squeeze(-1)
        return out.float()  # as Meta: logits (and values) leave the model in fp32, whatever the compute dtype

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
