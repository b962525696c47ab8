"""The fused LM head + cross-entropy against the plain F.cross_entropy(h @ W.T) it replaces, and the model's
``forward(tokens, targets=...)`` against logits + F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

from llama2 import ModelArgs, Transformer
from llama2.ops import fused_linear_cross_entropy


def reference(hidden, weight, targets, ignore_index=-100):
    """Loss and gradients of the unfused computation, in float64 (the reference for fp32 results)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fused(hidden, weight, targets, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_close(a, b, rtol=1e-5):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-12)
    assert (a - b).abs().max() <= rtol * scale, f"max rel diff {((a - b).abs().max() / scale).item():.3e}"


def data(N=37, C=16, V=50, seed=0, ignore_frac=0.2, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 1000])
def test_matches_cross_entropy_loss_and_grads(chunk_size):
    hidden, weight, targets = data()
    assert (targets == -100).any() and (targets != -100).any()
    ref = reference(hidden, weight, targets)
    out = fused(hidden, weight, targets, chunk_size=chunk_size)
    for a, b in zip(out, ref):
        assert_close(a, b)
    # and the fp32 unfused computation agrees too (what the model used before)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    F.cross_entropy(h @ w.T, targets).backward()
    assert_close(out[1], h.grad)
    assert_close(out[2], w.grad)


def test_custom_ignore_index_and_grad_output_scaling():
    hidden, weight, targets = data(ignore_index=3, seed=1)
    ref = reference(hidden, weight, targets, ignore_index=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets, ignore_index=3, chunk_size=6)
    (2.5 * loss).backward()
    assert_close(loss.detach(), ref[0])
    assert_close(h.grad, 2.5 * ref[1])
    assert_close(w.grad, 2.5 * ref[2])


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, targets = data()
    targets = torch.full_like(targets, -100)
    loss, gh, gw = fused(hidden, weight, targets, chunk_size=8)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_no_grad_and_frozen_weight():
    hidden, weight, targets = data()
    ref = reference(hidden, weight, targets)
    with torch.no_grad():
        assert_close(fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4), ref[0])
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, targets, chunk_size=4).backward()  # weight needs no grad
    assert_close(h.grad, ref[1])


def test_bf16_under_autocast_keeps_dtypes():
    hidden, weight, targets = data(N=64, C=32, V=100)
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()  # fp32 master weight, as under autocast training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, targets, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = reference(hidden, weight, targets)
    assert abs(loss.item() - ref[0].item()) < 0.05 * ref[0].item()
    assert F.cosine_similarity(w.grad.flatten().double(), ref[2].flatten(), dim=0) > 0.99


def test_shape_errors():
    hidden, weight, targets = data()
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(hidden, weight, targets[:-1])


# -- the model's forward(tokens, targets=...) ------------------------------------------------------------------
def tiny(**kw):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16, max_seq_len=64, **kw)
    return Transformer(args).init_weights(std=0.1, seed=0)


def test_model_loss_and_all_grads_match_logits_plus_cross_entropy():
    model = tiny()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 100, (3, 17), generator=g)
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[0, :5] = -100  # e.g. a prompt whose tokens are not scored
    loss = model(x, targets=y)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    ref.backward()
    assert loss.shape == () and abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    for n, p in model.named_parameters():
        assert_close(ours[n], p.grad), n


def test_model_targets_errors():
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="scalar"):
        tiny(head="scalar")(x, targets=x)
    with pytest.raises(ValueError, match="last_only"):
        tiny()(x, targets=x, last_only=True)


def test_cpu_linear_equals_the_layer_in_value_and_gradients():
    """model.py's projections go through ops.cpu_linear: an fp32 CPU nn.Linear takes oneDNN's kernel (when it runs
    here), in the forward and in both products of the backward; value and gradients must be the layer's own."""
    from llama2.ops import ONEDNN_LINEAR, cpu_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=False)
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear(layer, x), layer(x), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        assert cpu_linear(layer, x).shape == (3, 7, 40)
    dy = torch.randn(3, 7, 40)
    for x_grad, w_grad in ((True, True), (True, False), (False, True)):
        xs = [x.clone().requires_grad_(x_grad) for _ in range(2)]
        layer.weight.requires_grad_(w_grad)
        y = cpu_linear(layer, xs[0])
        if ONEDNN_LINEAR:
            assert type(y.grad_fn.next_functions[0][0]).__name__.startswith("_OneDNNLinear")  # the path tested
        got = torch.autograd.grad(y, [t for t, on in ((xs[0], x_grad), (layer.weight, w_grad)) if on], dy)
        want = torch.autograd.grad(layer(xs[1]), [t for t, on in ((xs[1], x_grad), (layer.weight, w_grad)) if on], dy)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    layer.weight.requires_grad_(True)
    biased = torch.nn.Linear(48, 40)
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear(biased, x), biased(x))


def test_cpu_linear_keeps_cpu_autocast():
    """Under CPU autocast the projection computes (and returns) the autocast dtype, as the layer itself does."""
    from llama2.ops import cpu_linear

    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_linear(layer, x).dtype == layer(x).dtype == torch.bfloat16
