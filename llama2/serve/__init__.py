"""An OpenAI-compatible HTTP server over the continuous-batching engine (``llama2 serve``).

Every client library, chat UI and agent framework speaks the OpenAI API, so the server speaks it too:
``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, with the OpenAI
response shapes (``usage``, ``finish_reason`` "stop" / "length"), server-sent events for ``stream=true`` ending with
``data: [DONE]``, and the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx for every
bad request (never a 500 and never a dead server).

How it is put together:

* **One engine, one thread.** ``llama2.generate.Engine`` is not thread-safe and its ``step`` is long (a forward of
  the model), so a single background thread (``BatchingLoop``) owns it. HTTP handlers never touch the engine: they
  post "submit" and "cancel" commands to a queue, which the thread applies *between* decode steps (continuous
  batching: a new request joins the running batch at the next step, a finished or abandoned one leaves at once),
  and they receive each step's tokens on an ``asyncio.Queue`` through ``call_soon_threadsafe``. The event loop
  therefore never waits for a step, and the engine never waits for the network.
* **Chat is rendered exactly as ``llama2 chat`` renders it** (paper §3, Meta's ``chat_completion``): the dialog goes
  through ``llama2.chat.fit_prompt`` (the project's one policy for over-long dialogs: drop the oldest exchanges, keep
  the system message and the last user turn; the reply gets what is left) and then Meta's layout. Dropped exchanges
  are reported in the ``X-Llama2-Dropped-Exchanges`` header and in the body's ``dropped_exchanges`` field; a last
  message that fills the context alone is a 400 ``context_length_exceeded``. Messages holding the template's tags
  ([INST], [/INST], <<SYS>>, <</SYS>>) are refused with Meta's own message (``llama2.chat.UNSAFE_ERROR``): typed
  into a message they would forge an extra turn or system prompt.
* **Text as ``generate`` returns it.** A choice's text is the decoded tokens without the final EOS, cut before the
  first stop string (the engine reports a stop string, the caller cuts: see ``SamplingParams.stop_strings``); chat
  content is stripped as ``Llama.chat_completion`` strips it. Streams release text only when it can no longer change:
  not inside a multi-byte UTF-8 character (SentencePiece byte pieces) and not while the text ends with the start of a
  stop string, so the concatenated deltas equal the non-streamed text.

Defaults where the OpenAI API and the paper differ: sampling is Meta's chat default (temperature 0.6, top-p 0.9, as
``GenerationConfig``) rather than OpenAI's 1.0 / 1.0, since that is what Llama 2-Chat was tuned and evaluated with;
``max_tokens`` defaults to ``GenerationConfig``'s 256 for both endpoints, so a chat request without it is trimmed
exactly as ``llama2 chat`` trims it. The engine reports the sampled token's log-probability only, so
``top_logprobs`` (chat) and ``logprobs`` > 0 (completions) are refused rather than answered with fewer alternatives.

The package: ``protocol.py`` (the OpenAI request bodies, error shape and response pieces), ``batching.py`` (the
thread that owns the engine), ``prompts.py`` (requests checked and turned into prompts and sampling parameters),
``choices.py`` (one choice's text as its tokens arrive), ``endpoints.py`` (the two completion endpoints, streamed or
not) and ``app.py`` (the FastAPI app, ``serve`` and ``running_server``). Library code never imports cli.py;
``llama2 serve`` calls ``serve``.
"""
from __future__ import annotations

from .app import create_app, running_server, serve
from .batching import BatchingLoop
from .protocol import APIError

__all__ = ["APIError", "BatchingLoop", "create_app", "running_server", "serve"]
