"""The lm-evaluation-harness adapter (llama2.eval.harness), offline.

The reference is lm-eval's own ``hf`` model on the same checkpoint exported to Hugging Face format: a task
written here (a YAML and a JSONL file: multiple choice and generation) must give the same accuracy, the same
per-request log-likelihoods (within 1e-4) and the same generations; rolling log-likelihoods (perplexity
tasks) must agree too, and with a direct computation. Also: the Llama 2-Chat template, the paper's task set
and table, and the errors a user sees. Nothing here touches the network: the datasets are local JSON files,
and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lm_eval  # noqa: E402, F401  (the adapter needs it: fail here, not inside a test)

from llama2 import ModelArgs, Transformer, checkpoint  # noqa: E402
from llama2.chat import encode_dialog_prompt  # noqa: E402
from llama2.demo import demo_corpus  # noqa: E402
from llama2.eval import paper  # noqa: E402
from llama2.eval.harness import CUSTOM_SUITES, Llama2LM, expand_tasks, run_eval  # noqa: E402
from llama2.tokenizer import train_tokenizer  # noqa: E402

TOL = 1e-4

MC_DOCS = [dict(question=q, choices=c, label=l) for q, c, l in (
    ('Where does Ada live?', ['near the harbour', 'near the mill', 'in the tower'], 0),
    ('What does Bram keep?', ['a lantern', 'a map', 'a violin', 'an old clock'], 2),
    ('How many apples does Cleo have?', ['3', '12', '7'], 1),
    ('Who lives near the harbour?', ['Ada', 'Bram', 'Cleo', 'Dov'], 1),
    ('Who found a red kite at the orchard?', ['Esme', 'Finn', 'Gala'], 0),
    ('What did Hugo carry to the library on Sunday?', ['a jar of honey', 'a map'], 0),
)]  # the last three: one-token answers that share the context (lm-eval scores them from one forward pass)
GEN_DOCS = [dict(question=q, answer=a) for q, a in (
    ('Where does Ada live?', 'near the harbour'),
    ('What did Bram find at the mill?', 'a map'),
    ('How many apples does Cleo have now?', '12'),
    ('Who walked to the tower on Sunday with a red kite and an old clock and a map?', 'Esme'),
    ('Gala?', 'Gala'),
)]


def _task_yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
            f"test_split: test\n{body}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def offline():
    """No network for anything lm-eval, datasets or the hub would fetch (also when they were imported before)."""
    import datasets
    import huggingface_hub.constants as hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(hub, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, offline):
    """A 400-piece tokenizer and a toy-tiny model fitted for a few seconds on the demo corpus (so that it
    writes words, not byte pieces, and its choices differ), saved natively and as Hugging Face; the tasks."""
    d = tmp_path_factory.mktemp("harness")
    text = demo_corpus(0, 1500)
    (d / "corpus.txt").write_text(text)
    tok = train_tokenizer([d / "corpus.txt"], 400, d / "tok.model")
    model = Transformer(ModelArgs.from_preset("toy-tiny", vocab_size=tok.vocab_size)).init_weights(seed=0)
    data = torch.tensor(tok.encode(text, bos=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(data) - 65, (16,), generator=gen)
        x = torch.stack([data[i : i + 64] for i in idx])
        y = torch.stack([data[i + 1 : i + 65] for i in idx])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    native = checkpoint.save(model, d / "native", format="native", tokenizer=tok)
    hf = checkpoint.save(model, d / "hf", format="hf", tokenizer=tok)

    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in MC_DOCS))
    (tasks / "gen.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GEN_DOCS))
    cache = d / "datasets-cache"
    (tasks / "toy_mc.yaml").write_text(_task_yaml("toy_mc", tasks / "mc.jsonl", cache, (
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")))
    (tasks / "toy_gen.yaml").write_text(_task_yaml("toy_gen", tasks / "gen.jsonl", cache, (
        "output_type: generate_until\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")))
    return {"dir": d, "tok": tok, "model": model, "native": native, "hf": hf, "tasks": tasks}


@pytest.fixture(scope="module")
def ours(world):
    return Llama2LM(world["native"], batch_size=3)  # 3: several batches, each padded


@pytest.fixture(scope="module")
def hf_lm(world):
    import accelerate  # noqa: F401  (lm-eval's hf model needs it; in the test extras)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(world["hf"]), dtype="float32", device="cpu", batch_size=2)


def _hf_evaluate(hf_lm, world, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(world["tasks"]), include_defaults=False)
    return simple_evaluate(model=hf_lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0)


# ------------------------------------------------------------------------------ agreement with lm-eval's hf


def test_tasks_score_as_with_lm_evals_hf_model(world, ours, hf_lm):
    out = world["dir"] / "results" / "ours.json"
    mine = run_eval(ours, ["toy_mc", "toy_gen"], include_path=world["tasks"], include_defaults=False,
                    log_samples=True, bootstrap_iters=0, out=out)
    ref = _hf_evaluate(hf_lm, world, ["toy_mc", "toy_gen"])

    for metric in ("acc,none", "acc_norm,none"):
        assert mine["results"]["toy_mc"][metric] == ref["results"]["toy_mc"][metric], metric
    assert mine["results"]["toy_gen"]["exact_match,none"] == ref["results"]["toy_gen"]["exact_match,none"]

    # every choice of every question: the same log-likelihood and the same "greedy" flag
    ours_mc = sorted(mine["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    ref_mc = sorted(ref["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    assert len(ours_mc) == len(ref_mc) == len(MC_DOCS)
    n = 0
    for a, b in zip(ours_mc, ref_mc):
        assert a["arguments"] == b["arguments"]
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            assert ll_a == pytest.approx(ll_b, abs=TOL)
            assert greedy_a == greedy_b
            n += 1
    assert n == sum(len(d["choices"]) for d in MC_DOCS)
    # the model prefers different answers to different questions: the comparison is not between constants
    assert len({max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in ours_mc}) > 1

    # generations: the same text, word for word, and real text rather than empty strings
    ours_gen = {s["doc_id"]: s["resps"][0][0] for s in mine["samples"]["toy_gen"]}
    ref_gen = {s["doc_id"]: s["resps"][0][0] for s in ref["samples"]["toy_gen"]}
    assert ours_gen == ref_gen
    assert any(t.strip() for t in ours_gen.values())
    assert not any("\n" in t or "." in t for t in ours_gen.values())  # cut at the task's stop strings

    written = json.loads(out.read_text())
    assert written["results"]["toy_mc"]["acc,none"] == mine["results"]["toy_mc"]["acc,none"]
    assert "samples" not in written and written["config"]["model"] == "llama2"


def test_rolling_loglikelihood_matches_hf_and_a_direct_sum(world, ours, hf_lm):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok, model = world["tok"], world["model"]
    docs = [demo_corpus(3, 60), "Ada lives near the mill.", "Esme has 3 apples.\n\nDov has 4."]
    assert len(tok.encode(docs[0])) > 3 * ours.max_length  # the long document spans several windows
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    mine = ours.loglikelihood_rolling(requests, disable_tqdm=True)

    # hf, told not to add the tokenizer's BOS to the document (it adds BOS as the prefix itself)
    hf_plain = HFLM(pretrained=str(world["hf"]), dtype="float32", device="cpu", batch_size=2, add_bos_token=False)
    ref = hf_plain.loglikelihood_rolling(requests, disable_tqdm=True)
    for a, b in zip(mine, ref):
        assert a == pytest.approx(b, abs=TOL)

    def direct(ids: list[int]) -> float:
        """Sum of log p(ids[t] | ids[:t]) for t >= 1, in one forward pass."""
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), dim=-1)
        return logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()

    # a short document is one window: its tokens after one BOS
    assert mine[1] == pytest.approx(direct([tok.bos_id] + tok.encode(docs[1])), abs=TOL)
    # lm-eval 0.4's hf with its defaults scores the document as BOS, BOS, tokens: log p(BOS | BOS) is added
    # and every token sees a second BOS (the documented quirk we do not copy)
    default = hf_lm.loglikelihood_rolling(requests[1:2], disable_tqdm=True)[0]
    assert default == pytest.approx(direct([tok.bos_id, tok.bos_id] + tok.encode(docs[1])), abs=TOL)
    assert abs(default - mine[1]) > 1.0


# ------------------------------------------------------------------------------------ tokenization, chat


def test_text_is_encoded_as_sentencepiece_with_bos(world, ours):
    tok = world["tok"]
    assert ours.tok_encode("Ada lives near the mill.") == [tok.bos_id] + tok.encode("Ada lives near the mill.")
    # a leading space keeps SentencePiece's dummy prefix (transformers 5's converted tokenizer drops it)
    assert ours.tok_encode(" Ada", add_special_tokens=False) == tok.encode(" Ada")
    assert ours.tok_encode("<s>Ada</s>x") == [tok.bos_id] + tok.encode("Ada") + [tok.eos_id] + tok.encode("x")
    assert ours.tok_encode("Ada", add_special_tokens=True)[0] == tok.bos_id
    assert ours.tok_encode("Ada has 12 apples", left_truncate_len=3) == tok.encode("Ada has 12 apples")[-3:]
    # lm-eval's pair split: the context's trailing space moves to the continuation
    ctx, cont = ours._encode_pair("Question: Where?\nAnswer: ", "near the mill")
    assert ctx == ours.tok_encode("Question: Where?\nAnswer:")
    assert ctx + cont == ours.tok_encode("Question: Where?\nAnswer: near the mill")


def test_chat_template_gives_metas_dialog_tokens(world, ours):
    dialog = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Where does Ada live?"},
        {"role": "assistant", "content": "Near the harbour."},
        {"role": "user", "content": "And Bram?"},
    ]
    rendered = ours.apply_chat_template(dialog)
    assert ours.tok_encode(rendered) == encode_dialog_prompt(world["tok"], dialog)
    assert rendered.startswith("<s>[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhere does Ada live? [/INST]")
    # an assistant message to continue (lm-eval's gen_prefix): the turn stays open
    answer_start = dialog[1:] + [{"role": "assistant", "content": "He lives"}]
    prefix = ours.apply_chat_template(answer_start, add_generation_prompt=False)
    assert prefix.endswith("<s>[INST] And Bram? [/INST] He lives")


def test_chat_runs_through_lm_eval(world, ours):
    res = run_eval(ours, "toy_mc", include_path=world["tasks"], include_defaults=False, chat=True, limit=2,
                   log_samples=True, bootstrap_iters=0)
    pairs = [args for s in res["samples"]["toy_mc"] for args in s["arguments"]]
    assert pairs and all(c.startswith("<s>[INST] Question:") and c.endswith("[/INST]") for c, _ in pairs)
    # the prompt is Meta's; the answer is scored as the model writes it after "[/INST]": with its space
    context, answer = pairs[0]
    ctx, cont = ours._encode_pair(context, answer)
    tok = world["tok"]
    assert ctx == encode_dialog_prompt(tok, [{"role": "user", "content": "Question: Where does Ada live?\nAnswer:"}])
    assert answer == "near the harbour" and cont == tok.encode("near the harbour")
    assert 0.0 <= res["results"]["toy_mc"]["acc,none"] <= 1.0


# ------------------------------------------------------------------------------------- tasks and errors


def test_paper_expands_to_the_papers_benchmarks_and_shots():
    tasks = dict(expand_tasks("paper"))
    assert tasks["commonsense_qa"] == 7 and tasks["piqa"] == 0 and tasks["hellaswag"] == 0
    assert tasks["nq_open"] == 5 and tasks["triviaqa"] == 5 and tasks["boolq"] == 0
    assert tasks["gsm8k_cot"] == 8 and tasks["minerva_math"] == 4
    assert tasks["mmlu"] == 5 and tasks["bbh_fewshot"] == 3 and "agieval_sat_math" in tasks
    assert "truthfulqa_mc2" in tasks and "toxigen" in tasks
    assert "humaneval" not in tasks and "mbpp" not in tasks  # they run model-written code
    with_code = dict(expand_tasks("paper", allow_code_execution=True))
    assert with_code["humaneval"] == 0 and with_code["mbpp"] == 3
    # a user's shot count overrides the paper's; names repeat only once; "a,b" is split
    assert expand_tasks("paper,piqa", num_fewshot=1)[0][1] == 1
    assert expand_tasks("piqa, hellaswag,piqa") == [("piqa", None), ("hellaswag", None)]


def test_paper_tasks_exist_in_lm_eval():
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    missing = [t for t, _ in paper.paper_tasks(allow_code_execution=True) if t not in known]
    assert not missing


def test_unknown_task_names_close_matches(world):
    with pytest.raises(ValueError, match=r"unknown task 'toy_mcq'.*toy_mc"):
        run_eval(world["native"], ["toy_mcq"], include_path=world["tasks"], include_defaults=False)
    with pytest.raises(ValueError, match="no tasks"):
        run_eval(world["native"], " , ")


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Llama2LM(tmp_path / "nowhere")


def test_custom_suite_is_dispatched_and_merged(world, ours, monkeypatch):
    calls = []

    def fake_suite(ckpt, **kwargs):
        calls.append((ckpt, kwargs))
        return {"results": {"toyfake": {"alias": "toyfake", "acc,none": 0.25}}}

    monkeypatch.setitem(CUSTOM_SUITES, "toyfake", fake_suite)
    out = world["dir"] / "results" / "custom.json"
    res = run_eval(ours, "toyfake,toy_mc", include_path=world["tasks"], include_defaults=False, limit=1,
                   bootstrap_iters=0, out=out)
    assert calls and calls[0][0] is ours and calls[0][1]["limit"] == 1
    assert res["results"]["toyfake"]["acc,none"] == 0.25 and "toy_mc" in res["results"]
    assert json.loads(out.read_text())["results"]["toyfake"]["acc,none"] == 0.25
    # a custom suite alone: no lm-eval run, and lm-eval's table still renders it
    from lm_eval.utils import make_table

    alone = run_eval(ours, "toyfake")
    assert "toyfake" in make_table(alone) and len(calls) == 2


# --------------------------------------------------------------------------------------------- the table


def test_table_groups_by_the_papers_categories():
    results = {"results": {
        "piqa": {"acc,none": 0.6, "acc_norm,none": 0.5},
        "hellaswag": {"acc,none": 0.1, "acc_norm,none": 0.7},
        "mmlu": {"acc,none": 0.45},
        "agieval_sat_math": {"acc,none": 0.3},  # one of AGIEval's eight: the benchmark is incomplete
        "nq_open": {"exact_match,remove_whitespace": 0.2},
        "triviaqa": {"exact_match,remove_whitespace": 0.6},
        "truthfulqa_mc2": {"acc,none": 0.33},
    }}
    cats = paper.category_scores(results)
    assert cats["Commonsense Reasoning"] == (pytest.approx(60.0), 2, 8)  # acc_norm, not acc
    assert cats["World Knowledge"] == (pytest.approx(40.0), 2, 2)
    assert cats["MMLU"][0] == pytest.approx(45.0)
    assert cats["AGI Eval"][0] is None and cats["Code"][0] is None
    table = paper.format_table(results, name="toy")
    row = next(line for line in table.splitlines() if line.startswith("| toy "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["toy", "-", "60.0*", "40.0", "-", "-", "45.0", "-", "-"]
    assert "Llama 2 70B (paper)" in table and "37.5" in table
    assert "| TruthfulQA" in table and "33.0" in table
    assert "QuAC" in table and "not in lm-eval" in table
