// WKV with retrospection: the arithmetic of every kernel, one function per GPU thread.
//
// Per channel c (all scalars per channel), w = exp(time_decay), u = time_first, wm = exp(medium_decay):
//   A_{t+1} = e^{-w} A_t + e^{k_t} v_t            (token sums, B_t likewise with v -> 1)
//   M_{r+1} = e^{-wm} M_r + e^{mk_r} mv_r           (medium sums, folded at segment ends)
//   y_t = (A_t + e^{u+k_t} v_t + MA_{r(t)}) / (B_t + e^{u+k_t} + MB_{r(t)})
// Every sum is kept in log space as (a, b, p) with a running maximum p.
//
// The CUDA kernels (wkv.cu) stage a chunk's inputs in shared memory and call these functions with
// one thread per (batch, chunk, channel) or (batch, channel); wkv_host.cpp calls the very same
// functions in loops on the CPU, so that the kernels' arithmetic (chunking, scans, the backward) is
// tested without a GPU. Compiled by nvcc for the device (__CUDACC__) or by the host compiler
// (WKV_HOST, with torch's c10 16-bit types).
#pragma once
#include "wkv.h"

#if defined(__CUDACC__)
#include <cuda_pipeline.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define WKV_UNROLL _Pragma("unroll")
#define WKV_DEV __device__ __forceinline__
#else
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#define WKV_UNROLL
#define WKV_DEV inline
#endif

#ifndef WKV_DTYPE
#define WKV_DTYPE 0
#endif

#if defined(__CUDACC__)
#if WKV_DTYPE == 0
typedef __nv_bfloat16 in_t;
__device__ __forceinline__ float to_f(in_t x) { return __bfloat162float(x); }
__device__ __forceinline__ in_t from_f(float x) { return __float2bfloat16_rn(x); }
#elif WKV_DTYPE == 1
typedef __half in_t;
__device__ __forceinline__ float to_f(in_t x) { return __half2float(x); }
__device__ __forceinline__ in_t from_f(float x) { return __float2half_rn(x); }
#else
typedef float in_t;
__device__ __forceinline__ float to_f(in_t x) { return x; }
__device__ __forceinline__ in_t from_f(float x) { return x; }
#endif
// Exponential: the accurate expf for float32 inputs, the MUFU approximation (about 2 ulp, plus the
// rounding of x * log2(e)) for 16-bit inputs whose outputs are rounded to 8 or 11 bits anyway.
#if WKV_DTYPE == 2
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ float dv(float x, float y) { return x / y; }
#else
__device__ __forceinline__ float ex(float x) { return __expf(x); }
__device__ __forceinline__ float dv(float x, float y) { return __fdividef(x, y); }   // y >= 1 here
#endif
#else  // host
#if WKV_DTYPE == 0
typedef c10::BFloat16 in_t;
#elif WKV_DTYPE == 1
typedef c10::Half in_t;
#else
typedef float in_t;
#endif
inline float to_f(in_t x) { return static_cast<float>(x); }
inline in_t from_f(float x) { return in_t(x); }          // round to nearest even, as the device
inline float ex(float x) { return std::exp(x); }
inline float dv(float x, float y) { return x / y; }
#endif

// Defined here, in the one translation unit of each build that holds the kernels (wkv.cu or
// wkv_host.cpp); the binding (wkv.cpp) names the dtype of its module with it.
const char* wkv_dtype_name() {
#if WKV_DTYPE == 0
  return "bfloat16";
#elif WKV_DTYPE == 1
  return "float16";
#else
  return "float32";
#endif
}

#ifndef U
#define U 4       // forward: tokens whose inputs are read together
#endif
#ifndef UB
#define UB 2      // k_bwd_local: inputs come from shared memory, few registers buffered
#endif
#ifndef SB
#define SB 4      // scans: loads of SB steps issued together (each step's code is unrolled SB times)
#endif
#ifndef SBT
#define SBT 8     // the forward scans (3 or 2 loads a step)
#endif

// The inputs of one channel from token t0 on: element i is at p[i * stride] (a shared-memory tile
// on the GPU, the (B, T, C) tensor itself on the host).
struct Col {
  const in_t* p;
  int stride;
  WKV_DEV float operator()(int i) const { return to_f(p[(size_t)i * stride]); }
  WKV_DEV Col from(int i) const { return Col{p + (size_t)i * stride, stride}; }   // from element i on
};

// f(t, k_t, v_t, gy_t) for every token t in [t0, t1) in order; the inputs of N tokens are read
// together ahead of their use (they do not depend on the recurrences). Without HAS_G, gy_t is 0.
template <int N, bool HAS_G, class F>
WKV_DEV void each_token(int t0, int t1, Col K, Col V, Col G, F f) {
  for (int base = t0; base < t1; base += N) {
    float kb[N], vb[N], gb[N];
    WKV_UNROLL
    for (int i = 0; i < N; i++)
      if (base + i < t1) {
        kb[i] = K(base + i - t0);
        vb[i] = V(base + i - t0);
        gb[i] = HAS_G ? G(base + i - t0) : 0.f;
      }
    WKV_UNROLL
    for (int i = 0; i < N; i++)
      if (base + i < t1) f(base + i, kb[i], vb[i], gb[i]);
  }
}

WKV_DEV float ld_or(const float* p, size_t i, float dflt) { return p ? p[i] : dflt; }

// (a, b, p) += exp(x) * (va, vb). One exponential: the larger exponent becomes the new maximum.
WKV_DEV void lse_add(float& a, float& b, float& p, float va, float vb, float x) {
  const float e = ex(-fabsf(p - x));
  if (x > p) {
    a = e * a + va;
    b = e * b + vb;
    p = x;
  } else {
    a = a + e * va;
    b = b + e * vb;
  }
}
// A decaying sum kept as (a, b) * exp(pr - pn * w): the decay steps are counted in pn and applied
// with one rounding (fmaf), so that no rounding error accumulates in the running maximum over long
// stretches without a new maximum. dec_add: decay by `steps` steps, then add exp(x) * (va, vb).
WKV_DEV float cur_p(float pr, float pn, float w) { return fmaf(-pn, w, pr); }
WKV_DEV void dec_add(float& a, float& b, float& pr, float& pn, float w, float steps,
                    float va, float vb, float x) {
  pn += steps;
  const float p = cur_p(pr, pn, w);
  const float e = ex(-fabsf(p - x));
  if (x > p) {
    a = e * a + va;
    b = e * b + vb;
    pr = x;
    pn = 0.f;
  } else {
    a = a + e * va;
    b = b + e * vb;
  }
}

