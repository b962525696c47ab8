"""`llama2 eval`: our model inside lm-evaluation-harness (EleutherAI's ``lm_eval``), and the paper's table.

The paper (§2.3) compares Llama 2 with other models on academic benchmarks; the field's common tool for
that is lm-evaluation-harness. ``Llama2LM`` is an lm-eval model (registered as ``llama2``) over any
checkpoint ``llama2.Llama.from_pretrained`` reads (native, Meta, Hugging Face, GGUF), so every lm-eval task
runs on it; ``run_eval`` is what the CLI calls; ``--tasks paper`` expands to the paper's benchmark set
(``llama2.eval.paper``) and ``format_table`` prints it grouped like Table 3.

The adapter follows lm-eval's own ``hf`` model (``lm_eval/models/huggingface.py``) step for step, so a
checkpoint scores the same here as after ``llama2 convert --to hf`` under ``lm_eval --model hf``:

* context/continuation pairs go through ``TemplateLM._encode_pair`` (trailing spaces of the context move to
  the continuation; the pair is encoded whole and split at the context's length), contexts start with BOS,
  an empty context becomes BOS alone;
* requests are sorted longest first and batched by the same ``Collator``, with the same sharing of one
  forward pass between continuations that differ only in their last token;
* generation is greedy by default, stops at the task's stop strings and EOS, cuts the text at the first
  stop, and truncates contexts from the left to leave room for ``max_gen_toks``.

Two deliberate differences, both where the ``hf`` path departs from the Llama tokenizer:

* Text is encoded as SentencePiece (Meta's tokenizer) encodes it. transformers 5 builds the tokenizer of a
  directory holding only ``tokenizer.model`` with a Metaspace pre-tokenizer that adds no "▁" prefix to
  text that already starts with a space (" Ada" -> [▁Ada] instead of SentencePiece's [▁, ▁Ada]). This
  only shows for strings that begin with a space (an empty context's continuation, some documents).
* ``loglikelihood_rolling`` scores the document's tokens after a single BOS. lm-eval 0.4's ``hf`` encodes
  the document with the tokenizer's BOS and then prepends its prefix token (BOS) again, so it also adds
  log p(BOS | BOS) to every document's log-likelihood (lm-eval issue #3333).

Literal "<s>" and "</s>" in a prompt are read as BOS and EOS, as Hugging Face tokenizers do; that is how the
chat template (``chat=True``: Meta's ``[INST]`` format, ``llama2.chat``, never a Jinja template) hands its
per-turn BOS/EOS to lm-eval, which passes prompts as strings. Under it, an answer scored after "[/INST]" gets
back the space lm-eval drops there (see ``_encode_pair``).
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from ..chat import E_INST, format_dialog
from ..generate import Llama, generate
from .paper import BENCHMARKS, format_table, paper_tasks
from .toyworld import lm_eval_suite

__all__ = ["Llama2LM", "run_eval", "expand_tasks", "CUSTOM_SUITES", "register_suite", "format_table"]

log = logging.getLogger(__name__)

LM_NAME = "llama2"

CUSTOM_SUITES: dict[str, Callable[..., dict]] = {}
"""Evaluation suites that are not lm-eval tasks (e.g. the toy world's held-out tasks): ``run_eval`` hands a
requested name found here to ``CUSTOM_SUITES[name](ckpt, num_fewshot=..., limit=..., batch_size=...,
device=..., chat=...)``, which returns a dict shaped like lm-eval's output (at least
``{"results": {name: {"metric,filter": value}}}``); it is merged into the returned results."""


def register_suite(name: str, fn: Callable[..., dict]) -> None:
    """Make ``llama2 eval --tasks NAME`` run ``fn`` (see ``CUSTOM_SUITES`` for how it is called)."""
    if name == "paper":
        raise ValueError("'paper' is the Llama 2 paper's benchmark set; choose another suite name")
    CUSTOM_SUITES[name] = fn


def _language_model(pretrained: str | Path | Llama, device: torch.device, dtype) -> tuple[Llama, str]:
    """(the Llama to evaluate, how to name it): loaded from a path, bf16 by default on a GPU (the logits still leave
    the model in fp32), checked to be a language model with a tokenizer."""
    if isinstance(pretrained, Llama):
        llama, name = pretrained, "<in-memory model>"
    else:
        if dtype is None and device.type == "cuda":
            dtype = torch.bfloat16
        llama, name = Llama.from_pretrained(pretrained, dtype=dtype, device=device), str(pretrained)
    if llama.tokenizer is None:
        raise ValueError(f"checkpoint {name} has no tokenizer; lm-eval tasks are text and need one")
    if llama.model.args.head != "lm":
        raise ValueError(f"checkpoint {name} has a scalar head (a reward or value model); lm-eval needs a language "
                         "model")
    return llama, name


@torch.inference_mode()
def continuation_logprobs(model, inputs: list[list[int]], spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """One forward pass over right-padded ``inputs``; for row i, log-softmax over the vocabulary at the
    positions spans[i] = (start, end) only: (end - start, vocab) each, fp32. Right padding needs no mask:
    causal attention never lets a real token see the pads after it. The LM head runs only on the scored
    positions, so a long context costs no (T, vocab) logits."""
    T = max(len(x) for x in inputs)
    tokens = torch.zeros(len(inputs), T, dtype=torch.long)
    for i, x in enumerate(inputs):
        tokens[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    h = model.hidden_states(tokens.to(model.tok_embeddings.weight.device))  # (B, T, C)
    picked = torch.cat([h[i, s:e] for i, (s, e) in enumerate(spans)])  # (sum of spans, C)
    logprobs = F.log_softmax(model.output(picked).float(), dim=-1)  # (sum of spans, vocab)
    return list(logprobs.split([e - s for s, e in spans]))


def _generation_settings(gen_kwargs: dict, max_gen_toks: int, eos_text: str) -> tuple[list[str], dict, list[str]]:
    """A task's generation kwargs as (stop strings, ``generate`` settings, kwargs we ignore): greedy unless the task
    asks to sample (do_sample), stopping at its ``until`` strings and EOS."""
    kwargs = normalize_gen_kwargs(gen_kwargs, max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
    sample = bool(kwargs.pop("do_sample", False))
    settings = dict(max_new_tokens=kwargs.pop("max_gen_toks"),
                    temperature=float(kwargs.pop("temperature", 0.0)) if sample else 0.0,
                    top_p=float(kwargs.pop("top_p", None) or 1.0), top_k=int(kwargs.pop("top_k", None) or 0))
    return until, settings, sorted(kwargs)


@register_model(LM_NAME)
class Llama2LM(TemplateLM):
    """An lm-eval language model over a ``llama2`` checkpoint.

    pretrained: a checkpoint path (any format ``Llama.from_pretrained`` reads) or a loaded ``Llama``.
    device: "cpu" or "cuda[:N]". dtype: None means float32 on the CPU (no fast bf16 there) and bfloat16 on a
    GPU. batch_size: requests per forward pass. max_length: the context used (default: the model's
    max_seq_len). max_gen_toks: the generation budget when a task sets none (lm-eval's default, 256).
    seed: the sampling seed for tasks that sample (do_sample=True); greedy tasks ignore it.

    Importing this module registers the class with lm-eval, so its Python API also finds it by name:
    ``lm_eval.simple_evaluate(model="llama2", model_args={"pretrained": DIR}, tasks=[...])``; ``run_eval`` (and
    ``llama2 eval``) is the usual way in.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | Path | Llama,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        batch_size: int | str | None = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        max_batch_size: int | None = None,  # passed by lm-eval's simple_evaluate; batches here have a fixed size
    ) -> None:
        super().__init__()
        llama, self.pretrained = _language_model(pretrained, torch.device(device or "cpu"), dtype)
        self.llama, self.model, self.tokenizer = llama, llama.model.eval(), llama.tokenizer
        self._device = self.model.tok_embeddings.weight.device
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported by the llama2 model; give a number")
        self._batch_size = int(batch_size or 1)
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self._batch_size}")
        self._max_length = int(max_length or self.model.args.max_seq_len)
        if self._max_length > self.model.args.max_seq_len:
            raise ValueError(f"max_length {self._max_length} exceeds the model's context "
                             f"({self.model.args.max_seq_len})")
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        tok = self.tokenizer
        # The strings HF tokenizers read as special tokens; see tok_encode.
        self._bos_text, self._eos_text = tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)
        self._special = re.compile("(" + "|".join(map(re.escape, (self._bos_text, self._eos_text))) + ")")
        self._warned: set[str] = set()

    # -- what lm-eval asks of a model ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and a rolling document) is conditioned on: BOS, as hf with Llama."""
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request cache when a chat template is applied."""
        return "llama2-sentencepiece-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.pretrained)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """What lm-eval records as the template: ours is code (``llama2.chat``), not a Jinja string."""
        if not chat_template:
            return None
        return "llama-2-chat: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s> (llama2.chat)"

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": self.model.num_params(),
            "model_dtype": str(self.model.tok_embeddings.weight.dtype),
            "checkpoint": self.pretrained,
        }

    # -- tokenization -------------------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids of ``string``: BOS first (as a Llama tokenizer's ``add_special_tokens``), then the text.

        add_special_tokens: None adds BOS unless the string already starts with "<s>" (hf's rule, so a chat-
        rendered prompt is not given a second BOS); True always; False never. "<s>" and "</s>" anywhere in the
        text become BOS and EOS, and each stretch of text between them is encoded on its own with
        SentencePiece, which is Meta's per-turn chat encoding."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self._bos_text)
        ids = [self.tokenizer.bos_id] if add_special_tokens else []
        for part in self._special.split(string):
            if part == self._bos_text:
                ids.append(self.tokenizer.bos_id)
            elif part == self._eos_text:
                ids.append(self.tokenizer.eos_id)
            elif part:
                ids += self.tokenizer.encode(part)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split (``TemplateLM._encode_pair``), with one addition for chat prompts: under a chat
        template lm-eval drops the space between prompt and answer (templates usually end their generation
        prompt with a newline), but in Meta's layout the answer follows "[/INST]" after one space
        (``[INST] {user} [/INST] {answer}``, llama2.chat), so it is put back: the model scores "▁near", as it
        was trained to write it, not "near" glued to the "]"."""
        if context.endswith(E_INST) and continuation and not continuation[0].isspace():
            continuation = " " + continuation
        return super()._encode_pair(context, continuation)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The dialog in Meta's Llama 2-Chat layout (paper §3, ``llama2.chat``), as a string whose "<s>"/"</s>"
        ``tok_encode`` reads back as the per-turn BOS/EOS, so that ``tok_encode`` of a dialog ending with a user
        message gives exactly ``llama2.chat.encode_dialog_prompt``. A system message (lm-eval's description or
        ``system_instruction``) is folded into the first user turn as Meta does. With
        ``add_generation_prompt=False`` the last message is an assistant answer to continue (lm-eval's
        ``gen_prefix``): it is left open, without the turn's closing space and EOS."""
        dialog = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        open_answer = not add_generation_prompt and dialog and dialog[-1]["role"] == "assistant"
        texts = format_dialog(dialog)
        out = "".join(f"{self._bos_text}{t}{self._eos_text}" for t in texts[:-1])
        last = texts[-1]
        if open_answer:
            out += self._bos_text + last[:-1]  # "[INST] u [/INST] a " -> "[INST] u [/INST] a"
        elif dialog[-1]["role"] == "assistant":
            out += f"{self._bos_text}{last}{self._eos_text}"
        else:
            out += self._bos_text + last
        return out

    # -- scoring --------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token), whether greedy decoding gives the whole continuation) for each
        (strings, context ids, continuation ids), in hf's order and batches: longest first, and one pass for
        requests that differ only in their continuation's last token (multiple choice with one-token answers).
        Too long a pair keeps its last max_length + 1 tokens, as hf."""

        def longest_first(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        reord = Collator(requests, sort_fn=longest_first, group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in reord.get_batched(n=self.batch_size):
            inputs, spans = [], []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ValueError("a loglikelihood request needs a non-empty context and continuation (token ids)")
                if len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens does not fit the context "
                                     f"({self.max_length})")
                if len(ctx) + len(cont) > self.max_length + 1:
                    self._warn_once("truncate", "context + continuation exceed the model's context; keeping the last "
                                    f"{self.max_length} input tokens, as lm-eval's hf model does")
                inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # the last token is only ever predicted
                inputs.append(inp)
                spans.append((len(inp) - len(cont), len(inp)))
            for (strings, ctx, cont), logprobs in zip(chunk, continuation_logprobs(self.model, inputs, spans)):
                logprobs = logprobs.unsqueeze(0)  # (1, len(cont), vocab)
                greedy = logprobs.argmax(dim=-1)
                shared = reord.get_cache(req_str=strings, cxt_toks=ctx, cont_toks=cont, logits=logprobs)
                for req_str, cont_toks, lp in shared:
                    target = torch.tensor(cont_toks, dtype=torch.long, device=lp.device).unsqueeze(0)  # (1, n)
                    # continuations sharing the pass may be shorter: score the last n positions
                    n = target.shape[1]
                    is_greedy = bool((greedy[:, -n:] == target).all())
                    answer = (float(lp[:, -n:].gather(2, target.unsqueeze(-1)).sum()), is_greedy)
                    results.append(answer)
                    if req_str is not None:
                        self.cache_hook.add_partial("loglikelihood", req_str, answer)
                    pbar.update(1)
        pbar.close()
        return reord.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents (perplexity tasks): the document's tokens, conditioned on BOS,
        cut into windows of the model's context where each token is predicted exactly once and every window
        after the first keeps as much preceding text as fits (lm-eval's ``get_rolling_token_windows`` with
        context_len 1, as hf). All windows of all documents are batched together."""
        windows: list[tuple[int, tuple[None, list[int], list[int]]]] = []
        for i, req in enumerate(tqdm(requests, disable=disable_tqdm, desc="Windowing documents")):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((i, (None, ctx, cont)))
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for (i, _), (lp, _) in zip(windows, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its stop strings (and EOS), at most max_gen_toks tokens; greedy
        unless the task asks to sample. Requests with the same generation settings are batched, longest
        first; the text is cut before the first stop string, as hf does."""
        reord = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                         group_by="gen_kwargs", group_fn=lambda a: a[1])
        results: list[str] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in reord.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            if not isinstance(all_kwargs[0], dict):
                raise ValueError(f"generation kwargs must be a dict, got {type(all_kwargs[0]).__name__}")
            until, settings, ignored = _generation_settings(all_kwargs[0], self.max_gen_toks, self._eos_text)
            if ignored:
                self._warn_once(f"gen:{ignored}", f"generation kwargs {ignored} are not supported by the llama2 "
                                "model; ignored")
            max_ctx = self.max_length - settings["max_new_tokens"]
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {settings['max_new_tokens']} leaves no room for a prompt in the "
                                 f"model's context ({self.max_length} tokens)")
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx) for c in contexts]
            completions = generate(self.model, prompts, tokenizer=self.tokenizer, stop_strings=tuple(until),
                                   seed=self.seed if settings["temperature"] > 0 else None, **settings)
            for context, gen_kwargs, c in zip(contexts, all_kwargs, completions):
                text = postprocess_generated_text(c.text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return reord.get_original(results)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


# ------------------------------------------------------------------------------------------------ running


def expand_tasks(tasks: str | Iterable[str], num_fewshot: int | None = None,
                 allow_code_execution: bool = False) -> list[tuple[str, int | None]]:
    """(task, shots) for each requested name, in order, without repeats. "a,b" strings are split. "paper"
    becomes the paper's benchmark set at the paper's shots (``llama2.eval.paper``; code benchmarks only with
    ``allow_code_execution``); an explicit ``num_fewshot`` overrides every task's shots."""
    names = [t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks) for t in t.split(",") if t.strip()]
    if not names:
        raise ValueError("no tasks given; name lm-eval tasks (e.g. hellaswag,arc_easy) or 'paper'")
    out: dict[str, int | None] = {}
    for name in names:
        if name == "paper":
            if not allow_code_execution:
                skipped = [b.name for b in BENCHMARKS if b.executes_code]
                log.warning("leaving out %s: their metric runs the model's code; allow code execution to include "
                            "them", ", ".join(skipped))
            for task, shots in paper_tasks(allow_code_execution):
                out.setdefault(task, shots if num_fewshot is None else num_fewshot)
        else:
            out.setdefault(name, num_fewshot)
    return list(out.items())


