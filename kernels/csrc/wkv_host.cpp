// The WKV kernels' arithmetic (wkv_algo.h) run on the CPU: the same per-thread functions as the CUDA
// kernels (wkv.cu), called in loops in the kernels' order. Built with the host compiler (WKV_HOST)
// by kernels/build.py for the tests, so that the chunking, the scans and the backward of the CUDA
// kernel are checked against the float64 reference on machines without a GPU. Slow; not for use.
#include <ATen/Parallel.h>
#include "wkv_algo.h"

namespace {

// The inputs of channel c of batch row b from token t0 on, in the (B, T, C) tensor itself.
Col col(const void* x, const WkvGeo& g, int b, int t0, int c) {
  return Col{(const in_t*)x + ((size_t)b * g.T + t0) * g.C + c, g.C};
}

// f(b, n, c, t0, t1) for every (batch row, chunk, channel), chunks in parallel.
template <class F>
void each_chunk(const WkvGeo& g, F f) {
  at::parallel_for(0, (int64_t)g.B * g.NC, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) {
      const int b = (int)(i / g.NC), n = (int)(i % g.NC);
      int t0, t1;
      wkv_chunk_range(g, n, t0, t1);
      for (int c = 0; c < g.C; c++) f(b, n, c, t0, t1);
    }
  });
}

// f(b, i, c) for every (batch row, group i < n, channel), in parallel.
template <class F>
void each_group(const WkvGeo& g, int n, F f) {
  at::parallel_for(0, (int64_t)g.B * n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++)
      for (int c = 0; c < g.C; c++) f((int)(i / n), (int)(i % n), c);
  });
}

template <class F>
void each_channel(const WkvGeo& g, F f) {
  at::parallel_for(0, (int64_t)g.B * g.C, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) f((int)(i / g.C), (int)(i % g.C));
  });
}

// One scan over `ng` groups a sequence, as wkv.cu's launch_scans runs it: phases A (sum) and B (scan)
// only where there are several groups, then C (walk).
template <class Args>
void scan_host(const Args& A, int ng, void (*sum)(const Args&, int, int, int), void (*scan)(const Args&, int, int),
               void (*walk)(const Args&, int, int, int)) {
  if (ng > 1) {
    each_group(A.g, ng, [&](int b, int i, int c) { sum(A, b, i, c); });
    each_channel(A.g, [&](int b, int c) { scan(A, b, c); });
  }
  each_group(A.g, ng, [&](int b, int i, int c) { walk(A, b, i, c); });
}

}  // namespace

// Each chunk walked window by window, as the CUDA kernels do (wkv_algo.h).
template <class F>
void each_window(int t0, int t1, bool reverse, F f) {
  const int nw = n_windows(t0, t1);
  for (int i = 0; i < nw; i++) {
    int w0, w1;
    window_range(t0, t1, reverse ? nw - 1 - i : i, w0, w1);
    f(w0, w1);
  }
}

void wkv_forward_host(const WkvFwdArgs& A) {
  const WkvGeo& g = A.g;
  each_chunk(g, [&](int b, int n, int c, int t0, int t1) {
    FwdLocal S;
    S.init(A, c);
    each_window(t0, t1, false, [&](int w0, int w1) { S.run(w0, w1, col(A.k, g, b, w0, c), col(A.v, g, b, w0, c)); });
    S.finish(A, b, n, c);
  });
  scan_host(A, g.NG, fwd_tokens_group_sum, fwd_tokens_group_scan, fwd_tokens_chunk_starts);
  if (g.s > 0) scan_host(A, g.NGM, fwd_mediums_group_sum, fwd_mediums_group_scan, fwd_mediums_starts);
  each_chunk(g, [&](int b, int n, int c, int t0, int t1) {
    FwdOut S;
    S.init(A, b, n, c, t0);
    each_window(t0, t1, false, [&](int w0, int w1) {
      S.run(A, b, c, w0, w1, col(A.k, g, b, w0, c), col(A.v, g, b, w0, c));
    });
  });
}

void wkv_backward_host(const WkvBwdArgs& A) {
  const WkvGeo& g = A.g;
  each_chunk(g, [&](int b, int n, int c, int t0, int t1) {
    BwdLocal S;
    S.init(A, b, n, c, t0);
    each_window(t0, t1, false, [&](int w0, int w1) {
      S.run(A, b, n, c, t1, w0, w1, col(A.k, g, b, w0, c), col(A.v, g, b, w0, c), col(A.gy, g, b, w0, c));
    });
    S.finish(A, b, n, c);
  });
  scan_host(A, g.NG, bwd_tokens_group_sum, bwd_tokens_group_scan, bwd_tokens_chunk_ends);
  if (g.s > 0) scan_host(A, g.NGM, bwd_mediums_group_sum, bwd_mediums_group_scan, bwd_mediums_out);
  each_chunk(g, [&](int b, int n, int c, int t0, int t1) {
    BwdOut S;
    S.init(A, b, n, c, t0, t1, nullptr);
    each_window(t0, t1, true, [&](int w0, int w1) {
      S.run(A, b, n, c, t0, w0, w1, col(A.k, g, b, w0, c), col(A.v, g, b, w0, c), col(A.gy, g, b, w0, c));
    });
    S.finish(A, b, n, c);
  });
  at::parallel_for(0, g.C, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; c++) {
      float sw, su;
      bwd_reduce_part(A, (int)c, 0, 1, sw, su);
      bwd_reduce_finish(A, (int)c, sw, su);
    }
  });
}
