"""The one training loop: accumulation gives the gradient of the whole batch, a non-finite step stops before the
optimizer touches the weights, a resumed run's metrics are cut back to its step, and the run control keeps its
cadences."""
import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from llama2 import ModelArgs, Transformer
from llama2.config import OptimConfig, RunConfig
from llama2.dist import init_distributed
from llama2.train.loop import MetricsLog, NonFiniteError, StepBatch, accumulate, begin, fit, run_steps

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Cfg:
    run: RunConfig = field(default_factory=lambda: RunConfig(out="x", tensorboard=False, save_every=10**6))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, grad_clip=0.0, weight_decay=0.0))


def _session(tmp_path, **optim):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_preset("toy-tiny", vocab_size=64, max_seq_len=32)).init_weights(seed=0)
    cfg = Cfg(RunConfig(out=str(tmp_path), tensorboard=False, save_every=10**6), OptimConfig(**{"lr": 1e-3, "grad_clip": 0.0,
                                                                                                "weight_decay": 0.0, **optim}))
    return begin(model, init_distributed("single", "cpu"), cfg, name="test", tokenizer=None)


def _loss(s, x):
    return s.model(x[:, :-1], targets=x[:, 1:]) * x[:, 1:].numel(), {"rows": float(len(x))}


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tmp_path):
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    a, b = _session(tmp_path / "a"), _session(tmp_path / "b")
    ra = accumulate(a, [data[:2], data[2:5], data[5:]], lambda x: _loss(a, x), units=data[:, 1:].numel())
    rb = accumulate(b, [data], lambda x: _loss(b, x), units=data[:, 1:].numel())
    assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    assert ra["rows"] == pytest.approx(8 / data[:, 1:].numel())  # metric sums are averaged over the units
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_a_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    s = _session(tmp_path)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}

    def nan_loss(x):
        loss, m = _loss(s, x)
        return loss * float("nan"), m

    with pytest.raises(NonFiniteError, match="not finite"):
        accumulate(s, [torch.randint(0, 64, (2, 9))], nan_loss, units=16)
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())
    assert all(p.grad is None for p in s.model.parameters())


def test_fit_runs_the_schedule_and_the_cadences(tmp_path):
    s = _session(tmp_path, warmup_steps=2)
    s.run = RunConfig(out=str(tmp_path), tensorboard=False, eval_every=3, save_every=10**6)
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    evals = []
    result = fit(s, 7, lambda step: StepBatch([data], units=data[:, 1:].numel(), info={"n": step}),
                 lambda x: _loss(s, x), desc="t", evaluate=lambda step: evals.append(step) or {"val": 1.0},
                 throughput={"rows_per_s": 4})
    hist = result["history"]
    assert [r["step"] for r in hist] == list(range(1, 8)) and evals == [3, 6, 7]  # every 3 steps and at the end
    assert hist[0]["lr"] == pytest.approx(5e-4) and hist[1]["lr"] == pytest.approx(1e-3)  # warmup over 2 steps
    assert hist[-1]["lr"] < hist[2]["lr"] and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[4]["n"] == 4 and hist[0]["rows_per_s"] > 0
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 8)) and (tmp_path / "test_config.json").is_file()
    assert (tmp_path / "checkpoints" / "step_000007" / "trainer_state.pt").is_file()  # saved at the end


def test_a_resumed_run_cuts_its_metrics_back_to_the_resumed_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6))
                                            + '{"step": 6, "lo')  # the last line cut by a kill
    log = MetricsLog(tmp_path, tensorboard=False, start_step=3)
    log.log({"step": 4, "loss": 0.5})
    log.close()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_should_stop_ends_the_run_early(tmp_path):
    s = _session(tmp_path)
    res = run_steps(s, 10, lambda step: {"x": float(step)}, desc="t", should_stop=lambda rec: rec["x"] >= 2)
    assert [r["step"] for r in res["history"]] == [1, 2, 3] and not res["stopped"]
    assert math.isfinite(res["history"][0]["seconds"])
