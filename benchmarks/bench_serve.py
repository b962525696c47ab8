"""``llama2 serve`` under a bounded load on loopback: continuous batching against one request at a time.

The same load (``--requests`` distinct greedy completions of ``--max-tokens`` tokens, sent by ``--clients``
concurrent clients with the official ``openai`` client) goes to two servers over the same checkpoint:

* **batched**: ``max_batch = --max-batch`` (default 8): requests join the running batch between decode steps;
* **one at a time**: ``max_batch = 1``: the same clients, but the server decodes one request at a time (the others
  wait in its queue), which is what a server without batching does.

Each server runs in its own process (``llama2.serve.serve``), so the clients' threads do not share its interpreter,
with ``--threads`` intra-op threads. Reported per mode: requests/s, completion tokens/s, p50/p99 latency of a
request (sent to answered), and the check the issue asks for: no request lost or errored, and every answer equal to
the other mode's answer to the same prompt (greedy output depends on the prompt only, so an answer given to the
wrong client would show up as a mismatch). The issue's target: batched >= 3x the tokens/s of one at a time at 8
clients on the CPU.

The model is a preset with random weights and the real Llama 2 vocabulary (32,000 pieces, as the paper's models:
the output layer is a large share of a small model's step, which is what batching amortises).

    python benchmarks/bench_serve.py                         # toy-25m, 8 clients, 200 requests, 64 tokens each
    python benchmarks/bench_serve.py --preset bench-100m --requests 64 --json serve.json

Not part of ``make test``: it takes minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, environment

VOCAB = ROOT / "tests" / "assets" / "ggml-vocab-llama-spm.gguf"


def make_checkpoint(preset: str, out: Path) -> Path:
    from llama2 import ModelArgs, Tokenizer, Transformer
    from llama2.checkpoint import save

    tok = Tokenizer.from_file(VOCAB)
    model = Transformer(ModelArgs.from_preset(preset, vocab_size=tok.vocab_size)).init_weights(seed=0)
    return save(model, out, tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``llama2.serve.serve`` in a child process (what ``llama2 serve`` runs), until the ``with`` block ends."""

    def __init__(self, ckpt: Path, max_batch: int, threads: int, max_seq_len: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (f"import torch; torch.set_num_threads({threads}); from llama2.serve import serve; "
                f"serve({str(ckpt)!r}, port={self.port}, max_batch={max_batch}, max_seq_len={max_seq_len}, "
                "model_name='bench', log_level='warning')")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env)

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not start within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_load(url: str, prompts: list[str], clients: int, max_tokens: int, endpoint: str) -> dict:
    """Send every prompt once, ``clients`` at a time; per request: latency, completion tokens, text or error."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(prompt: str) -> dict:
        t0 = time.perf_counter()
        try:
            if endpoint == "chat":
                r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                   temperature=0, max_tokens=max_tokens)
                text = r.choices[0].message.content
            else:
                r = client.completions.create(model="bench", prompt=prompt, temperature=0, max_tokens=max_tokens)
                text = r.choices[0].text
            return {"latency": time.perf_counter() - t0, "tokens": r.usage.completion_tokens, "text": text}
        except Exception as e:  # noqa: BLE001 - counted as a lost request
            return {"latency": time.perf_counter() - t0, "tokens": 0, "error": f"{type(e).__name__}: {e}"}

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, prompts[: 2 * clients]))  # warm-up: first-call costs are not the server's throughput
        t0 = time.perf_counter()
        results = list(pool.map(one, prompts))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)
    return {
        "wall_s": wall,
        "requests": len(prompts),
        "errors": len(results) - len(ok),
        "completion_tokens": tokens,
        "requests_per_s": len(ok) / wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "texts": [r.get("text") for r in results],
        "first_error": next((r["error"] for r in results if "error" in r), None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="toy-25m", help="model shape (random weights, vocabulary 32000)")
    ap.add_argument("--ckpt", help="an existing checkpoint instead of a random preset")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=200, help="requests per mode")
    ap.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--max-batch", type=int, default=8, help="the batched server's max_batch")
    ap.add_argument("--max-seq-len", type=int, default=512, help="the servers' KV cache length per slot")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (1: best on a shared 2-core box)")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()

    prompts = [f"Request {i}: a short note about the number {i * 37 % 1000} and the colour of item {i}."
               for i in range(a.requests)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(a.ckpt) if a.ckpt else make_checkpoint(a.preset, Path(tmp) / a.preset)
        results = {}
        for mode, batch in (("batched", a.max_batch), ("one at a time", 1)):
            with ServerProcess(ckpt, batch, a.threads, a.max_seq_len) as srv:
                print(f"{mode}: max_batch={batch}, {a.clients} clients, {a.requests} requests ...", flush=True)
                results[mode] = run_load(srv.url, prompts, a.clients, a.max_tokens, a.endpoint)
    load_after = os.getloadavg()

    b, s = results["batched"], results["one at a time"]
    mismatches = sum(x != y for x, y in zip(b["texts"], s["texts"]))
    print(f"\nllama2 serve, {a.preset if not a.ckpt else a.ckpt}, {a.endpoint}, {a.clients} clients, {a.requests} "
          f"requests x {a.max_tokens} tokens, greedy, server threads {a.threads}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)\n")
    print("| mode | max_batch | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | errors |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        batch = a.max_batch if mode == "batched" else 1
        print(f"| {mode} | {batch} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | "
              f"{r['latency_p99_s']:.2f} | {r['errors']} |")
    ratio = b["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else float("nan")
    print(f"\nbatched / one at a time: {ratio:.2f}x tokens/s (target >= 3x)")
    print(f"answers differing between the two modes: {mismatches} of {a.requests}; lost requests: "
          f"{b['errors'] + s['errors']}" + (f" (first error: {b['first_error'] or s['first_error']})"
                                            if b["errors"] + s["errors"] else ""))
    if a.json:
        out = {"config": vars(a), "environment": environment(), "load_average": [load_before, load_after],
               "ratio_tokens_per_s": ratio, "mismatches": mismatches,
               "results": {m: {k: v for k, v in r.items() if k != "texts"} for m, r in results.items()}}
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
