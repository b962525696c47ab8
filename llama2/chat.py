"""The Llama 2-Chat dialog format.

Llama 2-Chat (paper §3) is fine-tuned on dialogs rendered in a fixed template.
This module reproduces Meta's ``Llama.chat_completion`` (``llama/generation.py``
in the ``meta-llama/llama`` repository) token for token:

* an optional leading system message is folded into the first user message as
  ``B_SYS + system + E_SYS + user`` (the system text itself is not stripped);
* every finished (user, assistant) exchange is encoded on its own as
  ``encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)``;
* a final, unanswered user message is encoded as
  ``encode(f"{B_INST} {user.strip()} {E_INST}", bos=True, eos=False)``;
* the pieces are concatenated, so every exchange starts with its own BOS.

Meta's code only builds prompts (the dialog must end with the user).  For
supervised fine-tuning, :func:`encode_dialog` also accepts dialogs ending with
an assistant message and returns a loss mask that is 1 on the assistant's
tokens: the paper (§3.1) zeroes out "the loss on tokens from the user prompt"
and back-propagates "only on answer tokens".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict

__all__ = [
    "B_INST",
    "E_INST",
    "B_SYS",
    "E_SYS",
    "SPECIAL_TAGS",
    "UNSAFE_ERROR",
    "Role",
    "Message",
    "Dialog",
    "EncodedDialog",
    "encode_dialog",
    "encode_dialog_prompt",
    "format_dialog",
    "has_special_tags",
    "fit_dialog",
    "fit_prompt",
    "turns",
]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# Meta's chat_completion refuses to answer (it returns UNSAFE_ERROR as the
# reply) when a message contains one of these tags; see has_special_tags().
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]


class TextEncoder(Protocol):
    """What the chat format needs from a tokenizer (``llama2.tokenizer.Tokenizer`` fits)."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class EncodedDialog:
    """Token ids of a dialog and, for dialogs ending with the assistant, a loss mask.

    ``loss_mask`` has the length of ``ids`` and is 1 exactly on the tokens the
    assistant produces (its answer, the trailing-space piece Meta's template
    adds, and the EOS closing each exchange) and 0 on BOS and on the
    ``[INST] ... [/INST]`` prompt tokens.  It is ``None`` when the dialog ends
    with a user message, i.e. when it is a prompt for generation.

    Unpacks as ``ids, loss_mask = encode_dialog(tokenizer, dialog)``.
    """

    ids: list[int]
    loss_mask: list[int] | None

    def __iter__(self) -> Iterator[list[int] | None]:
        yield self.ids
        yield self.loss_mask

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class _Turn:
    """One ``[INST] prompt [/INST]`` segment and, if the assistant replied, its answer."""

    user: str  # includes the folded-in system prompt, not yet stripped
    answer: str | None

    @property
    def prompt_text(self) -> str:
        return f"{B_INST} {self.user.strip()} {E_INST}"

    @property
    def full_text(self) -> str:
        if self.answer is None:
            return self.prompt_text
        return f"{B_INST} {self.user.strip()} {E_INST} {self.answer.strip()} "


def _turns(dialog: Sequence[Mapping[str, object]]) -> list[_Turn]:
    """Validate ``dialog`` and group it into turns, following Meta's chat_completion.

    Meta asserts ``system?`` then strictly alternating ``user``/``assistant``
    starting with ``user``; the same rules are checked here with messages that
    name the offending message.
    """
    if isinstance(dialog, (str, bytes)) or not isinstance(dialog, Sequence):
        raise ValueError(f"a dialog must be a list of messages, got {type(dialog).__name__}")
    if len(dialog) == 0:
        raise ValueError("the dialog is empty; it needs at least one user message")

    roles: list[str] = []
    contents: list[str] = []
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i}: expected a mapping with 'role' and 'content' keys, got {msg!r}")
        role, content = msg["role"], msg["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(
                f"message {i}: unknown role {role!r} (expected 'system', 'user' or 'assistant')"
            )
        if not isinstance(content, str):
            raise ValueError(
                f"message {i} (role {role!r}): content must be a str, got {type(content).__name__}"
            )
        roles.append(role)
        contents.append(content)

    start = 0
    system: str | None = None
    if roles[0] == "system":
        if len(roles) == 1:
            raise ValueError("message 0 (role 'system'): a system message must be followed by a user message")
        system = contents[0]
        start = 1

    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] == "system":
            raise ValueError(
                f"message {i} (role 'system'): a system message is only allowed as the first message"
            )
        if roles[i] != expected:
            raise ValueError(
                f"message {i} (role {roles[i]!r}): expected role {expected!r}; after an optional "
                "system message, roles must alternate user/assistant starting with user"
            )

    users = contents[start::2]
    answers: list[str | None] = list(contents[start + 1 :: 2])
    if len(answers) < len(users):
        answers.append(None)  # the dialog ends with an unanswered user message
    if system is not None:
        # Meta: B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        users[0] = B_SYS + system + E_SYS + users[0]
    return [_Turn(user, answer) for user, answer in zip(users, answers)]


def format_dialog(dialog: Sequence[Mapping[str, object]]) -> list[str]:
    """The texts that :func:`encode_dialog` encodes, one per turn.

    Each text is encoded with a leading BOS; texts of answered turns also get
    a trailing EOS.  Useful for inspecting what the model sees.
    """
    return [turn.full_text for turn in _turns(dialog)]


