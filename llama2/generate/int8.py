"""Weight-only int8 for generation: each linear layer's weight stored as int8 with one fp32 scale per output row.

W (out, in) ≈ q * scale[:, None], q = round(W / scale) in [-127, 127], scale = max|W[row]| / 127 (symmetric,
per output channel, the scheme of gpt-fast's and torchao's int8 weight-only). Activations stay in fp32: only
the bytes a decode step must stream shrink, 4x against fp32. Batch-1 decoding reads every weight once per
token, so it is bound by those bytes, not by arithmetic.

The kernel. PyTorch's own int8 weight-only matmul (``torch._weight_int8pack_mm``) read the weights more slowly
on the CPUs this project was measured on than the fp32 kernel reads fp32 (benchmarks/RESULTS.md). A one-row
product written as multiply-and-sum, ``(x * q.float()).sum(-1) * scale``, is compiled by Inductor into one vectorised pass that converts each int8
weight in registers; that is the decode kernel (inside a compiled decode step, or compiled on its own, once per
process, for an eager step). Several rows (prefill, batched decoding) dequantise a block of output rows at a
time and multiply it with the fp32 kernel: arithmetic-bound work where the weight bytes matter little.

For generation only: a quantised model has no gradients, its state dict holds the int8 tensors, and
``Llama.save`` refuses it (quantise after loading instead: ``Llama.from_pretrained(path, quantize="int8")``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import dense_linear, materialize

__all__ = ["Int8Linear", "quantize_int8", "is_quantized"]

_DEQUANT_ROWS = 4096  # output rows dequantised at a time for multi-row inputs (a 4096 x 4096 block: 64 MiB fp32)
_GEMV_ROWS = 64  # up to this many input rows (a decode batch) each read the int8 weight; more dequantise it
_GEMV_ROWS_COMPILED = 8  # the same inside a compiled step, where each row is a kernel of the graph


def _gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(1, in) fp32 x (out, in) int8 -> (1, out): sum_k x[k] q[n, k], times scales[n]."""
    return (x * q.to(x.dtype)).sum(-1)[None] * scales


_compiled_gemv = None  # torch.compile(_gemv_int8, dynamic=True), built on first use; False if that failed


def _eager_gemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The one-row kernel outside a compiled step: compiled on its own (dynamic shapes: one compile serves
    every layer), falling back to a dequantised matmul with a warning if compilation is unavailable."""
    global _compiled_gemv
    if _compiled_gemv is None:
        try:
            fn = torch.compile(_gemv_int8, dynamic=True)
            fn(x, q, scales)
            _compiled_gemv = fn
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"int8: compiling the matrix-vector kernel failed ({type(e).__name__}: {e}); "
                          "using a dequantised matmul (slower)", RuntimeWarning, stacklevel=3)
            _compiled_gemv = False
    if _compiled_gemv is False:
        return F.linear(x, q.to(x.dtype)) * scales
    return _compiled_gemv(x, q, scales)


class Int8Linear(nn.Module):
    """A bias-free linear layer with an int8 weight (out, in) and fp32 per-row scales (out,)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, layer: nn.Linear) -> "Int8Linear":
        if layer.bias is not None:
            raise ValueError("Int8Linear has no bias")
        w = layer.weight.detach().float()
        q = cls(layer.in_features, layer.out_features, device=w.device, dtype=layer.weight.dtype)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        q.scales.copy_(scale)
        return q

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        q, s = self.weight, self.scales.to(x.dtype)
        n = x2.shape[0]
        if n <= _GEMV_ROWS_COMPILED and torch.compiler.is_compiling():
            x2 = materialize(x2)
            out = torch.cat([_gemv_int8(x2[i : i + 1], q, s) for i in range(n)]) if n > 1 else _gemv_int8(x2, q, s)
        elif n <= _GEMV_ROWS and not torch.compiler.is_compiling():  # a decode batch: each row streams the int8
            out = torch.cat([_eager_gemv(x2[i : i + 1], q, s) for i in range(n)]) if n > 1 else _eager_gemv(x2, q, s)
        else:
            blocks = []  # dequantised blocks through the fp32 kernel choice (oneDNN on the CPU)
            for r in range(0, self.out_features, _DEQUANT_ROWS):
                w = q[r : r + _DEQUANT_ROWS].to(x.dtype) * s[r : r + _DEQUANT_ROWS, None]
                blocks.append(dense_linear(x2, w))
            out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every linear layer of the transformer blocks and the LM head by an ``Int8Linear``, in place
    (the fp32 weights are released); returns the model. The embedding table stays in its dtype (one row of it
    is read per token). For generation only (see the module docstring)."""
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(mod))
    model.requires_grad_(False)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
