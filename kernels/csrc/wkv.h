// WKV with retrospection (RRWKV, docs in shared/design/rrwkv.md): shared declarations of the CUDA
// kernels (wkv.cu, compiled by nvcc without torch headers), their CPU build for the tests
// (wkv_host.cpp, WKV_HOST) and the torch binding (wkv.cpp).
#pragma once
#include <stddef.h>
#ifndef WKV_HOST
#include <cuda_runtime.h>
#endif

#define WKV_CH 64     // longest time chunk handled by one thread
#ifndef WKV_SUB
#define WKV_SUB 8     // backward: tokens kept in registers while walking a chunk in reverse
#endif
#define WKV_NEG (-1e38f)
#define NTHREADS 128  // threads of a chunk kernel's block (channels of its tile)
// Chunk kernels: tokens of inputs staged in shared memory at a time (a multiple of WKV_SUB, at most
// WKV_CH), and how many such windows are in flight (2: the next window's copy overlaps this one's work).
#ifndef WKV_WIN
#define WKV_WIN 32
#endif
#ifndef WKV_NBUF
#define WKV_NBUF 1
#endif
#if WKV_WIN % WKV_SUB != 0 || WKV_WIN > WKV_CH || WKV_WIN <= 0
#error "WKV_WIN must be a positive multiple of WKV_SUB, at most WKV_CH"
#endif

// Time chunking. Positions are counted in "absolute" coordinates q = phase + t, so that segment j
// covers q in [j*s, (j+1)*s). Chunks never straddle a segment boundary when s > WKV_CH, and hold
// whole segments when 0 < s <= WKV_CH (chunk length L = s * floor(WKV_CH / s)).
struct WkvGeo {
  int B, T, C;
  int s;        // medium interval (0: no mediums)
  int phase;    // position within its segment at which the chunk starts (0 <= phase < s)
  int L;        // chunk length (s == 0 or s <= CH), or sub-segment piece length (s > CH)
  int nsub;     // pieces per segment when s > CH (else 1)
  int c_first;  // absolute index of the first chunk
  int NC;       // number of chunks overlapping [phase, phase + T)
  int J;        // number of mediums (segments touched): ceil((phase + T) / s)
  int complete; // segments complete at the end: (phase + T) / s
  int npiece;   // segment-sum pieces written by the backward: J (s <= CH) or NC (s > CH)
  int GT, NG;   // scans over chunks: chunks per group, groups (NG == 1: one level)
  int GJ, NGM;  // scans over segments: segments per group, groups (0 without mediums)
};

// Two-level scans (wkv_algo.h) from WKV_GROUP_MIN chunks (segments) a sequence on, in groups of
// WKV_GROUP; shorter sequences are scanned in one level.
#define WKV_GROUP 16
#ifndef WKV_GROUP_MIN
#define WKV_GROUP_MIN 128
#endif

#if defined(__CUDACC__)
#define WKV_HD __host__ __device__ __forceinline__
#else
#define WKV_HD inline
#endif

WKV_HD int wkv_min(int a, int b) { return a < b ? a : b; }
WKV_HD int wkv_max(int a, int b) { return a > b ? a : b; }

WKV_HD void wkv_set_groups(WkvGeo& g) {
  g.GT = g.NC >= WKV_GROUP_MIN ? WKV_GROUP : (g.NC > 0 ? g.NC : 1);
  g.NG = (g.NC + g.GT - 1) / g.GT;
  g.GJ = g.J >= WKV_GROUP_MIN ? WKV_GROUP : (g.J > 0 ? g.J : 1);
  g.NGM = (g.J + g.GJ - 1) / g.GJ;
}

// Token range [t0, t1) of relative chunk n.
WKV_HD void wkv_chunk_range(const WkvGeo& g, int n, int& t0, int& t1) {
  int c = g.c_first + n, q0, q1;
  if (g.s == 0 || g.s <= WKV_CH) {
    q0 = c * g.L;
    q1 = q0 + g.L;
  } else {
    int j = c / g.nsub, i = c - j * g.nsub;
    q0 = j * g.s + i * g.L;
    q1 = wkv_min(q0 + g.L, (j + 1) * g.s);
  }
  t0 = wkv_max(q0 - g.phase, 0);
  t1 = wkv_min(q1 - g.phase, g.T);
}