// Forward quantities of token t given the state before it: m (shared max), den, y.
// Of the three terms' scale factors e^{p-m}, e^{u+k-m}, e^{mP-m} one is e^0: two exponentials (the
// smaller of p and u+k against the larger, then that pair against the mediums' mP) instead of three.
struct TokOut { float m, den, y, eu; };   // eu = exp(u + k - m)
WKV_DEV TokOut tok_out(float a, float bb, float p, float k, float v, float u, float mA, float mB, float mP) {
  TokOut o;
  const float lu = u + k;
  const float m2 = fmaxf(p, lu);
  const float e = ex(-fabsf(p - lu));
  float e1 = p >= lu ? 1.f : e, e2 = p >= lu ? e : 1.f, em;
  const float f = ex(-fabsf(m2 - mP));
  if (mP > m2) {
    e1 *= f; e2 *= f; em = 1.f; o.m = mP;
  } else {
    em = f; o.m = m2;
  }
  const float num = e1 * a + e2 * v + em * mA;
  o.den = e1 * bb + e2 + em * mB;
  o.y = dv(num, o.den);
  o.eu = e2;
  return o;
}

// The medium state (mA, mB, mP) that token t0 + offset sees, and its position in its segment.
struct MedCursor {
  float mA = 0.f, mB = 0.f, mP = WKV_NEG;
  int r = 0, pos = 0;
  WKV_DEV void load(const float* ma, const float* mb, const float* mp, const WkvGeo& g, int b, int c) {
    const size_t om = ((size_t)b * g.J + r) * g.C + c;
    mA = ma[om]; mB = mb[om]; mP = mp[om];
  }
  WKV_DEV void start(const float* ma, const float* mb, const float* mp, const WkvGeo& g, int b, int c, int t) {
    if (g.s > 0) {
      r = (g.phase + t) / g.s;
      pos = g.phase + t - r * g.s;
      load(ma, mb, mp, g, b, c);
    }
  }
  // Before token t: step into the next segment where the previous one ended.
  WKV_DEV bool enter(const float* ma, const float* mb, const float* mp, const WkvGeo& g, int b, int c) {
    if (g.s > 0 && pos == g.s) {
      pos = 0; r++;
      load(ma, mb, mp, g, b, c);
      return true;
    }
    return false;
  }
};

// ---------------------------------------------------------------- chunks and windows
// The chunk kernels walk their chunk [t0, t1) window by window: WKV_WIN tokens (a multiple of
// WKV_SUB) at a time, the windows aligned to t0. On the GPU each window of k, v (and gy) is staged in
// shared memory for the block's channels, so that a block holds WKV_WIN tokens of inputs instead of
// the whole chunk (more blocks per SM); on the host each window is a view of the tensor. The
// per-thread state of a chunk lives in a struct: init (before the first window), run (one window;
// Col indexes the window from its first token w0), finish (after the last).
WKV_DEV int n_windows(int t0, int t1) { return (t1 - t0 + WKV_WIN - 1) / WKV_WIN; }
WKV_DEV void window_range(int t0, int t1, int i, int& w0, int& w1) {
  w0 = t0 + i * WKV_WIN;
  w1 = wkv_min(w0 + WKV_WIN, t1);
}

// ---------------------------------------------------------------- forward
// Chunk-local token sums from zero.
struct FwdLocal {
  float w, a, bb, p, pn;
  WKV_DEV void init(const WkvFwdArgs& A, int c) {
    w = ex(A.td[c]);
    a = 0.f; bb = 0.f; p = WKV_NEG; pn = 0.f;
  }
  WKV_DEV void run(int w0, int w1, Col K, Col V) {
    each_token<U, false>(w0, w1, K, V, Col{nullptr, 0}, [&](int t, float k, float v, float gy) {
      dec_add(a, bb, p, pn, w, 1.f, v, 1.f, k);
    });
  }
  WKV_DEV void finish(const WkvFwdArgs& A, int b, int n, int c) {
    const size_t o = ((size_t)b * A.g.NC + n) * A.g.C + c;
    A.loc_a[o] = a; A.loc_b[o] = bb; A.loc_p[o] = cur_p(p, pn, w);
  }
};

// ---------------------------------------------------------------- scans over chunks and segments
// Two levels when a sequence has many chunks (segments): groups of g.GT chunks (g.GJ segments) are
// summed from zero in parallel (phase A, *_group_sum), a scan over the groups gives each group's
// start state (phase B, *_group_scan), then each group walks its own chunks (segments) from it
// (phase C), so that one sequence gives the scans g.NG times the threads and a chain of
// g.GT + g.NG + g.GT steps instead of g.NC. With one group (g.NG == 1: short sequences) phase C
// alone walks the whole sequence from the incoming state. The last group also writes the outgoing
// state (forward); in the backward, group 0 writes the gradient of the incoming state.
WKV_DEV void group_range(int gi, int per, int total, int& i0, int& i1) {
  i0 = gi * per;
  i1 = wkv_min(i0 + per, total);
}
WKV_DEV int chunk_len(const WkvGeo& g, int n) {
  int t0, t1;
  wkv_chunk_range(g, n, t0, t1);
  return t1 - t0;
}
WKV_DEV int group_len(const WkvGeo& g, int gi) {   // tokens in the chunks of token group gi
  int n0, n1, t0, t1, u0, u1;
  group_range(gi, g.GT, g.NC, n0, n1);
  wkv_chunk_range(g, n0, t0, u0);
  wkv_chunk_range(g, n1 - 1, u1, t1);
  return t1 - t0;
}

// f(i, x) for the rows i of [i0, i1) in order (the last first with REV), x[q] = xs[q][base + i * C]:
// the loads of SBN rows are issued together (they do not depend on the recurrence in f).
template <int NA>
struct Rows { const float* x[NA]; };   // by value, so that the pointers stay in registers
template <int SBN, bool REV, int NA, class F>
WKV_DEV void each_row(int i0, int i1, Rows<NA> xs, size_t base, int C, F f) {
  for (int k0 = 0; k0 < i1 - i0; k0 += SBN) {
    float x[SBN][NA];
    WKV_UNROLL
    for (int j = 0; j < SBN; j++)
      if (k0 + j < i1 - i0) {
        const int i = REV ? i1 - 1 - (k0 + j) : i0 + k0 + j;
        WKV_UNROLL
        for (int q = 0; q < NA; q++) x[j][q] = xs.x[q][base + (size_t)i * C];
      }
    WKV_UNROLL
    for (int j = 0; j < SBN; j++)
      if (k0 + j < i1 - i0) f(REV ? i1 - 1 - (k0 + j) : i0 + k0 + j, x[j]);
  }
}

