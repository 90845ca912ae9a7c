"""Operations people expect from other trainers: the warmup-stable-decay schedule, per-source metrics
of mixed data (tokens read and validation loss per source), and TensorBoard beside metrics.jsonl; a
tiny 2-source run end to end, and its resume (lr, losses, per-source tokens, TensorBoard events)."""
import importlib.util
import json
import math
import shutil
import subprocess

import pytest
import torch

from rrwkv.pretrain.config import ConfigError, load_config
from rrwkv.pretrain.schedule import lr_factor, lr_scheduler
from tests.runs import ROOT, env, pretrain_cmd, run

# The `test` extra installs tensorboard (so CI checks the events); without it the run below checks the rest.
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def wsd(step, shape="linear", **kw):
    args = dict(warmup_steps=10, max_steps=100, lr=1.0, lr_final=0.1, schedule="wsd", decay_fraction=0.2,
                decay_shape=shape)
    return lr_factor(step, **{**args, **kw})


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_over_the_last_fraction(shape):
    assert [wsd(s, shape) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert all(wsd(s, shape) == 1.0 for s in range(10, 81))            # stable until the last 20 steps
    decay = [wsd(s, shape) for s in range(80, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.1)
    half = 0.1 + 0.9 * (0.5 if shape == "linear" else 1 - math.sqrt(0.5))
    assert wsd(90, shape) == pytest.approx(half)
    # the warmup is never cut short by the decay: a decay longer than the run after it starts later
    assert wsd(5, shape, decay_fraction=1.0) == 0.6 and wsd(10, shape, decay_fraction=1.0) == 1.0


def test_the_schedule_resumes_from_its_state_dict_on_the_same_lr_sequence():
    cfg = load_config([str(ROOT / "configs/tiny.yaml")], ["optim.schedule=wsd", "optim.decay_fraction=0.5",
                                                        "optim.decay_shape=1-sqrt", "optim.warmup_steps=3"])

    def fresh(max_steps=12):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=cfg.optim.lr)
        return opt, lr_scheduler(opt, cfg.optim, max_steps=max_steps)

    def steps(opt, sched, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    opt, sched = fresh()
    whole = steps(opt, sched, 12)
    opt, sched = fresh()
    first = steps(opt, sched, 5)
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    opt, sched = fresh()
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    assert first + steps(opt, sched, 7) == whole
    assert whole[:3] == pytest.approx([cfg.optim.lr * (s + 1) / 3 for s in range(3)])
    assert whole[3:7] == [cfg.optim.lr] * 4 and cfg.optim.lr > whole[7] > whole[11] > cfg.optim.lr_final
    # Extended from its stable phase (step 5 of 12) to 24 steps: the base lr until step 12, then the decay.
    opt, sched = fresh(max_steps=24)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    longer = steps(opt, sched, 19)
    assert longer[:8] == [cfg.optim.lr] * 8 and longer[8] < cfg.optim.lr and longer[-1] > cfg.optim.lr_final


@pytest.mark.parametrize("override,message", [
    ("optim.decay_shape=cosine", "config key 'optim.decay_shape' is 'cosine'; choose one of linear, 1-sqrt"),
    ("optim.decay_fraction=1.5", "config key 'optim.decay_fraction' must be in [0, 1], got 1.5"),
    ("optim.schedule=wsdd", "choose one of cosine, linear, exponential, constant, wsd"),
])
def test_bad_schedule_keys_are_one_clear_error(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([str(ROOT / "configs/tiny.yaml")], [override])
    assert message in str(e.value)


@pytest.fixture(scope="module")
def data(cache_dir, tmp_path_factory):
    """Two sources of one tokenizer: the built-in stdlib corpus and this repository's docs (README.md
    held out as the docs' validation split)."""
    from rrwkv.data_tools.builtin import prepare_builtin_corpus
    from rrwkv.data_tools.shards import tokenize_files
    corpus = prepare_builtin_corpus(cache_dir, vocab_size=2048)
    root = tmp_path_factory.mktemp("sources")
    texts = {"docs": sorted((ROOT / "docs").glob("*.md")), "readme": [ROOT / "README.md"]}
    for name, files in texts.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
        tokenize_files([root / f"{name}.jsonl"], corpus.tokenizer, root / name, progress=False)
    return {"stdlib": corpus.train.parent, "stdlib_valid": corpus.valid.parent, "docs": root / "docs",
            "docs_valid": root / "readme"}


def test_source_counts_follow_the_stream_position(data):
    from rrwkv.pretrain.data import TokenStream
    mix = [(data["stdlib"], 3.0), (data["docs"], 1.0)]
    a = TokenStream(mix, 32, 4, seed=7, lanes=True)
    seen, at = [], {}
    for n, _ in enumerate(a, start=1):
        seen.append(a.stats()["batches_by_source"])
        at[n] = a.state_dict()
        assert a.source_counts() == seen[-1]           # tallied as it goes, read from the position
        if n == 40:
            break
    assert min(seen[-1]) > 0
    b = TokenStream(mix, 32, 4, seed=7, lanes=True)     # a resumed stream counts on from the start of the run
    b.load_state_dict(at[25])
    assert b.source_counts() == seen[24]
    b.load_state_dict(at[10])                           # moved back (a rollback)
    assert b.source_counts() == seen[9]
    # windows the trainer skipped are not counted: each takes one from its source
    for w in (3, 9):
        source = [x - y for x, y in zip(seen[w - 1], seen[w - 2])].index(1)
        expect = list(seen[9])
        expect[source] -= 1
        assert b.source_counts(exclude={w}) == expect
    assert b.source_counts(exclude={11, 30}) == seen[9]  # windows not read yet change nothing


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(out, tag):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc.Tags()["scalars"]


def test_two_source_run_logs_per_source_metrics_wsd_and_tensorboard_and_resumes(tmp_path, cache_dir, data):
    from rrwkv.pretrain.data import TokenStream
    out = tmp_path / "run"
    cfg = ["train.max_steps=6", "train.save_every=3", "train.eval_every=3", "train.eval_batches=1",
           "optim.schedule=wsd", "optim.decay_fraction=0.5", "optim.decay_shape=1-sqrt",
           f"logging.tensorboard={str(HAS_TENSORBOARD).lower()}",
           f"data.train=[{{path: {data['stdlib']}, weight: 3, name: stdlib}}, {{path: {data['docs']}}}]",
           f"data.valid=[{{path: {data['stdlib_valid']}, name: stdlib}}, {{path: {data['docs_valid']}, name: docs}}]"]
    p = run(pretrain_cmd(out, cache_dir, cfg))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    first = rows(out)
    train = {r["step"]: r for r in first if "loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]

    # WSD: 2 warmup steps, the base lr until the last half of the run, then the 1-sqrt decay.
    lr = [train[s]["lr"] for s in range(1, 7)]
    base = 2.0e-3                                                     # configs/tiny.yaml's optim.lr
    assert lr[:4] == pytest.approx([base / 2, base, base, base])
    assert lr[3] > lr[4] > lr[5] > 2.0e-4
    assert lr[4] == pytest.approx(2.0e-4 + (base - 2.0e-4) * (1 - math.sqrt(1 / 3)))

    # Tokens per source: what the stream read from each (its own count of a real stream of the same
    # mix: 8 lanes, one window each a step), adding up to `tokens` in every row.
    mix = [(data["stdlib"], 3.0), (data["docs"], 1.0)]
    ref = TokenStream(mix, 64, 8, seed=1234, lanes=True)
    for step, _ in enumerate(ref, start=1):
        by = train[step]["tokens_by_source"]
        assert list(by) == ["stdlib", "docs"] and sum(by.values()) == train[step]["tokens"]
        assert [by["stdlib"], by["docs"]] == [n * 8 * 64 for n in ref.stats()["batches_by_source"]]
        if step == 6:
            break
    assert min(train[6]["tokens_by_source"].values()) > 0

    # Validation: the mix as before, and each source's own split.
    val = [r for r in first if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6]
    for r in val:
        assert set(r["val_loss_by_source"]) == {"stdlib", "docs"}
        assert all(math.isfinite(v) for v in r["val_loss_by_source"].values())
        assert r["val_loss_by_source"]["stdlib"] != r["val_loss_by_source"]["docs"]

    # TensorBoard: every number of the rows, nested ones as tag/name.
    if HAS_TENSORBOARD:
        tensorboard_events_hold_the_rows(out, train)
    else:
        assert not (out / "tensorboard").exists()

    # As if killed once the step-3 checkpoint was written: the run resumes there and redoes steps 4-6
    # with the same lr, losses and per-source tokens; TensorBoard's events of the redone steps replace
    # the first ones (one value per step), in the same event folder.
    loss = scalars(out, "loss")[0] if HAS_TENSORBOARD else None
    ckpt = out / "checkpoints"
    shutil.rmtree(ckpt / "step6")
    (ckpt / "latest").write_text("step3")
    p = run(pretrain_cmd(out, cache_dir, cfg))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "at step 3" in p.stdout
    keys = ("step", "loss", "lr", "tokens", "tokens_by_source", "val_loss", "val_loss_by_source")
    same = [[{k: v for k, v in r.items() if k in keys} for r in rs] for rs in (rows(out), first)]
    assert same[0] == same[1]
    if HAS_TENSORBOARD:
        assert scalars(out, "loss")[0] == loss                            # steps 1-6, once each
        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def tensorboard_events_hold_the_rows(out, train):
    loss, tags = scalars(out, "loss")
    assert {"lr", "tokens", "mfu", "val_loss", "tokens_by_source/stdlib", "tokens_by_source/docs",
            "val_loss_by_source/stdlib", "val_loss_by_source/docs"} <= set(tags)
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in loss] == pytest.approx([train[s]["loss"] for s in range(1, 7)], rel=1e-6)
    docs_tokens, _ = scalars(out, "tokens_by_source/docs")
    assert docs_tokens == [(s, train[s]["tokens_by_source"]["docs"]) for s in range(1, 7)]


def test_tensorboard_without_its_package_is_one_clear_error(tmp_path, cache_dir):
    # A folder on PYTHONPATH whose `tensorboard` fails to import as a missing package does.
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tensorboard'\")\n")
    e = {**env(), "PYTHONPATH": str(shadow.parent)}
    p = subprocess.run(pretrain_cmd(tmp_path / "out", cache_dir, ["logging.tensorboard=true"]), cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "logging.tensorboard=true needs the tensorboard package" in err[0], p.stderr[-2000:]
    assert "pip install 'rrwkv-pretrain[tensorboard]'" in err[0] and "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()
