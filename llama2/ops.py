"""Fused operations the training step needs and eager PyTorch does wastefully.

``fused_linear_cross_entropy``: the LM head and the next-token loss in one pass over row chunks.

Why. The plain way, ``F.cross_entropy(h @ W.T, y)``, materialises the logits, an (N, V) tensor with N = batch
x sequence tokens and V = 32000: 262 MB in fp32 for N = 2048. Autograd then keeps it (or its log-softmax) for
the backward and walks over it several more times: log-softmax writes a second (N, V) tensor, the NLL
backward fills a third with zeros and scatters -1/N into it, the log-softmax backward reads two and writes
one, and only then do the two matmuls of the head's backward run. Each of those passes streams hundreds of
MB through memory; on a CPU that is a measurable share of a small model's step, and on a GPU the logits are
often the single largest activation of the step (at 7B with 4096-token sequences, 4096 x 32000 fp32 logits are
524 MB per sequence).

Here the rows are processed ``chunk_size`` at a time. For each chunk the forward computes the logits (n, V),
their log-sum-exp and the loss, and, since the loss is a scalar whose gradient is known in closed form,
also the gradient with respect to the logits, softmax - onehot(target), scaled by 1/count and zeroed on
ignored rows. That gradient is turned at once into the chunk's share of the input gradient (g @ W) and added
into the weight gradient (g^T h); then the chunk's logits are dropped. Only the two gradients, (N, C) and
(V, C), are kept for the backward, which just scales them by the incoming gradient. Peak memory for the head
drops from several N x V tensors to one n x V chunk, worked on in place (max, exp, sum, scale: no second
n x V tensor is allocated), and the step is faster than the plain path on a CPU too (benchmarks/bench_train.py;
the figures are in benchmarks/RESULTS.md, training step).

The price: the gradients are computed even if ``backward`` is never called (so the function skips them when
no input requires grad), and it fits a scalar loss that is backpropagated once, which is what training does.
"""
from __future__ import annotations

import os

import torch