// Token phase A, shared by the forward (token states) and the backward (their adjoints, REV: walked
// from the end; Args: WkvFwdArgs or WkvBwdArgs, both hold td and the tg_* scratch): group gi's
// chunk rows xs (a local (a, b, p) triple per chunk) composed from zero, into tg_*.
template <int SBN, bool REV, class Args>
WKV_DEV void tokens_group_sum(const Args& A, const Rows<3>& xs, int b, int gi, int c) {
  const WkvGeo& g = A.g;
  const float w = ex(A.td[c]);
  int n0, n1;
  group_range(gi, g.GT, g.NC, n0, n1);
  float a = 0.f, bb = 0.f, p = WKV_NEG, pn = 0.f;
  each_row<SBN, REV, 3>(n0, n1, xs, (size_t)b * g.NC * g.C + c, g.C, [&](int n, const float* x) {
    dec_add(a, bb, p, pn, w, (float)chunk_len(g, n), x[0], x[1], x[2]);
  });
  const size_t o = ((size_t)b * g.NG + gi) * g.C + c;
  A.tg_a[o] = a; A.tg_b[o] = bb; A.tg_p[o] = cur_p(p, pn, w);
}

// Token states, phase A: group gi's chunk sums composed from zero, into tg_*.
WKV_DEV void fwd_tokens_group_sum(const WkvFwdArgs& A, int b, int gi, int c) {
  tokens_group_sum<SBT, false>(A, Rows<3>{{A.loc_a, A.loc_b, A.loc_p}}, b, gi, c);
}

// Token states, phase B (per (b, c)): each group's start state, in place of its sum in tg_*.
WKV_DEV void fwd_tokens_group_scan(const WkvFwdArgs& A, int b, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float w = ex(A.td[c]);
  float a = ld_or(A.aa, bc, 0.f), bb = ld_or(A.bb, bc, 0.f), p = ld_or(A.pp, bc, WKV_NEG), pn = 0.f;
  const Rows<3> xs{{A.tg_a, A.tg_b, A.tg_p}};
  each_row<SB, false, 3>(0, g.NG, xs, (size_t)b * g.NG * g.C + c, g.C, [&](int gi, const float* x) {
    const size_t o = ((size_t)b * g.NG + gi) * g.C + c;
    A.tg_a[o] = a; A.tg_b[o] = bb; A.tg_p[o] = cur_p(p, pn, w);
    dec_add(a, bb, p, pn, w, (float)group_len(g, gi), x[0], x[1], x[2]);
  });
}

// Token states, phase C: the start state of each chunk of group gi (saved for fwd_out and the
// backward); the last group writes the outgoing state.
WKV_DEV void fwd_tokens_chunk_starts(const WkvFwdArgs& A, int b, int gi, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float w = ex(A.td[c]);
  float a, bb, p, pn = 0.f;
  if (g.NG == 1) {
    a = ld_or(A.aa, bc, 0.f); bb = ld_or(A.bb, bc, 0.f); p = ld_or(A.pp, bc, WKV_NEG);
  } else {
    const size_t o = ((size_t)b * g.NG + gi) * g.C + c;
    a = A.tg_a[o]; bb = A.tg_b[o]; p = A.tg_p[o];
  }
  int n0, n1;
  group_range(gi, g.GT, g.NC, n0, n1);
  const Rows<3> xs{{A.loc_a, A.loc_b, A.loc_p}};
  each_row<SBT, false, 3>(n0, n1, xs, (size_t)b * g.NC * g.C + c, g.C, [&](int n, const float* x) {
    const size_t o = ((size_t)b * g.NC + n) * g.C + c;
    A.cs_a[o] = a; A.cs_b[o] = bb; A.cs_p[o] = cur_p(p, pn, w);
    dec_add(a, bb, p, pn, w, (float)chunk_len(g, n), x[0], x[1], x[2]);
  });
  if (gi == g.NG - 1) { A.aaT[bc] = a; A.bbT[bc] = bb; A.ppT[bc] = cur_p(p, pn, w); }
}

// Medium states (segments r < g.complete add their medium and decay by one step; an incomplete last
// segment neither), phase A: group gm's sum from zero, into mg_*.
WKV_DEV void fwd_mediums_group_sum(const WkvFwdArgs& A, int b, int gm, int c) {
  const WkvGeo& g = A.g;
  const float wm = ex(A.md[c]);
  int r0, r1;
  group_range(gm, g.GJ, g.J, r0, r1);
  float a = 0.f, bb = 0.f, p = WKV_NEG, pn = 0.f;
  const Rows<2> xs{{A.mk, A.mv}};
  each_row<SBT, false, 2>(r0, wkv_min(r1, g.complete), xs, (size_t)b * g.J * g.C + c, g.C,
                          [&](int r, const float* x) { dec_add(a, bb, p, pn, wm, 1.f, x[1], 1.f, x[0]); });
  const size_t o = ((size_t)b * g.NGM + gm) * g.C + c;
  A.mg_a[o] = a; A.mg_b[o] = bb; A.mg_p[o] = cur_p(p, pn, wm);
}

WKV_DEV void fwd_mediums_group_scan(const WkvFwdArgs& A, int b, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float wm = ex(A.md[c]);
  float a = ld_or(A.ma, bc, 0.f), bb = ld_or(A.mb, bc, 0.f), p = ld_or(A.mp, bc, WKV_NEG), pn = 0.f;
  const Rows<3> xs{{A.mg_a, A.mg_b, A.mg_p}};
  each_row<SB, false, 3>(0, g.NGM, xs, (size_t)b * g.NGM * g.C + c, g.C, [&](int gm, const float* x) {
    const size_t o = ((size_t)b * g.NGM + gm) * g.C + c;
    A.mg_a[o] = a; A.mg_b[o] = bb; A.mg_p[o] = cur_p(p, pn, wm);
    int r0, r1;
    group_range(gm, g.GJ, g.J, r0, r1);
    dec_add(a, bb, p, pn, wm, (float)wkv_max(wkv_min(r1, g.complete) - r0, 0), x[0], x[1], x[2]);
  });
}

