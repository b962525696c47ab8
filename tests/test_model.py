"""Module values against independent references (Meta's complex-number rotary, transformers' RMSNorm and rotary),
the paper's parameter counts, and the properties training and decoding rely on."""
import math

import pytest
import torch

from llama2 import KVCache, ModelArgs, Transformer
from llama2.model import RMSNorm, apply_rope, causal_mask, ffn_hidden_dim, precompute_rope


def tiny(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
    base.update(kw)
    return Transformer(ModelArgs(**base)).init_weights(std=0.1, seed=0).eval()


# -- the paper's shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,count",
    # Meta's released checkpoints: 7B, 13B and 70B parameter totals (model card / Table 1 sizes).
    [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192)],
)
def test_preset_parameter_counts(name, count):
    args = ModelArgs.from_preset(name)
    with torch.device("meta"):
        model = Transformer(args)
    assert model.num_params() == count
    assert args.num_params() == count
    assert args.max_seq_len == 4096 and args.vocab_size == 32000 and args.norm_eps == 1e-5


def test_ffn_hidden_rule_matches_meta_checkpoint_shapes():
    # w1 shapes in Meta's consolidated files: 11008 (7B), 13824 (13B), 28672 (70B)
    assert ffn_hidden_dim(4096, 256, None) == 11008
    assert ffn_hidden_dim(5120, 256, None) == 13824
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672
    assert ModelArgs.from_preset("llama2-70b").n_kv_heads == 8


def test_params_json_and_validation(tmp_path):
    p = tmp_path / "params.json"
    p.write_text('{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}')
    args = ModelArgs.from_params_json(p)
    assert args.vocab_size == 32000 and args.n_kv_heads == 32
    assert ModelArgs.from_params_json(p, vocab_size=500).vocab_size == 500
    p.write_text('{"dim": 64, "n_heads": 4, "n_layers": 1, "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        ModelArgs.from_params_json(p)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(KeyError, match="llama2-7b"):
        ModelArgs.from_preset("llama2-8b")


# -- modules against references --------------------------------------------------------------------------------
def test_rmsnorm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        w = torch.randn(48)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(3, 7, 48) * 5
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    # computed in fp32 even for bf16 input (Meta: self._norm(x.float()).type_as(x))
    xb = x.bfloat16()
    expect = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * ours.weight
    torch.testing.assert_close(ours(xb).float(), expect.float(), atol=1e-2, rtol=1e-2)


def meta_rope_reference(x, theta=10000.0):
    """Meta's llama/model.py: precompute_freqs_cis + apply_rotary_emb (complex multiplication)."""
    B, T, H, D = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, D, 2)[: (D // 2)].float() / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), freqs)
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    x_ = torch.view_as_complex(x.float().reshape(B, T, H, -1, 2))
    return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3)


def test_rope_matches_meta_complex_formulation():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 3, 16)
    cos, sin = precompute_rope(16, 64)
    out = apply_rope(x, cos[None, :50, None], sin[None, :50, None])
    torch.testing.assert_close(out, meta_rope_reference(x), atol=1e-5, rtol=1e-5)
    # a rotation: norms of each pair are preserved
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_rope_matches_transformers_after_hf_permutation():
    """HF stores q/k with each head's dims permuted so rotate_half works; the same rotation results."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.manual_seed(0)
    H, D, T = 2, 16, 20
    x = torch.randn(1, T, H, D)
    cos, sin = precompute_rope(D, 64)
    ours = apply_rope(x, cos[None, :T, None], sin[None, :T, None])
    perm = torch.arange(D).view(D // 2, 2).t().reshape(-1)  # Meta (2i, 2i+1) pairs -> HF (i, i + D/2)
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, max_position_embeddings=64, rope_theta=10000.0)
    rot = LlamaRotaryEmbedding(cfg)
    hc, hs = rot(x, torch.arange(T)[None])
    xh = x[..., perm].transpose(1, 2)  # (1, H, T, D)
    theirs, _ = apply_rotary_pos_emb(xh, xh, hc, hs)
    torch.testing.assert_close(ours[..., perm], theirs.transpose(1, 2), atol=1e-5, rtol=1e-5)


# -- the model --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_forward_shapes_and_gradients(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads).train()
    tokens = torch.randint(0, 97, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, 97) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.layers[0].attention.wk.weight.shape == (n_kv_heads * 16, 64)


def test_attention_is_causal():
    model = tiny()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :8], lb[:, :8])
    assert (la[:, 8:] - lb[:, 8:]).abs().max() > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA is MHA whose key/value heads are shared by groups of query heads (Ainslie et al., 2023)."""
    gqa = tiny(n_kv_heads=2)
    mha = Transformer(ModelArgs(**{**gqa.args.to_dict(), "n_kv_heads": 4})).eval()
    sd = gqa.state_dict()
    for i in range(gqa.args.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)