def _check_task_names(names: Iterable[str], known: Sequence[str]) -> list[str]:
    """Resolve glob patterns ("mmlu_*") against lm-eval's index and fail on unknown names, listing the close
    matches (lm-eval's own error only says the name is not registered)."""
    known_set = set(known)
    resolved: list[str] = []
    for name in names:
        if name in known_set or name in CUSTOM_SUITES or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            resolved.append(name)
        elif any(ch in name for ch in "*?["):
            hits = fnmatch.filter(known, name)
            if not hits:
                raise ValueError(f"task pattern {name!r} matches no lm-eval task")
            resolved += hits
        else:
            close = difflib.get_close_matches(name, list(known) + list(CUSTOM_SUITES) + ["paper"], n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `lm_eval ls tasks` for the names"
            raise ValueError(f"unknown task {name!r}{hint}")
    return resolved


def _merge(into: dict, part: Mapping[str, Any]) -> None:
    """Fold one lm-eval output into another: per-task sections are unioned, the rest kept from the first."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        else:
            into.setdefault(key, value)


def run_eval(
    ckpt: str | Path | Llama | Llama2LM,
    tasks: str | Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    chat: bool = False,
    out: str | Path | None = None,
    *,
    system_instruction: str | None = None,
    allow_code_execution: bool = False,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
    seed: int = 1234,
    dtype: str | torch.dtype | None = None,
    include_defaults: bool = True,
) -> dict:
    """Evaluate a checkpoint on lm-eval tasks (and registered custom suites); returns lm-eval's results dict
    and, with ``out``, writes it there as JSON (without per-sample logs, as lm-eval's own results file).

    ckpt: a checkpoint path, a loaded ``Llama`` or a ``Llama2LM``. tasks: lm-eval task/group names, glob
    patterns, YAML paths, "paper" (the paper's set at its shots, ``llama2.eval.paper``) or names in
    ``CUSTOM_SUITES``. num_fewshot: overrides every task's shots (lm-eval keeps 0 where a task's config
    fixes it). limit: at most this many examples per task (a fraction if < 1; for quick checks, not for
    reporting). include_path: folders of extra task YAMLs. chat: render prompts in the Llama 2-Chat format
    (few-shot examples as earlier turns). allow_code_execution: let code tasks (HumanEval, MBPP) run the
    model's code; without it "paper" leaves them out. seed: for tasks that sample (lm-eval's own seeds, which
    pick the few-shot examples, stay at its defaults, so the prompts are those of an ``lm_eval`` run).
    include_defaults=False skips indexing lm-eval's built-in tasks (seconds), for runs of --include-path
    tasks only.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    requested = expand_tasks(tasks, num_fewshot, allow_code_execution)
    if allow_code_execution:
        # Hugging Face evaluate's code_eval metric (HumanEval, MBPP) also asks for this opt-in before it runs code.
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    custom = [(n, s) for n, s in requested if n in CUSTOM_SUITES]
    harness = [(n, s) for n, s in requested if n not in CUSTOM_SUITES]

    results: dict[str, Any] = {}
    if harness:
        manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
        by_shots: dict[int | None, list[str]] = {}
        for name, shots in harness:
            for resolved in _check_task_names([name], manager.all_tasks):
                by_shots.setdefault(shots, []).append(resolved)
        lm = ckpt if isinstance(ckpt, Llama2LM) else Llama2LM(ckpt, device=device, dtype=dtype, batch_size=batch_size,
                                                               seed=seed)
        # lm-eval takes one shot count per call, and the paper's tasks differ in shots: one call per count.
        for shots, names in by_shots.items():
            try:
                part = simple_evaluate(
                    model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
                    log_samples=log_samples, bootstrap_iters=bootstrap_iters, apply_chat_template=chat,
                    fewshot_as_multiturn=chat, system_instruction=system_instruction,
                    confirm_run_unsafe_code=allow_code_execution,  # lm-eval's default seeds: its few-shot picks
                )
            except ValueError as e:
                if "unsafe" in str(e):
                    raise ValueError(f"{e} (here: allow code execution, e.g. `llama2 eval "
                                     "--allow-code-execution`)") from e
                raise
            _merge(results, part)
        results.setdefault("config", {}).update(model=LM_NAME, model_args=f"pretrained={lm.pretrained}")
    for name, shots in custom:
        part = CUSTOM_SUITES[name](ckpt, num_fewshot=shots, limit=limit, batch_size=batch_size, device=device,
                                   chat=chat)
        _merge(results, part)

    for key in ("versions", "n-shot", "higher_is_better"):  # so lm-eval's make_table reads custom-only results too
        results.setdefault(key, {})

    if out is not None:
        _write_results(results, Path(out))
    return results


def _write_results(results: dict, out: Path) -> None:
    """lm-eval's results as JSON, without the per-sample logs (as lm-eval's own results file)."""
    from lm_eval.utils import handle_non_serializable

    out.parent.mkdir(parents=True, exist_ok=True)
    written = {k: v for k, v in results.items() if k != "samples"}
    out.write_text(json.dumps(written, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")


register_suite("toyworld", lm_eval_suite)  # the built-in world's held-out tasks (llama2.eval.toyworld)