WKV_HD WkvGeo wkv_make_geo(int B, int T, int C, int s, int phase) {
  WkvGeo g;
  g.B = B; g.T = T; g.C = C; g.s = s; g.phase = s > 0 ? phase : 0;
  if (s == 0) {
    g.L = WKV_CH; g.nsub = 1; g.c_first = 0; g.NC = (T + WKV_CH - 1) / WKV_CH;
    g.J = 0; g.complete = 0; g.npiece = 0;
    wkv_set_groups(g);
    return g;
  }
  int q_last = g.phase + T - 1;
  g.J = (g.phase + T + s - 1) / s;
  g.complete = (g.phase + T) / s;
  if (s <= WKV_CH) {
    g.L = s * (WKV_CH / s); g.nsub = 1; g.c_first = 0;
    g.NC = q_last / g.L + 1;
    g.npiece = g.J;
  } else {
    g.nsub = (s + WKV_CH - 1) / WKV_CH;
    g.L = (s + g.nsub - 1) / g.nsub;
    g.c_first = g.phase / g.L;
    int j = q_last / s, i = (q_last - j * s) / g.L;
    g.NC = j * g.nsub + i - g.c_first + 1;
    g.npiece = g.NC;
  }
  wkv_set_groups(g);
  return g;
}

// A sum S = sum_i exp(x_i) * (value) kept as (a, b, p): S_v = a * exp(p), S_1 = b * exp(p).
struct WkvFwdArgs {
  WkvGeo g;
  const float *td, *tf, *md;          // (C,) raw parameters
  const void *k, *v;                  // (B, T, C) input dtype
  const float *mk, *mv;               // (B, J, C)
  const float *aa, *bb, *pp;          // (B, C) incoming token state
  const float *ma, *mb, *mp;          // (B, C) incoming medium state
  void* y;                            // (B, T, C) input dtype
  float *aaT, *bbT, *ppT, *maT, *mbT, *mpT;  // (B, C) outgoing state
  float *cs_a, *cs_b, *cs_p;          // (B, NC, C) token state at each chunk start (saved)
  float *ms_a, *ms_b, *ms_p;          // (B, J, C) medium state before each segment (saved)
  float *loc_a, *loc_b, *loc_p;       // (B, NC, C) scratch: chunk-local sums
  float *tg_a, *tg_b, *tg_p;          // (B, NG, C) scratch: token groups' sums, then start states
  float *mg_a, *mg_b, *mg_p;          // (B, NGM, C) scratch: medium groups' sums, then start states
};

struct WkvBwdArgs {
  WkvGeo g;
  const float *td, *tf, *md;
  const void *k, *v, *gy;
  const float *mk, *mv;
  const float *aa, *bb, *pp, *ma, *mb, *mp;        // incoming state (B, C)
  const float *ppT, *mpT;                          // outgoing running maxima (B, C)
  const float *gaaT, *gbbT, *gmaT, *gmbT;          // gradients of the outgoing state (B, C)
  const float *cs_a, *cs_b, *cs_p, *ms_a, *ms_b, *ms_p;  // saved by the forward
  void *gk, *gv;                                   // (B, T, C) input dtype
  float *gtd, *gtf, *gmd;                          // (C,)
  float *gmk, *gmv;                                // (B, J, C)
  float *gaa, *gbb, *gpp, *gma, *gmb, *gmp;        // (B, C)
  // scratch
  float *r_a, *r_b, *r_p;        // (B, NC, C): chunk-local reverse sums, then the adjoint at each chunk end
  float *s_a, *s_b, *s_p;        // (B, npiece, C): per-segment sums of the output adjoints
  float *pw, *pu;                // (B, NC, C): partial gradients of time_decay, time_first
  float *pwm;                    // (B, NGM, C): partial gradients of medium_decay
  float *tg_a, *tg_b, *tg_p;     // (B, NG, C): token groups' adjoint sums, then adjoints at their ends
  float *mg_a, *mg_b, *mg_p;     // (B, NGM, C): medium groups' adjoint sums, then adjoints
  float *ss_a, *ss_b, *ss_p;     // (B, NC * CH / SUB, C): token state at each sub-chunk start
};

const char* wkv_dtype_name();
#ifdef WKV_HOST
// The same computation on the CPU (wkv_host.cpp).
void wkv_forward_host(const WkvFwdArgs& a);
void wkv_backward_host(const WkvBwdArgs& a);
#else
// Returns the first CUDA error of the launches (cudaSuccess when all went well).
cudaError_t wkv_forward_launch(const WkvFwdArgs& a, cudaStream_t stream);
cudaError_t wkv_backward_launch(const WkvBwdArgs& a, cudaStream_t stream);
#endif
