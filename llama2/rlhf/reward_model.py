"""The reward model (paper §3.2.2): the chat model with its next-token head replaced by a scalar head.

"The model architecture and hyper-parameters are identical to those of the pretrained language models, except
that the classification head for next-token prediction is replaced with a regression head for outputting a
scalar reward." :func:`reward_model_from_chat` makes that model from a chat checkpoint; :class:`RewardModel`
loads a trained one and scores (prompt, response) pairs, for rejection sampling and PPO.

A sequence is scored at its last real token: the EOS that closes the response in the Llama 2-Chat layout
(``encode_dialog(dialog + [assistant response])``, exactly what the reward model was trained on, see
:func:`llama2.data.preferences.encode_preference`). Batches are right-padded and the value is read with
:func:`llama2.data.preferences.gather_last`, so padding never changes a score (see :func:`score_batch`).

Its accuracy on preference pairs per rating (Table 8: how often the chosen response scores higher, in each
"significantly better / better / slightly better / negligibly better or unsure" bucket) is
:func:`evaluate_reward`, from the pairs' scores (:func:`score_pairs`, which training's evaluation shares).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..chat import encode_dialog
from ..checkpoint import detect, load
from ..data.batching import pad_sequences
from ..data.preferences import EncodedPair, collate_pairs, encode_preferences, gather_last
from ..data.records import Preference
from ..data.sft import encode_sft_example
from ..dist import Dist, autocast_for, unwrap
from ..generate import decoder_for, forward_cached, prefill_shared
from ..model import Transformer
from ..tokenizer import Tokenizer
from .reward import accuracy_by_rating

__all__ = ["reward_model_from_chat", "score_batch", "encode_scored", "RewardModel", "REWARD_CONFIG_FILE", "score_pairs",
           "evaluate_reward"]

REWARD_CONFIG_FILE = "reward_config.json"  # written by llama2.train.reward beside the checkpoint: kind, margin, ...


def reward_model_from_chat(model: Transformer, seed: int = 0) -> Transformer:
    """A new scalar-head Transformer with every body weight copied from the chat ``model`` (its LM head dropped).

    The new head (``output``, a Linear(dim, 1) with bias) is initialised normal(0, 1/sqrt(dim)), bias 0. The
    paper gives no scheme; our choice and why: the head reads the final RMSNorm's output, whose coordinates
    have a root-mean-square near the norm's gain (about 1), so with this std the first scores are O(1), the
    scale of the Table 27 margins (0..1 small, 0..3 large): the sigmoid of the ranking loss starts neither
    saturated nor flat, and every pair gives the body a useful gradient from the first step. A zero head would
    give the body no gradient on the first step; the 0.02 of LM initialisations would start all scores near 0
    and make the margin dominate the early loss. ``seed`` makes the head's draw reproducible.

    The copy keeps the chat model's device and dtype; ``model`` itself is left untouched.
    """
    if model.args.head != "lm":
        raise ValueError(f"reward_model_from_chat needs a chat model with an LM head; this one has a {model.args.head!r} head")
    args = dataclasses.replace(model.args, head="scalar")
    with torch.device("meta"):
        rm = Transformer(args)
    body = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("output.")}
    ref = model.tok_embeddings.weight
    gen = torch.Generator().manual_seed(seed)
    body["output.weight"] = (torch.randn(1, args.dim, generator=gen) / math.sqrt(args.dim)).to(ref.device, ref.dtype)
    body["output.bias"] = torch.zeros(1, device=ref.device, dtype=ref.dtype)
    rm.load_state_dict(body, strict=True, assign=True)  # strict: every body weight of the chat model is there
    rm.reset_rope()
    rm.gradient_checkpointing = model.gradient_checkpointing
    rm.train(model.training)
    return rm


def score_batch(model: torch.nn.Module, batch: Mapping[str, Any], device: torch.device | str | None = None) -> torch.Tensor:
    """Values (N,) of the rows of a :func:`~llama2.data.preferences.collate_pairs` batch, each read at its last real
    token. Right-padded batches run plain causal attention (a real token never sees the padding after it, so
    the scores equal those of each sequence alone, and SDPA keeps its fast kernels); left-padded ones pass the
    padding-aware mask and the real-token positions, which gives the same scores. Gradients flow (training);
    wrap in ``torch.no_grad()`` for inference. Works on a DDP/FSDP-wrapped model (the call goes through it; pass
    ``device``, the rank's device, since sharded parameters do not say it)."""
    if device is None:
        device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)  # (N, T)
    right_padded = bool(batch["attention_mask"][:, 0].all())  # every row starts with a real token
    if right_padded:
        values = model(tokens)  # (N, T)
    else:
        values = model(tokens, mask=batch["mask"].to(device), position_ids=batch["position_ids"].to(device))
    return gather_last(values, batch["last_index"])  # (N,)