// Medium states, phase C: the state before each segment of group gm; the last group writes the
// outgoing medium state.
WKV_DEV void fwd_mediums_starts(const WkvFwdArgs& A, int b, int gm, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float wm = ex(A.md[c]);
  float a, bb, p, pn = 0.f;
  if (g.NGM == 1) {
    a = ld_or(A.ma, bc, 0.f); bb = ld_or(A.mb, bc, 0.f); p = ld_or(A.mp, bc, WKV_NEG);
  } else {
    const size_t o = ((size_t)b * g.NGM + gm) * g.C + c;
    a = A.mg_a[o]; bb = A.mg_b[o]; p = A.mg_p[o];
  }
  int r0, r1;
  group_range(gm, g.GJ, g.J, r0, r1);
  const Rows<2> xs{{A.mk, A.mv}};
  each_row<SBT, false, 2>(r0, r1, xs, (size_t)b * g.J * g.C + c, g.C, [&](int r, const float* x) {
    const size_t o = ((size_t)b * g.J + r) * g.C + c;
    A.ms_a[o] = a; A.ms_b[o] = bb; A.ms_p[o] = cur_p(p, pn, wm);
    if (r < g.complete) dec_add(a, bb, p, pn, wm, 1.f, x[1], 1.f, x[0]);
  });
  if (gm == g.NGM - 1) { A.maT[bc] = a; A.mbT[bc] = bb; A.mpT[bc] = cur_p(p, pn, wm); }
}

// The scaled path (k_fwd_out, k_bwd_local). Within one
// stretch of WKV_SUB tokens, with one reference R at least every exponent in it (the start state's,
// every u + k, the mediums'), every sum is a plain recurrence with the constant factor e^{-w}:
//   A'_{t+1} = e^{-w} A'_t + e^{k_t - R} v_t,
//   y_t = (A'_t + e^u e^{k_t - R} v_t + MA') / (B'_t + e^u e^{k_t - R} + MB'),
// one exponential a token and no running maximum, and the output adjoints gy / D likewise (on the
// scale e^{+R}). It is taken where every token's own term e^{u + k_t - R} is above e^{-WKV_SPAN} (so no
// denominator is smaller, nothing overflows, and what underflows is below the float range in the
// log-space path's results too); elsewhere the log-space path runs, exact for any inputs. This is
// v6's scaled path, removed in v7 when the kernels were bound by latency (16 warps an SM); since v8's
// windows they are bound by instruction issue, and in v18 it took k_bwd_local from 0.074 to 0.060 ms
// at (8,1024,2048) on the H100.
#ifndef WKV_SCALED
#define WKV_SCALED 1   // 0: the log-space path only
#endif
#define WKV_SPAN 50.f

struct Scale {
  float R;        // the reference
  float mA, mB;   // the medium sums of the cursor's segment on its scale (after rescale, medium)
  // The reference of tokens [tb, te) (window from w0) after a state of log scale p; M: the medium cursor
  // at tb. False where the sub-chunk needs the log-space path.
  WKV_DEV bool init(const WkvGeo& g, const float* ms_p, int b, int c, const MedCursor& M, int tb, int te, int w0,
                    Col K, float p, float u) {
    float kmin = K(tb - w0), kmax = kmin;
    WKV_UNROLL
    for (int i = 1; i < WKV_SUB; i++)
      if (tb + i < te) {
        const float k = K(tb + i - w0);
        kmin = fminf(kmin, k);
        kmax = fmaxf(kmax, k);
      }
    R = fmaxf(p, kmax + fmaxf(u, 0.f));
    if (g.s > 0) {
      R = fmaxf(R, M.mP);
      // the later segments that the sub-chunk enters
      for (int r = M.r + 1, rest = M.pos + (te - tb) - g.s; rest > 0; r++, rest -= g.s)
        R = fmaxf(R, ms_p[((size_t)b * g.J + r) * g.C + c]);
    }
    return WKV_SCALED && R - u - kmin <= WKV_SPAN;
  }
  // The medium sums of the cursor's segment on this scale.
  WKV_DEV void medium(const MedCursor& M) {
    const float e = ex(M.mP - R);
    mA = M.mA * e;
    mB = M.mB * e;
  }
  // Onto this scale: the token state (a, bb) of log scale p, and the cursor's medium sums.
  WKV_DEV void rescale(const MedCursor& M, float p, float& a, float& bb) {
    const float e = ex(p - R);
    a *= e; bb *= e;
    medium(M);
  }
  // Token (k, v) after the state (a, bb) (eu = e^u): the numerator and denominator of its output;
  // returns its own term e^{k - R}, with which past() moves the state past it (ew = e^-w).
  WKV_DEV float token(float k, float v, float eu, float a, float bb, float& num, float& den) const {
    const float x = ex(k - R), xu = eu * x;
    num = a + xu * v + mA;
    den = bb + xu + mB;
    return x;
  }
  WKV_DEV static void past(float x, float v, float ew, float& a, float& bb) {
    a = fmaf(ew, a, x * v);
    bb = fmaf(ew, bb, x);
  }
};

// Outputs of one chunk from its start state, in stretches of WKV_SUB tokens, each on the scaled path
// where its inputs allow.
struct FwdOut {
  float w, u, ew, eu, a, bb, p, pn;
  MedCursor M;
  in_t* y;
  WKV_DEV void init(const WkvFwdArgs& A, int b, int n, int c, int t0) {
    const WkvGeo& g = A.g;
    w = ex(A.td[c]); u = A.tf[c];
    ew = ex(-w); eu = ex(u);
    y = (in_t*)A.y + (size_t)b * g.T * g.C + c;
    const size_t o = ((size_t)b * g.NC + n) * g.C + c;
    a = A.cs_a[o]; bb = A.cs_b[o]; p = A.cs_p[o]; pn = 0.f;
    M.start(A.ms_a, A.ms_b, A.ms_p, g, b, c, t0);
  }
  WKV_DEV void run(const WkvFwdArgs& A, int b, int c, int w0, int w1, Col K, Col V) {
    const WkvGeo& g = A.g;
#pragma unroll 1
    for (int tb = w0; tb < w1; tb += WKV_SUB) {
      const int te = wkv_min(tb + WKV_SUB, w1);
      Scale S;
      const float pc = cur_p(p, pn, w);
      if (S.init(g, A.ms_p, b, c, M, tb, te, w0, K, pc, u)) {
        S.rescale(M, pc, a, bb);
        WKV_UNROLL
        for (int i = 0; i < WKV_SUB; i++) {
          if (tb + i < te) {
            if (M.enter(A.ms_a, A.ms_b, A.ms_p, g, b, c)) S.medium(M);
            const float vx = V(tb + i - w0);
            float num, den;
            const float x = S.token(K(tb + i - w0), vx, eu, a, bb, num, den);
            y[(size_t)(tb + i) * g.C] = from_f(dv(num, den));
            Scale::past(x, vx, ew, a, bb);
            M.pos++;
          }
        }
        p = S.R; pn = 0.f;
      } else {
        each_token<U, false>(tb, te, K.from(tb - w0), V.from(tb - w0), Col{nullptr, 0},
                             [&](int t, float k, float v, float gy) {
          M.enter(A.ms_a, A.ms_b, A.ms_p, g, b, c);
          const float pq = cur_p(p, pn, w);
          y[(size_t)t * g.C] = from_f(tok_out(a, bb, pq, k, v, u, M.mA, M.mB, M.mP).y);
          dec_add(a, bb, p, pn, w, 1.f, v, 1.f, k);
          M.pos++;
        });
      }
    }
  }
};

