// WKV with retrospection: the CUDA kernels (design in kernels/NOTES.md). The arithmetic of each
// thread is in wkv_algo.h (shared with the CPU build that tests it, wkv_host.cpp); the kernels here
// stage each chunk's inputs in shared memory and map threads to (batch, chunk, channel).
//
// Parallel over (batch, time chunk, channel); one thread per (b, chunk, c), channels contiguous so
// that each warp reads 32 consecutive elements. Forward: (1) chunk-local sums, (2) a scan over
// chunks per (b, c) (also the medium recurrence, J = T/s steps), (3) outputs. Backward: (1) chunk-
// local sums of the output adjoints (recomputing the forward inside the chunk from the saved chunk-
// start state), (2) a reverse scan over chunks and the medium backward, (3) the gradients of k, v
// walking each chunk in reverse in sub-chunks of WKV_SUB tokens, (4) a fixed-order reduction of the
// per-chunk partial gradients of time_decay, time_first, medium_decay. No atomics: deterministic.
#include "wkv_algo.h"
#include <stdint.h>
#include <cuda_pipeline.h>

#define NSCAN 32  // threads per block of the scans (one per channel)

// Copy rows [0, rows) x channels [c0, c0 + NTHREADS) of a (rows, C) slab into shared memory
// sm[rows][NTHREADS]: 16-byte asynchronous copies when the slab allows (so that a whole window's
// loads are in flight at once, holding no registers), element copies otherwise (C not a multiple
// of 8 (bf16/fp16) or 4 (fp32), the last channel tile, unaligned base). The caller commits, then
// waits + syncs.
// Each thread copies the same 16-byte column piece q of rows r0, r0 + RSTEP, ...: its addresses advance
// by constant strides, and a full window (rows == WKV_WIN) is unrolled (v20: before, each copy
// recomputed its row and column from a flat index, about 5 of k_bwd_out's 129 instructions a token
// and 13 of k_fwd_out's registers; kernels 0.252 -> 0.244 ms at (8,1024,2048) on the H100).
__device__ __forceinline__ void tile_load(in_t* __restrict__ sm, const in_t* __restrict__ gsrc, int rows, int C, int c0) {
  constexpr int PER = 16 / sizeof(in_t);   // elements of a 16-byte copy
  constexpr int CPR = NTHREADS / PER;      // copies a row
  constexpr int RSTEP = NTHREADS / CPR;    // rows the block copies at a time
  static_assert(NTHREADS % CPR == 0 && WKV_WIN % RSTEP == 0, "tile_load: rows of a window in whole steps");
  const bool vec = (C % PER == 0) && (c0 + NTHREADS <= C) &&
                   ((reinterpret_cast<uintptr_t>(gsrc) & 15) == 0);
  if (vec) {
    const int r0 = threadIdx.x / CPR, q = threadIdx.x % CPR;
    const in_t* src = gsrc + (size_t)r0 * C + c0 + q * PER;
    in_t* dst = sm + r0 * NTHREADS + q * PER;
    const size_t gstep = (size_t)RSTEP * C;
    if (rows == WKV_WIN) {
      WKV_UNROLL
      for (int k = 0; k < WKV_WIN / RSTEP; k++)
        __pipeline_memcpy_async(dst + k * RSTEP * NTHREADS, src + k * gstep, 16);
    } else {
#pragma unroll 1
      for (int r = r0; r < rows; r += RSTEP, src += gstep, dst += RSTEP * NTHREADS)
        __pipeline_memcpy_async(dst, src, 16);
    }
  } else {
#pragma unroll 1   // the rare case (C not a multiple of 8, the last channel tile): little code
    for (int i = threadIdx.x; i < rows * NTHREADS; i += NTHREADS) {
      const int r = i / NTHREADS, q = i - r * NTHREADS;
      if (c0 + q < C) sm[i] = gsrc[(size_t)r * C + c0 + q];
    }
  }
}
#define WTILE (WKV_WIN * NTHREADS)
// Blocks per SM that each chunk kernel's register use must allow (ptxas caps the registers to fit;
// shared memory allows 9 to 14 blocks of WKV_WIN = 32 tokens).
#ifndef WKV_MINB_FWD_LOCAL
#define WKV_MINB_FWD_LOCAL 8
#endif
#ifndef WKV_MINB_FWD_OUT
#define WKV_MINB_FWD_OUT 6
#endif
#ifndef WKV_MINB_BWD_LOCAL
#define WKV_MINB_BWD_LOCAL 8
#endif
#ifndef WKV_MINB_BWD_OUT
#define WKV_MINB_BWD_OUT 5
#endif
template <int NT>
__host__ __device__ constexpr int smem_bytes() { return WKV_NBUF * NT * WTILE * (int)sizeof(in_t); }

