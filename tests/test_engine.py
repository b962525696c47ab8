"""The static-cache engine against the eager reference: same greedy tokens and logits, the same stop/stream/context
behaviour, compaction that changes nothing, sampling that follows the rules and does not depend on the batch, and
the continuous-batching Engine (concurrent requests equal each alone; cancel frees the slot)."""
import pytest
import torch

from llama2 import ModelArgs, Transformer, generate
from llama2.generate import (
    Decoder,
    Engine,
    Sampler,
    SamplingParams,
    decoder_for,
    prefill_groups,
    sample_tokens,
    uniforms,
)
from llama2.kv_cache import StaticKVCache


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, multiple_of=16, max_seq_len=48)
    return Transformer(args).init_weights(std=0.3, seed=1).eval()


PROMPTS = [[1, 5, 9, 13, 2, 40, 77], [1, 60], [1, 3, 3, 3, 8], [1, 60]]


def both(model, prompts, **kw):
    kw.setdefault("stop_tokens", ())
    return (generate(model, prompts, engine="eager", **kw), generate(model, prompts, engine="static", **kw))


def test_prefill_logits_match_the_model(model):
    """Left-padded, chunked prefill over the static cache gives the model's own last-position logits."""
    P = max(len(p) for p in PROMPTS)
    tokens = torch.zeros(len(PROMPTS), P, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        tokens[b, P - len(p):] = torch.tensor(p)
    starts = torch.tensor([P - len(p) for p in PROMPTS])
    with torch.inference_mode():
        for chunk in (512, 3):
            cache = StaticKVCache.for_model(model, len(PROMPTS), 20)
            got = Decoder(model).prefill(cache, tokens, starts, chunk=chunk)
            for b, p in enumerate(PROMPTS):
                torch.testing.assert_close(got[b], model(torch.tensor([p]))[0, -1], atol=1e-4, rtol=1e-4)


def test_prefill_in_length_groups_gives_each_prompts_logits_and_cache(model):
    """Distinct prompts prefilled shortest first in groups of similar length, each group over its own columns,
    repeated prompts copied: every row's logits are the model's own for its prompt, and decoding on from that
    cache gives the eager loop's tokens."""
    from llama2.generate import prefill_groups, prefill_shared

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (3, 30, 12, 3, 25, 14)]
    prompts.insert(3, prompts[1])  # a repeat, away from its first copy
    assert len(prefill_groups(sorted(len(p) for p in set(map(tuple, prompts))))) >= 3
    P = max(map(len, prompts))
    with torch.inference_mode():
        cache, logits, starts = prefill_shared(decoder_for(model), prompts, P, 48, chunk=8)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b], model(torch.tensor([p]))[0, -1], atol=1e-4, rtol=1e-4)
            assert int(starts[b]) == P - len(p)
    eager, static = both(model, prompts, temperature=0, max_new_tokens=10)
    assert [s.tokens for s in static] == [e.tokens for e in eager]


def test_prefill_groups_cover_sorted_lengths_with_bounded_padding():
    lengths = sorted([1, 2, 2, 5, 9, 10, 11, 30, 31, 40, 80, 81, 200])
    groups = prefill_groups(lengths)
    assert [i for r0, r1 in groups for i in range(r0, r1)] == list(range(len(lengths)))  # in order, each once
    for r0, r1 in groups:
        assert lengths[r1 - 1] <= lengths[r0] + max(8, int(lengths[r0] * 0.25))
    assert prefill_groups([]) == [] and prefill_groups([7]) == [(0, 1)]


def test_greedy_tokens_and_logprobs_equal_eager(model):
    eager, static = both(model, PROMPTS, temperature=0, max_new_tokens=14, logprobs=True)
    for e, s in zip(eager, static):
        assert s.tokens == e.tokens
        assert s.finish_reason == e.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=0)


def test_chunked_prefill_and_context_limit_equal_eager(model):
    eager, static = both(model, PROMPTS, temperature=0, max_new_tokens=100, prefill_chunk=2)
    for e, s in zip(eager, static):
        assert s.tokens == e.tokens
        assert s.finish_reason == e.finish_reason == "context"
        assert len(PROMPTS[0]) + len(static[0].tokens) == model.args.max_seq_len


