"""Whole-batch decoding over the static cache: what ``generate`` runs for a list of prompts.

Same contract as the eager reference loop (left padding, stop tokens kept, stop strings, ``on_token`` in row
order as tokens are drawn, "length"/"context"/"stop"). On top of it:

* identical prompts (rejection sampling asks for K samples of each) are prefilled once and their cache rows
  copied (``prefill_shared``);
* rows that have finished leave the batch: whenever at least a quarter of the rows in the batch are done the cache
  and the per-row state are compacted to the live rows (``cfg.compact``), so a long answer does not keep the
  finished short ones computing;
* on CUDA the next step is queued before this step's tokens are read back (into pinned memory, behind an event),
  so the host's work per token (recording, stop tests, the step's launch and guards) overlaps the device's.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..model import Transformer
from .decoder import ATTN_BUCKET, EAGER_ATTN_BUCKET, attn_bucket, decoder_for, prefill_shared
from .sampler import Sampler, sample_tokens, token_logprob, uniforms
from .stops import Outputs

__all__ = ["decode_static"]

_OVERLAP_DEVICES = ("cuda",)  # where the next step is queued before this one's tokens are read


class _Readback:
    """The host's copy of a step's (B,) tokens and log-probabilities, taken without blocking: into pinned buffers
    on CUDA, with an event that ``values`` waits on (so the device can run the next step meanwhile)."""

    def __init__(self, B: int, want_lp: bool, device: torch.device):
        pin = device.type == "cuda"
        self.tok = torch.empty(B, dtype=torch.long, pin_memory=pin)
        self.lp = torch.empty(B, dtype=torch.float32, pin_memory=pin) if want_lp else None
        self.event = torch.cuda.Event() if pin else None
        self.device = device
        self.n = 0

    def start(self, tok: torch.Tensor, lp: torch.Tensor | None) -> None:
        self.n = n = tok.shape[0]
        self.tok[:n].copy_(tok, non_blocking=True)
        if self.lp is not None and lp is not None:
            self.lp[:n].copy_(lp, non_blocking=True)
        if self.event is not None:  # on the stream of the model's device, which copies (not the current device's)
            self.event.record(torch.cuda.current_stream(self.device))

    def values(self) -> tuple[list[int], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()
        n = self.n
        return self.tok[:n].tolist(), (self.lp[:n].tolist() if self.lp is not None else None)


class _Live:
    """The rows still decoding: their original row numbers, next tokens (and logprobs), start columns and sampling
    settings, compacted together with the cache."""

    def __init__(self, B: int, tok, lp, starts, s: Sampler):
        self.rows, self.tok, self.lp, self.starts, self.s = list(range(B)), tok, lp, starts, s

    def compact(self, cache, done: list[bool], lp_too: bool) -> None:
        keep = [i for i, b in enumerate(self.rows) if not done[b]]
        idx = torch.tensor(keep, device=self.tok.device)
        cache.select(idx)
        self.tok, self.starts, self.s = self.tok[idx], self.starts[idx], self.s.select(idx)
        if lp_too and self.lp is not None:
            self.lp = self.lp[idx]
        self.rows = [self.rows[i] for i in keep]


def decode_static(model: Transformer, prompts: Sequence[Sequence[int]], cfg, outs: Outputs) -> None:
    """Decode ``prompts`` with the static engine into ``outs`` (a ``GenerationConfig``'s settings, ``cfg``). Sampled
    rows draw ``uniforms(row seed, token index)``: reproducible for a seed and independent of batch composition and
    compaction."""
    device = model.tok_embeddings.weight.device
    args = model.args
    B = len(prompts)
    P = max(len(p) for p in prompts)
    total = min(args.max_seq_len, P + cfg.max_new_tokens)
    n_new = total - P
    if n_new <= 0:
        return

    dec = decoder_for(model)
    dec.sig = dec.signature()
    # compiled steps (and CUDA graphs, kept per shape) want few shapes; eager CPU steps want short attention
    bucket = ATTN_BUCKET if (cfg.compile or device.type != "cpu") else EAGER_ATTN_BUCKET
    cache, logits, starts = prefill_shared(dec, prompts, P, attn_bucket(total, args.max_seq_len, bucket),
                                           cfg.prefill_chunk)
    s, mode = Sampler.for_batch(cfg, B, device)
    tok = sample_tokens(logits, s, uniforms(s.seeds, torch.zeros(B, dtype=torch.long, device=device)), mode)
    live = _Live(B, tok, token_logprob(logits, tok) if cfg.logprobs else None, starts, s)

    def launch(step: int):
        col = P + step  # the column this step's token is written to
        n = len(live.rows)
        cols = torch.full((n,), col, dtype=torch.long, device=device)
        counters = torch.full((n,), step + 1, dtype=torch.long, device=device)
        return dec.step(cache, live.tok, cols, live.starts, attn_bucket(col + 1, cache.max_seq_len, bucket), live.s,
                        counters, mode, cfg.logprobs, cfg.compile)

    overlap = device.type in _OVERLAP_DEVICES
    readback = _Readback(B, cfg.logprobs, device) if overlap else None
    for step in range(n_new):
        last = step == n_new - 1
        ahead = None
        if overlap:
            readback.start(live.tok, live.lp)
            if not last:
                ahead = launch(step)  # may compute one step past the end of every row: discarded
            toks, lps = readback.values()
        else:  # a (B,) copy to the host, the only per-token sync
            toks, lps = live.tok.tolist(), (live.lp.tolist() if live.lp is not None else None)
        n_done = outs.record(live.rows, toks, lps)
        if n_done == len(live.rows) or last:
            break
        # compaction changes the batch size; a CUDA graph is recorded per size, so on CUDA with a compiled step
        # the batch keeps its shape (finished rows ride along) instead
        compact = (cfg.compact and n_done and n_done * 4 >= len(live.rows)
                   and not (cfg.compile and device.type == "cuda"))
        if ahead is not None:  # the step already ran on the old batch: compact its outputs with the cache
            live.tok, live.lp = ahead
        if compact:
            live.compact(cache, outs.done, lp_too=ahead is not None)
        if ahead is None:
            live.tok, live.lp = launch(step)
