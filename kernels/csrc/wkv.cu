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

#define NTHREADS 128
#define NSCAN 32  // threads per block of the scans (one per channel)

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
// Stage the chunk [t0, t1) of k, v (and gy) for this block's NTHREADS channels in shared memory.
#define LOAD_TILES(NT, GY)                                                                \
  extern __shared__ __align__(16) unsigned char smraw[];                                \
  in_t* sk = reinterpret_cast<in_t*>(smraw);                                            \
  in_t* sv = sk + TILE;                                                                 \
  in_t* sg = NT > 2 ? sv + TILE : nullptr;                                              \
  {                                                                                     \
    const size_t row0 = ((size_t)b * A.g.T + t0) * A.g.C;                               \
    const int c0 = blockIdx.x * NTHREADS;                                               \
    tile_load(sk, (const in_t*)A.k + row0, t1 - t0, A.g.C, c0);                        \
    tile_load(sv, (const in_t*)A.v + row0, t1 - t0, A.g.C, c0);                        \
    if (NT > 2) tile_load(sg, (const in_t*)(GY) + row0, t1 - t0, A.g.C, c0);          \
    __pipeline_wait_prior(0);                                                           \
    __syncthreads();                                                                    \
  }                                                                                     \
  if (c >= A.g.C) return;                                                               \
  const Col K{sk + threadIdx.x, NTHREADS}, V{sv + threadIdx.x, NTHREADS};

#define CHUNK_THREAD                                                                      \
  const int c = blockIdx.x * blockDim.x + threadIdx.x;                                  \
  const int n = blockIdx.y, b = blockIdx.z;                                             \
  int t0, t1;                                                                           \
  wkv_chunk_range(A.g, n, t0, t1);

// ---------------------------------------------------------------- forward
__global__ void __launch_bounds__(NTHREADS) k_fwd_local(WkvFwdArgs A) {
  CHUNK_THREAD
  LOAD_TILES(2, nullptr)
  fwd_local(A, b, n, c, t0, t1, K, V);
}

__global__ void __launch_bounds__(NTHREADS) k_fwd_scan(WkvFwdArgs A) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < A.g.C) fwd_scan(A, blockIdx.y, c);
}

__global__ void __launch_bounds__(NTHREADS) k_fwd_out(WkvFwdArgs A) {
  CHUNK_THREAD
  LOAD_TILES(2, nullptr)
  fwd_out(A, b, n, c, t0, t1, K, V);
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
__global__ void __launch_bounds__(NTHREADS) k_bwd_local(WkvBwdArgs A) {
  CHUNK_THREAD
  LOAD_TILES(3, A.gy)
  const Col G{sg + threadIdx.x, NTHREADS};
  bwd_local(A, b, n, c, t0, t1, K, V, G);
}

__global__ void __launch_bounds__(NTHREADS) k_bwd_scan(WkvBwdArgs A) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < A.g.C) bwd_scan(A, blockIdx.y, c);
}

__global__ void __launch_bounds__(NTHREADS) k_bwd_out(WkvBwdArgs A) {
  CHUNK_THREAD
  LOAD_TILES(3, A.gy)
  const Col G{sg + threadIdx.x, NTHREADS};
  bwd_out(A, b, n, c, t0, t1, K, V, G);
}

__global__ void __launch_bounds__(NTHREADS) k_bwd_reduce(WkvBwdArgs A) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < A.g.C) bwd_reduce(A, c);
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
