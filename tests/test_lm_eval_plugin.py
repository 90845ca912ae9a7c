"""lm-eval: `rrwkv` found through its `lm_eval.models` entry point, batched generation equal to one
request at a time, lm_eval's data-parallel split over two processes (torchrun, gloo) on local tasks
(tests/data/lm_eval_tasks) checked against direct scores, and downstream evaluation during training
(train.eval_tasks) logged in metrics.jsonl from the trainer's own weights."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from rrwkv.pretrain.export import export_checkpoint, load_model, load_tokenizer  # noqa: E402
from rrwkv.pretrain.generation import Sampling, generate  # noqa: E402
from rrwkv.pretrain.lm_eval_adapter import GenRequest, Scorer, prefill_rows  # noqa: E402

from .runs import ROOT, free_port, pretrain_cmd, run  # noqa: E402
from .test_generate import make_model_dir  # noqa: E402

TASKS = ROOT / "tests/data/lm_eval_tasks"


def rows(name):
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def one_thread_env():
    """Subprocesses of tiny models: one torch thread each (two processes share this machine's two cores)."""
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def tokenizer_file(cache_dir):
    from rrwkv.data_tools.builtin import prepare_builtin_corpus
    return prepare_builtin_corpus(cache_dir, vocab_size=2048).tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):
    return make_model_dir(tmp_path_factory.mktemp("model"), tokenizer_file, interval=8, seed=3)


PROBE = """
import sys
from importlib.metadata import entry_points
from lm_eval.api.registry import get_model, model_registry
assert [e.value for e in entry_points(group="lm_eval.models") if e.name == "rrwkv"] == \
    ["rrwkv.pretrain.lm_eval_adapter:RRWKVLM"]
try:                                   # lm_eval releases that read the lm_eval.models group themselves
    cls, native = get_model("rrwkv"), True
except ValueError:                     # 0.4.13 and before: rrwkv-lm-eval registers the group's entry points
    from rrwkv.pretrain.cli.lmeval import register_entry_point_models
    register_entry_point_models()
    assert "rrwkv" in model_registry and "rrwkv.pretrain.lm_eval_adapter" not in sys.modules   # lazily
    cls, native = get_model("rrwkv"), False
print(cls.__module__, cls.__name__, native)
"""


