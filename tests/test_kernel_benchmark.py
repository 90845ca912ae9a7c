"""kernels/benchmark.py's fla row on CPU: the call matches fla-core 0.6.0's fused_recurrent_rwkv4.

fla's op is a Triton kernel (GPU only), so a stand-in with its signature and its forward arithmetic
(fla/ops/rwkv4/fused_recurrent.py, transcribed loop for loop) takes its place; the step must give the
reference's y at interval 0 and gradients for all four inputs.
"""
import sys
import types

import torch

from rrwkv.kernels import benchmark
from rrwkv.kernels.reference import wkv_retro_reference


def fused_recurrent_rwkv4(w, u, k, v, state):   # fla-core 0.6.0's signature
    assert w.shape == u.shape == (k.shape[2],) and k.shape == v.shape
    assert state.shape == (k.shape[0], 3, 1, k.shape[2])
    w = -torch.exp(w.float())                   # as FusedRecurrentRWKV4Function.forward
    alpha, beta, eps = (state[:, i, 0].float() for i in range(3))
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t].float(), v[:, t].float()
        ukt = u + kt
        tau = torch.maximum(ukt, eps)
        e1a, e2a = torch.exp(eps - tau), torch.exp(ukt - tau)
        ys.append((e1a * alpha + e2a * vt) / (e1a * beta + e2a))
        w_eps = w + eps
        eps = torch.maximum(w_eps, kt)
        e1b, e2b = torch.exp(w_eps - eps), torch.exp(kt - eps)
        alpha, beta = e1b * alpha + e2b * vt, e1b * beta + e2b
    fused_recurrent_rwkv4.y = torch.stack(ys, 1).detach()
    return torch.stack(ys, 1).to(k.dtype), torch.stack((alpha, beta, eps), 1)[:, :, None]


def test_fla_row_calls_fused_recurrent_rwkv4_as_fla_core_defines_it(monkeypatch):
    mod = types.ModuleType("fla.ops.rwkv4")
    mod.fused_recurrent_rwkv4 = fused_recurrent_rwkv4
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.rwkv4", mod)
    step, error = benchmark.fla_step()
    assert error is None
    B, T, C = 2, 30, 8
    g = torch.Generator().manual_seed(0)
    td = (torch.randn(C, generator=g) * 1.5 - 1).requires_grad_()
    tf = torch.randn(C, generator=g).requires_grad_()
    k = (torch.randn(B, T, C, generator=g) * 3).requires_grad_()
    v = torch.randn(B, T, C, generator=g).requires_grad_()
    step((td, tf, k, v, None, None, None, torch.randn(B, T, C, generator=g)))
    y, _ = wkv_retro_reference(td.detach(), tf.detach(), k.detach(), v.detach(), None, None, None, 0, None)
    torch.testing.assert_close(fused_recurrent_rwkv4.y, y, rtol=1e-5, atol=1e-5)


def test_fla_row_reports_why_fla_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)   # import fla raises ImportError
    step, error = benchmark.fla_step()
    assert step is None and isinstance(error, ImportError)
