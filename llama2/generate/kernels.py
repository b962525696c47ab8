"""The matrix products of an inference step, with the fastest kernel for each place.

A batch-1 decode step is about a hundred matrix-vector products that each stream one weight matrix once, so it is
bound by how fast those weights are read. On x86 CPUs PyTorch's fp32 ``F.linear`` goes to MKL's sgemm, which on
AMD processors does not use AVX-512; oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the kernel
Inductor's own CPU lowering calls) reads the very same tensor, unpacked and uncopied, several times faster
(``benchmarks/bench_linear.py`` measures both). ``linear`` picks it for fp32 weights on the CPU; inside a compiled
step a one-row product is written as multiply-and-sum, which Inductor turns into one vectorised pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import ONEDNN_LINEAR, onednn_linear

__all__ = ["linear", "dense_linear", "materialize", "rms_norm"]


@torch.library.custom_op("llama2::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The oneDNN linear as an opaque op for torch.compile: Inductor's own lowering of ``mkldnn._linear_pointwise``
    expects a prepacked weight, so a compiled step calls the kernel through this wrapper instead."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@_onednn_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(x)`` for an inference step: x (..., in) -> (..., out). A bias-free ``nn.Linear`` goes through
    ``dense_linear``; any other layer (a quantised ``Int8Linear``) is simply called."""
    if type(layer) is nn.Linear and layer.bias is None:
        return dense_linear(x, layer.weight)
    return layer(x)


def dense_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T with the fastest kernel for it here.

    fp32 on the CPU: oneDNN's linear on the weight as it is (no copy and no prepacking, so the engine always
    reads the live parameters); inside a compiled step, a one-row product is written as multiply-and-sum, which
    Inductor turns into one vectorised, multi-threaded pass over the weight, the fastest read of it on the CPU.
    Anything else: ``F.linear``.
    """
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return F.linear(x, w)
    x2 = x.reshape(-1, x.shape[-1])  # (M, in)
    if torch.compiler.is_compiling() and x2.shape[0] == 1:
        out = (materialize(x2) * w).sum(-1)[None]
    elif ONEDNN_LINEAR and torch.compiler.is_compiling():
        out = _onednn_linear_op(x2, w)
    elif ONEDNN_LINEAR:  # eager: the aten op directly (a custom op's Python dispatch would cost more than the op)
        out = onednn_linear(x2, w)
    else:
        out = F.linear(x2, w)
    return out.view(*x.shape[:-1], w.shape[0])


def materialize(x: torch.Tensor) -> torch.Tensor:
    """Inside a compiled step: make Inductor compute ``x`` into a buffer before it is read.

    Without it Inductor inlines a cheap producer into its consumer: the input of a matrix-vector product written
    as multiply-and-sum (RMSNorm's scaling, SwiGLU's silu(a) * b) would be recomputed for every output row,
    768 to 32000 times per element, which made the compiled step slower than the weight stream it exists for.
    ``prims.inductor_force_stride_order`` is Inductor's own "realize with this layout" primitive. Eager: x."""
    if not torch.compiler.is_compiling():
        return x
    x = x.contiguous()
    # the prim is registered by Decoder.step's import; a contiguous layout's strides, as Python ints (under dynamic
    # shapes x.stride() holds SymInts, which Dynamo cannot pass to the prim)
    strides = [1] * x.dim()
    for d in range(x.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * int(x.shape[d + 1])
    return torch.ops.prims.inductor_force_stride_order(x, strides)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``RMSNorm.forward`` (model.py) as a function: fp32 statistics, the gain in the input's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight
