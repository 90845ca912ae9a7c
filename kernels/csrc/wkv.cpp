// Torch binding of the WKV-retrospection kernels (wkv.cu). One module per input dtype. Built with
// WKV_HOST it binds the CPU build of the same arithmetic (wkv_host.cpp, for the tests) instead.
#include <torch/extension.h>
#ifndef WKV_HOST
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#define WKV_DEVICE_NAME "a CUDA"
#define WKV_ON_DEVICE(t) (t).is_cuda()
#define WKV_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#else
#define WKV_DEVICE_NAME "a CPU"
#define WKV_ON_DEVICE(t) (t).is_cpu()
#define WKV_GUARD(t)
#endif
#include "wkv.h"

namespace {

// Empty (numel 0) state tensors mean a fresh state, empty state gradients mean zero.
void check_opt(const at::Tensor& t, const char* name, at::IntArrayRef shape);

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(WKV_ON_DEVICE(t), "wkv: ", name, " must be " WKV_DEVICE_NAME " tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "wkv: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "wkv: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "wkv: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

at::ScalarType module_dtype() {
  std::string n = wkv_dtype_name();
  if (n == "bfloat16") return at::kBFloat16;
  if (n == "float16") return at::kHalf;
  return at::kFloat;
}

void check_in(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(WKV_ON_DEVICE(t), "wkv: ", name, " must be " WKV_DEVICE_NAME " tensor");
  TORCH_CHECK(t.scalar_type() == module_dtype(), "wkv: ", name, " must be ", wkv_dtype_name(),
              " for this build, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "wkv: ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, "wkv: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

void check_opt(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  if (t.numel() != 0) check_f32(t, name, shape);
}

float* fp(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// Part i of `parts` equal parts of a contiguous float tensor (t[i] of its first dimension) as a pointer:
// no view is made (each costs host time on every call).
float* part(const at::Tensor& t, int i, int parts) { return t.numel() ? t.data_ptr<float>() + t.numel() / parts * i : nullptr; }

// The scratch arrays of a pass, carved out of one allocation (one call to the allocator instead of one
// per array); take(0) gives null, as fp() of an empty tensor.
struct Scratch {
  at::Tensor buf;
  float* next;
  Scratch(int64_t floats, const at::TensorOptions& f32) : buf(at::empty({floats}, f32)), next(fp(buf)) {}
  float* take(int64_t floats) {
    float* r = floats ? next : nullptr;
    next += floats;
    return r;
  }
};

}  // namespace

// Returns y, the outgoing state (aa, bb, pp, ma, mb, mp) and what the backward needs
// (chunk-start token states cs_a, cs_b, cs_p and medium states ms_a, ms_b, ms_p).
std::vector<at::Tensor> wkv_forward(at::Tensor td, at::Tensor tf, at::Tensor k, at::Tensor v,
                                    at::Tensor md, at::Tensor mk, at::Tensor mv,
                                    at::Tensor aa, at::Tensor bb, at::Tensor pp,
                                    at::Tensor ma, at::Tensor mb, at::Tensor mp,
                                    int64_t interval, int64_t phase) {
  TORCH_CHECK(k.dim() == 3, "wkv: k must be (B, T, C)");
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  TORCH_CHECK(T > 0 && B > 0 && C > 0, "wkv: empty input");
  TORCH_CHECK(interval >= 0 && (interval == 0 || (phase >= 0 && phase < interval)), "wkv: bad interval/phase");
  TORCH_CHECK(B * T * C < (int64_t(1) << 62) && T < (int64_t(1) << 30) && C < (int64_t(1) << 30), "wkv: too large");
  WKV_GUARD(k);
  WkvGeo g = wkv_make_geo((int)B, (int)T, (int)C, (int)interval, (int)phase);
  TORCH_CHECK(g.NC <= 65535 && B <= 65535, "wkv: too many chunks or batch rows for one launch");
  check_f32(td, "time_decay", {C});
  check_f32(tf, "time_first", {C});
  check_in(k, "k", {B, T, C});
  check_in(v, "v", {B, T, C});
  for (auto* t : {&aa, &bb, &pp}) check_opt(*t, "state", {B, C});
  if (interval > 0) {
    check_f32(md, "medium_decay", {C});
    check_f32(mk, "mk", {B, g.J, C});
    check_f32(mv, "mv", {B, g.J, C});
    for (auto* t : {&ma, &mb, &mp}) check_opt(*t, "medium state", {B, C});
  }
  auto f32 = k.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(k);
  at::Tensor aaT = at::empty({B, C}, f32), bbT = at::empty({B, C}, f32), ppT = at::empty({B, C}, f32);
  const int64_t Jm = interval > 0 ? g.J : 0, Cm = interval > 0 ? C : 0;
  at::Tensor maT = at::empty({B, Cm}, f32), mbT = at::empty({B, Cm}, f32), mpT = at::empty({B, Cm}, f32);
  at::Tensor cs = at::empty({3, B, g.NC, C}, f32);
  at::Tensor ms = at::empty({3, B, Jm, C}, f32);
  Scratch sc(3 * B * C * ((int64_t)g.NC + g.NG + g.NGM), f32);
  WkvFwdArgs A;
  A.g = g;
  A.td = fp(td); A.tf = fp(tf); A.md = interval > 0 ? fp(md) : nullptr;
  A.k = k.data_ptr(); A.v = v.data_ptr();
  A.mk = interval > 0 ? fp(mk) : nullptr; A.mv = interval > 0 ? fp(mv) : nullptr;
  A.aa = fp(aa); A.bb = fp(bb); A.pp = fp(pp);
  A.ma = interval > 0 ? fp(ma) : nullptr; A.mb = interval > 0 ? fp(mb) : nullptr; A.mp = interval > 0 ? fp(mp) : nullptr;
  A.y = y.data_ptr();
  A.aaT = fp(aaT); A.bbT = fp(bbT); A.ppT = fp(ppT); A.maT = fp(maT); A.mbT = fp(mbT); A.mpT = fp(mpT);
  A.cs_a = part(cs, 0, 3); A.cs_b = part(cs, 1, 3); A.cs_p = part(cs, 2, 3);
  A.ms_a = part(ms, 0, 3); A.ms_b = part(ms, 1, 3); A.ms_p = part(ms, 2, 3);
  const int64_t nloc = B * g.NC * C, ntg = B * g.NG * C, nmg = B * g.NGM * C;
  A.loc_a = sc.take(nloc); A.loc_b = sc.take(nloc); A.loc_p = sc.take(nloc);
  A.tg_a = sc.take(ntg); A.tg_b = sc.take(ntg); A.tg_p = sc.take(ntg);
  A.mg_a = sc.take(nmg); A.mg_b = sc.take(nmg); A.mg_p = sc.take(nmg);
#ifdef WKV_HOST
  wkv_forward_host(A);
#else
  cudaError_t err = wkv_forward_launch(A, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "wkv forward launch failed: ", cudaGetErrorString(err));
#endif
  return {y, aaT, bbT, ppT, maT, mbT, mpT, cs, ms};
}

// Returns g_time_decay, g_time_first, gk, gv, g_medium_decay, gmk, gmv, and the gradients of the
// incoming state (aa, bb, pp, ma, mb, mp).
std::vector<at::Tensor> wkv_backward(at::Tensor td, at::Tensor tf, at::Tensor k, at::Tensor v,
                                     at::Tensor md, at::Tensor mk, at::Tensor mv,
                                     at::Tensor aa, at::Tensor bb, at::Tensor pp,
                                     at::Tensor ma, at::Tensor mb, at::Tensor mp,
                                     at::Tensor ppT, at::Tensor mpT, at::Tensor cs, at::Tensor ms,
                                     at::Tensor gy, at::Tensor gaaT, at::Tensor gbbT,
                                     at::Tensor gmaT, at::Tensor gmbT,
                                     int64_t interval, int64_t phase) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  WKV_GUARD(k);
  WkvGeo g = wkv_make_geo((int)B, (int)T, (int)C, (int)interval, (int)phase);
  check_in(k, "k", {B, T, C});
  check_in(v, "v", {B, T, C});
  check_in(gy, "grad y", {B, T, C});
  check_f32(cs, "saved chunk states", {3, B, g.NC, C});
  check_f32(ppT, "saved pp", {B, C});
  for (auto* t : {&aa, &bb, &pp, &gaaT, &gbbT}) check_opt(*t, "state or its gradient", {B, C});
  const int64_t Jm = interval > 0 ? g.J : 0;
  if (interval > 0) {
    check_f32(ms, "saved medium states", {3, B, Jm, C});
    check_f32(mpT, "saved mp", {B, C});
    for (auto* t : {&ma, &mb, &mp, &gmaT, &gmbT}) check_opt(*t, "medium state or its gradient", {B, C});
  }
  auto f32 = k.options().dtype(at::kFloat);
  at::Tensor gk = at::empty_like(k), gv = at::empty_like(k);
  at::Tensor gtd = at::empty({C}, f32), gtf = at::empty({C}, f32);
  at::Tensor gmd = at::empty({interval > 0 ? C : 0}, f32);
  at::Tensor gmk = at::empty({B, Jm, interval > 0 ? C : 0}, f32), gmv = at::empty_like(gmk);
  at::Tensor gst = at::empty({6, B, C}, f32);
  // scratch: r (3 x chunks), s (3 x pieces), pw and pu (2 x chunks), pwm, tg (3 x token groups), mg
  // (3 x medium groups), the sub-chunk states (3 x chunks x CH / SUB), each (B, *, C)
  const int64_t nr = B * g.NC * C, ns = B * (interval > 0 ? g.npiece : 0) * C, ntg = B * g.NG * C;
  const int64_t nmg = B * g.NGM * C, nsub = nr * (WKV_CH / WKV_SUB);
  Scratch sc(3 * nr + 3 * ns + 2 * nr + nmg + 3 * ntg + 3 * nmg + 3 * nsub, f32);
  WkvBwdArgs A;
  A.g = g;
  const bool med = interval > 0;
  A.td = fp(td); A.tf = fp(tf); A.md = med ? fp(md) : nullptr;
  A.k = k.data_ptr(); A.v = v.data_ptr(); A.gy = gy.data_ptr();
  A.mk = med ? fp(mk) : nullptr; A.mv = med ? fp(mv) : nullptr;
  A.aa = fp(aa); A.bb = fp(bb); A.pp = fp(pp);
  A.ma = med ? fp(ma) : nullptr; A.mb = med ? fp(mb) : nullptr; A.mp = med ? fp(mp) : nullptr;
  A.ppT = fp(ppT); A.mpT = med ? fp(mpT) : nullptr;
  A.gaaT = fp(gaaT); A.gbbT = fp(gbbT);
  A.gmaT = med ? fp(gmaT) : nullptr; A.gmbT = med ? fp(gmbT) : nullptr;
  A.cs_a = part(cs, 0, 3); A.cs_b = part(cs, 1, 3); A.cs_p = part(cs, 2, 3);
  A.ms_a = med ? part(ms, 0, 3) : nullptr; A.ms_b = med ? part(ms, 1, 3) : nullptr; A.ms_p = med ? part(ms, 2, 3) : nullptr;
  A.gk = gk.data_ptr(); A.gv = gv.data_ptr();
  A.gtd = fp(gtd); A.gtf = fp(gtf); A.gmd = med ? fp(gmd) : nullptr;
  A.gmk = med ? fp(gmk) : nullptr; A.gmv = med ? fp(gmv) : nullptr;
  A.gaa = part(gst, 0, 6); A.gbb = part(gst, 1, 6); A.gpp = part(gst, 2, 6);
  A.gma = part(gst, 3, 6); A.gmb = part(gst, 4, 6); A.gmp = part(gst, 5, 6);
  A.r_a = sc.take(nr); A.r_b = sc.take(nr); A.r_p = sc.take(nr);
  A.s_a = sc.take(ns); A.s_b = sc.take(ns); A.s_p = sc.take(ns);
  A.pw = sc.take(nr); A.pu = sc.take(nr); A.pwm = sc.take(nmg);
  A.tg_a = sc.take(ntg); A.tg_b = sc.take(ntg); A.tg_p = sc.take(ntg);
  A.mg_a = sc.take(nmg); A.mg_b = sc.take(nmg); A.mg_p = sc.take(nmg);
  A.ss_a = sc.take(nsub); A.ss_b = sc.take(nsub); A.ss_p = sc.take(nsub);
#ifdef WKV_HOST
  wkv_backward_host(A);
#else
  cudaError_t err = wkv_backward_launch(A, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "wkv backward launch failed: ", cudaGetErrorString(err));
#endif
  return {gtd, gtf, gk, gv, gmd, gmk, gmv, gst[0], gst[1], gst[2], gst[3], gst[4], gst[5]};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv_forward, "WKV with retrospection, forward");
  m.def("backward", &wkv_backward, "WKV with retrospection, backward");
  m.def("dtype", []() { return std::string(wkv_dtype_name()); });
}