// ---------------------------------------------------------------- backward
// Where the token state before sub-chunk j of chunk n is saved (bwd_local) for bwd_out: (B, NC * CH / SUB, C).
WKV_DEV size_t ss_index(const WkvGeo& g, int b, int n, int j, int c) {
  constexpr int NS = WKV_CH / WKV_SUB;
  return ((size_t)b * g.NC * NS + (size_t)n * NS + j) * g.C + c;
}

// Chunk-local sums of the output adjoints: gN_t = gy_t / D_t and gD_t = -gy_t y_t / D_t,
// (1) decayed to the chunk start: sum_t e^{-(t-t0) w} gN_t, (2) per segment (undecayed).
// Also saves the token state at every sub-chunk start, for bwd_out.
struct BwdLocal {
  float w, u, ew, eu, a, bb, p, pn;
  MedCursor M;
  float ra, rb, rp;   // reverse sum decayed to t0
  float sa, sb, sp;   // segment sum
  int t0;
  WKV_DEV void init(const WkvBwdArgs& A, int b, int n, int c, int t0_) {
    const WkvGeo& g = A.g;
    t0 = t0_;
    w = ex(A.td[c]); u = A.tf[c];
    ew = ex(-w); eu = ex(u);
    const size_t o = ((size_t)b * g.NC + n) * g.C + c;
    a = A.cs_a[o]; bb = A.cs_b[o]; p = A.cs_p[o]; pn = 0.f;
    M.start(A.ms_a, A.ms_b, A.ms_p, g, b, c, t0);
    ra = 0.f; rb = 0.f; rp = WKV_NEG;
    sa = 0.f; sb = 0.f; sp = WKV_NEG;
  }
  // Segment r ends at token t in this chunk (s <= WKV_CH): its sum goes out.
  WKV_DEV void segment_end(const WkvBwdArgs& A, int b, int c) {
    const size_t os = ((size_t)b * A.g.npiece + M.r) * A.g.C + c;
    A.s_a[os] = sa; A.s_b[os] = sb; A.s_p[os] = sp;
    sa = 0.f; sb = 0.f; sp = WKV_NEG;
  }
  // The window [w0, w1) in sub-chunks of WKV_SUB tokens (the windows start at sub-chunk starts), each on
  // the scaled path (see Scale) where its inputs allow.
  WKV_DEV void run(const WkvBwdArgs& A, int b, int n, int c, int t1, int w0, int w1, Col K, Col V, Col G) {
    const WkvGeo& g = A.g;
#pragma unroll 1
    for (int tb = w0; tb < w1; tb += WKV_SUB) {
      const int te = wkv_min(tb + WKV_SUB, w1);
      const float pc = cur_p(p, pn, w);
      {   // the sub-chunk's start state, for bwd_out
        const size_t oss = ss_index(g, b, n, (tb - t0) / WKV_SUB, c);
        A.ss_a[oss] = a; A.ss_b[oss] = bb; A.ss_p[oss] = pc;
      }
      Scale S;
      if (S.init(g, A.ms_p, b, c, M, tb, te, w0, K, pc, u)) {
        S.rescale(M, pc, a, bb);
        // The sub-chunk's output adjoints gy / D on the scale e^{-R}: decayed to tb (Ra, Rb), and undecayed
        // for the current segment (Sa, Sb).
        float Ra = 0.f, Rb = 0.f, f = 1.f, Sa = 0.f, Sb = 0.f;
        WKV_UNROLL
        for (int i = 0; i < WKV_SUB; i++) {
          const int t = tb + i;
          if (t < te) {
            if (M.enter(A.ms_a, A.ms_b, A.ms_p, g, b, c)) S.medium(M);
            const float vx = V(t - w0);
            float num, den;
            const float x = S.token(K(t - w0), vx, eu, a, bb, num, den);
            const float y = dv(num, den), tg = dv(G(t - w0), den);
            Ra = fmaf(f, tg, Ra);
            Rb = fmaf(-f * tg, y, Rb);
            f *= ew;
            if (g.s > 0) {
              Sa += tg;
              Sb = fmaf(-tg, y, Sb);
              if (g.s <= WKV_CH && (M.pos == g.s - 1 || t == t1 - 1)) {   // segment r ends in this chunk
                lse_add(sa, sb, sp, Sa, Sb, -S.R);
                segment_end(A, b, c);
                Sa = 0.f; Sb = 0.f;
              }
            }
            Scale::past(x, vx, ew, a, bb);
            M.pos++;
          }
        }
        lse_add(ra, rb, rp, Ra, Rb, -S.R - (float)(tb - t0) * w);
        if (g.s > 0) lse_add(sa, sb, sp, Sa, Sb, -S.R);
        p = S.R; pn = 0.f;
      } else {
        each_token<UB, true>(tb, te, K.from(tb - w0), V.from(tb - w0), G.from(tb - w0),
                             [&](int t, float k, float v, float gy) {
          M.enter(A.ms_a, A.ms_b, A.ms_p, g, b, c);
          const float pq = cur_p(p, pn, w);
          const TokOut q = tok_out(a, bb, pq, k, v, u, M.mA, M.mB, M.mP);
          const float gn = dv(gy, q.den);
          lse_add(ra, rb, rp, gn, -gn * q.y, -(float)(t - t0) * w - q.m);
          if (g.s > 0) {
            lse_add(sa, sb, sp, gn, -gn * q.y, -q.m);
            if (g.s <= WKV_CH && (M.pos == g.s - 1 || t == t1 - 1)) segment_end(A, b, c);   // segment r ends
          }
          dec_add(a, bb, p, pn, w, 1.f, v, 1.f, k);
          M.pos++;
        });
      }
    }
  }
  WKV_DEV void finish(const WkvBwdArgs& A, int b, int n, int c) {
    const WkvGeo& g = A.g;
    const size_t o = ((size_t)b * g.NC + n) * g.C + c;
    A.r_a[o] = ra; A.r_b[o] = rb; A.r_p[o] = rp;
    if (g.s > WKV_CH) {
      const size_t os = ((size_t)b * g.npiece + n) * g.C + c;
      A.s_a[os] = sa; A.s_b[os] = sb; A.s_p[os] = sp;
    }
  }
};

