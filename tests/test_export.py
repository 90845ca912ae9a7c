"""launch/export.py: DeepSpeed checkpoints (ZeRO-3 and ZeRO-2, two gloo ranks) to MODEL_DIRs whose
logits are bit-identical to the trained model's; one-line errors for what a user can get wrong."""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from rrwkv.pretrain.export import load_model, load_tokenizer

from tests.runs import env, free_port, pretrain_cmd, run  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["train.max_steps=2", "model.medium_interval=8"]

# The trained model as DeepSpeed holds it: a ZeRO engine on the same ranks, loaded from the checkpoint
# (its model built from a different seed, so every weight must come from the checkpoint).
ENGINE_LOGITS = textwrap.dedent("""
    import glob, sys, deepspeed, torch
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]   # the launcher adds it
    sys.path.insert(0, argv[0])
    from rrwkv.pretrain.distributed import init_distributed
    from rrwkv.pretrain.parallelize import param_groups
    from rrwkv.pretrain.model import RRWKV, RRWKVConfig
    out_dir, ids_file, out_file = argv[1:4]
    tag = open(out_dir + "/checkpoints/latest").read().strip()
    saved = torch.load(sorted(glob.glob(f"{out_dir}/checkpoints/{tag}/*model_states.pt"))[0], weights_only=False)
    d = init_distributed()
    torch.set_num_threads(1)
    model = RRWKV(RRWKVConfig.from_dict(saved["model_config"]), init_seed=999)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=saved["ds_config"])
    path, _ = engine.load_checkpoint(out_dir + "/checkpoints", tag=tag, load_lr_scheduler_states=False)
    assert path is not None
    engine.eval()
    with torch.no_grad():
        logits = engine(torch.load(ids_file))
    if d.rank == 0:
        torch.save(logits, out_file)
""")


def export(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch/export.py"), *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


def train(out, cache_dir, zero):
    p = run(pretrain_cmd(out, cache_dir, STEPS + [f"parallel.zero_stage={zero}"], ranks=2))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]


def ids(vocab):
    return torch.randint(0, vocab, (2, 50), generator=torch.Generator().manual_seed(0))


def logits_1thread(model, x):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # as the engine's ranks ran: the same kernels, the same sums
    try:
        with torch.no_grad():
            return model(x)
    finally:
        torch.set_num_threads(threads)


def test_zero3_export_reloads_to_bit_identical_logits(tmp_path, cache_dir):
    out = tmp_path / "run"
    train(out, cache_dir, zero=3)
    p = export("--checkpoint", out, "--output", tmp_path / "model")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "step2" in p.stdout
    model = load_model(tmp_path / "model")
    assert model.cfg.medium_interval == 8 and model.cfg.n_embd == 64
    tok = load_tokenizer(tmp_path / "model")
    assert tok.decode(tok.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    x = ids(model.cfg.vocab_size)
    torch.save(x, tmp_path / "ids.pt")
    script = tmp_path / "engine_logits.py"
    script.write_text(ENGINE_LOGITS)
    p = run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script), str(ROOT), str(out),
             str(tmp_path / "ids.pt"), str(tmp_path / "ref.pt")])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ref = torch.load(tmp_path / "ref.pt")
    got = logits_1thread(model, x)
    assert torch.equal(got, ref), (got - ref).abs().max()
    # ... and the freshly initialized model is not: the comparison can tell weights apart
    assert not torch.equal(logits_1thread(load_model(tmp_path / "model").apply(_reinit), x), ref)

    # bf16 export: bf16 tensors, logits close to the fp32 ones
    p = export("--checkpoint", out / "checkpoints" / "step2", "--output", tmp_path / "bf16", "--dtype", "bf16")
    assert p.returncode == 0, p.stderr[-2000:]
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    torch.testing.assert_close(logits_1thread(load_model(tmp_path / "bf16"), x), got, atol=0.1, rtol=0.05)


def _reinit(module):
    if hasattr(module, "init_weights"):
        module.init_weights(seed=5)


