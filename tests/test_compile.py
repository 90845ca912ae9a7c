"""model.compile: every block through torch.compile as one graph, WKV op included (inductor, on CPU
here, where the op is the kernels' arithmetic built for the host) gives the eager logits and
gradients, and all blocks share the graph. Training with it (ZeRO-3 on 2
ranks, activation checkpointing) is one of tests/test_parallel.py's layouts.

The model here has the shapes of tests/runs.py's SMALL training runs, so that a training run can
find its graphs in inductor's on-disk cache instead of compiling them again.
"""
import pytest
import torch

from rrwkv.pretrain.parallelize import checkpoint_blocks, compile_blocks
from rrwkv.pretrain.config import ConfigError, load_config
from rrwkv.pretrain.model import RRWKV, RRWKVConfig


GPU = pytest.param("cuda", marks=[pytest.mark.cuda,
                                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])


def small(s, checkpointing=False, dev="cpu"):
    cfg = RRWKVConfig(vocab_size=2048, n_layer=2, n_embd=64, ctx_len=256, medium_interval=s, se_reduction=16)
    m = RRWKV(cfg, init_seed=1234).to(dev)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialized projections would hide wiring mistakes
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(dev) * 0.1)
    if checkpointing:
        checkpoint_blocks(m)
    return m


def loss_and_grads(m, idx):
    logits = m(idx)
    logits.logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("dev", [GPU, "cpu"])
@pytest.mark.parametrize("s", [16, 0])
def test_compiled_blocks_equal_eager(s, dev):
    """On the GPU both runs use the CUDA kernel (eager: the custom op called directly; compiled: inside the
    graph); on the CPU the eager run is the PyTorch reference, the compiled one the kernel's host build."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    idx = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(1)).to(dev)
    ref, ref_grads = loss_and_grads(small(s, dev=dev).train(), idx)
    for checkpointing in ((False, True) if s else (False,)):
        m = small(s, checkpointing, dev).train()
        assert compile_blocks(m) == 2
        out, grads = loss_and_grads(m, idx)
        assert torch.allclose(out, ref, rtol=0, atol=2e-5 * ref.abs().max().item()), checkpointing
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=0, atol=2e-5 * ref_grads[n].abs().max().item() + 1e-12), n
    # A chunk with a carried state runs the same blocks eagerly; the first chunk (no state) compiled.
    e, x1, x2 = small(s, dev=dev).train(), idx, idx.flip(1)
    ea, est = e(x1, None, return_state=True)
    ca, cst = m(x1, None, return_state=True)
    eb, cb = e(x2, est, return_state=True)[0], m(x2, cst, return_state=True)[0]
    for c_, e_ in ((ca, ea), (cb, eb)):
        assert torch.allclose(c_, e_, rtol=0, atol=2e-5 * e_.abs().max().item())
    assert counters["stats"]["unique_graphs"] == 1    # the whole block, WKV op included, shared by both blocks
    assert not counters["graph_break"]


def test_bad_compile_value_names_the_key():
    with pytest.raises(ConfigError, match="model.compile"):
        load_config([], ["model.compile=sometimes"])


@pytest.mark.parametrize("dev", [GPU, "cpu"])
def test_compiled_block_with_a_partial_last_segment(dev):
    """Windows that are no multiple of the interval (here 40 tokens, interval 16: the last segment
    half full) compile too and give the eager logits and gradients; then a second length in the same
    process (a recompilation with dynamic shapes)."""
    torch._dynamo.reset()
    e, m = small(16, dev=dev).train(), small(16, dev=dev).train()
    compile_blocks(m)
    for T in (40, 57):
        idx = torch.randint(0, 2048, (2, T), generator=torch.Generator().manual_seed(T)).to(dev)
        for p in list(e.parameters()) + list(m.parameters()):
            p.grad = None
        ref, ref_grads = loss_and_grads(e, idx)
        out, grads = loss_and_grads(m, idx)
        assert torch.allclose(out, ref, rtol=0, atol=2e-5 * ref.abs().max().item()), T
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=0, atol=2e-5 * ref_grads[n].abs().max().item() + 1e-12), (T, n)
