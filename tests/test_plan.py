"""The run's plan (pretrain/plan.py): the config resolved once, cross-key rules checked in one place."""
import re

import pytest
import torch

from rrwkv.pretrain.config import ConfigError, load_config
from rrwkv.pretrain.plan import make_plan

CPU = torch.device("cpu")


def cfg(*overrides):
    return load_config(["configs/tiny.yaml"], list(overrides))


def test_plan_resolves_layout_steps_and_deepspeed_config_without_changing_the_config():
    c = cfg("data.micro_batch_size=2", "train.global_batch_size=8", "data.seq_len=64", "train.max_tokens=5000",
            "parallel.zero_stage=1")
    p = make_plan(c, world_size=2, rank=1, device=CPU)
    assert (p.data_parallel, p.dp_rank, p.micro_batch_size, p.grad_accum, p.global_batch_size) == (2, 1, 2, 2, 8)
    assert p.max_steps == 10 and p.step_tokens == 512            # ceil(5000 / (8 x 64)) whole steps
    assert c.train.max_steps == load_config(["configs/tiny.yaml"]).train.max_steps   # the config is not edited
    ds = p.deepspeed_config()
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    ds["train_batch_size"] = 0                                      # DeepSpeed may edit its copy; the plan keeps its own
    assert p.deepspeed_config()["train_batch_size"] == 8
    assert "deepspeed" not in p.summary() and p.summary()["max_steps"] == 10

    pipe = make_plan(cfg("parallel.pipeline_stages=2", "parallel.zero_stage=1"), world_size=4, rank=3, device=CPU)
    assert (pipe.data_parallel, pipe.dp_rank) == (2, 1)             # DeepSpeed numbers ranks stage by stage


@pytest.mark.parametrize("overrides, world, match", [
    (["parallel.pipeline_stages=2"], 3, "must divide the number of processes"),
    (["data.micro_batch_size=3", "train.global_batch_size=8"], 1, "must be a multiple of data.micro_batch_size"),
    (["parallel.offload=all", "parallel.zero_stage=2"], 1, "offload=all .* needs parallel.zero_stage=3"),
    (["parallel.offload=optimizer", "parallel.zero_stage=0"], 1, "offload needs parallel.zero_stage >= 1"),
    (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], 2, "zero_stage 0 or 1, not 2"),
    (["parallel.pipeline_stages=2", "parallel.zero_stage=1", "run.init_from=/x"], 2, "run.init_from is not supported"),
    (["train.grad_accum_dtype=bf16", "train.precision=fp32"], 1, "train.grad_accum_dtype"),
])
def test_each_cross_key_rule_is_one_config_error(overrides, world, match):
    c = cfg(*overrides)          # each key is valid on its own: the config loads
    with pytest.raises(ConfigError, match=match):
        make_plan(c, world_size=world, rank=0, device=CPU)


@pytest.mark.parametrize("override,message", [
    ("optim.lr=inf", "'optim.lr' must be > 0, got inf"),
    ("optim.lr=nan", "'optim.lr' must be > 0, got nan"),
    ("optim.beta2=1.0", "'optim.beta2' must be in [0, 1), got 1.0"),
    ("optim.beta1=-0.1", "'optim.beta1' must be in [0, 1)"),
    ("optim.eps=0", "'optim.eps' must be > 0"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be >= 0"),
    ("optim.grad_clip=-1", "'optim.grad_clip' must be >= 0"),
    ("train.eval_batches=0", "'train.eval_batches' must be a positive integer, got 0"),
    ("train.max_bad_steps=-1", "'train.max_bad_steps' must be >= 0"),
    ("model.ffn_mult=0", "'model.ffn_mult' must be a positive integer"),
    ("parallel.zero_stage=4", "'parallel.zero_stage' must be 0, 1, 2 or 3"),
])
def test_every_number_is_checked_against_its_range_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match="config key " + re.escape(message)):
        cfg(override)
