"""The `llama2` command: convert, generate and chat on a tiny checkpoint with the real Llama 2 vocabulary."""
import io
import sys

import pytest
import torch

from llama2 import Llama, ModelArgs, Transformer
from llama2.checkpoint import load, save
from llama2.chat import fit_dialog
from llama2.cli import build_parser, main



@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    return llama_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=96)
    model = Transformer(args).init_weights(std=0.2, seed=3)
    return save(model, tmp_path_factory.mktemp("ckpt") / "tiny", format="native", tokenizer=tok)


def test_convert_every_format_keeps_logits(ckpt, tmp_path, capsys):
    ref_model, _ = load(ckpt)
    tokens = torch.randint(0, 32000, (1, 9))
    ref = ref_model(tokens)
    for fmt, dst in (("hf", tmp_path / "hf"), ("meta", tmp_path / "meta"), ("gguf", tmp_path / "m.gguf")):
        extra = ["--shards", "2"] if fmt == "meta" else []
        main(["convert", str(ckpt), str(dst), "--to", fmt, *extra])
        assert f"({fmt})" in capsys.readouterr().out
        model, t = load(dst)
        torch.testing.assert_close(model(tokens), ref, atol=1e-5, rtol=1e-5)
        assert t is not None and t.encode("Hello world") == [15043, 3186]
    with pytest.raises(SystemExit, match="--shards applies to --to meta only"):
        main(["convert", str(ckpt), str(tmp_path / "x"), "--to", "hf", "--shards", "2"])


def test_generate_prints_what_the_library_returns(ckpt, capsys):
    expect = Llama.from_pretrained(ckpt).text_completion(["Hello", "The sky is"], temperature=0, max_new_tokens=8)
    main(["generate", "--ckpt", str(ckpt), "--prompt", "Hello", "--prompt", "The sky is", "temperature=0", "max_new_tokens=8"])
    out = capsys.readouterr().out
    for p, e in zip(["Hello", "The sky is"], expect):
        assert f"=== {p}\n{e}\n" in out


def test_generate_errors_are_clear(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="unknown field 'temprature'"):
        main(["generate", "--ckpt", str(ckpt), "--prompt", "x", "temprature=0"])
    with pytest.raises(SystemExit, match="at least one --prompt"):
        main(["generate", "--ckpt", str(ckpt)])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--ckpt", str(tmp_path / "nothing"), "--prompt", "x"])


def test_help_lists_every_generation_field():
    text = build_parser()._subparsers._group_actions[0].choices["chat"].format_help()
    for field in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_strings", "logprobs"):
        assert field + "=" in text


def test_fit_dialog_drops_oldest_exchanges_keeps_system(tok):
    dialog = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        dialog += [{"role": "user", "content": f"question number {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    dialog.append({"role": "user", "content": "last question"})
    full = fit_dialog(tok, dialog, 10_000)
    assert full[2] == 0 and full[0] == dialog
    budget = len(full[1]) - 20
    kept, ids, dropped = fit_dialog(tok, dialog, budget)
    assert len(ids) <= budget and dropped >= 1
    assert kept[0] == dialog[0] and kept[-1] == dialog[-1] and kept[1:] == dialog[1 + 2 * dropped :]
    with pytest.raises(ValueError, match="alone"):
        fit_dialog(tok, dialog, 5)


def test_chat_keeps_the_dialog_and_trims_when_full(ckpt, monkeypatch, capsys):
    lines = "\n".join(f"tell me about the number {i} please" for i in range(8)) + "\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    main(["chat", "--ckpt", str(ckpt), "--system", "You are terse.", "temperature=0", "max_new_tokens=12"])
    err = capsys.readouterr().err
    # 96-token context, 12 reserved for the reply: eight exchanges cannot all fit
    assert "context full: dropped" in err