def encode_dialog(tokenizer: TextEncoder, dialog: Sequence[Mapping[str, object]]) -> EncodedDialog:
    """Encode a dialog in the Llama 2-Chat format; see the module docstring.

    A dialog ending with a user message gives the generation prompt (exactly
    Meta's ``chat_completion`` tokens) and ``loss_mask=None``.  A dialog ending
    with an assistant message is a training example and gets a loss mask.
    """
    turns = _turns(dialog)
    training = turns[-1].answer is not None
    ids: list[int] = []
    mask: list[int] = []
    for turn in turns:
        if turn.answer is None:  # only ever the last turn
            ids += tokenizer.encode(turn.prompt_text, bos=True, eos=False)
            continue
        turn_ids = tokenizer.encode(turn.full_text, bos=True, eos=True)
        ids += turn_ids
        if training:
            n_prompt = _prompt_length(tokenizer.encode(turn.prompt_text, bos=True, eos=False), turn_ids)
            mask += [0] * n_prompt + [1] * (len(turn_ids) - n_prompt)
    return EncodedDialog(ids=ids, loss_mask=mask if training else None)


def _prompt_length(prompt_ids: list[int], turn_ids: list[int]) -> int:
    """How many leading tokens of a turn belong to the ``<s>[INST] ... [/INST]`` prompt.

    The ids always stay those of Meta's whole-turn encoding; the mask boundary
    is where the separately encoded prompt stops matching them.  With
    SentencePiece this is the full prompt: the answer text begins with a space
    after ``"]"``, and no Llama piece spans ``"]"`` and a following ``"▁"``
    (pieces carry whitespace only at their start), so BPE merges never cross
    the boundary and the prompt's tokens are a prefix of the turn's.  Should a
    tokenizer ever merge across it, the straddling token is counted as answer
    (mask 1) rather than re-tokenizing and departing from Meta's ids.
    """
    n = 0
    for a, b in zip(prompt_ids, turn_ids):
        if a != b:
            break
        n += 1
    return n


def encode_dialog_prompt(tokenizer: TextEncoder, dialog: Sequence[Mapping[str, object]]) -> list[int]:
    """Token ids of a generation prompt (the dialog must end with a user message)."""
    turns = _turns(dialog)
    if turns[-1].answer is not None:
        last = len(dialog) - 1
        raise ValueError(
            f"message {last} (role 'assistant'): a prompt for generation must end with a user message"
        )
    return encode_dialog(tokenizer, dialog).ids


def turns(*texts: str, system: str | None = None) -> list[dict[str, str]]:
    """A dialog from its texts in order, user first, then alternating with the assistant; ``system`` first if given.

    >>> turns("Hi", "Hello.", "How are you?")[-1]
    {'role': 'user', 'content': 'How are you?'}
    """
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def has_special_tags(dialog: Sequence[Mapping[str, object]]) -> bool:
    """Whether any message contains ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>``.

    Meta's ``chat_completion`` still encodes such dialogs but replaces the
    model's reply with :data:`UNSAFE_ERROR`; callers that want the same
    safeguard can check this before generating.
    """
    return any(
        tag in str(msg.get("content", "")) for msg in dialog for tag in SPECIAL_TAGS
    )


def fit_dialog(tokenizer: TextEncoder, dialog: Sequence[Mapping[str, object]], budget: int,
               floor: bool = False) -> tuple[list, list[int], int]:
    """Drop the oldest user/assistant exchanges (never the system message or the last user turn) until the
    generation prompt has at most ``budget`` tokens. Returns the kept dialog, its prompt ids and how many
    exchanges were dropped. If the last user turn alone does not fit: ValueError, or with ``floor`` that last
    attempt (the system message and the last user turn) as it is. Used by `llama2 chat` and by the multi-turn
    Ghost Attention evaluation, where the system message must survive any trimming."""
    system = list(dialog[:1]) if dialog and dialog[0]["role"] == "system" else []
    turns = list(dialog[len(system):])
    dropped = 0
    while True:
        ids = encode_dialog_prompt(tokenizer, system + turns)
        if len(ids) <= budget:
            return system + turns, ids, dropped
        if len(turns) <= 1:
            if floor:
                return system + turns, ids, dropped
            raise ValueError(f"the message alone is {len(ids)} tokens; at most {budget} fit with the reply budget")
        turns = turns[2:]
        dropped += 1


def fit_prompt(tokenizer: TextEncoder, dialog: Sequence[Mapping[str, object]], context: int,
               max_new_tokens: int) -> tuple[list, list[int], int]:
    """The one policy for fitting a dialog into the model's context before generating, used by chat, generate,
    the server and every stage that samples (rejection sampling, PPO, GAtt, evaluation):

    1. the prompt should leave ``max_new_tokens`` for the reply: the oldest user/assistant exchanges are dropped
       (never the system message or the last user turn) until it does (:func:`fit_dialog`);
    2. if the last user turn (with the system message) alone leaves less room, it is kept whole and the reply
       gets the room that is left: a question is never cut, an answer may come out shorter;
    3. if it alone fills the context, ValueError (there is nothing sensible to generate).

    Returns the kept dialog, its prompt ids and how many exchanges were dropped."""
    if context < 2:
        raise ValueError(f"a context of {context} tokens holds no prompt and reply")
    kept, ids, dropped = fit_dialog(tokenizer, dialog, context - max_new_tokens, floor=True)  # a bad dialog raises
    if len(ids) >= context:
        raise ValueError(f"the last message alone is {len(ids)} tokens; the model's context is {context}")
    return kept, ids, dropped
