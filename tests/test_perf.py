"""FLOPs accounting against a hand count; the machine-rate and memory probes."""
import subprocess
import sys


from llama2 import ModelArgs, Transformer
from llama2.perf import current_rss_bytes, flops_per_token, matmul_params, measure_matmul_flops, peak_memory_bytes


def test_flops_per_token_hand_count():
    # dim 64, 2 layers, 4 heads of 16, 2 kv heads (kv width 32), SwiGLU hidden 176 (int(2*256/3) = 170 -> 176), vocab 100
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16)
    assert args.hidden_dim == 176
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 176  # wq wk wv wo w1 w2 w3 = 46080
    n = 2 * per_layer + 100 * 64  # + output head, no embedding table
    assert per_layer == 46080 and matmul_params(args) == n == 98560
    # the same count from the module: every 2-D weight except the embedding table
    model = Transformer(args)
    assert n == sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in name)
    T = 32
    attn = 12 * 2 * 64 * T  # PaLM App. B: 12 * n_layers * dim * seq_len
    assert flops_per_token(args, T) == 6 * n + attn == 640_512
    assert flops_per_token(args, T, training=False) == (6 * n + attn) / 3


def test_matmul_flops_positive_and_cached():
    f = measure_matmul_flops(n=256, reps=2)
    assert f > 1e8  # even a slow CPU does far more than 0.1 GFLOP/s
    assert measure_matmul_flops(n=256, reps=2) == f


def test_peak_memory_grows_after_a_big_allocation():
    # in a fresh process, so the peaks of other tests do not hide the growth
    code = (
        "import torch; from llama2.perf import peak_memory_bytes, current_rss_bytes, reset_peak_memory\n"
        "before = peak_memory_bytes('cpu')\n"
        "x = torch.ones(64 << 20)  # 256 MiB, every page touched\n"
        "print(before, peak_memory_bytes('cpu'), current_rss_bytes())\n"
        "del x; reset_peak_memory('cpu'); print(peak_memory_bytes('cpu'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after, rss, after_reset = map(int, out.split())
    assert before > 0 and after - before >= 200 << 20 and rss >= 256 << 20
    assert after_reset < after - (200 << 20)  # the freed tensor no longer counts towards the new peak
    assert peak_memory_bytes() >= current_rss_bytes() > 0
