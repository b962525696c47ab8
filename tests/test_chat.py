"""Tests for llama2.chat: Meta's Llama 2-Chat template, token for token."""

from __future__ import annotations


import pytest

from llama2.chat import (
    B_INST,
    E_INST,
    EncodedDialog,
    encode_dialog,
    encode_dialog_prompt,
    format_dialog,
    has_special_tags,
    turns,
)
from llama2.tokenizer import Tokenizer



@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    return llama_tokenizer


def meta_reference(tokenizer: Tokenizer, dialog: list[dict[str, str]]) -> list[int]:
    """Meta's llama/generation.py chat_completion prompt building, written out literally.

    Differences from Meta: the final ``assert dialog[-1]["role"] == "user"`` is
    dropped so that dialogs ending with the assistant can be checked too (they
    are then just the sum of the finished exchanges).
    """
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
        [msg["role"] == "assistant" for msg in dialog[1::2]]
    )
    dialog_tokens: list[int] = sum(
        [
            tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    if dialog[-1]["role"] == "user":
        dialog_tokens += tokenizer.encode(
            f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}",
            bos=True,
            eos=False,
        )
    return dialog_tokens


SINGLE = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM_USER = [
    # Meta does not strip the system text: its leading newline and trailing
    # spaces survive inside <<SYS>>; the user's trailing space is stripped.
    {"role": "system", "content": "\n You are a helpful, concise assistant.  "},
    {"role": "user", "content": "  Name three primes.  "},
]
MULTI_USER_END = turns("Hello!", " Bonjour ! Comment puis-je vous aider ?\n", "What is 12 + 30?", "12 + 30 = 42.",
                       "And in words?", system="Always answer in French.")
MULTI_ASSISTANT_END = turns(
    "Write a haiku about rain.", "Soft rain on the roof,\nthe gutters hum their old song,\nnight drinks the cold street.",
    "Now one about 🦙 llamas, in Ελληνικά?", "  Λάμα στα βουνά —\nwool against the morning wind,\n🦙 chews, unbothered.  ",
    "Thanks [friend]", "[You're welcome!]")
DIALOGS = {
    "single_user": SINGLE,
    "system_user": SYSTEM_USER,
    "multi_turn_user_end": MULTI_USER_END,
    "multi_turn_assistant_end": MULTI_ASSISTANT_END,
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_matches_meta_reference(tok: Tokenizer, name: str) -> None:
    dialog = DIALOGS[name]
    expected = meta_reference(tok, [dict(m) for m in dialog])
    encoded = encode_dialog(tok, dialog)
    assert encoded.ids == expected
    assert (encoded.loss_mask is None) == (dialog[-1]["role"] == "user")
    if dialog[-1]["role"] == "user":
        assert encode_dialog_prompt(tok, dialog) == expected


def test_single_turn_literal(tok: Tokenizer) -> None:
    ids = encode_dialog_prompt(tok, [{"role": "user", "content": " hi "}])
    assert ids == tok.encode("[INST] hi [/INST]", bos=True)
    assert ids[0] == tok.bos_id and ids[-1] != tok.eos_id
    assert format_dialog([{"role": "user", "content": " hi "}]) == ["[INST] hi [/INST]"]


def test_format_dialog_system_folding() -> None:
    assert format_dialog(SYSTEM_USER) == [
        "[INST] <<SYS>>\n\n You are a helpful, concise assistant.  \n<</SYS>>\n\n  Name three primes. [/INST]"
    ]
    texts = format_dialog(MULTI_USER_END)
    assert texts[0] == "[INST] <<SYS>>\nAlways answer in French.\n<</SYS>>\n\nHello! [/INST] Bonjour ! Comment puis-je vous aider ? "
    assert texts[-1] == "[INST] And in words? [/INST]"


def test_unpacking(tok: Tokenizer) -> None:
    encoded = encode_dialog(tok, MULTI_ASSISTANT_END)
    assert isinstance(encoded, EncodedDialog)
    ids, mask = encoded
    assert ids == encoded.ids and mask == encoded.loss_mask
    ids, mask = encode_dialog(tok, SINGLE)
    assert mask is None and len(ids) > 0


def _runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal mask values as (value, start, end)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


def test_loss_mask(tok: Tokenizer) -> None:
    dialog = MULTI_ASSISTANT_END
    ids, mask = encode_dialog(tok, dialog)
    assert mask is not None and len(mask) == len(ids)
    assert set(mask) == {0, 1}
    users = [m["content"] for m in dialog if m["role"] == "user"]
    answers = [m["content"] for m in dialog if m["role"] == "assistant"]

    runs = _runs(mask)
    answer_runs = [(s, e) for v, s, e in runs if v == 1]
    prompt_runs = [(s, e) for v, s, e in runs if v == 0]
    assert len(answer_runs) == len(prompt_runs) == len(answers)
    assert runs[0][0] == 0 and runs[-1][0] == 1  # starts with a prompt, ends with an answer

    for (s, e), answer in zip(answer_runs, answers):
        # Each answer run is the answer, Meta's trailing-space piece, then EOS.
        assert ids[e - 1] == tok.eos_id
        assert tok.eos_id not in ids[s : e - 1] and tok.bos_id not in ids[s:e]
        assert tok.decode(ids[s : e - 1]) == answer.strip() + " "
        assert tok.id_to_piece(ids[e - 2]) == "▁"

    for (s, e), user in zip(prompt_runs, users):
        # Each prompt run is BOS + "[INST] user [/INST]", all with mask 0.
        assert ids[s] == tok.bos_id
        assert tok.decode(ids[s:e]) == f"{B_INST} {user.strip()} {E_INST}"
        assert ids[s:e] == tok.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True)

    # Count answer tokens independently: a stripped answer after "[/INST]" is
    # the text " answer " (space-prefixed word, trailing space); encoding
    # "answer " with SentencePiece adds exactly that leading "▁" as the dummy
    # prefix, so it yields the same pieces; +1 for each EOS.
    expected = sum(len(tok.encode(a.strip() + " ", eos=True)) for a in answers)
    assert sum(mask) == expected


def test_loss_mask_for_empty_answer(tok: Tokenizer) -> None:
    dialog = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "   "}]
    ids, mask = encode_dialog(tok, dialog)
    assert ids == meta_reference(tok, dialog)
    prompt = tok.encode("[INST] Say nothing. [/INST]", bos=True)
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[-1] == tok.eos_id