def test_zero2_export_equals_the_trained_weights(tmp_path, cache_dir):
    out = tmp_path / "run"
    train(out, cache_dir, zero=2)
    p = export("--checkpoint", out, "--output", tmp_path / "model", "--tag", "step2")
    assert p.returncode == 0, p.stderr[-2000:]
    # ZeRO-2 keeps the whole fp32 model on rank 0 beside the partitioned optimizer state that
    # zero_to_fp32 reads: both must be the same numbers, and give the same logits.
    trained = torch.load(out / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(exported) == set(trained)
    for k, v in trained.items():
        assert torch.equal(exported[k], v.float()), k
    model = load_model(tmp_path / "model")
    ref = load_model(tmp_path / "model").apply(_reinit)
    ref.load_state_dict(trained)
    x = ids(model.cfg.vocab_size)
    assert torch.equal(logits_1thread(model, x), logits_1thread(ref, x))


def test_export_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    pipe = tmp_path / "pipe" / "checkpoints"
    (pipe / "step4").mkdir(parents=True)
    (pipe / "latest").write_text("step4")
    (pipe / "step4" / "layer_00-model_states.pt").write_bytes(b"")   # a pipeline checkpoint missing layers
    torn = tmp_path / "torn" / "checkpoints"
    (torn / "step1").mkdir(parents=True)
    (torn / "latest").write_text("step1")
    (torn / "step1" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    cases = [
        ([tmp_path / "missing"], "--checkpoint", "no such directory"),
        ([tmp_path / "empty"], "--checkpoint", "no checkpoint found"),
        ([tmp_path / "pipe"], "--checkpoint", "without gaps (a stage's files missing?)"),
        ([tmp_path / "torn"], "--checkpoint", "could not be read"),
        ([pipe.parent, "--tag", "step9"], "--checkpoint", "tags present: ['step4']"),
    ]
    for args, flag, message in cases:
        p = export(flag, *args, "--output", tmp_path / "out")
        err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and message in err[0], (args, p.stderr[-1500:])
        assert "Traceback" not in p.stderr


def test_bf16_zero1_export_gives_the_fp32_master_weights(tmp_path, cache_dir):
    """bf16 with ZeRO 0/1 runs DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 cannot parse alone."""
    out = tmp_path / "run"
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=1", "train.precision=bf16", "parallel.zero_stage=1"]))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    p = export("--checkpoint", out, "--output", tmp_path / "model")
    assert p.returncode == 0, p.stderr[-2000:]
    module = torch.load(out / "checkpoints" / "step1" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert set(exported) == set(module) and {v.dtype for v in exported.values()} == {torch.float32}
    for k, v in module.items():                     # the masters round to the bf16 weights the run computed with
        assert v.dtype == torch.bfloat16 and torch.equal(exported[k].to(torch.bfloat16), v), k
    assert any(not torch.equal(exported[k], v.float()) for k, v in module.items())  # ... and hold more than bf16


def test_pipeline_checkpoint_exports_the_trained_weights(tmp_path, cache_dir):
    pipe, flat = tmp_path / "pipe", tmp_path / "flat"
    p = run(pretrain_cmd(pipe, cache_dir, STEPS + ["parallel.pipeline_stages=2", "parallel.zero_stage=1"], ranks=2))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    p = run(pretrain_cmd(flat, cache_dir, STEPS + ["data.micro_batch_size=8"]))
    assert p.returncode == 0, p.stderr[-2000:]
    for run_dir in (pipe, flat):
        p = export("--checkpoint", run_dir, "--output", tmp_path / (run_dir.name + "_model"))
        assert p.returncode == 0, p.stderr[-2000:]
    got = load_file(str(tmp_path / "pipe_model" / "model.safetensors"))
    # Exactly the weights of the pipeline stages' layer files, under RRWKV's names...
    step = (pipe / "checkpoints" / "latest").read_text().strip()
    block0 = torch.load(pipe / "checkpoints" / step / "layer_01-model_states.pt", weights_only=False)
    assert torch.equal(got["blocks.0.att.time_decay"], block0["att.time_decay"])
    # ...and every name maps to the same parameter as in a one-process run of the same steps (equal up
    # to float rounding, which Adam's g/sqrt(v) can blow up to lr-sized steps where gradients are ~0;
    # a wrong mapping would put a different parameter there, off by far more).
    flat_sd = load_file(str(tmp_path / "flat_model" / "model.safetensors"))
    assert set(got) == set(flat_sd)
    for k in flat_sd:
        diff = (got[k] - flat_sd[k]).abs()
        assert diff.max() < 1e-2 and diff.mean() < 1e-4, (k, diff.max(), diff.mean())
    assert (got["blocks.0.ffn.key.weight"] - flat_sd["blocks.1.ffn.key.weight"]).abs().mean() > 1e-2
    model = load_model(tmp_path / "pipe_model")
    x = ids(model.cfg.vocab_size)
    assert torch.isfinite(logits_1thread(model, x)).all()


def test_evaluate_on_the_builtin_validation_split(tmp_path, cache_dir):
    """`--data builtin` scores the validation shards of the corpus that configs/tiny.yaml trains on."""
    out = tmp_path / "run"
    p = run(pretrain_cmd(out, cache_dir, ["train.max_steps=1"]))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert export("--checkpoint", out, "--output", tmp_path / "model").returncode == 0
    p = subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), "--model", str(tmp_path / "model"),
                        "--data", "builtin", "--cache-dir", str(cache_dir), "--report", str(tmp_path / "r.json"),
                        "--no-tasks", "--max-docs", "3"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["documents"] == 3 and Path(report["data"]) == next(Path(cache_dir).glob("*/valid"))
    assert math.isfinite(report["loss"])
