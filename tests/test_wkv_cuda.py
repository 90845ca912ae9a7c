"""The CUDA WKV-retrospection kernel against the float64 reference.

Each test runs on the GPU (skipped without CUDA) and on the CPU build of the kernels' arithmetic
(kernels/csrc/wkv_host.cpp: the same per-thread functions, wkv_algo.h, in loops), so that the
kernel's chunking, scans and backward are checked on machines without a GPU too.

Tolerances (norm-relative error of the whole tensor, issue 3): float32 y <= 1e-5 and every gradient
<= 1e-4; bfloat16 / float16 y and gradients <= 2e-2. Inputs are drawn fresh for each case with
exp(time_decay), exp(medium_decay) spanning 1e-4..20 and keys in [-30, 30].
"""
import math
import zlib

import pytest
import torch

from rrwkv.kernels.wkv import WKVState, num_mediums, wkv_retro
from rrwkv.kernels.reference import wkv_retro_reference

from rrwkv.kernels import cuda as kc

GPU = pytest.param("cuda", marks=[pytest.mark.cuda,
                                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")])


@pytest.fixture(params=[GPU, "cpu"])
def dev(request):
    return request.param

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}


def rel(a, b):
    a, b = a.double(), b.double()
    nb = b.norm()
    if nb == 0:
        return a.norm().item()
    return ((a - b).norm() / nb).item()


def poison_allocator(dev):
    """Fill free cached device memory with NaN so that unwritten outputs show up."""
    if dev == "cuda":
        x = torch.full((64 << 20,), float("nan"), device="cuda")
        del x


def kernel(dev):
    """The kernel: through the public dispatch on the GPU, its CPU build on the CPU."""
    return wkv_retro if dev == "cuda" else kc.wkv_retro_cuda


def draw(B, T, C, s, phase, seed, key_range=30.0, dtype=torch.float32, dev="cuda"):
    """Parameters, inputs and an incoming state (fresh when phase is None), all float64 on `dev`."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *sh: torch.rand(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    n = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    span = lambda: math.log(1e-4) + u(C) * (math.log(20.0) - math.log(1e-4))  # noqa: E731
    td, md = span(), span()
    tf = n(C) * 2
    k = (u(B, T, C) * 2 - 1) * key_range
    v = n(B, T, C)
    p = {"td": td, "tf": tf, "k": k, "v": v}
    if s:
        J = num_mediums(phase or 0, T, s)
        p.update(md=md, mk=(u(B, J, C) * 2 - 1) * key_range, mv=n(B, J, C))
    # Round the inputs of the kernel's dtype so that the reference sees the very same numbers.
    # (k, v in the kernel's input dtype, everything else in float32, the kernel's parameter dtype).
    p = {kk: vv.to(dtype if kk in ("k", "v") else torch.float32).double().to(dev) for kk, vv in p.items()}
    if phase is None:
        return p, None
    # A realistic carried state: the reference run over a random prefix ending `phase` into a segment.
    Tp = (s * 3 + phase) if s else 37
    pre_k = ((u(B, Tp, C) * 2 - 1) * key_range).to(dev)
    pre_v = n(B, Tp, C).to(dev)
    pre_med = (None, None, None)
    if s:
        Jp = num_mediums(0, Tp, s)
        pre_med = (p["md"], ((u(B, Jp, C) * 2 - 1) * key_range).to(dev), n(B, Jp, C).to(dev))
    _, st = wkv_retro_reference(p["td"], p["tf"], pre_k, pre_v, *pre_med, s)
    assert st.phase == (phase if s else 0)
    return p, st


def run(p, st, s, dtype, impl, dev="cuda"):
    """y, final state and gradients of a random linear function of y and the final state."""
    if impl == "cuda":
        leaves = {kk: vv.to(dtype if kk in ("k", "v") else torch.float32) for kk, vv in p.items()}
    else:
        leaves = {kk: vv.clone() for kk, vv in p.items()}
    for t in leaves.values():
        t.requires_grad_()
    sdt = torch.float32 if impl == "cuda" else torch.float64
    st_in = None
    st_leaves = []
    if st is not None:
        ts = [t.detach().float().to(sdt).requires_grad_() for t in st.tensors()]
        st_leaves = ts
        if s:
            st_in = WKVState(*ts, phase=st.phase)
        else:
            st_in = WKVState(ts[0], ts[1], ts[2], None, None, None, 0)
    med = (leaves["md"], leaves["mk"], leaves["mv"]) if s else (None, None, None)
    if impl == "cuda":
        y, st_out = kernel(dev)(leaves["td"], leaves["tf"], leaves["k"], leaves["v"], *med, s, st_in)
    else:
        y, st_out = wkv_retro_reference(leaves["td"], leaves["tf"], leaves["k"], leaves["v"], *med, s, st_in)
    return y, st_out, leaves, st_leaves


def grads(y, st_out, leaves, st_leaves, wy, wst):
    loss = (y.double() * wy).sum()
    outs = [(st_out.aa, st_out.pp), (st_out.bb, st_out.pp)]
    if st_out.ma is not None:
        outs += [(st_out.ma, st_out.mp), (st_out.mb, st_out.mp)]
    for (o, p), w in zip(outs, wst):
        # Where p = -1e38 the state represents an empty sum whatever a and b hold (the reference
        # leaves a nonzero a there, with a meaningless gradient); only live entries are compared.
        loss = loss + (o.double() * w * (p.detach() > -1e30)).sum()
    names = list(leaves)
    gs = torch.autograd.grad(loss, list(leaves.values()) + st_leaves, allow_unused=True, materialize_grads=True)
    return dict(zip(names + [f"state{i}" for i in range(len(st_leaves))], gs))


CASES = [
    # B, T, C, interval, phase (None: fresh state), dtype
    (2, 100, 40, 0, None, torch.float32),
    (2, 100, 40, 0, 0, torch.float32),                 # carried state, plain RWKV-4
    (2, 200, 67, 64, None, torch.float32),             # C not a multiple of 32, T not of the interval
    (2, 200, 67, 64, 13, torch.float32),               # chunk starting mid-segment
    (3, 77, 33, 7, 5, torch.float32),                  # small interval, many segments per chunk
    (2, 300, 50, 100, 37, torch.float32),              # interval > chunk: segments split in pieces
    (2, 130, 20, 1, None, torch.float32),              # interval 1
    (2, 257, 24, 65, 64, torch.float32),               # phase = interval - 1
    (1, 1, 5, 3, 2, torch.float32),                    # a single token completing a segment
    (1, 1, 5, 3, None, torch.float32),
    (1, 16384, 48, 64, None, torch.float32),           # long sequence
    (1, 16384, 48, 64, 21, torch.bfloat16),
    # two-level scans (256 chunks, wkv.h WKV_GROUP_MIN): without mediums, with segments split in
    # pieces (164 segments), and with several token groups but one medium group (64 segments)
    (1, 16384, 16, 0, 0, torch.float32),
    (1, 16384, 16, 100, 37, torch.float32),
    (2, 16384, 16, 256, None, torch.float32),
    (2, 1000, 96, 64, 3, torch.bfloat16),
    (2, 1000, 96, 0, 0, torch.bfloat16),
    (2, 513, 70, 48, 47, torch.float16),
    (2, 1024, 512, 64, None, torch.bfloat16),          # wide
    (2, 1024, 512, 64, None, torch.float32),
]


# Keys of trained models span far less than [-30, 30]: moderate key ranges, where the sums' running
# maxima change rarely (and where v6's scaled path, removed in v7, took over).
MODERATE_KEY_CASES = [
    # B, T, C, interval, phase, dtype, key range
    (2, 300, 40, 0, 0, torch.float32, 4.0),
    (2, 200, 67, 64, 13, torch.float32, 8.0),
    (3, 77, 33, 7, 5, torch.float32, 3.0),
    (2, 300, 50, 100, 37, torch.float32, 12.0),
    (1, 4096, 24, 64, None, torch.float32, 6.0),
    (2, 1000, 96, 64, 3, torch.bfloat16, 6.0),
    (2, 513, 70, 48, 47, torch.float16, 6.0),
    (2, 700, 40, 32, 5, torch.float32, 20.0),
]


@pytest.mark.parametrize("B,T,C,s,phase,dtype", CASES)
def test_matches_float64_reference(B, T, C, s, phase, dtype, dev):
    check_against_reference(B, T, C, s, phase, dtype, dev, 30.0)


@pytest.mark.parametrize("B,T,C,s,phase,dtype,key_range", MODERATE_KEY_CASES)
def test_moderate_keys_match_float64_reference(B, T, C, s, phase, dtype, key_range, dev):
    check_against_reference(B, T, C, s, phase, dtype, dev, key_range)


def check_against_reference(B, T, C, s, phase, dtype, dev, key_range):
    seed = zlib.crc32(repr((B, T, C, s, phase, dtype, key_range)).encode())   # the same in every run
    p, st = draw(B, T, C, s, phase, seed, key_range=key_range, dtype=dtype, dev=dev)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    wy = torch.randn(B, T, C, device=dev, dtype=torch.float64, generator=g).to(dtype).double()
    wst = [torch.randn(B, C, device=dev, dtype=torch.float64, generator=g) for _ in range(4)]
    poison_allocator(dev)
    y, so, lv, sl = run(p, st, s, dtype, "cuda", dev)
    assert y.dtype == dtype and y.shape == (B, T, C)
    gc = grads(y, so, lv, sl, wy, wst)
    y_r, so_r, lv_r, sl_r = run(p, st, s, dtype, "ref")
    gr = grads(y_r, so_r, lv_r, sl_r, wy, wst)
    tol_y, tol_g = TOL[dtype]
    assert torch.isfinite(y).all()
    assert rel(y, y_r) <= tol_y, f"y: {rel(y, y_r):.3g}"
    for name, gref in gr.items():
        gcu = gc[name]
        assert torch.isfinite(gcu).all(), name
        err = rel(gcu, gref)
        assert err <= tol_g, f"grad {name}: {err:.3g} (ref norm {gref.norm().item():.3g})"
    # Final state: the represented sums (a * exp(p)) on the reference's scale. The state carries the
    # float32 rounding of its running maximum (about |k| * 6e-8 per step, growing like sqrt(T)); it
    # is common to a and b and cancels in y, hence the looser bound than y's.
    assert so.phase == so_r.phase
    pairs = [(so.aa, so.bb, so.pp, so_r.aa, so_r.bb, so_r.pp)]
    if s:
        pairs.append((so.ma, so.mb, so.mp, so_r.ma, so_r.mb, so_r.mp))
    for a, b_, pp, ar, br, ppr in pairs:
        live = ppr > -1e30                    # both represent an empty sum where p is -1e38
        scale = torch.exp(torch.where(live, pp.double() - ppr, 0.0))
        assert torch.isfinite(a).all() and torch.isfinite(b_).all()
        assert rel(a.double() * scale * live, ar * live) <= 1e-4
        assert rel(b_.double() * scale * live, br * live) <= 1e-4


@pytest.mark.parametrize("s,dtype", [(0, torch.float32), (64, torch.float32), (8, torch.float32),
                                     (100, torch.float32), (64, torch.bfloat16)])
def test_chunked_with_carried_state_equals_one_pass(s, dtype, dev):
    B, T, C = 2, 700, 45
    p, _ = draw(B, T, C, s, None, seed=11 + s, dtype=dtype, dev=dev)
    lv = {kk: (vv.to(dtype) if kk in ("k", "v") else vv.float()).requires_grad_() for kk, vv in p.items()}
    med = (lv["md"], lv["mk"], lv["mv"]) if s else (None, None, None)
    y_full, st_full = kernel(dev)(lv["td"], lv["tf"], lv["k"], lv["v"], *med, s, None)
    ys, st, pos = [], None, 0
    for L in [5, 130, 1, 3, 64, 200, 97, 200]:    # cuts in mid-segment, single tokens, long chunks
        phase = st.phase if st else 0
        if s:
            j0, J = pos // s, num_mediums(phase, L, s)
            cm = (lv["md"], lv["mk"][:, j0:j0 + J], lv["mv"][:, j0:j0 + J])
        else:
            cm = (None, None, None)
        y, st = kernel(dev)(lv["td"], lv["tf"], lv["k"][:, pos:pos + L], lv["v"][:, pos:pos + L], *cm, s, st)
        ys.append(y)
        pos += L
    assert pos == T
    y_chunks = torch.cat(ys, 1)
    tol_y, tol_g = TOL[dtype]
    assert rel(y_chunks, y_full) <= tol_y
    for a, b in zip(st.tensors(), st_full.tensors()):
        assert rel(a, b) <= 1e-4                # see test_matches_float64_reference
    w = torch.randn_like(y_full)
    names = list(lv)
    g_full = torch.autograd.grad((y_full * w).sum(), list(lv.values()))
    g_chunks = torch.autograd.grad((y_chunks * w).sum(), list(lv.values()))
    for name, a, b in zip(names, g_chunks, g_full):
        assert rel(a, b) <= tol_g, name


def test_run_to_run_identical(dev):
    B, T, C, s = 3, 2048, 200, 64
    p, st = draw(B, T, C, s, 17, seed=5, dtype=torch.bfloat16, dev=dev)
    wy = torch.randn(B, T, C, device=dev, dtype=torch.float64)
    wst = [torch.randn(B, C, device=dev, dtype=torch.float64) for _ in range(4)]
    results = []
    for _ in range(3):
        poison_allocator(dev)
        y, so, lv, sl = run(p, st, s, torch.bfloat16, "cuda", dev)
        gc = grads(y, so, lv, sl, wy, wst)
        results.append([y] + so.tensors() + list(gc.values()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_fresh_state_gradient_and_public_dispatch():
    # wkv_retro on CUDA tensors runs the kernel (not the reference) and returns its dtype.
    B, T, C, s = 2, 70, 8, 16
    p, _ = draw(B, T, C, s, None, seed=3)
    f = {kk: vv.float() for kk, vv in p.items()}
    y1, st1 = wkv_retro(f["td"], f["tf"], f["k"], f["v"], f["md"], f["mk"], f["mv"], s)
    y2, st2 = kc.wkv_retro_cuda(f["td"], f["tf"], f["k"], f["v"], f["md"], f["mk"], f["mv"], s, None)
    assert torch.equal(y1, y2) and st1.phase == st2.phase == (T % s)
    assert y1.dtype == torch.float32 and st1.aa.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("B,T,C,s,phase", [(2, 1000, 200, 64, 17), (1, 9000, 72, 48, 5), (2, 300, 40, 100, 70),
                                           (3, 130, 33, 0, 0)])
def test_cuda_graph_replay_equals_eager(B, T, C, s, phase):
    """Forward + backward captured in a CUDA graph (as torch.compile's "reduce-overhead" mode does, and
    kernels.benchmark's graph timing) and replayed on new inputs copied into the graph's inputs gives
    bit for bit what the eager calls give: nothing in the op's launches depends on the host between
    calls. The 9000-token shape takes the two-level scans (188 chunks and segments); the others one
    level, segments longer than a chunk, and no mediums."""
    dtype = torch.bfloat16

    def inputs(seed):
        p, st = draw(B, T, C, s, phase, seed, dtype=dtype)
        lv = {kk: vv.to(dtype if kk in ("k", "v") else torch.float32) for kk, vv in p.items()}
        sts = [t.float() for t in st.tensors()]
        gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to("cuda", dtype)
        return lv, sts, gy

    def step(lv, sts, gy):
        state = WKVState(*sts, phase=phase) if s else WKVState(*sts, None, None, None, 0)
        med = (lv["md"], lv["mk"], lv["mv"]) if s else (None, None, None)
        y, so = wkv_retro(lv["td"], lv["tf"], lv["k"], lv["v"], *med, s, state)
        leaves = list(lv.values()) + sts
        outs = [y] + [t for t in so.tensors() if t is not None]
        weights = [gy] + [torch.ones_like(t) for t in outs[1:]]
        diff = [(o, w) for o, w in zip(outs, weights) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], leaves, [w for _, w in diff])
        return outs + list(grads)

    static = inputs(1)
    for t in list(static[0].values()) + static[1]:
        t.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(*static)
    for seed in (2, 3):
        lv, sts, gy = inputs(seed)
        with torch.no_grad():
            for a, b in zip(list(static[0].values()) + static[1] + [static[2]], list(lv.values()) + sts + [gy]):
                a.copy_(b)
        graph.replay()
        for t in list(lv.values()) + sts:
            t.requires_grad_()
        eager = step(lv, sts, gy)
        torch.cuda.synchronize()
        assert len(outs) == len(eager)
        for i, (a, b) in enumerate(zip(outs, eager)):
            assert torch.equal(a, b), f"output {i} differs between the graph replay and the eager call"


def test_another_source_version_is_loaded_beside_the_current_one(tmp_path, monkeypatch):
    """RRWKV_WKV_CSRC switches kernels.cuda to the build of another copy of the sources within one
    process (what `kernels.benchmark --baseline-csrc` does), and back; here on the CPU build."""
    import shutil
    from rrwkv.kernels import build
    monkeypatch.delenv("RRWKV_WKV_CSRC", raising=False)
    B, T, C, s = 2, 40, 5, 8
    td, tf, k, v, md, mk, mv = (torch.randn(*sh, dtype=torch.float32, generator=torch.Generator().manual_seed(i))
                                for i, sh in enumerate([(C,), (C,), (B, T, C), (B, T, C), (C,),
                                                        (B, T // s, C), (B, T // s, C)]))
    y0, _ = kc.wkv_retro_cuda(td, tf, k, v, md, mk, mv, s, None)
    current = kc._ext(torch.float32, torch.device("cpu"))
    copy = tmp_path / "csrc"
    shutil.copytree(build.CSRC, copy)
    with open(copy / "wkv_algo.h", "a") as f:
        f.write("// a second version of the sources\n")
    monkeypatch.setenv("RRWKV_WKV_CSRC", str(copy))
    y1, _ = kc.wkv_retro_cuda(td, tf, k, v, md, mk, mv, s, None)
    other = kc._ext(torch.float32, torch.device("cpu"))
    assert other is not current and other.__name__ != current.__name__
    assert other.__name__ == build.host_build_spec(torch.float32)[0]
    assert torch.equal(y0, y1)                                   # the same arithmetic, built twice
    monkeypatch.delenv("RRWKV_WKV_CSRC")
    assert kc._ext(torch.float32, torch.device("cpu")) is current


@pytest.mark.parametrize("s,phases", [(0, [0]), (16, [0, 5, 15]), (64, [0, 63]), (100, [0, 37, 99]),
                                      (200, [0, 64, 130, 199])])
def test_custom_op_shapes_and_registration(s, phases, dev):
    """rrwkv::wkv_forward / wkv_backward, the custom ops torch.compile traces (pretrain/parallelize.py): the
    shape functions (kernels.cuda.geometry) give the shapes the built op returns, for chunk starts in
    mid-segment and lengths that are no multiple of the interval or the chunk; torch.library.opcheck
    checks the registration (schema, shape functions, autograd, torch.compile's dispatch)."""
    if dev == "cuda":
        poison_allocator(dev)
    C = 40
    for T, phase in [(T, p) for T in (1, 63, 64, 65, 200, 517) for p in phases]:
        p, st = draw(2, T, C, s, phase, seed=T * 1000 + phase + s, dtype=torch.float32, dev=dev)
        f32 = lambda t: t.float().contiguous()  # noqa: E731
        e = p["k"].new_empty(0, dtype=torch.float32)
        sts = [f32(t) for t in (st.aa, st.bb, st.pp)] + ([f32(t) for t in (st.ma, st.mb, st.mp)] if s else [e] * 3)
        med = [f32(p["md"]), f32(p["mk"]), f32(p["mv"])] if s else [e] * 3
        args = [f32(p["td"]), f32(p["tf"]), f32(p["k"]), f32(p["v"])] + med + sts
        out = torch.ops.rrwkv.wkv_forward(*args, s, phase)
        NC, J = kc.geometry(T, s, phase)
        assert out[7].shape == (3, 2, NC, C) and out[8].shape == (3, 2, J, C), (T, s, phase)
        if T in (65, 517):   # opcheck runs the op many ways: a few shapes suffice
            for t in args[:7]:
                t.requires_grad_(t.numel() > 0)
            torch.library.opcheck(torch.ops.rrwkv.wkv_forward.default, (*args, s, phase))
