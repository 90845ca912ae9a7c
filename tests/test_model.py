"""RRWKV model: the three running modes agree, causality, RWKV-4 at interval 0, initialization."""
import pytest
import torch

from rrwkv.pretrain.model import RRWKV, RRWKVConfig
from rrwkv.pretrain.parallelize import checkpoint_blocks

V = 61


def make(s, layers=3, C=32, seed=1, perturb=True):
    cfg = RRWKVConfig(vocab_size=V, n_layer=layers, n_embd=C, ctx_len=128, medium_interval=s, se_reduction=4)
    m = RRWKV(cfg, init_seed=seed).double().eval()
    if perturb:  # zero-initialized projections would hide wiring mistakes
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return m


@pytest.mark.parametrize("s", [0, 8, 5])
def test_chunked_and_step_modes_equal_parallel(s):
    m = make(s)
    idx = torch.randint(0, V, (2, 47), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(idx)
        outs, st, pos = [], None, 0
        for L in [3, 10, 1, 7, 13, 13]:        # cuts in mid-segment and on segment ends
            o, st = m(idx[:, pos:pos + L], st, return_state=True)
            outs.append(o)
            pos += L
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-10, rtol=0)
        # A prefill of 19 tokens, then one token at a time, then a chunk again.
        o, st = m(idx[:, :19], None, return_state=True)
        outs = [o]
        for t in range(19, 40):
            lt, st = m.step(idx[:, t], st)
            outs.append(lt[:, None])
        o, st = m(idx[:, 40:], st, return_state=True)
        outs.append(o)
        assert torch.allclose(torch.cat(outs, 1), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("s", [0, 8])
def test_causality(s):
    m = make(s)
    idx = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = m(idx)
        # Random positions and the last position of segments: if a segment's medium or gate reached
        # the segment itself, changing its last token would change its earlier positions.
        for p in [0, 5, 7, 15, 23, 31, 39]:
            idx2 = idx.clone()
            idx2[0, p] = (idx2[0, p] + 1) % V
            out = m(idx2)
            diff = (out - base).abs().amax(-1)[0]
            assert diff[:p].max().item() == 0 if p else True
            assert diff[p] > 0


def test_mediums_carry_information_across_segments_only_after_the_segment_ends():
    # With token decay made extreme, only the mediums can carry information over many positions.
    m = make(8, layers=1)
    with torch.no_grad():
        m.blocks[0].att.time_decay.fill_(5.0)       # exp(5) ~ 148 per step: tokens forget at once
        m.blocks[0].att.medium_decay.fill_(-3.0)     # mediums barely decay
        m.blocks[0].ffn.value.weight.zero_()         # remove the channel-mix path
        idx = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(4))
        base = m(idx)
        idx2 = idx.clone()
        idx2[0, 2] = (idx2[0, 2] + 3) % V           # a token of segment 0
        d = (m(idx2) - base).abs().amax(-1)[0]
    assert d[8:].min() > 1e-6                        # every later segment sees segment 0's medium
    assert d[8:].min() > 1e3 * d[5:8].max()          # within segment 0, the change has decayed away


def test_interval_zero_is_rwkv4_parameters_only():
    m = RRWKV(RRWKVConfig(vocab_size=V, n_layer=2, n_embd=16, medium_interval=0))
    keys = set(m.state_dict())
    expected = {"emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias",
                "head.weight"}
    for i in range(2):
        b = f"blocks.{i}."
        expected |= {b + n for n in ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.time_decay",
                                      "att.time_first", "att.time_mix_k", "att.time_mix_v", "att.time_mix_r",
                                      "att.key.weight", "att.value.weight", "att.receptance.weight",
                                      "att.output.weight", "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight",
                                      "ffn.receptance.weight", "ffn.value.weight"]}
    assert keys == expected
    assert m.blocks[1].att.time_mix_k.shape == (1, 1, 16)
    rr = RRWKV(RRWKVConfig(vocab_size=V, n_layer=2, n_embd=16, medium_interval=4, se_reduction=4))
    extra = set(rr.state_dict()) - keys
    assert extra == {f"blocks.{i}.{n}" for i in range(2) for n in
                     ["att.medium_decay", "att.excite.down.weight", "att.excite.up.weight",
                      "ffn.excite.down.weight", "ffn.excite.up.weight"]}


def test_initialization_follows_rwkv4_and_rrwkv():
    cfg = RRWKVConfig(vocab_size=V, n_layer=4, n_embd=64, medium_interval=16, se_reduction=16)
    m = RRWKV(cfg, init_seed=3)
    for b in m.blocks:
        assert torch.equal(b.att.medium_decay, b.att.time_decay)
        for lin in (b.att.key, b.att.receptance, b.att.output, b.ffn.value, b.ffn.receptance,
                    b.att.excite.up, b.ffn.excite.up):
            assert lin.weight.abs().sum() == 0
    assert m.blocks[0].att.time_decay[0].item() == pytest.approx(-5.0)
    assert m.blocks[-1].att.time_decay[-1].item() == pytest.approx(3.0)
    assert m.emb.weight.abs().max() <= 1e-4
    extra = sum(p.numel() for n, p in m.named_parameters() if "excite" in n or "medium" in n)
    rwkv = RRWKV(RRWKVConfig(vocab_size=V, n_layer=4, n_embd=64, medium_interval=0)).num_params()
    assert 0.01 < extra / rwkv < 0.03                      # about C^2/4 per layer of ~13 C^2
    # Per-layer seeds: the same layer gets the same weights whatever the depth of the model.
    deeper = RRWKV(RRWKVConfig(vocab_size=V, n_layer=6, n_embd=64, medium_interval=16), init_seed=3)
    assert torch.equal(deeper.blocks[1].att.value.weight, m.blocks[1].att.value.weight)
    assert torch.equal(deeper.head.weight, m.head.weight)


def test_gates_start_at_one_and_excitation_at_half():
    m = make(8, perturb=False)
    with torch.no_grad():
        y = torch.randn(2, 20, 32, dtype=torch.float64)
        g, _, _ = m.blocks[0].ffn.gates(y, None)
    assert torch.equal(g, torch.ones_like(g))


def test_float32_bfloat16_and_activation_checkpointing_run():
    m = make(8).float().train()
    idx = torch.randint(0, V, (2, 20))
    ref = m(idx)
    checkpoint_blocks(m)
    out = m(idx)
    assert torch.allclose(out, ref)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    mb = make(8).to(torch.bfloat16)
    assert mb(idx).dtype == torch.bfloat16


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="medium_interval"):
        RRWKVConfig(medium_interval=-1)