// Adjoint of the token state, walked from the end (phase A, B, C as in the forward). r_* holds each
// chunk's local reverse sum (bwd_local) and receives the adjoint of the state at each chunk's end.
WKV_DEV void bwd_tokens_group_sum(const WkvBwdArgs& A, int b, int gi, int c) {
  tokens_group_sum<SB, true>(A, Rows<3>{{A.r_a, A.r_b, A.r_p}}, b, gi, c);
}

WKV_DEV void bwd_tokens_group_scan(const WkvBwdArgs& A, int b, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float w = ex(A.td[c]);
  float a = ld_or(A.gaaT, bc, 0.f), bb = ld_or(A.gbbT, bc, 0.f), p = -A.ppT[bc], pn = 0.f;
  const Rows<3> xs{{A.tg_a, A.tg_b, A.tg_p}};
  each_row<SB, true, 3>(0, g.NG, xs, (size_t)b * g.NG * g.C + c, g.C, [&](int gi, const float* x) {
    const size_t o = ((size_t)b * g.NG + gi) * g.C + c;
    A.tg_a[o] = a; A.tg_b[o] = bb; A.tg_p[o] = cur_p(p, pn, w);
    dec_add(a, bb, p, pn, w, (float)group_len(g, gi), x[0], x[1], x[2]);
  });
}

// Phase C: the adjoint at each chunk end of group gi (into r_*); group 0 writes the gradients of the
// incoming token state.
WKV_DEV void bwd_tokens_chunk_ends(const WkvBwdArgs& A, int b, int gi, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float w = ex(A.td[c]);
  float Ra, Rb, Rp, Rn = 0.f;
  if (g.NG == 1) {
    Ra = ld_or(A.gaaT, bc, 0.f); Rb = ld_or(A.gbbT, bc, 0.f); Rp = -A.ppT[bc];
  } else {
    const size_t o = ((size_t)b * g.NG + gi) * g.C + c;
    Ra = A.tg_a[o]; Rb = A.tg_b[o]; Rp = A.tg_p[o];
  }
  int n0, n1;
  group_range(gi, g.GT, g.NC, n0, n1);
  const Rows<3> xs{{A.r_a, A.r_b, A.r_p}};
  each_row<SB, true, 3>(n0, n1, xs, (size_t)b * g.NC * g.C + c, g.C, [&](int n, const float* x) {
    const size_t o = ((size_t)b * g.NC + n) * g.C + c;
    A.r_a[o] = Ra; A.r_b[o] = Rb; A.r_p[o] = cur_p(Rp, Rn, w);
    dec_add(Ra, Rb, Rp, Rn, w, (float)chunk_len(g, n), x[0], x[1], x[2]);
  });
  if (gi == 0) {
    Rp = cur_p(Rp, Rn, w);
    const float aa0 = ld_or(A.aa, bc, 0.f), bb0 = ld_or(A.bb, bc, 0.f);
    const float e = ex(Rp + ld_or(A.pp, bc, WKV_NEG));
    const float ga = Ra * e, gb = Rb * e;
    A.gaa[bc] = ga; A.gbb[bc] = gb; A.gpp[bc] = ga * aa0 + gb * bb0;
  }
}

// Adjoint of the medium state, from the last segment back: before segment r's step it is M; the step
// is M <- e^{-wm} M + (the output adjoints of segment r's tokens, s_*) + (at r == complete: the
// gradient of the outgoing medium state). `sa, sb, sp`: segment r's sum when s <= WKV_CH (one piece
// a segment), else its pieces are read here.
WKV_DEV void med_adj_step(const WkvBwdArgs& A, int b, int c, int r, float& Ma, float& Mb, float& Mp, float& Mn,
                          float wm, float sa, float sb, float sp) {
  const WkvGeo& g = A.g;
  Mn += 1.f;
  if (g.s <= WKV_CH) {
    dec_add(Ma, Mb, Mp, Mn, wm, 0.f, sa, sb, sp);
  } else {
    const int n0 = wkv_max(r * g.nsub - g.c_first, 0);
    const int n1 = wkv_min((r + 1) * g.nsub - g.c_first, g.NC);
    for (int n = n0; n < n1; n++) {
      const size_t os = ((size_t)b * g.npiece + n) * g.C + c;
      dec_add(Ma, Mb, Mp, Mn, wm, 0.f, A.s_a[os], A.s_b[os], A.s_p[os]);
    }
  }
  if (r == g.complete) {
    const size_t bc = (size_t)b * g.C + c;
    dec_add(Ma, Mb, Mp, Mn, wm, 0.f, ld_or(A.gmaT, bc, 0.f), ld_or(A.gmbT, bc, 0.f), -A.mpT[bc]);
  }
}

// Segment r's pieces as rows of each_row: with s <= WKV_CH one piece a segment (npiece == J), so
// they are read with the segment's other inputs; else none (med_adj_step reads them).
#define MED_ROWS(NA, ...)                                                                 \
  if (g.s <= WKV_CH) {                                                                  \
    const Rows<NA + 3> xs{{__VA_ARGS__, A.s_a, A.s_b, A.s_p}};                       \
    each_row<SB, true, NA + 3>(r0, r1, xs, (size_t)b * g.J * g.C + c, g.C, step);       \
  } else {                                                                              \
    const Rows<NA> xs{{__VA_ARGS__}};                                                \
    each_row<SB, true, NA>(r0, r1, xs, (size_t)b * g.J * g.C + c, g.C, step);           \
  }