def encode_scored(tokenizer, dialog: Sequence[Mapping[str, str]], response: str, seq_len: int) -> list[int]:
    """Token ids of ``dialog`` (ending with a user turn) answered by ``response``, as the reward model reads them:
    ``encode_dialog(dialog + [assistant response]).ids``, the finished turn closed by its EOS.

    At most ``seq_len`` tokens, cut with the rule of :func:`~llama2.data.preferences.encode_preference` (the same
    code path, via ``encode_sft_example``): the earliest whole (user, assistant) exchanges go first, then the
    start of the last prompt, while one prompt token stays before the response. Only when the response alone
    does not fit (where training would drop the pair) are its own first tokens cut: a score is still owed, and
    it is read at the final EOS with as much of the response as fits.
    """
    if not dialog or dialog[-1].get("role") != "user":
        raise ValueError("a dialog to score must end with a user message (the response answers it)")
    full = [*dialog, {"role": "assistant", "content": response}]
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3 to score a dialog, got {seq_len}")
    ex = encode_sft_example(tokenizer, full, seq_len - 1, "truncate")  # seq_len - 1 positions = seq_len tokens
    if ex is not None:
        return ex.ids
    return encode_dialog(tokenizer, full).ids[-seq_len:]


class RewardModel:
    """A trained reward model and its tokenizer: ``score(dialogs, responses)`` -> one scalar per response.

    >>> rm = RewardModel.from_pretrained("runs/reward-helpfulness")
    >>> rm.score([[{"role": "user", "content": "2+2?"}]], ["4"])        # tensor([1.73])

    Attributes: ``model`` (a Transformer with head "scalar", in eval mode), ``tokenizer``, ``seq_len`` (the
    window sequences are cut to), and, when the checkpoint directory holds ``reward_config.json`` (written by
    ``llama2 reward``), ``kind`` ("helpfulness" or "safety"), ``margin`` ("none", "small", "large") and
    ``config`` (the whole training config); otherwise these are None.
    """

    def __init__(self, model: Transformer, tokenizer, seq_len: int | None = None, kind: str | None = None,
                 margin: str | None = None, config: dict | None = None) -> None:
        if model.args.head != "scalar":
            raise ValueError(f"a reward model needs a scalar head; this model has a {model.args.head!r} head "
                             "(train one from a chat checkpoint with `llama2 reward`)")
        if tokenizer is None:
            raise ValueError("a reward model needs its tokenizer to encode dialogs")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.seq_len = min(seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.kind, self.margin, self.config = kind, margin, config

    @classmethod
    def from_pretrained(cls, path, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> "RewardModel":
        """Load a native checkpoint directory with a scalar head and its tokenizer (e.g. the ``out`` of
        ``llama2 reward``); reads ``reward_config.json`` there if present."""
        path = Path(path)
        fmt = detect(path)
        if fmt != "native":
            raise ValueError(f"{path}: a {fmt} checkpoint; reward models are stored in the native format only "
                             "(the other formats describe language models)")
        model, tokenizer = load(path, dtype=dtype, device=device)
        if model.args.head != "scalar":
            raise ValueError(f"{path}: this checkpoint has an LM head (a language model), not a reward model's scalar "
                             "head; train a reward model from it with `llama2 reward init_from=...`")
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer.model in the checkpoint; a reward model needs its tokenizer")
        meta: dict = {}
        if (path / REWARD_CONFIG_FILE).is_file():
            meta = json.loads((path / REWARD_CONFIG_FILE).read_text(encoding="utf-8"))
        cfg = meta.get("config") or {}
        return cls(model, tokenizer, seq_len=cfg.get("seq_len"), kind=meta.get("kind"), margin=meta.get("margin"),
                   config=cfg or None)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def encode(self, dialog: Sequence[Mapping[str, str]], response: str) -> list[int]:
        """The ids scored for one (dialog, response); see :func:`encode_scored`."""
        return encode_scored(self.tokenizer, dialog, response, self.seq_len)

    def score(self, dialogs: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Scores (N,) float32 on the CPU of each ``responses[i]`` to ``dialogs[i]`` (a dialog ending with a user
        turn; an optional system message first)."""
        if len(dialogs) != len(responses):
            raise ValueError(f"{len(dialogs)} dialogs but {len(responses)} responses")
        keys: dict[str, int] = {}
        groups = [keys.setdefault(json.dumps(d, sort_keys=True), len(keys)) for d in dialogs]
        return self.score_ids([self.encode(d, r) for d, r in zip(dialogs, responses)], batch_size, groups=groups)

    @torch.no_grad()
    def score_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 16,
                  groups: Sequence[int] | None = None) -> torch.Tensor:
        """Scores (N,) of already encoded sequences (each scored at its last token; longer than ``seq_len`` keeps
        its last ``seq_len`` tokens). Sequences are batched by length (less padding), right-padded, and the
        scores returned in the input order.

        ``groups``: a label per sequence; sequences with the same label (answers to one dialog: rejection
        sampling's K samples, a preference pair) share their common first tokens, which are then computed once
        (the model is causal: a prefix's keys and values do not depend on what follows it). Scores equal the
        separate ones to float rounding."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        seqs = [list(s)[-self.seq_len:] for s in ids]
        if any(not s for s in seqs):
            raise ValueError("cannot score an empty sequence")
        if groups is not None and len(groups) != len(seqs):
            raise ValueError(f"{len(groups)} group labels for {len(seqs)} sequences")
        out = torch.empty(len(seqs), dtype=torch.float32)
        members: dict[Any, list[int]] = {}
        for i, g in enumerate(groups if groups is not None else range(len(seqs))):
            members.setdefault(g, []).append(i)
        shared = [m for m in members.values() if len(m) > 1]
        alone = [m[0] for m in members.values() if len(m) == 1]
        if shared:
            self._score_shared(seqs, shared, batch_size, out)
        self._score_plain(seqs, alone, batch_size, out)
        return out

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def _score_plain(self, seqs: list[list[int]], which: Sequence[int], batch_size: int, out: torch.Tensor) -> None:
        order = sorted(which, key=lambda i: len(seqs[i]))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            padded = pad_sequences([seqs[j] for j in idx])  # right-padded: plain causal attention scores exactly
            batch = {"tokens": padded.tokens, "attention_mask": padded.real, "last_index": padded.last_index}
            with self._autocast():
                values = score_batch(self.model, batch)  # (n,)
            out[torch.tensor(idx)] = values.float().cpu()

    def _score_shared(self, seqs: list[list[int]], groups: list[list[int]], batch_size: int, out: torch.Tensor) -> None:
        """Score groups of sequences with a common prefix: each group's prefix (the longest one common to its
        members, leaving each at least one token of its own) prefilled once into a static KV cache and copied to
        its members' rows, then every member's own tokens run over it (llama2.generate), read at its last token.
        About ``4 * batch_size`` rows a call (the rows are short: only the part after the prefix)."""
        def common(m: list[int]) -> int:  # the common prefix, leaving every member >= 1 token of its own
            return min(len(os.path.commonprefix([seqs[i] for i in m])), min(len(seqs[i]) for i in m) - 1)

        plain: list[int] = []
        work = []
        for m in groups:
            n = common(m)
            if n < 1:
                plain += m
            else:
                work.append((n, m))
        work.sort(key=lambda w: w[0])  # similar prefix lengths share a call
        dec, dev = decoder_for(self.model), self.device
        rows_per_call = 4 * batch_size
        i = 0
        while i < len(work):
            chunk, rows, longest = [], 0, (0, 0)  # longest prefix, longest suffix: the call's cache is their sum
            while i < len(work):
                n, m = work[i]
                grown = (max(longest[0], n), max(longest[1], max(len(seqs[j]) - n for j in m)))
                if chunk and (rows + len(m) > rows_per_call or sum(grown) > self.model.args.max_seq_len):
                    break  # (a group alone always fits: its sequences do)
                chunk.append(work[i])
                rows, longest = rows + len(m), grown
                i += 1
            idx = [j for _, m in chunk for j in m]
            prefixes = [seqs[j][:n] for n, m in chunk for j in m]
            suffixes = [seqs[j][n:] for n, m in chunk for j in m]
            P = max(len(p) for p in prefixes)
            S = max(len(x) for x in suffixes)
            padded = pad_sequences(suffixes)  # right-padded after the prefix; each read at its own last token
            with self._autocast():
                cache, _, starts = prefill_shared(dec, prefixes, P, P + S, chunk=512, fresh=True)
                cols = torch.arange(P, P + S, device=dev).expand(len(idx), -1)
                h = forward_cached(self.model, cache.k, cache.v, padded.tokens.to(dev), cols, starts, P + S,
                                   last=padded.last_index.to(dev))  # (n, C)
                values = self.model.output(h).squeeze(-1)
            out[torch.tensor(idx)] = values.float().cpu()
        if plain:
            self._score_plain(seqs, plain, batch_size, out)

    def __call__(self, dialogs, responses, batch_size: int = 16) -> torch.Tensor:
        return self.score(dialogs, responses, batch_size)

    def __repr__(self) -> str:
        a = self.model.args
        return (f"RewardModel(kind={self.kind!r}, margin={self.margin!r}, dim={a.dim}, n_layers={a.n_layers}, "
                f"seq_len={self.seq_len})")


# -- accuracy on preference pairs (Table 8) -------------------------------------------------------------------------
@torch.no_grad()
def score_pairs(model, pairs: Sequence[EncodedPair], micro_batch: int, padding: str, d: Dist, autocast
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (len(pairs),) on the CPU, split across ranks. Every rank runs the same number
    of forwards (FSDP gathers weights collectively); a rank short of pairs scores a stand-in and drops it."""
    was_training = model.training
    model.eval()
    n = len(pairs)
    per_rank = -(-n // d.world)
    mine = list(range(d.rank * per_rank, min(n, (d.rank + 1) * per_rank)))
    rc, rr = torch.zeros(n), torch.zeros(n)
    for i in range(0, per_rank, micro_batch):
        idx = mine[i : i + micro_batch]
        batch = collate_pairs([pairs[j] for j in idx] or [pairs[0]], side=padding)
        with autocast:
            r = score_batch(model, batch, d.device).float().cpu()  # (2b,)
        c, rj = r.chunk(2)
        if idx:
            rc[idx], rr[idx] = c, rj
    if d.world > 1:  # each rank filled its own slice; the others are zero
        both = torch.stack([rc, rr]).to(d.device)
        dist.all_reduce(both)
        rc, rr = both.cpu().unbind(0)
    model.train(was_training)
    return rc, rr


def evaluate_reward(
    model_or_path: Transformer | RewardModel | str | Path,
    prefs: Sequence[Preference | EncodedPair],
    tokenizer: Tokenizer | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    overflow: Literal["truncate", "skip"] = "truncate",
    padding: Literal["right", "left"] = "right",
    device: torch.device | str | None = None,
) -> dict:
    """Accuracy of a reward model on preference pairs, per rating bucket and overall (``accuracy_by_rating``:
    the columns of Table 8; feed a dict of these to ``format_accuracy_table``).

    ``model_or_path``: a scalar-head Transformer (then ``tokenizer`` is needed for Preference records), a
    :class:`RewardModel`, or a checkpoint directory. ``prefs``: Preference records (encoded here like training
    data, with ``seq_len`` defaulting to the model's window; pairs that do not fit are left out and reported on
    stderr) or already encoded pairs. One process; ``batch_size`` pairs per forward.
    """
    if isinstance(model_or_path, (str, Path)):
        model_or_path = RewardModel.from_pretrained(model_or_path, device=device or "cpu")
    if isinstance(model_or_path, RewardModel):
        model, tokenizer = model_or_path.model, tokenizer or model_or_path.tokenizer
        seq_len = seq_len or model_or_path.seq_len
    else:
        model = model_or_path
    if unwrap(model).args.head != "scalar":
        raise ValueError("evaluate_reward needs a reward model (scalar head); this model has an LM head")
    seq_len = seq_len or unwrap(model).args.max_seq_len
    to_encode = [p for p in prefs if isinstance(p, Preference)]
    pairs = [p for p in prefs if isinstance(p, EncodedPair)]
    if to_encode:
        if tokenizer is None:
            raise ValueError("evaluate_reward: Preference records need a tokenizer to encode them")
        encoded, stats = encode_preferences(tokenizer, to_encode, seq_len, overflow)
        if stats.kept < stats.total:
            print(f"evaluate_reward: {stats}", file=sys.stderr)
        pairs += encoded
    if not pairs:
        raise ValueError("evaluate_reward: no preference pairs to evaluate")
    dev = next(unwrap(model).parameters()).device
    rc, rr = score_pairs(model, pairs, batch_size, padding, Dist(device=dev), autocast_for(dev))
    return accuracy_by_rating(rc, rr, [p.rating for p in pairs])
