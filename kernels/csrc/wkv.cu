// WKV with retrospection: forward and backward CUDA kernels (see kernels/NOTES.md for the design).
//
// Per channel c (all scalars per channel), w = exp(time_decay), u = time_first, wm = exp(medium_decay):
//   A_{t+1} = e^{-w} A_t + e^{k_t} v_t            (token sums, B_t likewise with v -> 1)
//   M_{r+1} = e^{-wm} M_r + e^{mk_r} mv_r           (medium sums, folded at segment ends)
//   y_t = (A_t + e^{u+k_t} v_t + MA_{r(t)}) / (B_t + e^{u+k_t} + MB_{r(t)})
// Every sum is kept in log space as (a, b, p) with a running maximum p.
//
// Parallel over (batch, time chunk, channel); one thread per (b, chunk, c), channels contiguous so
// that each warp reads 32 consecutive elements. Forward: (1) chunk-local sums, (2) a scan over
// chunks per (b, c) (also the medium recurrence, J = T/s steps), (3) outputs. Backward: (1) chunk-
// local sums of the output adjoints (recomputing the forward inside the chunk from the saved chunk-
// start state), (2) a reverse scan over chunks and the medium backward, (3) the gradients of k, v
// walking each chunk in reverse in sub-chunks of WKV_SUB tokens, (4) a fixed-order reduction of the
// per-chunk partial gradients of time_decay, time_first, medium_decay. No atomics: deterministic.
#include "wkv.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <cuda_pipeline.h>

#ifndef WKV_DTYPE
#define WKV_DTYPE 0
#endif
#if WKV_DTYPE == 0
typedef __nv_bfloat16 in_t;
const char* wkv_dtype_name() { return "bfloat16"; }
#elif WKV_DTYPE == 1
typedef __half in_t;
const char* wkv_dtype_name() { return "float16"; }
#else
typedef float in_t;
const char* wkv_dtype_name() { return "float32"; }
#endif

#define NTHREADS 128
#define U 16
#define NSCAN 32  // threads per block of the scans (one per channel)
#define SB 8     // scans: loads of SB steps issued together
#define UB 4     // k_bwd_local: inputs come from shared memory, few registers buffered