WKV_DEV void bwd_mediums_group_sum(const WkvBwdArgs& A, int b, int gm, int c) {
  const WkvGeo& g = A.g;
  const float wm = ex(A.md[c]);
  int r0, r1;
  group_range(gm, g.GJ, g.J, r0, r1);
  float Ma = 0.f, Mb = 0.f, Mp = WKV_NEG, Mn = 0.f;
  if (g.s <= WKV_CH) {
    const Rows<3> xs{{A.s_a, A.s_b, A.s_p}};
    each_row<SB, true, 3>(r0, r1, xs, (size_t)b * g.J * g.C + c, g.C, [&](int r, const float* x) {
      med_adj_step(A, b, c, r, Ma, Mb, Mp, Mn, wm, x[0], x[1], x[2]);
    });
  } else {
    for (int r = r1 - 1; r >= r0; r--) med_adj_step(A, b, c, r, Ma, Mb, Mp, Mn, wm, 0.f, 0.f, WKV_NEG);
  }
  const size_t o = ((size_t)b * g.NGM + gm) * g.C + c;
  A.mg_a[o] = Ma; A.mg_b[o] = Mb; A.mg_p[o] = cur_p(Mp, Mn, wm);
}

WKV_DEV void bwd_mediums_group_scan(const WkvBwdArgs& A, int b, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float wm = ex(A.md[c]);
  float Ma = 0.f, Mb = 0.f, Mp = WKV_NEG, Mn = 0.f;
  if (g.complete == g.J) { Ma = ld_or(A.gmaT, bc, 0.f); Mb = ld_or(A.gmbT, bc, 0.f); Mp = -A.mpT[bc]; }
  const Rows<3> xs{{A.mg_a, A.mg_b, A.mg_p}};
  each_row<SB, true, 3>(0, g.NGM, xs, (size_t)b * g.NGM * g.C + c, g.C, [&](int gm, const float* x) {
    const size_t o = ((size_t)b * g.NGM + gm) * g.C + c;
    A.mg_a[o] = Ma; A.mg_b[o] = Mb; A.mg_p[o] = cur_p(Mp, Mn, wm);
    int r0, r1;
    group_range(gm, g.GJ, g.J, r0, r1);
    dec_add(Ma, Mb, Mp, Mn, wm, (float)(r1 - r0), x[0], x[1], x[2]);
  });
}

// Phase C: gmk, gmv of each segment of group gm and the group's part of medium_decay's gradient
// (pwm); group 0 writes the gradients of the incoming medium state.
WKV_DEV void bwd_mediums_out(const WkvBwdArgs& A, int b, int gm, int c) {
  const WkvGeo& g = A.g;
  const size_t bc = (size_t)b * g.C + c;
  const float wm = ex(A.md[c]);
  float Ma = 0.f, Mb = 0.f, Mp = WKV_NEG, Mn = 0.f;
  if (g.NGM == 1) {
    if (g.complete == g.J) { Ma = ld_or(A.gmaT, bc, 0.f); Mb = ld_or(A.gmbT, bc, 0.f); Mp = -A.mpT[bc]; }
  } else {
    const size_t o = ((size_t)b * g.NGM + gm) * g.C + c;
    Ma = A.mg_a[o]; Mb = A.mg_b[o]; Mp = A.mg_p[o];
  }
  int r0, r1;
  group_range(gm, g.GJ, g.J, r0, r1);
  float acc = 0.f;
  auto step = [&](int r, const auto& x) {   // x: mk, mv, ms_a, ms_b, ms_p (, s_a, s_b, s_p)
    const size_t o = ((size_t)b * g.J + r) * g.C + c;
    const float Mc = cur_p(Mp, Mn, wm);
    const float e = ex(x[0] + Mc);
    A.gmv[o] = Ma * e;
    A.gmk[o] = (x[1] * Ma + Mb) * e;
    acc += (x[2] * Ma + x[3] * Mb) * ex(x[4] + Mc - wm);
    if constexpr (sizeof(x) / sizeof(x[0]) == 8) med_adj_step(A, b, c, r, Ma, Mb, Mp, Mn, wm, x[5], x[6], x[7]);
    else med_adj_step(A, b, c, r, Ma, Mb, Mp, Mn, wm, 0.f, 0.f, WKV_NEG);
  };
  MED_ROWS(5, A.mk, A.mv, A.ms_a, A.ms_b, A.ms_p)
  A.pwm[((size_t)b * g.NGM + gm) * g.C + c] = acc;
  if (gm == 0) {
    Mp = cur_p(Mp, Mn, wm);
    const float ma0 = ld_or(A.ma, bc, 0.f), mb0 = ld_or(A.mb, bc, 0.f);
    const float e = ex(Mp + ld_or(A.mp, bc, WKV_NEG));
    const float ga = Ma * e, gb = Mb * e;
    A.gma[bc] = ga; A.gmb[bc] = gb; A.gmp[bc] = ga * ma0 + gb * mb0;
  }
}
#undef MED_ROWS

// Gradients of k and v of one chunk: walk it backwards in sub-chunks of WKV_SUB tokens, whose
// forward states are recomputed from the sub-chunk start states saved by bwd_local. The adjoint of
// the token state is carried as (ga, gb) * exp(cur_p(gq, gn, w)). The windows come last first.
struct Adj { float ga, gb, gq, gn, gw, gu; };

