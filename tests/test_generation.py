"""Generation: cached decoding equals recomputing, batched equals one-by-one, sampling rules, stops, streaming."""
import pytest
import torch

from llama2 import GenerationConfig, ModelArgs, Transformer, generate
from llama2.generate import TextStreamer


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16, max_seq_len=48)
    return Transformer(args).init_weights(std=0.3, seed=1).eval()


def greedy_by_recomputing(model, prompt, n):
    """The reference: no cache, the whole sequence through the model for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[1, 5, 9, 13, 2, 40, 77], [1, 60], [1, 3, 3, 3, 8]]


def test_cached_greedy_equals_recomputation(model):
    for p in PROMPTS:
        out = generate(model, [p], temperature=0, max_new_tokens=12, stop_tokens=())[0]
        assert out.tokens == greedy_by_recomputing(model, p, 12)


def test_batched_ragged_equals_one_by_one(model):
    batched = generate(model, PROMPTS, temperature=0, max_new_tokens=12, stop_tokens=())
    for p, b in zip(PROMPTS, batched):
        assert b.tokens == generate(model, [p], temperature=0, max_new_tokens=12, stop_tokens=())[0].tokens


def test_logprobs_equal_full_forward(model):
    p = PROMPTS[0]
    out = generate(model, [p], temperature=0, max_new_tokens=6, stop_tokens=(), logprobs=True)[0]
    seq = torch.tensor([p + out.tokens])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq)[0, len(p) - 1 : -1], -1)
    expect = lp.gather(-1, torch.tensor(out.tokens)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs), expect, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, PROMPTS, temperature=1.0, top_p=1.0, max_new_tokens=15, seed=7, stop_tokens=())
    b = generate(model, PROMPTS, temperature=1.0, top_p=1.0, max_new_tokens=15, seed=7, stop_tokens=())
    c = generate(model, PROMPTS, temperature=1.0, top_p=1.0, max_new_tokens=15, seed=8, stop_tokens=())
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    g = generate(model, PROMPTS, temperature=0, max_new_tokens=8, stop_tokens=())
    k1 = generate(model, PROMPTS, temperature=1.3, top_k=1, top_p=1.0, max_new_tokens=8, seed=0, stop_tokens=())
    p0 = generate(model, PROMPTS, temperature=1.3, top_p=1e-6, max_new_tokens=8, seed=0, stop_tokens=())
    assert [x.tokens for x in g] == [x.tokens for x in k1] == [x.tokens for x in p0]


def test_stop_token_ends_that_row_only(model):
    free = generate(model, PROMPTS, temperature=0, max_new_tokens=10, stop_tokens=())
    stop = free[0].tokens[3]
    outs = generate(model, PROMPTS, temperature=0, max_new_tokens=10, stop_tokens=(stop,))
    assert outs[0].tokens == free[0].tokens[: free[0].tokens.index(stop) + 1]
    assert outs[0].finish_reason == "stop"
    for f, o in zip(free[1:], outs[1:]):
        expect = f.tokens[: f.tokens.index(stop) + 1] if stop in f.tokens else f.tokens
        assert o.tokens == expect


def test_context_limit_and_streaming(model):
    seen = []
    out = generate(model, [PROMPTS[0]], temperature=0, max_new_tokens=100, stop_tokens=(), on_token=lambda r, t: seen.append((r, t)))[0]
    assert len(PROMPTS[0]) + len(out.tokens) == model.args.max_seq_len
    assert out.finish_reason == "context"
    assert [t for _, t in seen] == out.tokens and {r for r, _ in seen} == {0}
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1] * 48], max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=1)


def test_bad_config_is_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


class CharTokenizer:
    """A tokenizer stand-in: id = ord(char) - 30 for printable ASCII; 1 BOS, 2 EOS."""

    bos_id, eos_id = 1, 2

    def encode(self, s, bos=False, eos=False):
        return [1] * bos + [ord(c) - 30 for c in s] + [2] * eos

    def decode(self, ids):
        return "".join(chr(i + 30) for i in ids if i > 2)


def test_stop_strings_cut_the_text(model):
    tok = CharTokenizer()
    free = generate(model, [PROMPTS[0]], temperature=0, max_new_tokens=12, stop_tokens=(), tokenizer=tok)[0]
    text = tok.decode(free.tokens)
    needle = text[4:6]
    out = generate(model, [PROMPTS[0]], temperature=0, max_new_tokens=12, stop_tokens=(), stop_strings=(needle,), tokenizer=tok)[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(needle)]
    assert len(out.tokens) == text.find(needle) + len(needle)


def test_text_streamer_waits_for_whole_characters():
    class ByteTok:
        bos_id, eos_id = 1, 2

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    chunks = []
    s = TextStreamer(ByteTok(), chunks.append)
    for b in "añb".encode():
        s.put(b)
    assert chunks == ["a", "ñ", "b"]


def test_a_trained_tiny_model_continues_its_pattern():
    """End to end through training and cached decoding: a tiny model fit on counting sequences
    (k, k+1, k+2, ... mod 90, offset by 3) continues any start greedily with the next numbers."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64)
    m = Transformer(args).init_weights(seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, 90, (32, 1), generator=gen)
        seq = (starts + torch.arange(17)) % 90 + 3
        loss = torch.nn.functional.cross_entropy(m(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    prompts = [[(s + i) % 90 + 3 for i in range(n)] for s, n in ((5, 3), (40, 6), (85, 4))]
    outs = generate(m, prompts, temperature=0, max_new_tokens=8, stop_tokens=())
    for p, o in zip(prompts, outs):
        start = p[0] - 3
        assert o.tokens == [(start + len(p) + i) % 90 + 3 for i in range(8)], (p, o.tokens)