def test_kv_cache_incremental_equals_full_and_gqa_size():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    cache = KVCache.for_model(model, 2, 32)
    parts = [model(tokens[:, :7], 0, cache), model(tokens[:, 7:8], 7, cache), model(tokens[:, 8:], 8, cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    mha_cache = KVCache(ModelArgs(**{**model.args.to_dict(), "n_kv_heads": 4}), 2, 32)
    assert cache.nbytes * 2 == mha_cache.nbytes  # n_kv_heads / n_heads = 2 / 4
    assert cache.nbytes == 2 * 2 * 2 * 32 * 2 * 16 * 4  # k+v, layers, batch, seq, kv heads, head_dim, fp32
    with pytest.raises(ValueError, match="overflow"):
        model(tokens[:, :20], 20, cache)


def test_left_padding_with_mask_and_positions_equals_unpadded():
    model = tiny()
    seq = torch.randint(0, 97, (1, 6))
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), seq], 1)
    valid = torch.arange(pad + 6)[None] >= pad
    mask = (causal_mask(pad + 6, pad + 6)[None] & valid[:, None, :]) | torch.eye(pad + 6, dtype=torch.bool)
    pos = (torch.arange(pad + 6) - pad).clamp(min=0)[None]
    out = model(padded, mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, pad:], model(seq), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_packed_documents_with_block_mask_equal_separate_passes():
    """Two documents in one row: a block-diagonal causal mask and positions restarting at 0 make each
    document's logits what it gets alone (how SFT packs dialogs without attention crossing them)."""
    model = tiny()
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    doc = torch.tensor([0] * 5 + [1] * 7)
    mask = causal_mask(12, 12) & (doc[:, None] == doc[None, :])
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    out = model(torch.cat([a, b], 1), mask=mask[None], position_ids=pos)
    torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:], model(b), atol=1e-5, rtol=1e-5)


def test_scalar_head_shares_the_body():
    lm = tiny()
    scalar = Transformer(ModelArgs(**{**lm.args.to_dict(), "head": "scalar"}))
    missing, unexpected = scalar.load_state_dict({k: v for k, v in lm.state_dict().items() if not k.startswith("output.")}, strict=False)
    assert sorted(missing) == ["output.bias", "output.weight"] and not unexpected
    tokens = torch.randint(0, 97, (3, 8))
    values = scalar.eval()(tokens)
    assert values.shape == (3, 8)
    h = lm.hidden_states(tokens)
    torch.testing.assert_close(values, h @ scalar.output.weight[0] + scalar.output.bias[0], atol=1e-5, rtol=1e-5)
    assert scalar.num_params() == lm.num_params() - 97 * 64 + 64 + 1 == scalar.args.num_params()


def test_positions_beyond_context_are_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_init_is_seeded_and_scaled():
    a, b = tiny(), tiny()
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    wo = a.layers[0].attention.wo.weight
    assert abs(wo.std().item() - 0.1 / math.sqrt(4)) < 0.02