// M: the medium cursor at tb. (The scaled path, tried here in v18, was no faster: k_bwd_out is bound
// by its memory traffic and the latency of its loads more than by its instructions.)
WKV_DEV void bwd_out_sub(const WkvBwdArgs& A, int b, int c, int w0, int tb, int te, MedCursor M, float a, float bb,
                         float p, Col K, Col V, Col G, in_t* gk, in_t* gv, float w, float u, Adj& J) {
  const WkvGeo& g = A.g;
  float ta[WKV_SUB], tbb[WKV_SUB], tp[WKV_SUB], tm[WKV_SUB], tgn[WKV_SUB], ty[WKV_SUB], tgx[WKV_SUB];
  float pn = 0.f;
  WKV_UNROLL
  for (int i = 0; i < WKV_SUB; i++) {
    if (tb + i < te) {
      M.enter(A.ms_a, A.ms_b, A.ms_p, g, b, c);
      const float pc = cur_p(p, pn, w);
      const float kx = K(tb + i - w0), vx = V(tb + i - w0);
      const TokOut q = tok_out(a, bb, pc, kx, vx, u, M.mA, M.mB, M.mP);
      ta[i] = a; tbb[i] = bb; tp[i] = pc;
      tm[i] = q.m; tgn[i] = dv(G(tb + i - w0), q.den); ty[i] = q.y; tgx[i] = q.eu * tgn[i];
      dec_add(a, bb, p, pn, w, 1.f, vx, 1.f, kx);
      M.pos++;
    }
  }
  WKV_UNROLL
  for (int i = WKV_SUB - 1; i >= 0; i--) {
    const int t = tb + i;
    if (t < te) {
      // (ga, gb, gq): adjoint of the token state after t (A_{t+1}, B_{t+1}).
      const float gc = cur_p(J.gq, J.gn, w);
      const float kx = K(t - w0), vx = V(t - w0);
      const float x = tgx[i];
      const float ek = ex(kx + gc);
      const float dy = vx - ty[i];
      gv[(size_t)t * g.C] = from_f(x + ek * J.ga);
      gk[(size_t)t * g.C] = from_f(x * dy + ek * (J.ga * vx + J.gb));
      J.gu += x * dy;
      J.gw += (ta[i] * J.ga + tbb[i] * J.gb) * ex(tp[i] + gc - w);
      dec_add(J.ga, J.gb, J.gq, J.gn, w, 1.f, tgn[i], -tgn[i] * ty[i], -tm[i]);
    }
  }
}

struct BwdOut {
  float w, u;
  Adj J;   // adjoint of the state after the part of the chunk walked so far
  in_t *gk, *gv;
  // The state before each sub-chunk (saved by bwd_local) is fetched one sub-chunk ahead: on the GPU
  // by asynchronous copies into this thread's two slots of 3 floats in shared memory (slot[k * NTHREADS],
  // k = 3 * (j & 1) + q), so that neither the load's latency nor registers are spent; on the host
  // read when needed.
  float* slot;
  static constexpr int SLOT_FLOATS = 6;   // shared-memory floats a thread: two slots of 3
  WKV_DEV void fetch(const WkvBwdArgs& A, int b, int n, int c, int j) {
#if defined(__CUDACC__)
    const size_t oss = ss_index(A.g, b, n, j, c);
    float* d = slot + 3 * (j & 1) * NTHREADS;
    __pipeline_memcpy_async(d, A.ss_a + oss, 4);
    __pipeline_memcpy_async(d + NTHREADS, A.ss_b + oss, 4);
    __pipeline_memcpy_async(d + 2 * NTHREADS, A.ss_p + oss, 4);
    __pipeline_commit();
#endif
  }
  // The state before sub-chunk j (fetched), once sub-chunk j - 1's fetch is issued where j > 0.
  WKV_DEV void take(const WkvBwdArgs& A, int b, int n, int c, int j, float& a, float& bb, float& p) {
#if defined(__CUDACC__)
    if (j > 0) __pipeline_wait_prior(1);
    else __pipeline_wait_prior(0);
    const float* d = slot + 3 * (j & 1) * NTHREADS;
    a = d[0]; bb = d[NTHREADS]; p = d[2 * NTHREADS];
#else
    const size_t oss = ss_index(A.g, b, n, j, c);
    a = A.ss_a[oss]; bb = A.ss_b[oss]; p = A.ss_p[oss];
#endif
  }
  WKV_DEV void init(const WkvBwdArgs& A, int b, int n, int c, int t0, int t1, float* slot_) {
    slot = slot_;
    const WkvGeo& g = A.g;
    w = ex(A.td[c]); u = A.tf[c];
    const size_t base_bt = (size_t)b * g.T * g.C + c;
    gk = (in_t*)A.gk + base_bt;
    gv = (in_t*)A.gv + base_bt;
    const size_t o = ((size_t)b * g.NC + n) * g.C + c;
    J = Adj{A.r_a[o], A.r_b[o], A.r_p[o], 0.f, 0.f, 0.f};
    fetch(A, b, n, c, (t1 - t0 - 1) / WKV_SUB);
  }
  // The window [w0, w1) of the chunk starting at t0, its sub-chunks last first.
  WKV_DEV void run(const WkvBwdArgs& A, int b, int n, int c, int t0, int w0, int w1, Col K, Col V, Col G) {
    const WkvGeo& g = A.g;
    const int j0 = (w0 - t0) / WKV_SUB, j1 = (w1 - t0 + WKV_SUB - 1) / WKV_SUB;
#pragma unroll 1
    for (int j = j1 - 1; j >= j0; j--) {
      const int tb = t0 + j * WKV_SUB, te = wkv_min(tb + WKV_SUB, w1);
      if (j > 0) fetch(A, b, n, c, j - 1);
      float a, bb, p;   // the state before tb
      take(A, b, n, c, j, a, bb, p);
      MedCursor M;
      M.start(A.ms_a, A.ms_b, A.ms_p, g, b, c, tb);
      bwd_out_sub(A, b, c, w0, tb, te, M, a, bb, p, K, V, G, gk, gv, w, u, J);
    }
  }
  WKV_DEV void finish(const WkvBwdArgs& A, int b, int n, int c) {
    const size_t o = ((size_t)b * A.g.NC + n) * A.g.C + c;
    A.pw[o] = J.gw;
    A.pu[o] = J.gu;
  }
};

// Per c: fixed-order sums of the per-chunk partial gradients of time_decay, time_first, medium_decay.
// The rows (b, chunk) are split into `parts` interleaved parts (rows part, part + parts, ...), each
// summed in order; the kernel gives each part a thread and adds the parts in order (deterministic).
WKV_DEV void bwd_reduce_part(const WkvBwdArgs& A, int c, int part, int parts, float& sw, float& su) {
  const WkvGeo& g = A.g;
  sw = 0.f; su = 0.f;
  const int rows = g.B * g.NC;
  for (int i = part; i < rows; i += parts) {
    sw += A.pw[(size_t)i * g.C + c];
    su += A.pu[(size_t)i * g.C + c];
  }
}

WKV_DEV void bwd_reduce_finish(const WkvBwdArgs& A, int c, float sw, float su) {
  const WkvGeo& g = A.g;
  const float w = ex(A.td[c]);
  A.gtd[c] = -w * sw;
  A.gtf[c] = su;
  if (g.s > 0) {
    float sm = 0.f;
    for (int i = 0; i < g.B * g.NGM; i++) sm += A.pwm[(size_t)i * g.C + c];
    A.gmd[c] = -ex(A.md[c]) * sm;
  }
}
