"""benchmarks/memory_estimate.py: activations counted on fake tensors equal those on real ones, a
recomputed block keeps only its input, and the model states follow the ZeRO stage."""
import sys

import pytest
import torch

from rrwkv.pretrain.config import load_config
from rrwkv.pretrain.model import RRWKVConfig
from tests.runs import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_estimate as me  # noqa: E402


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_tensors_count_what_real_tensors_hold(checkpointing):
    cfg = RRWKVConfig(vocab_size=300, n_layer=3, n_embd=64, medium_interval=16)
    B, T = 2, 128
    real = me.measure_activations(cfg, torch.float32, B, T, checkpointing, True, fake=False)
    fake = me.measure_activations(cfg, torch.float32, B, T, checkpointing, True, fake=True)
    assert real == fake
    unit = B * T * cfg.n_embd * 4                               # one (B, T, C) fp32 tensor
    peak, saved = fake
    per_block = (saved - unit) / cfg.n_layer                   # less the embedding output
    if checkpointing:
        assert per_block == unit                               # a recomputed block keeps its input only
    else:
        assert 20 * unit < per_block < 32 * unit               # everything backward needs
    assert peak > saved


def test_model_states_follow_the_zero_stage():
    over = ["model.n_layer=2", "model.n_embd=64", "model.vocab_size=300", "train.precision=bf16",
            "data.seq_len=64", "data.micro_batch_size=1", "train.global_batch_size=4"]
    rows = {z: me.estimate(load_config([], over + [f"parallel.zero_stage={z}"]), gpus=4)["per_gpu"][0]
            for z in (1, 2, 3)}
    n = rows[1]["params"]
    gib = 2 ** 30
    assert rows[1]["optimizer_gb"] * gib == pytest.approx(12 * n / 4)   # master + Adam, partitioned
    assert rows[2]["grads_gb"] * gib == pytest.approx(4 * n / 4)        # fp32 gradients, partitioned
    assert rows[3]["weights_gb"] * gib == pytest.approx(2 * n / 4)      # bf16 weights, partitioned
    assert rows[1]["weights_gb"] * gib == pytest.approx(2 * n)