// The block's chunk [t0, t1) of NT inputs (k, v and, when NT == 3, gy) in channel tile ct, window by
// window (the last first when REV): each window is staged in shared memory (WKV_NBUF buffers; with 2
// the next window's copy is in flight while this one is worked on), then f(w0, w1, K, V, G) runs on it.
// Every thread of the block takes part in the copies and barriers; f runs where `on` (a channel).
template <int NT, bool REV, class F>
__device__ __forceinline__ void each_window(const WkvGeo& g, const void* x0, const void* x1, const void* x2,
                                            int b, int ct, int t0, int t1, bool on, F f) {
  extern __shared__ __align__(16) unsigned char smraw[];
  in_t* sm = reinterpret_cast<in_t*>(smraw);
  const int nw = n_windows(t0, t1);
  const int c0 = ct * NTHREADS;
  const void* src[3] = {x0, x1, x2};
  auto load = [&](int i) {
    int w0, w1;
    window_range(t0, t1, REV ? nw - 1 - i : i, w0, w1);
    const size_t row0 = ((size_t)b * g.T + w0) * g.C;
    in_t* d = sm + (i % WKV_NBUF) * NT * WTILE;
    WKV_UNROLL
    for (int q = 0; q < NT; q++) tile_load(d + q * WTILE, (const in_t*)src[q] + row0, w1 - w0, g.C, c0);
    __pipeline_commit();
  };
  if (WKV_NBUF > 1) load(0);
#pragma unroll 1
  for (int i = 0; i < nw; i++) {
    if (WKV_NBUF == 1) {
      if (i > 0) __syncthreads();   // everyone is done with the previous window
      load(i);
    }
    __pipeline_wait_prior(0);
    __syncthreads();                // window i is in shared memory (and window i - 1 is done with)
    if (WKV_NBUF > 1 && i + 1 < nw) load(i + 1);
    if (on) {
      int w0, w1;
      window_range(t0, t1, REV ? nw - 1 - i : i, w0, w1);
      const in_t* d = sm + (i % WKV_NBUF) * NT * WTILE + threadIdx.x;
      f(w0, w1, Col{d, NTHREADS}, Col{d + WTILE, NTHREADS}, Col{NT > 2 ? d + 2 * WTILE : nullptr, NTHREADS});
    }
  }
}

// The block's channel tile ct, chunk n and sequence b. The blocks of a grid start roughly in the order
// of their linear index (x fastest); with LAST_FIRST the last (b, n, ct) goes first. The two chunk
// kernels of a pass read the same inputs (k, v; gy) with a scan between them, so the second walks the
// tiles in the opposite order of the first and starts with those the first read last, which are
// still in L2 (k_fwd_local first to last, k_fwd_out last first; k_bwd_local last first, k_bwd_out
// first to last: the backward's first kernel does not start with what the forward's last read last,
// as it would not in a model, where other layers run between them). v20: 0.256 -> 0.252 ms at
// (8,1024,2048) on the H100, mostly k_bwd_out (0.100 -> 0.097). WKV_L2_ORDER=0: all first to last.
#ifndef WKV_L2_ORDER
#define WKV_L2_ORDER 1
#endif
#define CHUNK_THREAD_ORDER(LAST_FIRST)                                                    \
  const int nct = gridDim.x, lin0 = blockIdx.x + nct * (blockIdx.y + gridDim.y * blockIdx.z); \
  const int lin = (LAST_FIRST) ? nct * gridDim.y * gridDim.z - 1 - lin0 : lin0;         \
  const int ct = lin % nct, n = (lin / nct) % gridDim.y, b = lin / (nct * gridDim.y);   \
  const int c = ct * NTHREADS + threadIdx.x;                                            \
  const bool on = c < A.g.C;                                                            \
  int t0, t1;                                                                           \
  wkv_chunk_range(A.g, n, t0, t1);

// The scans (phases A, B, C of wkv_algo.h): threadIdx.y 0 works on the token states, threadIdx.y 1
// on the medium states (independent of each other), for NSCAN channels per block; blockIdx.y is
// the group in phases A and C.
#define SCAN_THREAD                                                                       \
  const int c = blockIdx.x * NSCAN + threadIdx.x;                                       \
  if (c >= A.g.C) return;                                                               \
  const bool tok = threadIdx.y == 0, med = threadIdx.y == 1 && A.g.s > 0;               \
  const int grp = blockIdx.y, b = blockIdx.z;