def test_stop_tokens_strings_and_streaming_equal_eager(model):
    free = generate(model, PROMPTS, engine="eager", temperature=0, max_new_tokens=10, stop_tokens=())
    stop = free[0].tokens[3]
    seen = {"eager": [], "static": []}
    outs = {k: generate(model, PROMPTS, engine=k, temperature=0, max_new_tokens=10, stop_tokens=(stop,),
                        on_token=lambda r, t, k=k: seen[k].append((r, t))) for k in seen}
    assert [o.tokens for o in outs["static"]] == [o.tokens for o in outs["eager"]]
    assert [o.finish_reason for o in outs["static"]] == [o.finish_reason for o in outs["eager"]]
    assert outs["static"][0].finish_reason == "stop" and outs["static"][0].tokens[-1] == stop
    assert seen["static"] == seen["eager"]  # the same tokens, in the same order, row by row

    class CharTok:
        bos_id, eos_id = 1, 2

        def decode(self, ids):
            return "".join(chr(i + 30) for i in ids if i > 2)

    tok = CharTok()
    needle = tok.decode(free[0].tokens)[4:6]
    e, s = both(model, PROMPTS, temperature=0, max_new_tokens=12, stop_strings=(needle,), tokenizer=tok)
    assert [(x.tokens, x.text, x.finish_reason) for x in s] == [(x.tokens, x.text, x.finish_reason) for x in e]
    assert s[0].finish_reason == "stop"


def test_finished_rows_leave_the_batch_without_changing_outputs(model, monkeypatch):
    """Rows that stop early are compacted away (the step runs on fewer rows) and every output stays the same,
    greedy and sampled."""
    free = generate(model, PROMPTS, engine="eager", temperature=0, max_new_tokens=12, stop_tokens=())
    stop = free[1].tokens[2]  # ends row 1 (and row 3, the same prompt) early
    widths = []
    real_step = Decoder.step

    def spy(self, cache, tok, *a, **k):
        widths.append(tok.shape[0])
        return real_step(self, cache, tok, *a, **k)

    monkeypatch.setattr(Decoder, "step", spy)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=5)):
        widths.clear()
        packed = generate(model, PROMPTS, engine="static", max_new_tokens=12, stop_tokens=(stop,), **kw)
        assert min(widths) < len(PROMPTS)
        widths.clear()
        full = generate(model, PROMPTS, engine="static", max_new_tokens=12, stop_tokens=(stop,), compact=False, **kw)
        assert set(widths) == {len(PROMPTS)}
        assert [o.tokens for o in packed] == [o.tokens for o in full]
        assert [o.finish_reason for o in packed] == [o.finish_reason for o in full]
    greedy = generate(model, PROMPTS, engine="eager", temperature=0, max_new_tokens=12, stop_tokens=(stop,))
    again = generate(model, PROMPTS, engine="static", temperature=0, max_new_tokens=12, stop_tokens=(stop,))
    assert [o.tokens for o in again] == [o.tokens for o in greedy]


@pytest.mark.parametrize("check", ["greedy", "context", "stops", "compaction"])
def test_overlapped_readback_gives_the_same_outputs(model, monkeypatch, check):
    """The CUDA loop (the next step queued before this step's tokens are read back, so one step may run past the
    end) run on the CPU: every equality above still holds."""
    import llama2.generate.batch as batch

    monkeypatch.setattr(batch, "_OVERLAP_DEVICES", ("cpu", "cuda"))
    starts = []
    real_start = batch._Readback.start
    monkeypatch.setattr(batch._Readback, "start", lambda self, *a: (starts.append(1), real_start(self, *a))[1])
    {"greedy": test_greedy_tokens_and_logprobs_equal_eager, "context": test_chunked_prefill_and_context_limit_equal_eager,
     "stops": test_stop_tokens_strings_and_streaming_equal_eager,
     "compaction": lambda m: test_finished_rows_leave_the_batch_without_changing_outputs(m, monkeypatch)}[check](model)
    assert starts  # the overlapped path ran


