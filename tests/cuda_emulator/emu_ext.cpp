// The CUDA kernels of csrc/cuda run under the CPU emulator, with a host side
// that mirrors csrc/cuda/semicrf_cuda.cu (smem limit and schedule as extra
// arguments). Built as a CPU torch extension for tests only.
#include "emu_runtime.h"

#include <ATen/ATen.h>
#include <torch/extension.h>

#include "cuda/backward_kernel.cuh"
#include "cuda/forward_kernel.cuh"
#include "semicrf_host.h"

using namespace flashsemicrf;
using cuda::Arena;

struct Sched {
  int mode;
  int64_t seed;
  int64_t smem_limit;
};

static at::Tensor workspace_for(Arena& arena, const at::Tensor& scores, int64_t B) {
  if (arena.workspace_stride == 0) return at::Tensor();
  at::Tensor ws = at::full({B * arena.workspace_stride}, NAN, scores.options());
  arena.workspace = ws.data_ptr();
  return ws;
}

template <typename Kernel, typename... Args>
void launch(const Sched& s, Kernel kernel, int64_t B, const Arena& arena, size_t elem, Args... args) {
  if (B == 0) return;
  const size_t smem = arena.smem_elems * elem;
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess)
    emu::fail("cudaFuncSetAttribute refused " + std::to_string(smem) + " bytes of shared memory");
  emu::launch(s.mode, static_cast<unsigned>(s.seed), B, cuda::kThreads, smem, kernel, args...);
}

std::vector<at::Tensor> forward(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                                at::Tensor lengths, at::Tensor st, at::Tensor et,
                                std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                                int64_t interval, int64_t mode, int64_t seed, int64_t smem_limit) {
  Sched sc{static_cast<int>(mode), seed, smem_limit};
  Problem prob(scores, transition, duration, lengths, st, et, ss, es, interval);
  auto out = prob.forward_outputs();
  std::get<0>(out).fill_(NAN);
  std::get<1>(out).fill_(NAN);
  std::get<2>(out).fill_(NAN);
  const Params& p = prob.params;
  const size_t elem = scores.element_size();
  Arena arena = cuda::plan_forward_arena(p, elem, smem_limit);
  at::Tensor ws = workspace_for(arena, scores, p.B);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "f", [&] {
    if (p.duration_dependent) launch(sc, cuda::forward_kernel<scalar_t, true>, p.B, arena, elem, p, arena);
    else launch(sc, cuda::forward_kernel<scalar_t, false>, p.B, arena, elem, p, arena);
  });
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out),
          at::tensor({(int64_t)arena.smem_elems, (int64_t)arena.workspace_stride})};
}

std::vector<at::Tensor> backward(at::Tensor grad_log_z, at::Tensor scores, at::Tensor transition,
                                 at::Tensor duration, at::Tensor lengths, at::Tensor st,
                                 at::Tensor et, std::optional<at::Tensor> ss,
                                 std::optional<at::Tensor> es, at::Tensor log_z, at::Tensor ring,
                                 at::Tensor off, int64_t interval, bool boundary_mass,
                                 int64_t mode, int64_t seed, int64_t smem_limit) {
  Sched sc{static_cast<int>(mode), seed, smem_limit};
  Problem prob(scores, transition, duration, lengths, st, et, ss, es, interval);
  auto out = prob.backward_outputs(grad_log_z, log_z, ring, off, boundary_mass);
  const Params& p = prob.params;
  const size_t elem = scores.element_size();
  Arena arena = cuda::plan_backward_arena(p, elem, smem_limit);
  at::Tensor ws = workspace_for(arena, scores, p.B);
  const int64_t span = p.interval + 1;
  at::Tensor sa = at::full({p.B, span, p.C}, NAN, scores.options());
  at::Tensor ss_ = at::full({p.B, span, p.C}, NAN, scores.options());
  at::Tensor so = at::full({p.B, cuda::span_offset_size(p.interval)}, NAN,
                           scores.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "b", [&] {
    auto* a = sa.data_ptr<scalar_t>();
    auto* s = ss_.data_ptr<scalar_t>();
    auto* o = so.data_ptr<double>();
    if (p.duration_dependent)
      launch(sc, cuda::backward_kernel<scalar_t, true>, p.B, arena, elem, p, arena, a, s, o);
    else
      launch(sc, cuda::backward_kernel<scalar_t, false>, p.B, arena, elem, p, arena, a, s, o);
  });
  auto& [a0, a1, a2, a3, a4, a5, a6] = out;
  return {a0, a1, a2, a3, a4, a5, a6,
          at::tensor({(int64_t)arena.smem_elems, (int64_t)arena.workspace_stride})};
}