#define SCAN_THREAD_B                                                                     \
  const int c = blockIdx.x * NSCAN + threadIdx.x;                                       \
  if (c >= A.g.C) return;                                                               \
  const bool tok = threadIdx.y == 0, med = threadIdx.y == 1 && A.g.s > 0;               \
  const int b = blockIdx.y;

// Launches phases A and B (only where a sequence has several groups) and C of a scan.
template <class Args>
static void launch_scans(const Args& A, cudaStream_t stream, void (*ka)(Args), void (*kb)(Args), void (*kc)(Args)) {
  const WkvGeo& g = A.g;
  const int cb = (g.C + NSCAN - 1) / NSCAN;
  const dim3 blk(NSCAN, g.s > 0 ? 2 : 1);
  const int ngm = g.s > 0 ? g.NGM : 0;
  if (g.NG > 1 || ngm > 1) {
    ka<<<dim3(cb, wkv_max(g.NG, ngm), g.B), blk, 0, stream>>>(A);
    kb<<<dim3(cb, g.B), blk, 0, stream>>>(A);
  }
  kc<<<dim3(cb, wkv_max(g.NG, ngm), g.B), blk, 0, stream>>>(A);
}

// ---------------------------------------------------------------- forward
__global__ void __launch_bounds__(NTHREADS, WKV_MINB_FWD_LOCAL) k_fwd_local(WkvFwdArgs A) {
  CHUNK_THREAD_ORDER(false)
  FwdLocal S;
  if (on) S.init(A, c);
  each_window<2, false>(A.g, A.k, A.v, nullptr, b, ct, t0, t1, on,
                        [&](int w0, int w1, Col K, Col V, Col G) { S.run(w0, w1, K, V); });
  if (on) S.finish(A, b, n, c);
}

__global__ void __launch_bounds__(2 * NSCAN) k_fwd_gsum(WkvFwdArgs A) {
  SCAN_THREAD
  if (tok && A.g.NG > 1 && grp < A.g.NG) fwd_tokens_group_sum(A, b, grp, c);
  if (med && A.g.NGM > 1 && grp < A.g.NGM) fwd_mediums_group_sum(A, b, grp, c);
}

__global__ void __launch_bounds__(2 * NSCAN) k_fwd_gscan(WkvFwdArgs A) {
  SCAN_THREAD_B
  if (tok && A.g.NG > 1) fwd_tokens_group_scan(A, b, c);
  if (med && A.g.NGM > 1) fwd_mediums_group_scan(A, b, c);
}

__global__ void __launch_bounds__(2 * NSCAN) k_fwd_scan(WkvFwdArgs A) {
  SCAN_THREAD
  if (tok && grp < A.g.NG) fwd_tokens_chunk_starts(A, b, grp, c);
  if (med && grp < A.g.NGM) fwd_mediums_starts(A, b, grp, c);
}

__global__ void __launch_bounds__(NTHREADS, WKV_MINB_FWD_OUT) k_fwd_out(WkvFwdArgs A) {
  CHUNK_THREAD_ORDER(WKV_L2_ORDER)
  FwdOut S;
  if (on) S.init(A, b, n, c, t0);
  each_window<2, false>(A.g, A.k, A.v, nullptr, b, ct, t0, t1, on,
                        [&](int w0, int w1, Col K, Col V, Col G) { S.run(A, b, c, w0, w1, K, V); });
}

// Let two kernels take `bytes` of dynamic shared memory where that is above the default 48 KiB, once
// per device (the attribute is per device; `done` is the calling launch's flag per device).
static void set_smem(bool (&done)[256], const void* fa, const void* fb, int bytes) {
  int dev = 0;
  cudaGetDevice(&dev);
  const bool known = dev >= 0 && dev < 256;
  if (known && done[dev]) return;
  if (bytes > 48 * 1024)
    for (const void* fn : {fa, fb}) cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (known) done[dev] = true;
}

cudaError_t wkv_forward_launch(const WkvFwdArgs& A, cudaStream_t stream) {
  const WkvGeo& g = A.g;
  dim3 blk(NTHREADS);
  dim3 grid_chunks((g.C + NTHREADS - 1) / NTHREADS, g.NC, g.B);
  const int sm2 = smem_bytes<2>();
  static bool done[256] = {};
  set_smem(done, (const void*)k_fwd_local, (const void*)k_fwd_out, sm2);
  k_fwd_local<<<grid_chunks, blk, sm2, stream>>>(A);
  launch_scans(A, stream, k_fwd_gsum, k_fwd_gscan, k_fwd_scan);
  k_fwd_out<<<grid_chunks, blk, sm2, stream>>>(A);
  return cudaGetLastError();
}