def test_sampled_rows_do_not_depend_on_the_batch(model):
    kw = dict(engine="static", temperature=1.0, top_p=1.0, max_new_tokens=15, stop_tokens=())
    a = generate(model, PROMPTS, seed=7, **kw)
    b = generate(model, PROMPTS, seed=7, **kw)
    c = generate(model, PROMPTS, seed=8, **kw)
    alone = generate(model, PROMPTS[:1], seed=7, **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    assert alone[0].tokens == a[0].tokens
    assert a[1].tokens != a[3].tokens  # the same prompt twice: two different samples (per-row seeds)


def test_eager_and_static_draw_the_same_samples(model):
    """One token sampler serves both paths, keyed by (row seed, token index): sampled completions agree too, not
    only greedy ones (up to the float rounding of the two paths' logits, which these draws do not meet)."""
    for kw in (dict(temperature=1.0, top_p=1.0), dict(temperature=0.8, top_p=0.9, top_k=20)):
        e = generate(model, PROMPTS, engine="eager", seed=3, max_new_tokens=12, stop_tokens=(), **kw)
        s = generate(model, PROMPTS, engine="static", seed=3, max_new_tokens=12, stop_tokens=(), **kw)
        assert [x.tokens for x in e] == [x.tokens for x in s]
        assert len({tuple(x.tokens) for x in s}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    g = generate(model, PROMPTS, engine="static", temperature=0, max_new_tokens=8, stop_tokens=())
    k1 = generate(model, PROMPTS, engine="static", temperature=1.3, top_k=1, top_p=1.0, max_new_tokens=8, seed=0, stop_tokens=())
    p0 = generate(model, PROMPTS, engine="static", temperature=1.3, top_p=1e-6, max_new_tokens=8, seed=0, stop_tokens=())
    assert [x.tokens for x in g] == [x.tokens for x in k1] == [x.tokens for x in p0]


def test_uniforms_are_uniform_and_keyed_by_seed_and_counter():
    n = 200_000
    seeds = torch.arange(n) * 7919 % (2**31 - 1)
    u = uniforms(seeds, torch.zeros(n, dtype=torch.long))
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (counts / n - 0.05).abs().max() < 0.003  # each bin within 0.3 points of 5% (sd ~0.05 points)
    v = uniforms(torch.full((n,), 12345), torch.arange(n))  # one seed, successive tokens
    assert (torch.histc(v.float(), bins=20, min=0, max=1) / n - 0.05).abs().max() < 0.003
    assert abs(torch.corrcoef(torch.stack([v[:-1], v[1:]]))[0, 1]) < 0.01  # successive draws uncorrelated
    assert torch.equal(u, uniforms(seeds, torch.zeros(n, dtype=torch.long)))


def test_sample_tokens_follows_temperature_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    logits = probs.log()[None].repeat(n, 1)
    u = uniforms(torch.arange(n), torch.zeros(n, dtype=torch.long))

    def freq(mode, temperature=1.0, top_p=1.0, top_k=0):
        s = Sampler(torch.full((n,), temperature), torch.full((n,), top_p), torch.full((n,), top_k), torch.arange(n))
        return torch.bincount(sample_tokens(logits, s, u, mode), minlength=4).float() / n

    assert torch.allclose(freq("sample"), probs, atol=0.01)
    f = freq("filter", top_p=0.7)  # nucleus {0, 1}, renormalised to 5/8, 3/8
    assert f[2:].sum() == 0 and abs(f[0].item() - 0.625) < 0.01
    f = freq("filter", top_k=3)
    assert f[3] == 0 and abs(f[2].item() - 0.15 / 0.95) < 0.01
    assert torch.allclose(freq("sample", temperature=0.5), probs**2 / (probs**2).sum(), atol=0.01)
    assert freq("filter", temperature=0.0)[0] == 1  # temperature 0: argmax in any mode
    # rows with their own settings in one call
    s = Sampler(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.1]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert sample_tokens(torch.tensor([[0.0, 1.0, 0.5, 0.0], [3.0, 0.0, 0.0, 0.0]]), s, torch.tensor([0.9, 0.9]), "filter").tolist() == [1, 0]


# -- the continuous-batching engine --------------------------------------------------------------------------------
def test_engine_concurrent_requests_equal_each_alone(model):
    alone = {}
    for i, p in enumerate(PROMPTS[:3]):
        eng = Engine(model, max_batch=1)
        rid = eng.submit(p, temperature=0, max_new_tokens=9, stop_tokens=())
        alone[i] = eng.run()[rid]
    eager = generate(model, PROMPTS[:3], engine="eager", temperature=0, max_new_tokens=9, stop_tokens=())
    assert [alone[i] for i in range(3)] == [c.tokens for c in eager]

    eng = Engine(model, max_batch=4)
    ids = [eng.submit(p, temperature=0, max_new_tokens=9 - 2 * i, stop_tokens=()) for i, p in enumerate(PROMPTS[:3])]
    first = eng.step()  # all three admitted: each reports its first two tokens
    assert sorted(e.request_id for e in first) == sorted(ids * 2)
    late = eng.submit(PROMPTS[0], temperature=0, max_new_tokens=4, stop_tokens=())  # joins between steps
    out: dict[int, list[int]] = {}
    reasons = {}
    for e in first:
        out.setdefault(e.request_id, []).append(e.token)
    while eng.has_work():
        for e in eng.step():
            out.setdefault(e.request_id, []).append(e.token)
            if e.finished:
                reasons[e.request_id] = e.finish_reason
    for i, rid in enumerate(ids):
        assert out[rid] == alone[i][: 9 - 2 * i]
        assert reasons[rid] == "length"
    assert out[late] == alone[0][:4]


def test_engine_sampled_request_does_not_depend_on_its_neighbours(model):
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=42, stop_tokens=(), logprobs=True)
    eng = Engine(model, max_batch=1)
    rid = eng.submit(PROMPTS[0], sp)
    alone = eng.run()[rid]
    eng = Engine(model, max_batch=3)
    eng.submit(PROMPTS[1], sp, seed=1)
    rid = eng.submit(PROMPTS[0], sp)
    eng.submit(PROMPTS[2], sp, temperature=0)
    events = []
    while eng.has_work():
        events += eng.step()
    mine = [e for e in events if e.request_id == rid]
    assert [e.token for e in mine] == alone
    assert all(e.logprob is not None and e.logprob <= 0 for e in mine)


def test_engine_stop_context_and_cancel(model):
    eng = Engine(model, max_batch=2, max_seq_len=20)
    free = generate(model, [PROMPTS[0]], engine="eager", temperature=0, max_new_tokens=20, stop_tokens=())[0].tokens
    a = eng.submit(PROMPTS[0], temperature=0, max_new_tokens=50, stop_tokens=(free[2],))
    b = eng.submit(PROMPTS[1], temperature=0, max_new_tokens=50, stop_tokens=())
    c = eng.submit(PROMPTS[2], temperature=0, max_new_tokens=50, stop_tokens=())
    eng.step()
    assert eng.free_slots == 0 and [r.id for r in eng.waiting] == [c]
    assert eng.cancel(b) and eng.free_slots == 1  # the slot is free at once
    assert not eng.cancel(b)
    events = []
    while eng.has_work():
        events += eng.step()
    by = {}
    for e in events:
        by.setdefault(e.request_id, []).append(e)
    assert by[a][-1].finish_reason == "stop" and by[a][-1].token == free[2]
    assert b not in by  # cancelled: nothing more from it
    assert by[c][-1].finish_reason == "context"
    assert len(PROMPTS[2]) + len(by[c]) == 20  # c ran to the engine's context: prompt + generated = max_seq_len
    assert by[c][-1].finished and all(not e.finished for e in by[c][:-1])
    with pytest.raises(ValueError, match="context"):
        eng.submit([1] * 20)


def test_compile_failure_falls_back_with_a_warning(model, monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    m = Transformer(model.args).init_weights(std=0.3, seed=1).eval()  # a fresh model: no cached compiled step
    with pytest.warns(RuntimeWarning, match="compile"):
        out = generate(m, PROMPTS, engine="static", compile=True, temperature=0, max_new_tokens=6, stop_tokens=())
    ref = generate(m, PROMPTS, engine="eager", temperature=0, max_new_tokens=6, stop_tokens=())
    assert [o.tokens for o in out] == [o.tokens for o in ref]
    assert decoder_for(m).compile_failed


def test_compiled_step_equals_eager(model):
    eager, _ = both(model, PROMPTS, temperature=0, max_new_tokens=10, logprobs=True)
    comp = generate(model, PROMPTS, engine="static", compile=True, temperature=0, max_new_tokens=10, logprobs=True,
                    stop_tokens=())
    assert not decoder_for(model).compile_failed
    for e, c in zip(eager, comp):
        assert c.tokens == e.tokens
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=1e-4, rtol=0)


def test_compile_none_waits_until_eager_time_would_have_paid_for_it(model, monkeypatch):
    """compile=None (the default): no compile while the eager steps taken are worth less than a compile; then
    the step is compiled once and kept (torch.compile replaced by a recorder: no real compile in a unit test)."""
    compiled = []

    def fake_compile(fn, **kw):
        compiled.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    m = Transformer(model.args).init_weights(std=0.3, seed=1).eval()
    dec = decoder_for(m)
    ref = generate(m, PROMPTS, engine="static", compile=False, temperature=0, max_new_tokens=8, stop_tokens=())
    out = generate(m, PROMPTS, engine="static", temperature=0, max_new_tokens=8, stop_tokens=())
    assert not compiled and dec.eager_seconds > 0  # a short call: eager
    dec.compile_seconds = dec.eager_seconds * 0.3  # as if compiling cost about a short call's worth of steps
    out = generate(m, PROMPTS, engine="static", temperature=0, max_new_tokens=8, stop_tokens=())
    assert len(compiled) == 1
    assert [o.tokens for o in out] == [o.tokens for o in ref]
    generate(m, PROMPTS, engine="static", temperature=0, max_new_tokens=8, stop_tokens=())
    assert len(compiled) == 1  # kept for later calls


def test_auto_leaves_hooked_models_to_the_eager_path(model, monkeypatch):
    """engine="auto" must not bypass forward hooks that materialise parameters (FSDP): such a model decodes
    through model.forward."""
    from llama2.generate import api

    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        assert not api._static_engine_applies(model)
        generate(model, PROMPTS[:1], temperature=0, max_new_tokens=3, stop_tokens=())
        assert calls  # the eager loop ran the model's forward (and its hooks)
    finally:
        handle.remove()
    assert api._static_engine_applies(model)


def test_engine_refuses_bad_settings_and_tokens_outside_the_vocabulary(model):
    """Settings that would loop forever (max_batch 0), index past a chunk (prefill_chunk 0) or hold no prompt
    are refused at construction; a token id the embedding does not have is refused at submit, before it can fail
    the whole running batch."""
    for kw in (dict(max_batch=0), dict(prefill_chunk=0), dict(max_seq_len=1)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be >= "):
            Engine(model, **kw)
    eng = Engine(model, max_batch=2)
    with pytest.raises(ValueError, match="token 101 is outside the vocabulary"):
        eng.submit([1, 5, 101], max_new_tokens=2)
    with pytest.raises(ValueError, match="token -1 is outside"):
        eng.submit([1, -1], max_new_tokens=2)
    assert eng.submit([1, 5, 100], max_new_tokens=2) is not None


def test_a_stop_string_longer_than_32_tokens_is_found(llama_tokenizer):
    """The window of tokens decoded to look for a stop string follows the stop strings' length: digits are one
    token each in the Llama 2 vocabulary, so a 40-digit stop string spans 40+ tokens (a fixed 32-token window, as
    before, never saw it whole)."""
    from llama2.generate import ends_in_stop

    stop = "1234567890" * 4
    ids = llama_tokenizer.encode("the code is " + stop)
    assert len(llama_tokenizer.encode(stop)) > 32
    assert ends_in_stop(llama_tokenizer, ids, [stop])
    assert not ends_in_stop(llama_tokenizer, ids[:-1], [stop])
    assert not ends_in_stop(llama_tokenizer, ids, [])
    assert ends_in_stop(llama_tokenizer, llama_tokenizer.encode("say hi there"), [" hi"])  # a leading space is kept