__all__ = ["fused_linear_cross_entropy"]


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matmuls: autocast's when autocast is on for this device (bf16 on GPU, as the
    plain ``F.linear`` would run), else the inputs' common dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def onednn_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a product of these fp32 CPU tensors may go through oneDNN (see :func:`onednn_linear`)."""
    return (ONEDNN_LINEAR and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and not torch.compiler.is_compiling())


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T: through oneDNN for fp32 on the CPU, else through ``torch.matmul``."""
    return onednn_linear(a, b) if onednn_ok(a, b) else a @ b.T


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, compute_dtype, need_grad):
        N, C = hidden.shape
        h_all = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)  # (V, C); no copy when already in compute_dtype
        valid = targets != ignore_index  # (N,)
        count = valid.sum()
        # 0-sum safe: with no target to score, loss and gradients are 0 (not nan), with no host sync
        scale = 1.0 / count.clamp(min=1).to(torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad[0] else None
        # the weight gradient sums over all chunks: accumulate in fp32 whatever the compute dtype
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad[1] else None
        for s in range(0, N, chunk_size):
            h = h_all[s : s + chunk_size]  # (n, C)
            n = h.shape[0]
            logits = _mm_t(h, w).float()  # (n, V), fp32 for the softmax (a no-op cast in fp32)
            y, ok = targets[s : s + n], valid[s : s + n]
            y = torch.where(ok, y, 0)  # any class for ignored rows; they are masked below
            target_logit = logits.gather(1, y[:, None])  # (n, 1), read before the in-place ops below
            # log-sum-exp and softmax sharing one exp pass, in place on the chunk (torch.logsumexp would make
            # two more (n, V) temporaries, and the softmax would need another exp pass)
            m = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            e = logits.sub_(m).exp_()  # exp(logit - max), in (0, 1]
            sum_e = e.sum(dim=-1, keepdim=True)  # (n, 1)
            nll = (m + sum_e.log() - target_logit).squeeze(1)  # log-sum-exp - target logit, (n,)
            loss_sum += torch.where(ok, nll, 0.0).sum()
            if grad_h is None and grad_w is None:
                continue
            # d loss / d logits = (softmax - onehot) / count on scored rows, 0 on ignored ones; in place
            row_scale = torch.where(ok, scale, 0.0)[:, None]  # (n, 1)
            g = e.mul_(row_scale / sum_e)
            g.scatter_add_(1, y[:, None], -row_scale)
            g = g.to(compute_dtype)
            if grad_h is not None:
                grad_h[s : s + n] = _mm_t(g, w.T)  # (n, C)
            if grad_w is not None and compute_dtype == torch.float32 and onednn_ok(g, h):
                grad_w.add_(onednn_linear(g.T, h.T))  # (V, C): g^T h
            elif grad_w is not None and compute_dtype == torch.float32:
                grad_w.addmm_(g.T, h)  # (V, C), accumulated in place
            elif grad_w is not None:
                grad_w.add_(g.T @ h)  # low-precision product, fp32 sum
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else grad_w * grad_out.to(grad_w.dtype)
        return gh, gw, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)`` without keeping the logits.

    hidden: (N, C); weight: (V, C) (an ``nn.Linear`` weight, no bias); targets: (N,) int64 class ids, rows equal
    to ``ignore_index`` not scored. Returns the fp32 scalar mean loss over the scored rows (0, with zero
    gradients, when no row is scored). ``chunk_size`` rows are processed at a time: peak extra memory is one
    (chunk_size, V) fp32 tensor. Under autocast the matmuls run in autocast's dtype (as ``F.linear`` would)
    while the softmax and the loss are in fp32; gradients come back in the inputs' dtypes.
    See the module docstring for why.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, C) and weight (V, C), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    need_grad = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    compute_dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen explicitly inside
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, targets, ignore_index, chunk_size, compute_dtype, need_grad
        )


# -- oneDNN's fp32 linear -------------------------------------------------------------------------------------------
def _onednn_linear_works() -> bool:
    if os.environ.get("LLAMA2_NO_ONEDNN"):  # an escape hatch, and the A/B switch of benchmarks/bench_inference.py
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        x, w = torch.randn(2, 8), torch.randn(4, 8)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.T, atol=1e-5)
    except Exception:  # noqa: BLE001 - any failure means: use F.linear
        return False


ONEDNN_LINEAR = _onednn_linear_works()
"""Whether oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``) runs on this machine. On x86 CPUs it multiplies
fp32 matrices faster than ``F.linear``'s MKL sgemm on AMD processors, where MKL does not use AVX-512, and reads a
weight in a matrix-vector product faster (benchmarks/RESULTS.md; LLAMA2_NO_ONEDNN=1 turns it off)."""


def onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ w (out, in)^T through oneDNN, on the weight as it is (no copy, no prepacking): (M, out)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x @ w^T with oneDNN in the forward and in both products of the backward: dx = dy @ w and
    dw = dy^T @ x, each also an ``_linear_pointwise`` call on transposed views (oneDNN reads the strides; no copy)."""

    @staticmethod
    def forward(ctx, x, w):  # x (M, in), w (out, in)
        ctx.save_for_backward(x, w)
        return onednn_linear(x, w)  # (M, out)

    @staticmethod
    def backward(ctx, dy):  # dy (M, out)
        x, w = ctx.saved_tensors
        dx = onednn_linear(dy, w.t()) if ctx.needs_input_grad[0] else None  # (M, out) @ (out, in) = (M, in)
        dw = onednn_linear(dy.t(), x.t()) if ctx.needs_input_grad[1] else None  # (out, M) @ (M, in) = (out, in)
        return dx, dw


def cpu_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, where on the CPU a bias-free fp32 ``nn.Linear`` outside autocast takes oneDNN's kernel instead
    of MKL's sgemm, in training (forward and backward, :class:`_OneDNNLinear`) as in inference. The two agree to
    float rounding; anything else (GPU, bf16, autocast, a bias, torch.compile, LLAMA2_NO_ONEDNN=1) is ``layer(x)``."""
    if (type(layer) is torch.nn.Linear and layer.bias is None and onednn_ok(x, layer.weight)
            and not torch.is_autocast_enabled("cpu")):
        x2 = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
            y = _OneDNNLinear.apply(x2, layer.weight)
        else:
            y = onednn_linear(x2, layer.weight)
        return y.view(*x.shape[:-1], layer.weight.shape[0])
    return layer(x)

