"""Checkpoint formats: round trips, agreement with Hugging Face transformers (the reference), Meta's
model-parallel sharding, GGUF, and the errors a user sees for broken or unsafe checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama2 import checkpoint
from llama2.checkpoint import detect, load, save
from llama2.checkpoint._common import ffn_args_for_hidden
from llama2.checkpoint.hf import permute_for_hf, unpermute_from_hf
from llama2.model import ModelArgs, Transformer, ffn_hidden_dim

DATA = Path(__file__).resolve().parents[1] / "assets"
VOCAB_GGUF = DATA / "ggml-vocab-llama-spm.gguf"

GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64)
MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=320, multiple_of=32, max_seq_len=64, rope_theta=50000.0)
# hidden_dim 100: not what multiple_of rounding of int(8 * 64 / 3) = 170 gives, nor larger than it
ODD_FFN = ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=256, multiple_of=100, ffn_dim_multiplier=100 / 170, max_seq_len=64)
TOL = 1e-4


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Random weights large enough that logits differ clearly between tokens; norms not all ones, so a
    norm mapped to the wrong place would show."""
    model = Transformer(args).init_weights(std=0.2, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name == "output.bias":
                p.normal_(0, 1, generator=gen)
    return model.eval()


def tokens(vocab: int, seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def vocab_tokenizer():
    from llama2.tokenizer import Tokenizer

    return Tokenizer.from_file(VOCAB_GGUF)


# -------------------------------------------------------------------------------------- helpers


def test_ffn_args_reproduce_hidden_dim():
    assert ffn_args_for_hidden(4096, 11008) == (256, None)  # Llama 2 7B
    assert ffn_args_for_hidden(8192, 28672) == (4096, 1.3)  # Llama 2 70B
    for dim in (64, 96, 128, 4096, 5120, 8192):
        for hidden in (1, 7, 100, 170, 171, 255, 1000, 11008, 13824, 14336, 22016, 28672):
            mult_of, mult = ffn_args_for_hidden(dim, hidden)
            assert ffn_hidden_dim(dim, mult_of, mult) == hidden, (dim, hidden, mult_of, mult)


def test_hf_permutation_is_invertible():
    w = torch.randn(4 * 16, 64)
    p = permute_for_hf(w, 4)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_from_hf(p, 4), w)
    # head 0, HF row 1 is Meta row 2 (the first element of the second rotary pair)
    assert torch.equal(p[1], w[2])


# --------------------------------------------------------------------------------- Hugging Face

import transformers  # noqa: E402  (the independent reference)


def hf_random_model(args: ModelArgs, seed: int = 0):
    config = transformers.LlamaConfig(  # written out here, not with the package's config_json: the independent side
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("args", [GQA, MHA, ODD_FFN], ids=["gqa", "mha", "odd-ffn"])
def test_hf_to_ours(tmp_path, args):
    hf_model = hf_random_model(args)
    if args is MHA:
        assert hf_model.config.rope_parameters["rope_theta"] == 50000.0
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert detect(tmp_path) == "hf"
    model, tokenizer = load(tmp_path)
    assert tokenizer is None
    assert model.args.hidden_dim == args.hidden_dim and model.args.n_kv_heads == args.n_kv_heads
    assert model.args.rope_theta == args.rope_theta
    x = tokens(args.vocab_size)
    with torch.no_grad():
        assert max_diff(model(x), hf_model(x).logits) <= TOL


@pytest.mark.parametrize("args", [GQA, MHA], ids=["gqa", "mha"])
def test_ours_to_hf(tmp_path, args):
    model = random_model(args)
    out = save(model, tmp_path / "hf", format="hf")
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == args.hidden_dim and config["num_key_value_heads"] == args.n_kv_heads
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = tokens(args.vocab_size)
    with torch.no_grad():
        assert max_diff(model(x), hf_model(x).logits) <= TOL
    back, _ = load(out)  # and back: identical tensors
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_hf_sharded_index(tmp_path):
    model = random_model(GQA)
    out = save(model, tmp_path / "hf", format="hf", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert index["weight_map"]["model.embed_tokens.weight"] in shards
    x = tokens(GQA.vocab_size)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours, _ = load(out)
    with torch.no_grad():
        ref = model(x)
        assert max_diff(hf_model(x).logits, ref) <= TOL
        assert max_diff(ours(x), ref) == 0


def test_hf_tokenizer_files(tmp_path, vocab_tokenizer):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=64)
    out = save(random_model(args), tmp_path / "hf", format="hf", tokenizer=vocab_tokenizer)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and tok_config["add_bos_token"] is True
    assert json.loads((out / "special_tokens_map.json").read_text())["bos_token"] == "<s>"
    _, tok = load(out)
    assert tok.to_proto_bytes() == vocab_tokenizer.to_proto_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world, the year 2024 was fine."
    assert hf_tok(text)["input_ids"] == vocab_tokenizer.encode(text, bos=True)


def test_hf_rejects_what_we_cannot_represent(tmp_path):
    from llama2.checkpoint.hf import args_from_config

    base = json.loads(json.dumps(hf_random_model(GQA).config.to_dict()))
    base.pop("rope_parameters", None)
    args_from_config(dict(base), "config.json")  # the base is fine
    for key, value, words in [
        ("tie_word_embeddings", True, "tie_word_embeddings"),
        ("attention_bias", True, "attention_bias"),
        ("mlp_bias", True, "mlp_bias"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope_type"),
        ("hidden_act", "gelu", "hidden_act"),
        ("head_dim", 8, "head_dim"),
        ("model_type", "mistral", "model_type"),
    ]:
        with pytest.raises(ValueError, match=words):
            args_from_config({**base, key: value}, "config.json")


def test_hf_pickle_only_is_refused(tmp_path):
    hf_random_model(GQA).config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    assert detect(tmp_path) == "hf"
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors"):
        load(tmp_path)


# ----------------------------------------------------------------------------------------- Meta


def test_meta_two_shards(tmp_path):
    model = random_model(GQA)
    out = save(model, tmp_path / "meta", format="meta", shards=2)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    params = json.loads((out / "params.json").read_text())
    assert params == {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-5, "vocab_size": 256}
    s0 = torch.load(out / "consolidated.00.pth", weights_only=True)
    s1 = torch.load(out / "consolidated.01.pth", weights_only=True)
    full = model.state_dict()
    assert s0["layers.0.attention.wq.weight"].shape == (32, 64)  # column parallel: output rows halved
    assert s0["layers.0.attention.wk.weight"].shape == (16, 64)
    assert s0["layers.0.attention.wo.weight"].shape == (64, 32)  # row parallel: input columns halved
    assert s0["layers.0.feed_forward.w2.weight"].shape == (64, GQA.hidden_dim // 2)
    assert s0["tok_embeddings.weight"].shape == (256, 32)  # ParallelEmbedding: embedding dim halved
    assert s0["output.weight"].shape == (128, 64)
    assert torch.equal(s1["norm.weight"], full["norm.weight"])  # replicated
    assert torch.equal(s1["layers.1.attention.wq.weight"], full["layers.1.attention.wq.weight"][32:])
    # each shard holds its half only (torch.save would write a view's whole storage)
    single = save(model, tmp_path / "meta1", format="meta")
    size1 = (single / "consolidated.00.pth").stat().st_size
    for f in ("consolidated.00.pth", "consolidated.01.pth"):
        assert (out / f).stat().st_size < 0.6 * size1
    for path in (out, single):
        assert detect(path) == "meta"
        back, tok = load(path)
        assert tok is None
        for name, t in full.items():
            assert torch.equal(back.state_dict()[name], t), name
        x = tokens(GQA.vocab_size)
        with torch.no_grad():
            assert max_diff(back(x), model(x)) == 0
    # bfloat16 shards, as Meta ships them, loaded as float32 (the read-and-convert path)
    bf = save(model, tmp_path / "meta-bf16", format="meta", shards=2, dtype="bfloat16")
    back, _ = load(bf)
    for name, t in full.items():
        assert back.state_dict()[name].dtype == torch.float32
        assert torch.equal(back.state_dict()[name], t.bfloat16().float()), name


def test_meta_params_conventions(tmp_path):
    out = save(random_model(MHA), tmp_path / "m", format="meta")
    params = json.loads((out / "params.json").read_text())
    assert "n_kv_heads" not in params and "ffn_dim_multiplier" not in params and "max_seq_len" not in params
    assert params["rope_theta"] == 50000.0  # written only when not the default 10000 (Code Llama does)
    with pytest.raises(ValueError, match=r"wq"):
        save(random_model(GQA), tmp_path / "m3", format="meta", shards=3)


def test_meta_vocab_minus_one_rope_freqs_and_parent_tokenizer(tmp_path, vocab_tokenizer):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=32)
    model = random_model(args)
    out = save(model, tmp_path / "llama-2-tiny", format="meta")
    params = json.loads((out / "params.json").read_text())
    params["vocab_size"] = -1  # as in Meta's release
    (out / "params.json").write_text(json.dumps(params))
    sd = torch.load(out / "consolidated.00.pth", weights_only=True)
    sd["rope.freqs"] = torch.randn(8)  # present in Meta's released files; derived state, ignored
    torch.save(sd, out / "consolidated.00.pth")
    vocab_tokenizer.save(tmp_path / "tokenizer.model")  # Meta's download layout: beside the model directory
    back, tok = load(out)
    assert back.args.vocab_size == 32000
    assert tok is not None and tok.vocab_size == 32000
    assert torch.equal(back.output.weight, model.output.weight)


class _Evil:
    """Pickles into a call that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_meta_refuses_arbitrary_pickles(tmp_path):
    out = save(random_model(GQA), tmp_path / "m", format="meta")
    marker = tmp_path / "marker"
    sd = dict(torch.load(out / "consolidated.00.pth", weights_only=True))
    sd["evil"] = _Evil(marker)
    torch.save(sd, out / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*weights_only"):
        load(out)
    assert not marker.exists()
    # the file really is hostile: a full unpickle runs its code
    torch.load(out / "consolidated.00.pth", weights_only=False)
    assert marker.read_text() == "pwned"


# --------------------------------------------------------------------------------------- native


def test_native_round_trip_with_tokenizer(tmp_path, vocab_tokenizer):
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=32000, multiple_of=16, max_seq_len=48)
    model = random_model(args)
    out = save(model, tmp_path / "n", tokenizer=vocab_tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["llama2.json", "model.safetensors", "tokenizer.model"]
    meta = json.loads((out / "llama2.json").read_text())
    assert meta["format"] == "llama2-native" and meta["version"] == 1 and meta["model_args"] == args.to_dict()
    back, tok = load(out)
    assert back.args == args
    assert tok.encode("Hello world") == vocab_tokenizer.encode("Hello world")
    x = tokens(args.vocab_size)
    with torch.no_grad():
        assert max_diff(back(x), model(x)) == 0


def test_native_scalar_head_sharded_and_dtypes(tmp_path):
    args = ModelArgs(**{**GQA.to_dict(), "head": "scalar"})
    model = random_model(args)
    out = save(model, tmp_path / "rm", max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    back, _ = load(out)
    assert back.args.head == "scalar"
    x = tokens(args.vocab_size)
    with torch.no_grad():
        values = back(x)
        assert values.shape == x.shape and max_diff(values, model(x)) == 0
    for fmt in ("hf", "meta", "gguf"):
        with pytest.raises(ValueError, match="scalar"):
            save(model, tmp_path / fmt, format=fmt)
    # stored dtype vs requested dtype
    bf = save(model, tmp_path / "bf16", dtype="bfloat16")
    assert load_file(bf / "model.safetensors")["norm.weight"].dtype == torch.bfloat16
    assert load(bf)[0].norm.weight.dtype == torch.float32  # None on the CPU: float32
    assert load(bf, dtype="bfloat16")[0].norm.weight.dtype == torch.bfloat16
    assert load(out, dtype=torch.float16)[0].tok_embeddings.weight.dtype == torch.float16


def test_overwrite_rules(tmp_path):
    model = random_model(GQA)
    target = tmp_path / "ckpt"
    target.mkdir()  # an existing empty directory is fine
    save(model, target)
    with pytest.raises(FileExistsError, match="overwrite"):
        save(model, target)
    save(model, target, format="hf", overwrite=True)  # replaced as a whole: no stale native files
    assert detect(target) == "hf" and not (target / "llama2.json").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not part of a checkpoint \(notes.txt\)"):
        save(model, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    # a project folder that happens to hold a config.json (so it *looks* like an HF checkpoint) keeps its code
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    (project / "main.py").write_text("print('hi')")
    with pytest.raises(FileExistsError, match=r"main.py, src/"):
        save(model, project, format="hf", overwrite=True)
    assert (project / "main.py").is_file() and (project / "src").is_dir()
    # a text file named .gguf is not a GGUF file: never replaced
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not a GGUF file"):
        save(model, notes, format="gguf", overwrite=True)
    assert notes.read_text() == "my notes"
    # a model memory-mapped from a checkpoint can be saved over that same checkpoint: the old files are
    # renamed away and unlinked, never truncated under the live mapping
    mapped, _ = load(target)
    save(mapped, target, format="hf", overwrite=True)
    x = tokens(GQA.vocab_size)
    with torch.no_grad():
        assert max_diff(mapped(x), model(x)) == 0
        assert max_diff(load(target)[0](x), model(x)) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_llama_save_and_from_pretrained(tmp_path, vocab_tokenizer):
    from llama2 import Llama

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=64)
    llama = Llama(random_model(args), vocab_tokenizer)
    path = llama.save(tmp_path / "l", format="hf")
    again = Llama.from_pretrained(path)
    assert not again.model.training and again.tokenizer.vocab_size == 32000
    assert torch.equal(again.model.output.weight, llama.model.output.weight)


# ----------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("dtype,tol", [("f32", 0.0), ("f16", 0.05)])
def test_gguf_round_trip(tmp_path, vocab_tokenizer, dtype, tol):
    import gguf

    # The tokenizer (32000 pieces, slow to parse) rides along in the f32 case only.
    with_tokenizer = dtype == "f32"
    vocab = 32000 if with_tokenizer else 256
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, max_seq_len=64, norm_eps=1e-5)
    model = random_model(args)
    tokenizer = vocab_tokenizer if with_tokenizer else None
    path = save(model, tmp_path / "m.gguf", tokenizer=tokenizer, format="gguf", dtype=dtype)
    assert detect(path) == "gguf" and detect(tmp_path) == "gguf"
    reader = gguf.GGUFReader(path)
    infos = {t.name: t for t in reader.tensors}
    assert infos["token_embd.weight"].shape.tolist() == [64, vocab]  # GGML order: row length first
    assert infos["blk.0.attn_k.weight"].shape.tolist() == [64, 32]
    expected_type = gguf.GGMLQuantizationType.F32 if dtype == "f32" else gguf.GGMLQuantizationType.F16
    assert infos["blk.0.ffn_down.weight"].tensor_type == expected_type
    assert infos["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert reader.fields["llama.rope.dimension_count"].contents() == 16
    assert ("tokenizer.ggml.model" in reader.fields) == with_tokenizer
    del reader
    back, tok = load(path)
    assert back.args.hidden_dim == args.hidden_dim and back.args.norm_eps == 1e-5 and back.args.max_seq_len == 64
    x = tokens(args.vocab_size)
    with torch.no_grad():
        ref = model(x)
        diff = max_diff(back(x), ref)
    assert diff <= max(tol * ref.abs().max().item(), TOL)
    if with_tokenizer:
        text = "Hello world! 123 éà 你好\n  indented"
        assert tok.encode(text, bos=True) == vocab_tokenizer.encode(text, bos=True)
        assert tok.pieces_scores_types() == vocab_tokenizer.pieces_scores_types()
    else:
        assert tok is None


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0"])
def test_gguf_reads_bf16_and_quantised(tmp_path, qtype):
    """A GGUF written by gguf-py directly (as llama.cpp's converter does), with quantised weights."""
    import gguf
    from gguf.quants import quantize

    from llama2.checkpoint.gguf import meta_to_gguf_name

    model = random_model(GQA)
    args = GQA
    q = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(tmp_path / "q.gguf", "llama")
    # the metadata written here with gguf-py's own calls (not the package's add_model_keys): the independent side
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    for name, t in model.state_dict().items():
        arr = t.numpy()
        if t.dim() == 1:
            w.add_tensor(meta_to_gguf_name(name), arr)
        else:
            w.add_tensor(meta_to_gguf_name(name), quantize(arr, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back, tok = load(tmp_path / "q.gguf")
    assert tok is None
    x = tokens(GQA.vocab_size)
    with torch.no_grad():
        ref = model(x)
        assert max_diff(back(x), ref) <= 0.05 * ref.abs().max().item()
        assert max_diff(back.output.weight, model.output.weight) <= 0.02 * model.output.weight.abs().max().item()


# --------------------------------------------------------------------------------------- errors


def test_state_dict_mismatches_name_the_tensors(tmp_path):
    out = save(random_model(GQA), tmp_path / "n")
    st = out / "model.safetensors"
    good = load_file(st)

    def rewrite(sd):
        save_file(sd, str(st), metadata={"format": "pt"})

    sd = dict(good)
    del sd["layers.1.feed_forward.w3.weight"]
    rewrite(sd)
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing tensors: layers\.1\.feed_forward\.w3\.weight"):
        load(out)
    rewrite({**good, "layers.2.attention.wq.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected tensors: layers\.2\.attention\.wq\.weight"):
        load(out)
    rewrite({**good, "norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"wrong shape: norm\.weight \(expected \(64,\), found \(65,\)\)"):
        load(out)


def test_hf_mismatch_uses_hf_names(tmp_path):
    hf_random_model(GQA).save_pretrained(tmp_path, safe_serialization=True)
    st = tmp_path / "model.safetensors"
    sd = load_file(st)
    del sd["model.layers.0.self_attn.q_proj.weight"]
    save_file(sd, str(st), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.0\.self_attn\.q_proj\.weight"):
        load(tmp_path)


def test_detect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect(tmp_path / "nope")
    with pytest.raises(ValueError) as err:
        detect(tmp_path)
    for looked_for in ("llama2.json", "params.json", "consolidated", "config.json", "model.safetensors", ".gguf"):
        assert looked_for in str(err.value)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf"):
        detect(tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save(random_model(GQA), tmp_path / "x", format="onnx")
    assert checkpoint.FORMATS == ("native", "meta", "hf", "gguf")


def test_vocab_only_gguf_is_a_clear_error():
    with pytest.raises(ValueError, match="no tensors"):
        load(VOCAB_GGUF)


# ------------------------------------------------------------------------- the released shapes


def test_released_configs_map_to_the_presets():
    """The published Llama 2 configs (meta-llama/Llama-2-*-hf config.json; Meta's params.json; llama.cpp's
    GGUF metadata) describe exactly the paper's shapes."""
    import gguf

    from llama2.checkpoint.gguf import args_from_gguf
    from llama2.checkpoint.hf import args_from_config
    from llama2.checkpoint.meta import params_json
    from llama2.model import PRESETS

    hf_7b = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
    }
    hf_70b = {**hf_7b, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_hidden_layers": 80, "num_key_value_heads": 8}
    assert args_from_config(hf_7b, "7b") == PRESETS["llama2-7b"]
    assert args_from_config(hf_70b, "70b") == PRESETS["llama2-70b"]
    # Meta's params.json files, but for vocab_size, which they leave at -1
    assert params_json(PRESETS["llama2-7b"]) == {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": 32000}
    assert params_json(PRESETS["llama2-70b"]) == {
        "dim": 8192, "ffn_dim_multiplier": 1.3, "multiple_of": 4096, "n_heads": 64, "n_kv_heads": 8, "n_layers": 80,
        "norm_eps": 1e-05, "vocab_size": 32000,
    }
    # llama.cpp's vocabulary test file carries the 7B model's metadata (and no tensors)
    assert args_from_gguf(gguf.GGUFReader(VOCAB_GGUF), str(VOCAB_GGUF), None) == PRESETS["llama2-7b"]