std::vector<at::Tensor> viterbi(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                                at::Tensor lengths, at::Tensor st, at::Tensor et,
                                std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                                int64_t mode, int64_t seed, int64_t smem_limit) {
  Sched sc{static_cast<int>(mode), seed, smem_limit};
  Problem prob(scores, transition, duration, lengths, st, et, ss, es, 1);
  auto out = prob.viterbi_outputs();
  std::get<0>(out).fill_(NAN);
  std::get<1>(out).fill_(-7);
  const Params& p = prob.params;
  const size_t elem = scores.element_size();
  Arena arena = cuda::plan_forward_arena(p, elem, smem_limit);
  at::Tensor ws = workspace_for(arena, scores, p.B);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "v", [&] {
    if (p.duration_dependent) launch(sc, cuda::viterbi_kernel<scalar_t, true>, p.B, arena, elem, p, arena);
    else launch(sc, cuda::viterbi_kernel<scalar_t, false>, p.B, arena, elem, p, arena);
  });
  return {std::get<0>(out), std::get<1>(out)};
}

std::vector<at::Tensor> filter(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                               at::Tensor lengths, at::Tensor st, at::Tensor et,
                               std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                               int64_t mode, int64_t seed, int64_t smem_limit) {
  Sched sc{static_cast<int>(mode), seed, smem_limit};
  Problem prob(scores, transition, duration, lengths, st, et, ss, es, 1);
  auto out = prob.filter_outputs();
  std::get<0>(out).fill_(NAN);
  std::get<1>(out).fill_(NAN);
  std::get<2>(out).fill_(NAN);
  const Params& p = prob.params;
  const size_t elem = scores.element_size();
  Arena arena = cuda::plan_forward_arena(p, elem, smem_limit);
  at::Tensor ws = workspace_for(arena, scores, p.B);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "fi", [&] {
    if (p.duration_dependent) launch(sc, cuda::filter_kernel<scalar_t, true>, p.B, arena, elem, p, arena);
    else launch(sc, cuda::filter_kernel<scalar_t, false>, p.B, arena, elem, p, arena);
  });
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

// The device limits' own test: a kernel that does nothing, launched as asked.
static void probe_kernel() { __syncthreads(); }

static void probe_launch(int64_t grid, int64_t threads, int64_t smem, bool set_attribute) {
  emu::smem_attribute().erase(emu::kernel_id(probe_kernel));
  if (set_attribute &&
      cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess)
    emu::fail("cudaFuncSetAttribute refused " + std::to_string(smem) + " bytes of shared memory");
  emu::launch(0, 0, grid, static_cast<int>(threads), static_cast<size_t>(smem), probe_kernel);
}

// Every launch so far: (grid, threads, dynamic smem bytes, smem bytes allowed).
static std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> launch_log() {
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> out;
  for (const auto& r : emu::launch_log())
    out.emplace_back(r.grid, r.threads, static_cast<int64_t>(r.smem),
                     static_cast<int64_t>(r.smem_attribute));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("probe_launch", &probe_launch);
  m.def("launch_log", &launch_log);
  m.def("clear_launch_log", [] { emu::launch_log().clear(); });
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("viterbi", &viterbi);
  m.def("filter", &filter);
}