def test_rrwkv_resolves_through_its_entry_point_without_importing_the_project():
    p = subprocess.run([sys.executable, "-c", PROBE], cwd="/", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    module, name, _native = p.stdout.split()
    assert (module, name) == ("rrwkv.pretrain.lm_eval_adapter", "RRWKVLM")


def test_rrwkv_lm_eval_is_lm_evals_command_line():
    p = subprocess.run(["rrwkv-lm-eval", "run", "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "--model_args" in p.stdout and "--include_path" in p.stdout, p.stderr[-2000:]


def reference_generation(model, tok, req: GenRequest, chunk_len: int, seed: int = 0) -> str:
    """One request through generation.generate (one sequence), cut before its first stop string."""
    ids, text = [], ""
    for t in generate(model, [tok.eos_id] + tok.encode(req.context), req.max_gen_toks,
                      Sampling(temperature=req.temperature), seed, chunk_len, stop_ids=(tok.eos_id,)):
        if t == tok.eos_id:
            break
        ids.append(t)
        text = tok.decode(ids)
        if any(u in text for u in req.until):
            break
    cuts = [text.index(u) for u in req.until if u in text]
    return text[:min(cuts)] if cuts else text


def test_batched_generation_equals_one_request_at_a_time(model_dir, one_thread):
    model, tok = load_model(model_dir, dtype=torch.float64), load_tokenizer(model_dir)
    chunk = 8                                    # prompts longer than a chunk, cut mid-segment (interval 8)
    # Prefill of prompts ending at the same phase (length 3 mod 8): each row's last logits are those
    # of its own full-sequence forward.
    lines = [r["prompt"] for r in rows("python_complete")]
    texts = ["\n".join(lines[i:] + lines[:i]) for i in range(len(lines))]
    prompts = [([tok.eos_id] + tok.encode(t))[:n] for t, n in zip(texts, (35, 35, 27, 19, 11, 3))]
    logits, state = prefill_rows(model, prompts, chunk)
    assert state.layers[0].wkv.phase == 3 and logits.shape[0] == len(prompts)
    with torch.no_grad():
        for r, p in enumerate(prompts):
            torch.testing.assert_close(logits[r], model(torch.tensor([p]))[0, -1], atol=1e-10, rtol=0)

    contexts = [r["prompt"] for r in rows("python_complete")] + [r["context"] for r in rows("python_choice")]
    reqs = [GenRequest(c, ("\n",) if i % 3 else ("\n", "("), 4 + i % 5, 1.0 if i % 4 == 0 else 0.0)
            for i, c in enumerate(contexts)] + [GenRequest("import", (), 0)]
    batch_sizes = []
    hook = model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    got = Scorer(model, tok, chunk_len=chunk, batch_size=4).generate_batch(reqs, seed=5)
    hook.remove()
    assert max(batch_sizes) > 1                  # rows did run together
    assert got == [reference_generation(model, tok, r, chunk, seed=5) for r in reqs]
    assert got[-1] == "" and any(got)


TWO_PROCESSES = """
import json, sys
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable
from rrwkv.pretrain.cli.lmeval import register_entry_point_models
model_args, tasks, out = sys.argv[1:]
register_entry_point_models()                       # what rrwkv-lm-eval does before lm_eval's command line
lm = get_model("rrwkv").create_from_arg_string(model_args, {"batch_size": 4, "device": "cpu"})
print(f"rank {lm.rank} of {lm.world_size}", flush=True)
res = lm_eval.simple_evaluate(model=lm, tasks=["rrwkv_python_choice", "rrwkv_python_complete"], log_samples=True,
                              task_manager=TaskManager(include_path=tasks, include_defaults=False))
if res is not None:
    with open(out, "w") as f:
        json.dump({k: res[k] for k in ("results", "samples")}, f, default=handle_non_serializable)
"""


def test_lm_eval_on_two_processes_matches_direct_scores(tmp_path, model_dir, one_thread):
    out = tmp_path / "out.json"
    (tmp_path / "run.py").write_text(TWO_PROCESSES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "run.py"), f"pretrained={model_dir},dtype=fp64", str(TASKS), str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env=one_thread_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rank 0 of 2" in p.stdout and "rank 1 of 2" in p.stdout
    report = json.loads(out.read_text())
    results, samples = report["results"], report["samples"]
    assert all(len(samples[t]) == 10 for t in ("rrwkv_python_choice", "rrwkv_python_complete"))  # all gathered

    scorer = Scorer(load_model(model_dir, dtype=torch.float64), load_tokenizer(model_dir), batch_size=3)
    correct = 0
    for s in samples["rrwkv_python_choice"]:
        direct = scorer.loglikelihood([tuple(a) for a in s["arguments"]])
        assert [(c, " " + x) for c, x in [(s["doc"]["context"], x) for x in s["doc"]["choices"]]] == \
            [tuple(a) for a in s["arguments"]]
        for (ll, greedy), ((ll2, greedy2),) in zip(direct, s["resps"]):
            assert math.isclose(ll, float(ll2), rel_tol=1e-9) and greedy == greedy2
        correct += max(range(len(direct)), key=lambda i: direct[i][0]) == s["doc"]["gold"]
    assert results["rrwkv_python_choice"]["acc,none"] == correct / 10
    matches = 0
    for s in samples["rrwkv_python_complete"]:
        ((context, kwargs),) = s["arguments"]
        assert context == s["doc"]["prompt"] and kwargs["until"] == ["\n"] and kwargs["max_gen_toks"] == 8
        direct = scorer.generate_until(context, ["\n"], 8)
        assert s["resps"] == [[direct]]
        matches += direct == s["doc"]["answer"]
    assert results["rrwkv_python_complete"]["exact_match,none"] == matches / 10


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_training_logs_downstream_scores_of_its_own_weights(tmp_path, cache_dir, one_thread, zero_stage):
    out = tmp_path / "run"
    p = run(pretrain_cmd(out, cache_dir, [f"parallel.zero_stage={zero_stage}", "train.max_steps=2",
                                          "train.eval_tasks=[rrwkv_python_choice,rrwkv_python_lines]",
                                          f"train.eval_tasks_include=[{TASKS}]", "train.eval_tasks_every=2"]))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in logged if "rrwkv_python_choice/acc" in r]
    assert row["step"] == 2 and row["rrwkv_python_choice/sample_len"] == 10 and row["eval_tasks_s"] > 0
    assert any("loss" in r and r["step"] == 2 for r in logged)

    # The same scores from the step-2 weights, exported and scored directly (batches of micro_batch_size 4).
    model_dir, _ = export_checkpoint(out, tmp_path / "model")
    scorer = Scorer(load_model(model_dir), load_tokenizer(model_dir), batch_size=4)
    correct = 0
    for doc in rows("python_choice"):
        scores = [ll for ll, _ in scorer.loglikelihood([(doc["context"], " " + c) for c in doc["choices"]])]
        correct += scores.index(max(scores)) == doc["gold"]
    assert row["rrwkv_python_choice/acc"] == correct / 10
    texts = [d["prompt"] + d["answer"] for d in rows("python_complete")]
    bits = -sum(scorer.loglikelihood_rolling(texts)) / sum(len(t.encode()) for t in texts) / math.log(2)
    assert math.isclose(row["rrwkv_python_lines/bits_per_byte"], bits, rel_tol=1e-6)


def test_pipeline_stages_are_refused_with_one_line(tmp_path, cache_dir):
    p = run(pretrain_cmd(tmp_path / "run", cache_dir, ["parallel.pipeline_stages=2", "parallel.zero_stage=1",
                                                       "train.eval_tasks=[rrwkv_python_choice]"]))
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "parallel.pipeline_stages" in err[0], p.stderr[-2000:]