// ---------------------------------------------------------------- backward
__global__ void __launch_bounds__(NTHREADS, WKV_MINB_BWD_LOCAL) k_bwd_local(WkvBwdArgs A) {
  CHUNK_THREAD_ORDER(WKV_L2_ORDER)
  BwdLocal S;
  if (on) S.init(A, b, n, c, t0);
  each_window<3, false>(A.g, A.k, A.v, A.gy, b, ct, t0, t1, on,
                        [&](int w0, int w1, Col K, Col V, Col G) { S.run(A, b, n, c, t1, w0, w1, K, V, G); });
  if (on) S.finish(A, b, n, c);
}

__global__ void __launch_bounds__(2 * NSCAN) k_bwd_gsum(WkvBwdArgs A) {
  SCAN_THREAD
  if (tok && A.g.NG > 1 && grp < A.g.NG) bwd_tokens_group_sum(A, b, grp, c);
  if (med && A.g.NGM > 1 && grp < A.g.NGM) bwd_mediums_group_sum(A, b, grp, c);
}

__global__ void __launch_bounds__(2 * NSCAN) k_bwd_gscan(WkvBwdArgs A) {
  SCAN_THREAD_B
  if (tok && A.g.NG > 1) bwd_tokens_group_scan(A, b, c);
  if (med && A.g.NGM > 1) bwd_mediums_group_scan(A, b, c);
}

__global__ void __launch_bounds__(2 * NSCAN) k_bwd_scan(WkvBwdArgs A) {
  SCAN_THREAD
  if (tok && grp < A.g.NG) bwd_tokens_chunk_ends(A, b, grp, c);
  if (med && grp < A.g.NGM) bwd_mediums_out(A, b, grp, c);
}

__global__ void __launch_bounds__(NTHREADS, WKV_MINB_BWD_OUT) k_bwd_out(WkvBwdArgs A) {
  CHUNK_THREAD_ORDER(false)
  BwdOut S;
  extern __shared__ __align__(16) unsigned char smraw[];   // the sub-chunk state slots after the tiles
  if (on) S.init(A, b, n, c, t0, t1, reinterpret_cast<float*>(smraw + smem_bytes<3>()) + threadIdx.x);
  each_window<3, true>(A.g, A.k, A.v, A.gy, b, ct, t0, t1, on,
                       [&](int w0, int w1, Col K, Col V, Col G) { S.run(A, b, n, c, t0, w0, w1, K, V, G); });
  if (on) S.finish(A, b, n, c);
}

#ifndef NRED
#define NRED 32  // k_bwd_reduce: threads (parts of the rows) per channel (v18: 32, was 8)
#endif
__global__ void __launch_bounds__(NSCAN * NRED) k_bwd_reduce(WkvBwdArgs A) {
  __shared__ float part_w[NRED][NSCAN], part_u[NRED][NSCAN];
  const int c = blockIdx.x * NSCAN + threadIdx.x;
  float sw = 0.f, su = 0.f;
  if (c < A.g.C) bwd_reduce_part(A, c, threadIdx.y, NRED, sw, su);
  part_w[threadIdx.y][threadIdx.x] = sw;
  part_u[threadIdx.y][threadIdx.x] = su;
  __syncthreads();
  if (threadIdx.y == 0 && c < A.g.C) {
    sw = 0.f; su = 0.f;
    for (int i = 0; i < NRED; i++) { sw += part_w[i][threadIdx.x]; su += part_u[i][threadIdx.x]; }
    bwd_reduce_finish(A, c, sw, su);
  }
}

cudaError_t wkv_backward_launch(const WkvBwdArgs& A, cudaStream_t stream) {
  const WkvGeo& g = A.g;
  dim3 blk(NTHREADS);
  const int cb = (g.C + NTHREADS - 1) / NTHREADS;
  dim3 grid_chunks(cb, g.NC, g.B);
  const int sm3 = smem_bytes<3>(), sm3o = sm3 + BwdOut::SLOT_FLOATS * NTHREADS * (int)sizeof(float);
  static bool done[256] = {};
  set_smem(done, (const void*)k_bwd_local, (const void*)k_bwd_out, sm3o);
  k_bwd_local<<<grid_chunks, blk, sm3, stream>>>(A);
  launch_scans(A, stream, k_bwd_gsum, k_bwd_gscan, k_bwd_scan);
  k_bwd_out<<<grid_chunks, blk, sm3o, stream>>>(A);
  k_bwd_reduce<<<dim3((g.C + NSCAN - 1) / NSCAN), dim3(NSCAN, NRED), 0, stream>>>(A);
  return cudaGetLastError();
}
