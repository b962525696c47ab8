"""Answers to dialogs, drawn the way every stage that samples draws them: rejection sampling, PPO rollouts, GAtt,
the annotation of new preference pairs, and evaluation.

Each dialog is fitted into the model's context by the one policy of :func:`llama2.chat.fit_prompt`; ``k``
answers per dialog are drawn in batches of ``gen_batch`` dialogs (``gen_batch * k`` rows per generation call),
each batch with a seed derived from (seed, purpose, batch index), so the same seed gives the same samples in
every process.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

from .chat import fit_prompt
from .config import StageSampling
from .generate import Completion, generate
from .seeding import derive_seed

__all__ = ["draw_answers", "answer_texts"]


@torch.no_grad()
def draw_answers(model, tokenizer, dialogs: Sequence[Sequence[Mapping[str, str]]], sampling: StageSampling, *,
                   k: int = 1, seed: int = 0, purpose: str = "sample", desc: str | None = None,
                   show: bool = True, prompts_out: list | None = None, logprobs: bool = False) -> list[list[Completion]]:
    """``k`` completions of each dialog (ending with a user turn), in the input order: out[i][j] is sample j of
    dialog i. The model is put in eval mode while sampling and returned to its previous mode. ``prompts_out``, if
    given, receives the prompt ids each dialog was fitted to (what the completions continue). ``logprobs``: each
    completion also carries its tokens' log-probabilities under the model (temperature 1)."""
    was_training = model.training
    model.eval()
    context = model.args.max_seq_len
    out: list[list[Completion]] = []
    bar = tqdm(total=len(dialogs) * k, desc=desc or purpose, unit="sample",
               disable=not (show and desc and sys.stderr.isatty()))
    try:
        for b in range(0, len(dialogs), sampling.gen_batch):
            chunk = dialogs[b : b + sampling.gen_batch]
            prompts = [fit_prompt(tokenizer, d, context, sampling.max_new_tokens)[1] for d in chunk]
            if prompts_out is not None:
                prompts_out += prompts
            rows = [p for p in prompts for _ in range(k)]  # (dialog 0 x k, dialog 1 x k, ...)
            comps = generate(model, rows, tokenizer=tokenizer, seed=derive_seed(seed, purpose, b), logprobs=logprobs,
                             **sampling.generate_kwargs())
            out += [comps[i * k : (i + 1) * k] for i in range(len(chunk))]
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return out


def answer_texts(model, tokenizer, dialogs: Sequence[Sequence[Mapping[str, str]]], sampling: StageSampling, *,
                 seed: int = 0, purpose: str = "answer", desc: str | None = None) -> list[str]:
    """One answer per dialog as stripped text (greedy when ``sampling.temperature`` is 0)."""
    return [c[0].text.strip() for c in draw_answers(model, tokenizer, dialogs, sampling, seed=seed, purpose=purpose,
                                                       desc=desc)]
