"""The reference WKV-retrospection op (kernels.wkv_retro on CPU) against rrwkv.md's sums."""
import math

import pytest
import torch

from rrwkv.kernels.wkv import WKVState, num_mediums, wkv_retro
from tests.wkv_direct import wkv_direct

D = torch.float64


def inputs(B, T, C, s, key_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=D)  # noqa: E731
    td, tf, md = r(C) * 1.5, r(C), r(C) * 1.5
    k, v = r(B, T, C) * key_scale, r(B, T, C)
    J = math.ceil(T / s) if s else 0
    mk, mv = r(B, J, C) * key_scale, r(B, J, C)
    return [x.requires_grad_() for x in (td, tf, k, v, md, mk, mv)]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("B,T,C,s", [(2, 37, 5, 0), (2, 37, 5, 8), (1, 70, 3, 16), (3, 9, 4, 4), (1, 1, 2, 3)])
def test_values_and_gradients_match_direct_sums(B, T, C, s):
    td, tf, k, v, md, mk, mv = inputs(B, T, C, s)
    med = (md, mk, mv) if s else (None, None, None)
    y, _ = wkv_retro(td, tf, k, v, *med, s)
    y_ref = wkv_direct(td, tf, k, v, *med, s)
    assert rel(y, y_ref) < 1e-12
    w = torch.randn_like(y_ref)
    leaves = [td, tf, k, v] + ([md, mk, mv] if s else [])
    g = torch.autograd.grad((y * w).sum(), leaves, allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad((y_ref * w).sum(), leaves, allow_unused=True, materialize_grads=True)
    for name, a, b in zip(["time_decay", "time_first", "k", "v", "medium_decay", "mk", "mv"], g, g_ref):
        assert rel(a, b) < 1e-10 or b.norm() == 0 and a.norm() == 0, name


def test_large_keys_are_stable():
    # |k| up to 60 and beyond: exp would overflow float32 without the running maximum.
    td, tf, k, v, md, mk, mv = inputs(2, 50, 4, 7, key_scale=40.0, seed=3)
    y, st = wkv_retro(td, tf, k.float(), v.float(), md.float(), mk.float(), mv.float(), 7)
    assert torch.isfinite(y).all()
    y_ref = wkv_direct(td, tf, k, v, md, mk, mv, 7)
    assert rel(y.double(), y_ref) < 1e-5
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (k, v, mk, mv, td, tf, md))


@pytest.mark.parametrize("s", [0, 8])
def test_chunks_with_carried_state_equal_one_pass(s):
    B, T, C = 2, 61, 6
    td, tf, k, v, md, mk, mv = inputs(B, T, C, s, seed=5)
    med = (md, mk, mv) if s else (None, None, None)
    y_full, st_full = wkv_retro(td, tf, k, v, *med, s)
    ys, st, pos = [], None, 0
    for L in [5, 13, 1, 3, 20, 19]:           # cuts in mid-segment, single tokens, a segment-spanning chunk
        phase = st.phase if st else 0
        if s:
            j0, J = pos // s, num_mediums(phase, L, s)
            chunk_med = (md, mk[:, j0:j0 + J], mv[:, j0:j0 + J])
        else:
            chunk_med = (None, None, None)
        y, st = wkv_retro(td, tf, k[:, pos:pos + L], v[:, pos:pos + L], *chunk_med, s, st)
        ys.append(y)
        pos += L
    assert pos == T
    y_chunks = torch.cat(ys, 1)
    assert rel(y_chunks, y_full) < 1e-12
    for a, b in zip(st.tensors(), st_full.tensors()):
        assert rel(a * 1, b * 1) < 1e-12 or torch.equal(a, b)
    # Gradients flow through the carried state into the first chunk's inputs.
    gk_full = torch.autograd.grad(y_full.sum(), k)[0]
    gk_chunks = torch.autograd.grad(y_chunks.sum(), k)[0]
    assert rel(gk_chunks, gk_full) < 1e-10


def test_medium_reaches_only_later_segments():
    B, T, C, s = 1, 40, 3, 8
    td, tf, k, v, md, mk, mv = inputs(B, T, C, s, seed=7)
    y, _ = wkv_retro(td, tf, k, v, md, mk, mv, s)
    j = 2
    mk2 = mk.detach().clone()
    mk2[:, j] += 5.0
    y2, _ = wkv_retro(td, tf, k, v, md, mk2, mv, s)
    same = (y - y2).abs().amax(dim=(0, 2)) == 0
    assert same[: (j + 1) * s].all()            # its own segment and earlier ones: untouched
    assert not same[(j + 1) * s:].any()         # every later token sees it


def test_shape_errors_are_clear():
    td, tf, k, v, md, mk, mv = inputs(1, 10, 3, 4)
    with pytest.raises(ValueError, match="mk and mv must be"):
        wkv_retro(td, tf, k, v, md, mk[:, :1], mv[:, :1], 4)
    with pytest.raises(ValueError, match="needs medium_decay"):
        wkv_retro(td, tf, k, v, None, None, None, 4)


def test_low_precision_inputs_return_their_dtype_and_float32_state():
    td, tf, k, v, md, mk, mv = inputs(2, 33, 4, 8)
    y, st = wkv_retro(td.float(), tf.float(), k.bfloat16(), v.bfloat16(), md.float(), mk.bfloat16(), mv.bfloat16(), 8)
    assert y.dtype == torch.bfloat16 and st.aa.dtype == torch.float32 and st.phase == 33 % 8
    y_ref = wkv_direct(td, tf, k.bfloat16().double(), v.bfloat16().double(), md, mk.bfloat16().double(),
                       mv.bfloat16().double(), 8)
    assert rel(y.double(), y_ref) < 1e-2
    assert isinstance(st, WKVState)