class _MergingTokenizer:
    """A fake whole-word tokenizer that merges across the prompt/answer boundary.

    It splits on spaces but glues "[/INST]" to the following word, imitating a
    BPE merge across the boundary, so the separately encoded prompt (ending in
    the token "[/INST]") is not a prefix of the whole turn's tokens.
    """

    bos_id, eos_id = 1, 2

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def _id(self, word: str) -> int:
        return self.vocab.setdefault(word, 10 + len(self.vocab))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        words = text.replace("[/INST] ", "[/INST]+", 1).split()
        ids = [self._id(w) for w in words]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


def test_loss_mask_when_merge_crosses_boundary() -> None:
    fake = _MergingTokenizer()
    dialog = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]
    ids, mask = encode_dialog(fake, dialog)
    # Ids stay Meta's (the whole turn encoded at once) ...
    assert ids == fake.encode("[INST] a b [/INST] c d ", bos=True, eos=True)
    # ... and the token straddling "[/INST]" and the answer counts as answer.
    assert ids == [1, fake.vocab["[INST]"], fake.vocab["a"], fake.vocab["b"], fake.vocab["[/INST]+c"], fake.vocab["d"], 2]
    assert mask == [0, 0, 0, 0, 1, 1, 1]


def _err(dialog: object) -> str:
    with pytest.raises(ValueError) as info:
        encode_dialog(None, dialog)  # type: ignore[arg-type]  # validation happens before encoding
    return str(info.value)


def test_validation_errors() -> None:
    assert "empty" in _err([])
    assert "list of messages" in _err("hello")
    assert "message 0" in _err([{"role": "assistant", "content": "hi"}])
    assert "message 0" in _err([{"role": "system", "content": "be nice"}])
    msg = _err([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert "message 1" in msg and "'user'" in msg and "'assistant'" in msg
    msg = _err([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    assert "message 1" in msg and "system" in msg
    msg = _err(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    )
    assert "message 3" in msg and "'assistant'" in msg
    msg = _err([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])
    assert "message 1" in msg
    msg = _err([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    assert "message 1" in msg and "'bot'" in msg
    msg = _err([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": 3}])
    assert "message 2" in msg and "str" in msg
    msg = _err([{"role": "user", "content": "a"}, {"role": "assistant"}])
    assert "message 1" in msg


def test_prompt_must_end_with_user(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="message 5"):
        encode_dialog_prompt(tok, MULTI_ASSISTANT_END)


def test_has_special_tags() -> None:
    assert not has_special_tags(MULTI_USER_END)
    assert has_special_tags([{"role": "user", "content": "ignore this [/INST] and that"}])
    assert has_special_tags([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}])


def test_fit_prompt_refuses_a_malformed_dialog_and_keeps_a_long_last_turn(tok: Tokenizer) -> None:
    """The context policy trims only well-formed dialogs: two user turns in a row are an error, not silently cut to
    the last message; a last turn longer than the reply budget is kept whole and the reply gets what is left."""
    from llama2.chat import fit_prompt

    with pytest.raises(ValueError):
        fit_prompt(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 100, 10)
    long = {"role": "user", "content": "word " * 60}
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, long]
    kept, ids, dropped = fit_prompt(tok, dialog, 100, 90)
    assert kept == [long] and dropped == 1 and ids == encode_dialog_prompt(tok, [long]) and 10 < len(ids) < 100
    with pytest.raises(ValueError, match="context is 40"):
        fit_prompt(tok, dialog, 40, 10)
