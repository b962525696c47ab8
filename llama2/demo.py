"""A short tour of what the package does, on a tiny model, in well under a minute on a laptop CPU.

Writes a small seeded corpus, trains a Llama-style tokenizer on it, fits a tiny Llama 2 model for a few
hundred steps so its greedy output is recognisable, then converts it through every checkpoint format
(native -> Hugging Face -> Meta in 2 shards -> GGUF), reloading each and checking the logits agree,
and generates from the final copy. The whole recipe on the toy world is ``llama2 pipeline`` (``make run``).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

NAMES = ["Ada", "Bram", "Cleo", "Dov", "Esme", "Finn", "Gala", "Hugo"]
PLACES = ["the harbour", "the library", "the mill", "the orchard", "the tower"]
THINGS = ["a lantern", "a map", "a violin", "a red kite", "an old clock", "a jar of honey"]


def demo_corpus(seed: int = 0, n: int = 3000) -> str:
    """Simple, regular sentences (a model this small can learn them in seconds)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        who, where, what = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        lines.append(rng.choice([
            f"{who} lives near {where} and keeps {what}.",
            f"On Sunday {who} walked to {where} with {what}.",
            f"{who} has {a} apples and buys {b} more, so {who} has {a + b} apples.",
            f"At {where}, {who} found {what}.",
        ]))
    return "\n".join(lines) + "\n"


def run_demo(out: Path, seed: int = 0, steps: int = 300) -> dict:
    from .checkpoint import load, save
    from .generate import Llama
    from .kv_cache import KVCache
    from .model import ModelArgs, Transformer
    from .tokenizer import train_tokenizer

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text(demo_corpus(seed), encoding="utf-8")
    tok = train_tokenizer([corpus], vocab_size=400, out=out / "tokenizer.model")
    print(f"1. tokenizer: {tok.vocab_size} pieces trained on {corpus} (BPE, split digits, byte fallback)")
    print(f"   'Ada has 12 apples.' -> {[tok.id_to_piece(i) for i in tok.encode('Ada has 12 apples.')]}")

    args = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=32, max_seq_len=256)
    model = Transformer(args).init_weights(seed=seed)
    print(f"2. model: {model.num_params() / 1e6:.2f}M parameters (dim {args.dim}, {args.n_layers} layers, "
          f"{args.n_heads} query heads sharing {args.n_kv_heads} key/value heads)")

    # A plain next-token fit, only so the demo's output is readable (`llama2 pretrain` is the real stage).
    data = torch.tensor(tok.encode(corpus.read_text(encoding="utf-8"), bos=True), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    T, B = 64, 16
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        x = torch.stack([data[i : i + T] for i in idx])
        y = torch.stack([data[i + 1 : i + T + 1] for i in idx])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"   step {step:4d}  loss {loss.item():.3f}")
    model.eval()

    probe = torch.tensor([tok.encode("On Sunday Ada walked to", bos=True)])
    with torch.inference_mode():
        ref = model(probe)
    path = save(model, out / "native", format="native", tokenizer=tok, overwrite=True)
    print("3. checkpoints (each reloaded, logits compared with the original):")
    chain = [("hf", out / "hf", {}), ("meta", out / "meta", {"shards": 2}), ("gguf", out / "model.gguf", {})]
    report = {}
    for fmt, dst, kw in chain:
        m, t = load(path)
        path = save(m, dst, format=fmt, tokenizer=t, overwrite=True, **kw)
        m2, _ = load(path)
        with torch.inference_mode():
            diff = (m2(probe) - ref).abs().max().item()
        report[fmt] = diff
        print(f"   {fmt:6s} -> {path}   max |logit diff| {diff:.2e}")
        if diff > 1e-4:
            raise RuntimeError(f"{fmt} round trip changed the logits by {diff}")

    # Meta's params.json has no context length (Meta passes max_seq_len at load time), so the final copy is
    # written from the trained model itself rather than from the end of the chain.
    save(model, out / "final", format="native", tokenizer=tok, overwrite=True)
    llama = Llama.from_pretrained(out / "final")
    print("4. generation (greedy, KV cache; a batch of prompts of different lengths):")
    prompts = ["On Sunday Ada walked to", "Cleo has 3 apples and buys 4 more, so", "At the mill,"]
    for p, c in zip(prompts, llama.text_completion(prompts, temperature=0, max_new_tokens=24, stop_strings=("\n",))):
        print(f"   {p!r} -> {c!r}")
    print("5. KV cache at full context, batch 1, bf16 (GQA caches n_kv_heads, not n_heads):")
    for name in ("llama2-7b", "llama2-70b"):
        a = ModelArgs.from_preset(name)
        with torch.device("meta"):
            c = KVCache(a, 1, dtype=torch.bfloat16, device="meta")
        print(f"   {name}: {c.nbytes / 2**30:.2f} GiB ({a.n_kv_heads} of {a.n_heads} heads cached, {a.n_layers} layers)")
    print(f"done in {time.perf_counter() - t_start:.0f}s. Try:  .venv/bin/llama2 chat --ckpt {out / 'final'}  "
          f"or  .venv/bin/llama2 generate --ckpt {out / 'final'} --prompt 'At the harbour,' temperature=0")
    return report
