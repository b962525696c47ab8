"""A request checked and turned into what the engine takes: prompt ids (chat rendered exactly as ``llama2 chat``
renders it) and one ``SamplingParams`` per choice. Every problem is an ``APIError`` 400 that names the field."""
from __future__ import annotations

from dataclasses import dataclass

from ..chat import UNSAFE_ERROR, fit_prompt, format_dialog, has_special_tags
from ..generate import GenerationConfig, SamplingParams
from .protocol import APIError, ChatRequest, CompletionRequest, SamplingRequest

__all__ = ["Prompt", "DEFAULTS", "sampling_params", "chat_prompt", "completion_prompts"]

DEFAULTS = GenerationConfig()  # the project's sampling defaults (Meta's chat defaults) and reply budget


@dataclass
class Prompt:
    ids: list[int]
    dropped: int = 0  # exchanges fit_prompt dropped to make room


def sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: bool, seed_offset: int) -> SamplingParams:
    """The engine's sampling parameters of choice ``seed_offset`` (choices of one request get seeds s, s+1, ... so
    that n > 1 samples differ, and choice 0 with seed s equals a single request with seed s)."""
    seed = None if req.seed is None else req.seed + seed_offset
    return SamplingParams(
        max_new_tokens=max_tokens or DEFAULTS.max_new_tokens,
        temperature=DEFAULTS.temperature if req.temperature is None else req.temperature,
        top_p=DEFAULTS.top_p if req.top_p is None else req.top_p,
        seed=seed, stop_strings=req.stops(), logprobs=logprobs)


def chat_prompt(tok, context: int, req: ChatRequest) -> Prompt:
    """The dialog as ``llama2 chat`` renders it: fit_prompt, then Meta's layout (paper §3)."""
    dialog = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        dialog.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    for i, m in enumerate(dialog):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"message {i} is not valid Unicode: a lone surrogate at character {e.start}",
                           param=f"messages.{i}.content") from None
    if has_special_tags(dialog):
        raise APIError(400, UNSAFE_ERROR, param="messages", code="special_tags")
    try:
        format_dialog(dialog)  # the dialog's shape: system?, then user/assistant alternating from user
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    if dialog[-1]["role"] != "user":
        raise APIError(400, f"message {len(dialog) - 1} (role {dialog[-1]['role']!r}): the last message must "
                            "come from the user", param="messages")
    budget = req.max_completion_tokens or req.max_tokens or DEFAULTS.max_new_tokens
    try:
        _, ids, dropped = fit_prompt(tok, dialog, context, budget)
    except ValueError as e:
        raise APIError(400, f"This model's maximum context length is {context} tokens: {e}",
                       param="messages", code="context_length_exceeded") from None
    return Prompt(ids, dropped)


def completion_prompts(tok, context: int, req: CompletionRequest) -> list[Prompt]:
    """The prompts of a completion request: text (encoded as ``Llama.text_completion`` encodes) or token ids."""
    p = req.prompt
    if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
        p = [p]
    if not p:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for i, item in enumerate(p):
        if isinstance(item, str):
            try:
                ids = tok.encode(item, bos=True)
            except ValueError as e:
                raise APIError(400, f"prompt {i}: {e}", param="prompt") from None
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < tok.vocab_size]
            if not ids or bad:
                raise APIError(400, f"prompt {i}: token ids must be a non-empty list of ids in "
                                    f"[0, {tok.vocab_size})" + (f"; got {bad[0]}" if bad else ""), param="prompt")
        if len(ids) >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; prompt {i} is "
                                f"{len(ids)} tokens and leaves no room for a reply", param="prompt",
                           code="context_length_exceeded")
        out.append(Prompt(ids))
    return out