__device__ __forceinline__ float ld(const float* p) { return __ldg(p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float lds(const float* p) { return *p; }
__device__ __forceinline__ float lds(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float lds(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void st(float* p, float x) { *p = x; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void st(__half* p, float x) { *p = __float2half_rn(x); }

// (a, b, p) += exp(x) * (va, vb)
// Exponential: the accurate expf for float32 inputs, the MUFU approximation (about 2 ulp, plus the
// rounding of x * log2(e)) for 16-bit inputs whose outputs are rounded to 8 or 11 bits anyway.
#if WKV_DTYPE == 2
__device__ __forceinline__ float ex(float x) { return expf(x); }
#else
__device__ __forceinline__ float ex(float x) { return __expf(x); }
#endif

// (a, b, p) += exp(x) * (va, vb). One exponential: the larger exponent becomes the new maximum.
__device__ __forceinline__ void lse_add(float& a, float& b, float& p, float va, float vb, float x) {
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
__device__ __forceinline__ float cur_p(float pr, float pn, float w) { return fmaf(-pn, w, pr); }
__device__ __forceinline__ void dec_add(float& a, float& b, float& pr, float& pn, float w, float steps,
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
#if WKV_DTYPE == 2
__device__ __forceinline__ float dv(float x, float y) { return x / y; }
#else
__device__ __forceinline__ float dv(float x, float y) { return __fdividef(x, y); }   // y >= 1 here
#endif
__device__ __forceinline__ float ld_or(const float* p, size_t i, float dflt) { return p ? p[i] : dflt; }

// Copy rows [0, rows) x channels [c0, c0 + NTHREADS) of a (rows, C) slab into shared memory
// sm[rows][NTHREADS]: 16-byte asynchronous copies when the slab allows (so that a whole chunk's
// loads are in flight at once, holding no registers), element copies otherwise (C not a multiple
// of 8 (bf16/fp16) or 4 (fp32), the last channel tile, unaligned base). Callers then wait + sync.
__device__ __forceinline__ void tile_load(in_t* __restrict__ sm, const in_t* __restrict__ gsrc, int rows, int C, int c0) {
  constexpr int PER = 16 / sizeof(in_t);
  constexpr int CPR = NTHREADS / PER;
  const bool vec = (C % PER == 0) && (c0 + NTHREADS <= C) &&
                   ((reinterpret_cast<uintptr_t>(gsrc) & 15) == 0);
  if (vec) {
    for (int i = threadIdx.x; i < rows * CPR; i += NTHREADS) {
      const int r = i / CPR, q = i - r * CPR;
      __pipeline_memcpy_async(sm + r * NTHREADS + q * PER, gsrc + (size_t)r * C + c0 + q * PER, 16);
    }
    __pipeline_commit();
  } else {
    for (int i = threadIdx.x; i < rows * NTHREADS; i += NTHREADS) {
      const int r = i / NTHREADS, q = i - r * NTHREADS;
      if (c0 + q < C) sm[i] = gsrc[(size_t)r * C + c0 + q];
    }
  }
}
#define TILE (WKV_CH * NTHREADS)
#define LOAD_TILES(NT, GY)                                                                \
  extern __shared__ __align__(16) unsigned char smraw[];                                \
  in_t* sk = reinterpret_cast<in_t*>(smraw);                                            \
  in_t* sv = sk + TILE;                                                                 \
  in_t* sg = NT > 2 ? sv + TILE : nullptr;                                              \
  {                                                                                     \
    const size_t row0 = ((size_t)b * g.T + t0) * g.C;                                   \
    const int c0 = blockIdx.x * NTHREADS;                                               \
    tile_load(sk, (const in_t*)A.k + row0, t1 - t0, g.C, c0);                          \
    tile_load(sv, (const in_t*)A.v + row0, t1 - t0, g.C, c0);                          \
    if (NT > 2) tile_load(sg, (const in_t*)(GY) + row0, t1 - t0, g.C, c0);            \
    __pipeline_wait_prior(0);                                                           \
    __syncthreads();                                                                    \
  }                                                                                     \
  const int tx = threadIdx.x;                                                           \
  if (c >= g.C) return;

// ---------------------------------------------------------------- forward
__global__ void __launch_bounds__(NTHREADS) k_fwd_local(WkvFwdArgs A) {
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = blockIdx.y, b = blockIdx.z;
  int t0, t1;
  wkv_chunk_range(g, n, t0, t1);
  LOAD_TILES(2, nullptr)
  const float w = ex(A.td[c]);
  float a = 0.f, bb = 0.f, p = WKV_NEG, pn = 0.f;
  for (int base = t0; base < t1; base += U) {
    float kb[U], vb[U];
#pragma unroll
    for (int i = 0; i < U; i++)
      if (base + i < t1) { kb[i] = lds(sk + (base + i - t0) * NTHREADS + tx); vb[i] = lds(sv + (base + i - t0) * NTHREADS + tx); }
#pragma unroll
    for (int i = 0; i < U; i++)
      if (base + i < t1) dec_add(a, bb, p, pn, w, 1.f, vb[i], 1.f, kb[i]);
  }
  const size_t o = ((size_t)b * g.NC + n) * g.C + c;
  A.loc_a[o] = a; A.loc_b[o] = bb; A.loc_p[o] = cur_p(p, pn, w);
}

__global__ void __launch_bounds__(NTHREADS) k_fwd_scan(WkvFwdArgs A) {
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int b = blockIdx.y;
  const size_t bc = (size_t)b * g.C + c;
  const float w = ex(A.td[c]);
  float a = ld_or(A.aa, bc, 0.f), bb = ld_or(A.bb, bc, 0.f), p = ld_or(A.pp, bc, WKV_NEG), pn = 0.f;
  // Loads of SB chunks are issued together (they do not depend on the recurrence).
  for (int n0 = 0; n0 < g.NC; n0 += SB) {
    float la[SB], lb[SB], lp[SB];
#pragma unroll
    for (int i = 0; i < SB; i++)
      if (n0 + i < g.NC) {
        const size_t o = ((size_t)b * g.NC + n0 + i) * g.C + c;
        la[i] = A.loc_a[o]; lb[i] = A.loc_b[o]; lp[i] = A.loc_p[o];
      }
#pragma unroll
    for (int i = 0; i < SB; i++)
      if (n0 + i < g.NC) {
        int t0, t1;
        wkv_chunk_range(g, n0 + i, t0, t1);
        const size_t o = ((size_t)b * g.NC + n0 + i) * g.C + c;
        A.cs_a[o] = a; A.cs_b[o] = bb; A.cs_p[o] = cur_p(p, pn, w);
        dec_add(a, bb, p, pn, w, (float)(t1 - t0), la[i], lb[i], lp[i]);
      }
  }
  A.aaT[bc] = a; A.bbT[bc] = bb; A.ppT[bc] = cur_p(p, pn, w);
  if (g.s > 0) {
    const float wm = ex(A.md[c]);
    a = ld_or(A.ma, bc, 0.f); bb = ld_or(A.mb, bc, 0.f); p = ld_or(A.mp, bc, WKV_NEG); pn = 0.f;
    for (int r0 = 0; r0 < g.J; r0 += SB) {
      float kk[SB], vv[SB];
#pragma unroll
      for (int i = 0; i < SB; i++)
        if (r0 + i < g.J) {
          const size_t o = ((size_t)b * g.J + r0 + i) * g.C + c;
          kk[i] = A.mk[o]; vv[i] = A.mv[o];
        }
#pragma unroll
      for (int i = 0; i < SB; i++)
        if (r0 + i < g.J) {
          const size_t o = ((size_t)b * g.J + r0 + i) * g.C + c;
          A.ms_a[o] = a; A.ms_b[o] = bb; A.ms_p[o] = cur_p(p, pn, wm);
          if (r0 + i < g.complete) dec_add(a, bb, p, pn, wm, 1.f, vv[i], 1.f, kk[i]);
        }
    }
    A.maT[bc] = a; A.mbT[bc] = bb; A.mpT[bc] = cur_p(p, pn, wm);
  }
}

__global__ void __launch_bounds__(NTHREADS) k_fwd_out(WkvFwdArgs A) {
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = blockIdx.y, b = blockIdx.z;
  int t0, t1;
  wkv_chunk_range(g, n, t0, t1);
  LOAD_TILES(2, nullptr)
  const float w = ex(A.td[c]), u = A.tf[c];
  const size_t base_bt = (size_t)b * g.T * g.C + c;
  in_t* __restrict__ y = (in_t*)A.y + base_bt;
  const size_t o = ((size_t)b * g.NC + n) * g.C + c;
  float a = A.cs_a[o], bb = A.cs_b[o], p = A.cs_p[o], pn = 0.f;
  float mA = 0.f, mB = 0.f, mP = WKV_NEG;
  int r = 0, pos = 0;
  if (g.s > 0) {
    r = (g.phase + t0) / g.s;
    pos = g.phase + t0 - r * g.s;
    const size_t om = ((size_t)b * g.J + r) * g.C + c;
    mA = A.ms_a[om]; mB = A.ms_b[om]; mP = A.ms_p[om];
  }
  for (int base = t0; base < t1; base += U) {
    float kb[U], vb[U];
#pragma unroll
    for (int i = 0; i < U; i++)
      if (base + i < t1) { kb[i] = lds(sk + (base + i - t0) * NTHREADS + tx); vb[i] = lds(sv + (base + i - t0) * NTHREADS + tx); }
#pragma unroll
    for (int i = 0; i < U; i++) {
      const int t = base + i;
      if (t < t1) {
        if (g.s > 0 && pos == g.s) {
          pos = 0; r++;
          const size_t om = ((size_t)b * g.J + r) * g.C + c;
          mA = A.ms_a[om]; mB = A.ms_b[om]; mP = A.ms_p[om];
        }
        const float pc = cur_p(p, pn, w);
        const float lu = u + kb[i];
        const float m = fmaxf(fmaxf(pc, lu), mP);
        const float e1 = ex(pc - m), e2 = ex(lu - m), em = ex(mP - m);
        const float num = e1 * a + e2 * vb[i] + em * mA;
        const float den = e1 * bb + e2 + em * mB;
        st(y + (size_t)t * g.C, dv(num, den));
        dec_add(a, bb, p, pn, w, 1.f, vb[i], 1.f, kb[i]);
        pos++;
      }
    }
  }
}

cudaError_t wkv_forward_launch(const WkvFwdArgs& A, cudaStream_t stream) {
  const WkvGeo& g = A.g;
  dim3 blk(NTHREADS);
  dim3 grid_chunks((g.C + NTHREADS - 1) / NTHREADS, g.NC, g.B);
  dim3 grid_scan((g.C + NSCAN - 1) / NSCAN, g.B);
  const int sm2 = 2 * TILE * sizeof(in_t);
  static bool attr[256] = {};   // the attribute is per device
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 256 || !attr[dev]) {
    cudaFuncSetAttribute(k_fwd_local, cudaFuncAttributeMaxDynamicSharedMemorySize, sm2);
    cudaFuncSetAttribute(k_fwd_out, cudaFuncAttributeMaxDynamicSharedMemorySize, sm2);
    if (dev >= 0 && dev < 256) attr[dev] = true;
  }
  k_fwd_local<<<grid_chunks, blk, sm2, stream>>>(A);
  k_fwd_scan<<<grid_scan, dim3(NSCAN), 0, stream>>>(A);
  k_fwd_out<<<grid_chunks, blk, sm2, stream>>>(A);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- backward
// Forward quantities of token t given the state before it: m (shared max), den, y.
struct TokOut { float m, den, y, eu; };   // eu = exp(u + k - m)
__device__ __forceinline__ TokOut tok_out(float a, float bb, float p, float k, float v, float u,
                                          float mA, float mB, float mP) {
  TokOut o;
  const float lu = u + k;
  o.m = fmaxf(fmaxf(p, lu), mP);
  const float e1 = ex(p - o.m), e2 = ex(lu - o.m), em = ex(mP - o.m);
  const float num = e1 * a + e2 * v + em * mA;
  o.den = e1 * bb + e2 + em * mB;
  o.y = dv(num, o.den);
  o.eu = e2;
  return o;
}

// Chunk-local sums of the output adjoints: gN_t = gy_t / D_t and gD_t = -gy_t y_t / D_t,
// (1) decayed to the chunk start: sum_t e^{-(t-t0) w} gN_t, (2) per segment (undecayed).
__global__ void __launch_bounds__(NTHREADS) k_bwd_local(WkvBwdArgs A) {
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = blockIdx.y, b = blockIdx.z;
  int t0, t1;
  wkv_chunk_range(g, n, t0, t1);
  LOAD_TILES(3, A.gy)
  const float w = ex(A.td[c]), u = A.tf[c];
  const size_t o = ((size_t)b * g.NC + n) * g.C + c;
  float a = A.cs_a[o], bb = A.cs_b[o], p = A.cs_p[o], pn = 0.f;
  float mA = 0.f, mB = 0.f, mP = WKV_NEG;
  int r = 0, pos = 0;
  if (g.s > 0) {
    r = (g.phase + t0) / g.s;
    pos = g.phase + t0 - r * g.s;
    const size_t om = ((size_t)b * g.J + r) * g.C + c;
    mA = A.ms_a[om]; mB = A.ms_b[om]; mP = A.ms_p[om];
  }
  float ra = 0.f, rb = 0.f, rp = WKV_NEG;   // reverse sum decayed to t0
  float sa = 0.f, sb = 0.f, sp = WKV_NEG;   // segment sum
  for (int base = t0; base < t1; base += UB) {
    float kb[UB], vb[UB], gb[UB];
#pragma unroll
    for (int i = 0; i < UB; i++)
      if (base + i < t1) {
        kb[i] = lds(sk + (base + i - t0) * NTHREADS + tx);
        vb[i] = lds(sv + (base + i - t0) * NTHREADS + tx);
        gb[i] = lds(sg + (base + i - t0) * NTHREADS + tx);
      }
#pragma unroll
    for (int i = 0; i < UB; i++) {
      const int t = base + i;
      if (t < t1) {
        if (g.s > 0 && pos == g.s) {
          pos = 0; r++;
          const size_t om = ((size_t)b * g.J + r) * g.C + c;
          mA = A.ms_a[om]; mB = A.ms_b[om]; mP = A.ms_p[om];
        }
        const float pc = cur_p(p, pn, w);
        if (((t - t0) & (WKV_SUB - 1)) == 0) {     // sub-chunk start state, for k_bwd_out
          const size_t oss = ((size_t)b * g.NC * (WKV_CH / WKV_SUB) + (size_t)n * (WKV_CH / WKV_SUB) +
                              (t - t0) / WKV_SUB) * g.C + c;
          A.ss_a[oss] = a; A.ss_b[oss] = bb; A.ss_p[oss] = pc;
        }
        const TokOut q = tok_out(a, bb, pc, kb[i], vb[i], u, mA, mB, mP);
        const float gn = dv(gb[i], q.den);
        lse_add(ra, rb, rp, gn, -gn * q.y, -(float)(t - t0) * w - q.m);
        if (g.s > 0) {
          lse_add(sa, sb, sp, gn, -gn * q.y, -q.m);
          if (g.s <= WKV_CH && (pos == g.s - 1 || t == t1 - 1)) {   // segment r ends in this chunk
            const size_t os = ((size_t)b * g.npiece + r) * g.C + c;
            A.s_a[os] = sa; A.s_b[os] = sb; A.s_p[os] = sp;
            sa = 0.f; sb = 0.f; sp = WKV_NEG;
          }
        }
        dec_add(a, bb, p, pn, w, 1.f, vb[i], 1.f, kb[i]);
        pos++;
      }
    }
  }
  A.r_a[o] = ra; A.r_b[o] = rb; A.r_p[o] = rp;
  if (g.s > WKV_CH) {
    const size_t os = ((size_t)b * g.npiece + n) * g.C + c;
    A.s_a[os] = sa; A.s_b[os] = sb; A.s_p[os] = sp;
  }
}

// Reverse scan over chunks (writes the adjoint of the token state at each chunk end into r_*),
// gradients of the incoming token state, and the whole medium backward.
__global__ void __launch_bounds__(NTHREADS) k_bwd_scan(WkvBwdArgs A) {
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  const int b = blockIdx.y;
  const size_t bc = (size_t)b * g.C + c;
  const float w = ex(A.td[c]);
  float Ra = ld_or(A.gaaT, bc, 0.f), Rb = ld_or(A.gbbT, bc, 0.f), Rp = -A.ppT[bc], Rn = 0.f;
  for (int n0 = g.NC - 1; n0 >= 0; n0 -= SB) {
    float la[SB], lb[SB], lp[SB];
#pragma unroll
    for (int i = 0; i < SB; i++)
      if (n0 - i >= 0) {
        const size_t o = ((size_t)b * g.NC + n0 - i) * g.C + c;
        la[i] = A.r_a[o]; lb[i] = A.r_b[o]; lp[i] = A.r_p[o];
      }
#pragma unroll
    for (int i = 0; i < SB; i++)
      if (n0 - i >= 0) {
        int t0, t1;
        wkv_chunk_range(g, n0 - i, t0, t1);
        const size_t o = ((size_t)b * g.NC + n0 - i) * g.C + c;
        A.r_a[o] = Ra; A.r_b[o] = Rb; A.r_p[o] = cur_p(Rp, Rn, w);
        dec_add(Ra, Rb, Rp, Rn, w, (float)(t1 - t0), la[i], lb[i], lp[i]);
      }
  }
  Rp = cur_p(Rp, Rn, w);
  {
    const float aa0 = ld_or(A.aa, bc, 0.f), bb0 = ld_or(A.bb, bc, 0.f);
    const float e = ex(Rp + ld_or(A.pp, bc, WKV_NEG));
    const float ga = Ra * e, gb = Rb * e;
    A.gaa[bc] = ga; A.gbb[bc] = gb; A.gpp[bc] = ga * aa0 + gb * bb0;
  }
  if (g.s > 0) {
    const float wm = ex(A.md[c]);
    float Ma = 0.f, Mb = 0.f, Mp = WKV_NEG, Mn = 0.f;   // adjoint of the medium state before segment r + 1
    if (g.complete == g.J) { Ma = ld_or(A.gmaT, bc, 0.f); Mb = ld_or(A.gmbT, bc, 0.f); Mp = -A.mpT[bc]; }
    float acc = 0.f;
    for (int r0 = g.J - 1; r0 >= 0; r0 -= SB) {
    // Loads of SB segments issued together (independent of the recurrence).
    float kk_[SB], vv_[SB], xa_[SB], xb_[SB], xp_[SB], sa_[SB], sb_[SB], sp_[SB];
#pragma unroll
    for (int i = 0; i < SB; i++)
      if (r0 - i >= 0) {
        const size_t o = ((size_t)b * g.J + r0 - i) * g.C + c;
        kk_[i] = A.mk[o]; vv_[i] = A.mv[o];
        xa_[i] = A.ms_a[o]; xb_[i] = A.ms_b[o]; xp_[i] = A.ms_p[o];
        if (g.s <= WKV_CH) {
          const size_t os = ((size_t)b * g.npiece + r0 - i) * g.C + c;
          sa_[i] = A.s_a[os]; sb_[i] = A.s_b[os]; sp_[i] = A.s_p[os];
        }
      }
#pragma unroll
    for (int i = 0; i < SB; i++) {
      const int r = r0 - i;
      if (r < 0) break;
      const size_t o = ((size_t)b * g.J + r) * g.C + c;
      const float Mc = cur_p(Mp, Mn, wm);
      const float e = ex(kk_[i] + Mc);
      A.gmv[o] = Ma * e;
      A.gmk[o] = (vv_[i] * Ma + Mb) * e;
      acc += (xa_[i] * Ma + xb_[i] * Mb) * ex(xp_[i] + Mc - wm);
      Mn += 1.f;
      if (g.s <= WKV_CH) {
        dec_add(Ma, Mb, Mp, Mn, wm, 0.f, sa_[i], sb_[i], sp_[i]);
      } else {
        const int n0 = wkv_max(r * g.nsub - g.c_first, 0);
        const int n1 = wkv_min((r + 1) * g.nsub - g.c_first, g.NC);
        for (int n = n0; n < n1; n++) {
          const size_t os = ((size_t)b * g.npiece + n) * g.C + c;
          dec_add(Ma, Mb, Mp, Mn, wm, 0.f, A.s_a[os], A.s_b[os], A.s_p[os]);
        }
      }
      if (r == g.complete)
        dec_add(Ma, Mb, Mp, Mn, wm, 0.f, ld_or(A.gmaT, bc, 0.f), ld_or(A.gmbT, bc, 0.f), -A.mpT[bc]);
    }
    }
    Mp = cur_p(Mp, Mn, wm);
    const float ma0 = ld_or(A.ma, bc, 0.f), mb0 = ld_or(A.mb, bc, 0.f);
    const float e = ex(Mp + ld_or(A.mp, bc, WKV_NEG));
    const float ga = Ma * e, gb = Mb * e;
    A.gma[bc] = ga; A.gmb[bc] = gb; A.gmp[bc] = ga * ma0 + gb * mb0;
    A.pwm[bc] = acc;
  }
}

// Gradients of k and v: walk each chunk backwards in sub-chunks of WKV_SUB tokens, whose forward
// states are recomputed from the sub-chunk start states found by a first forward walk.
__global__ void __launch_bounds__(NTHREADS) k_bwd_out(WkvBwdArgs A) {
  constexpr int NS = WKV_CH / WKV_SUB;
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = blockIdx.y, b = blockIdx.z;
  int t0, t1;
  wkv_chunk_range(g, n, t0, t1);
  LOAD_TILES(3, A.gy)
  const float w = ex(A.td[c]), u = A.tf[c];
  const size_t base_bt = (size_t)b * g.T * g.C + c;
  in_t* __restrict__ gk = (in_t*)A.gk + base_bt;
  in_t* __restrict__ gv = (in_t*)A.gv + base_bt;
  const size_t o = ((size_t)b * g.NC + n) * g.C + c;
  float ga = A.r_a[o], gb = A.r_b[o], gq = A.r_p[o], gn_ = 0.f;   // adjoint of the state after the chunk
  float gw = 0.f, gu = 0.f;
#pragma unroll
  for (int j = NS - 1; j >= 0; j--) {
    const int tb = t0 + j * WKV_SUB;
    if (tb >= t1) continue;
#define KB(i) lds(sk + (tb + (i) - t0) * NTHREADS + tx)
#define VB(i) lds(sv + (tb + (i) - t0) * NTHREADS + tx)
#define GB(i) lds(sg + (tb + (i) - t0) * NTHREADS + tx)
    float mA = 0.f, mB = 0.f, mP = WKV_NEG;
    int r = 0, pos = 0;
    if (g.s > 0) {
      r = (g.phase + tb) / g.s;
      pos = g.phase + tb - r * g.s;
      const size_t om = ((size_t)b * g.J + r) * g.C + c;
      mA = A.ms_a[om]; mB = A.ms_b[om]; mP = A.ms_p[om];
    }
    float ta[WKV_SUB], tbb[WKV_SUB], tp[WKV_SUB], tm[WKV_SUB], tgn[WKV_SUB], ty[WKV_SUB], tgx[WKV_SUB];
    const size_t oss = ((size_t)b * g.NC * NS + (size_t)n * NS + j) * g.C + c;
    float a = A.ss_a[oss], bb = A.ss_b[oss], p = A.ss_p[oss], pn = 0.f;
#pragma unroll
    for (int i = 0; i < WKV_SUB; i++) {
      if (tb + i < t1) {
        if (g.s > 0 && pos == g.s) {
          pos = 0; r++;
          const size_t om = ((size_t)b * g.J + r) * g.C + c;
          mA = A.ms_a[om]; mB = A.ms_b[om]; mP = A.ms_p[om];
        }
        const float pc = cur_p(p, pn, w);
        const TokOut q = tok_out(a, bb, pc, KB(i), VB(i), u, mA, mB, mP);
        ta[i] = a; tbb[i] = bb; tp[i] = pc;
        tm[i] = q.m; tgn[i] = dv(GB(i), q.den); ty[i] = q.y; tgx[i] = q.eu * tgn[i];
        dec_add(a, bb, p, pn, w, 1.f, VB(i), 1.f, KB(i));
        pos++;
      }
    }
#pragma unroll
    for (int i = WKV_SUB - 1; i >= 0; i--) {
      const int t = tb + i;
      if (t < t1) {
        // (ga, gb, gq): adjoint of the token state after t (A_{t+1}, B_{t+1}).
        const float gc = cur_p(gq, gn_, w);
        const float x = tgx[i];
        const float ek = ex(KB(i) + gc);
        const float dy = VB(i) - ty[i];
        st(gv + (size_t)t * g.C, x + ek * ga);
        st(gk + (size_t)t * g.C, x * dy + ek * (ga * VB(i) + gb));
        gu += x * dy;
        gw += (ta[i] * ga + tbb[i] * gb) * ex(tp[i] + gc - w);
        dec_add(ga, gb, gq, gn_, w, 1.f, tgn[i], -tgn[i] * ty[i], -tm[i]);
      }
    }
  }
  A.pw[o] = gw;
  A.pu[o] = gu;
}

__global__ void __launch_bounds__(NTHREADS) k_bwd_reduce(WkvBwdArgs A) {
  const WkvGeo g = A.g;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= g.C) return;
  float sw = 0.f, su = 0.f;
  const int rows = g.B * g.NC;
  for (int i = 0; i < rows; i++) {
    sw += A.pw[(size_t)i * g.C + c];
    su += A.pu[(size_t)i * g.C + c];
  }
  const float w = ex(A.td[c]);
  A.gtd[c] = -w * sw;
  A.gtf[c] = su;
  if (g.s > 0) {
    float sm = 0.f;
    for (int i = 0; i < g.B; i++) sm += A.pwm[(size_t)i * g.C + c];
    A.gmd[c] = -ex(A.md[c]) * sm;
  }
}

cudaError_t wkv_backward_launch(const WkvBwdArgs& A, cudaStream_t stream) {
  const WkvGeo& g = A.g;
  dim3 blk(NTHREADS);
  const int cb = (g.C + NTHREADS - 1) / NTHREADS;
  dim3 grid_chunks(cb, g.NC, g.B);
  dim3 grid_scan((g.C + NSCAN - 1) / NSCAN, g.B);
  const int sm3 = 3 * TILE * sizeof(in_t);
  static bool attr[256] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 256 || !attr[dev]) {
    cudaFuncSetAttribute(k_bwd_local, cudaFuncAttributeMaxDynamicSharedMemorySize, sm3);
    cudaFuncSetAttribute(k_bwd_out, cudaFuncAttributeMaxDynamicSharedMemorySize, sm3);
    if (dev >= 0 && dev < 256) attr[dev] = true;
  }
  k_bwd_local<<<grid_chunks, blk, sm3, stream>>>(A);
  k_bwd_scan<<<grid_scan, dim3(NSCAN), 0, stream>>>(A);
  k_bwd_out<<<grid_chunks, blk, sm3, stream>>>(A);
  k_bwd_reduce<<<dim3((g.C + NSCAN - 1) / NSCAN), dim3(NSCAN), 0, stream>>>(A);
  return cudaGetLastError();
}
