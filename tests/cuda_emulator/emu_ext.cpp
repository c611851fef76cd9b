// The CUDA kernels of csrc/cuda run under the CPU emulator, with a host side
// that mirrors csrc/cuda/semicrf_cuda.cu (the smem limit and the schedule as
// extra arguments; workspace and outputs NaN-filled so that an unwritten
// element shows). Built as a CPU torch extension for tests only.
#include "emu_runtime.h"

#include <ATen/ATen.h>
#include <torch/extension.h>

#include "cuda/backward_kernel.cuh"
#include "cuda/exp_backward_kernel.cuh"
#include "cuda/exp_blocked_kernel.cuh"
#include "cuda/exp_forward_kernel.cuh"
#include "cuda/forward_kernel.cuh"
#include "semicrf_host.h"

using namespace flashsemicrf;
using cuda::Arena;

struct Schedule {
  int mode;  // 0 in order, 1 reversed, 2 shuffled with `seed`
  int64_t seed;
  int64_t smem_limit;
};

// launch_per_sequence of semicrf_cuda.cu under the emulator; returns the
// arena's [shared memory bytes, workspace bytes per CTA].
// launch_kernel of semicrf_cuda.cu under the emulator.
template <typename P, typename KernelFor, typename... Extra>
void launch_kernel(const Schedule& s, const at::Tensor& scores, const P& p, int64_t grid,
                   const Arena& arena, KernelFor kernel_for, Extra... extra) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "emulated", [&] {
    const auto kernel = p.duration_dependent
                            ? cuda::pick_kernel(kernel_for, scalar_t(0), std::true_type{}, arena)
                            : cuda::pick_kernel(kernel_for, scalar_t(0), std::false_type{}, arena);
    const size_t smem = static_cast<size_t>(arena.smem_bytes);
    // As on the device: above 48 KB a kernel must opt in to more dynamic shared memory.
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      emu::fail("cudaFuncSetAttribute refused " + std::to_string(smem) + " bytes of shared memory");
    emu::launch(s.mode, static_cast<unsigned>(s.seed), grid, cuda::kThreads, smem, kernel, p,
                arena, extra...);
  });
}

// 0xff bytes: NaN for float and double, so that unwritten workspace shows.
at::Tensor nan_workspace(const at::Tensor& scores, int64_t bytes) {
  return at::full({bytes}, 255, scores.options().dtype(at::kByte));
}

template <typename P, typename Plan, typename KernelFor, typename... Extra>
at::Tensor launch_ctas(const Schedule& s, const at::Tensor& scores, const P& p, int64_t ctas,
                       Plan plan, KernelFor kernel_for, Extra... extra) {
  Arena arena = plan(p, scores.element_size(), static_cast<size_t>(s.smem_limit));
  const at::Tensor sizes = at::tensor({arena.smem_bytes, arena.workspace_stride});
  if (ctas == 0) return sizes;
  at::Tensor workspace;
  if (arena.workspace_stride > 0) {
    workspace = nan_workspace(scores, ctas * arena.workspace_stride);
    arena.workspace = workspace.data_ptr<uint8_t>();
  }
  launch_kernel(s, scores, p, ctas, arena, kernel_for, extra...);
  return sizes;
}
template <typename P, typename Plan, typename KernelFor, typename... Extra>
at::Tensor launch_per_sequence(const Schedule& s, const at::Tensor& scores, const P& p, Plan plan,
                               KernelFor kernel_for, Extra... extra) {
  return launch_ctas(s, scores, p, p.B, plan, kernel_for, extra...);
}

// launch_backward_with_span_recompute of semicrf_cuda.cu; returns the sweep
// arena's sizes and the recompute arena's.
template <typename PlanAllSpans, typename SweepFor, typename... Extra>
at::Tensor launch_backward_with_span_recompute(const Schedule& s, const at::Tensor& scores,
                                               const BackwardParams& p,
                                               PlanAllSpans plan_all_spans, SweepFor sweep_for,
                                               Extra... extra) {
  const size_t e = scores.element_size(), limit = static_cast<size_t>(s.smem_limit);
  Arena sweep = plan_all_spans(p, e, limit);
  Arena recompute = cuda::plan_recompute_arena(p, e, limit);
  const at::Tensor sizes = at::tensor({sweep.smem_bytes, sweep.workspace_stride,
                                       recompute.smem_bytes, recompute.workspace_stride});
  if (p.B == 0) return sizes;
  const int64_t spans = p.B * p.n_ckpt;
  at::Tensor workspace =
      nan_workspace(scores, p.B * sweep.workspace_stride + spans * recompute.workspace_stride);
  sweep.workspace = workspace.data_ptr<uint8_t>();
  recompute.workspace = sweep.workspace + p.B * sweep.workspace_stride;
  launch_kernel(s, scores, p, spans, recompute, [](auto zero, auto dd, auto smem) {
    return &cuda::recompute_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
  }, sweep);
  launch_kernel(s, scores, p, p.B, sweep, sweep_for, true, extra...);
  return sizes;
}

auto log_sweep_kernel = [](auto zero, auto dd, auto smem) {
  return &cuda::backward_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
};
auto exp_sweep_kernel = [](auto zero, auto, auto smem) {
  return &cuda::exp_backward_kernel<decltype(zero), decltype(smem)::value>;
};
const int32_t* const kAll = nullptr;  // backward_kernel's redo: every sequence

template <typename Tuple, size_t... I>
std::vector<at::Tensor> nan_filled(Tuple& out, std::index_sequence<I...>) {
  std::vector<at::Tensor> v;
  for (at::Tensor* x : {&std::get<I>(out)...}) {
    if (x->numel() > 0) x->fill_(x->is_floating_point() ? NAN : -7);
    v.push_back(*x);
  }
  return v;
}

template <typename... Ts>
std::vector<at::Tensor> nan_filled(std::tuple<Ts...>& out) {
  return nan_filled(out, std::index_sequence_for<Ts...>{});
}

auto log_forward_kernel = [](auto zero, auto dd, auto smem) {
  return &cuda::forward_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
};

std::vector<at::Tensor> forward(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                                at::Tensor lengths, at::Tensor st, at::Tensor et,
                                std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                                int64_t interval, int64_t mode, int64_t seed, int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.forward(interval);
  auto out = nan_filled(pass.outputs);
  out.push_back(launch_per_sequence(
      {static_cast<int>(mode), seed, smem_limit}, scores, pass.params, cuda::plan_forward_arena,
      log_forward_kernel, static_cast<const int32_t*>(nullptr)));
  return out;
}

// The exp-domain forward as semicrf_cuda.cu runs it for the static
// transition: exp_blocked_kernel (blocked, C <= 32) or exp_forward_kernel
// (per step), then forward_kernel for the sequences it marked. Returns the
// exp kernel's arena sizes and the verdicts (1: recomputed by the
// log-domain kernel).
std::pair<at::Tensor, at::Tensor> exp_forward_with_redo(const Schedule& sched,
                                                        const at::Tensor& scores,
                                                        const ForwardParams& p, bool blocked) {
  // -7: a verdict the exp-domain kernel did not write shows (and reruns).
  at::Tensor redo = at::full({std::max<int64_t>(p.B, 1)}, -7, scores.options().dtype(at::kInt));
  at::Tensor sizes = launch_per_sequence(
      sched, scores, p, blocked ? cuda::plan_exp_blocked_arena : cuda::plan_exp_forward_arena,
      [blocked](auto zero, auto, auto smem) {
        return blocked ? &cuda::exp_blocked_kernel<decltype(zero), decltype(smem)::value>
                       : &cuda::exp_forward_kernel<decltype(zero), decltype(smem)::value>;
      },
      redo.data_ptr<int32_t>());
  launch_per_sequence(sched, scores, p, cuda::plan_forward_arena, log_forward_kernel,
                      static_cast<const int32_t*>(redo.data_ptr<int32_t>()));
  return {sizes, redo.narrow(0, 0, p.B)};
}

// run_chunked_forward of semicrf_cuda.cu (FLASHSEMICRF_CUDA_FORWARD=chunks),
// then forward_kernel for the sequences the junctions rejected. warmup < 0:
// chunk_warmup's. Returns the verdicts (1: redone serially), or an undefined
// tensor where the sequences make one chunk (cuda::chunked) and nothing ran;
// *first, if given, receives the first try's verdicts.
at::Tensor chunked_forward_with_redo(const Schedule& sched, const at::Tensor& scores,
                                     const ForwardParams& p, int64_t warmup,
                                     at::Tensor* first = nullptr) {
  if (warmup < 0) warmup = cuda::chunk_warmup(p.K, scores.element_size());
  const ForwardParams q = cuda::chunked(p, warmup);
  if (q.chunks < 2 || p.B == 0) return at::Tensor();
  // -7 and NaN: a verdict or a junction the kernels did not write shows.
  at::Tensor verdicts = at::full({p.B}, -7, scores.options().dtype(at::kInt));
  at::Tensor ring = at::full({cuda::chunk_ring_scalars(q)}, NAN, scores.options());
  at::Tensor doubles = at::full({cuda::chunk_doubles(q)}, NAN,
                                scores.options().dtype(at::kDouble));
  cuda::run_chunk_tries(
      q, ring.data_ptr(), doubles.data_ptr<double>(), verdicts.data_ptr<int32_t>(),
      [&](const ForwardParams& r, const int32_t* redo) {
        launch_ctas(sched, scores, r, r.B * r.chunks, cuda::plan_forward_arena,
                    log_forward_kernel, redo);
      },
      [&](const ForwardParams& r, int32_t* marks, bool retry) {
        AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "emulated_junctions", [&] {
          emu::launch(sched.mode, static_cast<unsigned>(sched.seed), r.B, cuda::kThreads,
                      cuda::junction_smem_bytes(), cuda::junction_kernel<scalar_t>, r, marks,
                      retry);
        });
        if (!retry && first != nullptr) *first = verdicts.clone();
      });
  launch_per_sequence(sched, scores, p, cuda::plan_forward_arena, log_forward_kernel,
                      static_cast<const int32_t*>(verdicts.data_ptr<int32_t>()));
  return verdicts;
}

// The forward op's chunked forward (chunked_forward_with_redo) on an op
// call's inputs. Returns log Z, the checkpoints, their offsets, the verdicts
// and the first try's verdicts (both empty where the sequences make one
// chunk and the serial forward ran).
std::vector<at::Tensor> forward_chunked(at::Tensor scores, at::Tensor transition,
                                        at::Tensor duration, at::Tensor lengths, at::Tensor st,
                                        at::Tensor et, std::optional<at::Tensor> ss,
                                        std::optional<at::Tensor> es, int64_t interval,
                                        int64_t warmup, int64_t mode, int64_t seed,
                                        int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.forward(interval);
  TORCH_CHECK(!pass.params.duration_dependent, "forward_chunked: static transition only");
  auto out = nan_filled(pass.outputs);
  const Schedule sched{static_cast<int>(mode), seed, smem_limit};
  at::Tensor first;
  at::Tensor verdicts = chunked_forward_with_redo(sched, scores, pass.params, warmup, &first);
  if (!verdicts.defined()) {  // one chunk: the serial forward
    launch_per_sequence(sched, scores, pass.params, cuda::plan_forward_arena, log_forward_kernel,
                        static_cast<const int32_t*>(nullptr));
    verdicts = first = at::empty({0}, scores.options().dtype(at::kInt));
  }
  out.push_back(verdicts);
  out.push_back(first);
  return out;
}

// semicrf_cuda.cu's forward for ForwardParams already filled in (the
// mirror image's): chunked where it applies (chunk_warmup >= -1), else exp
// (blocked where C allows) with the log-domain redo, or log. Returns the
// chunked or exp forward's verdicts (empty for log).
at::Tensor run_forward(const Schedule& sched, const at::Tensor& scores, const ForwardParams& p,
                       bool exp, int64_t chunk_warmup = -2) {
  if (chunk_warmup >= -1 && !p.duration_dependent) {
    at::Tensor verdicts = chunked_forward_with_redo(sched, scores, p, chunk_warmup);
    if (verdicts.defined()) return verdicts;
  }
  if (exp) {
    return exp_forward_with_redo(sched, scores, p, cuda::uses_blocked_exp_forward(p.C)).second;
  }
  launch_per_sequence(sched, scores, p, cuda::plan_forward_arena, log_forward_kernel,
                      static_cast<const int32_t*>(nullptr));
  return at::empty({0}, scores.options().dtype(at::kInt));
}

// exp_forward_with_redo on an op call's inputs. Returns log Z, the
// checkpoints, their offsets, the exp kernel's arena sizes and the verdicts.
std::vector<at::Tensor> forward_exp(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                                    at::Tensor lengths, at::Tensor st, at::Tensor et,
                                    std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                                    int64_t interval, int64_t mode, int64_t seed,
                                    int64_t smem_limit, bool blocked) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.forward(interval);
  TORCH_CHECK(!pass.params.duration_dependent, "forward_exp: static transition only");
  TORCH_CHECK(!blocked || cuda::uses_blocked_exp_forward(pass.params.C),
              "forward_exp: the blocked kernel takes C <= ", cuda::kBlockedMaxLabels);
  auto out = nan_filled(pass.outputs);
  const Schedule sched{static_cast<int>(mode), seed, smem_limit};
  auto [sizes, verdicts] = exp_forward_with_redo(sched, scores, pass.params, blocked);
  out.push_back(sizes);
  out.push_back(verdicts);
  return out;
}

// The forward op as semicrf_cuda.cu runs it with the span-parallel sweeps
// (FLASHSEMICRF_CUDA_SWEEP=parallel, static transition): its checkpoint
// outputs have 2B rows, and where there is more than one span the mirror
// image's forward (exp: exp-domain, else log, as the forward) writes rows
// B … 2B-1 (one after the other here; on a GPU on two streams). Returns log
// Z, the checkpoints, their offsets, and the forward's and the mirror's
// verdicts (empty for log, and the mirror's where it does not run).
std::vector<at::Tensor> forward_with_mirror(at::Tensor scores, at::Tensor transition,
                                            at::Tensor duration, at::Tensor lengths,
                                            at::Tensor st, at::Tensor et,
                                            std::optional<at::Tensor> ss,
                                            std::optional<at::Tensor> es, int64_t interval,
                                            bool exp, int64_t mode, int64_t seed,
                                            int64_t smem_limit, int64_t chunk_warmup) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.forward(interval, [](const ForwardParams& p) { return !p.duration_dependent; });
  TORCH_CHECK(pass.params.mirror_ring != nullptr, "forward_with_mirror: static transition only");
  auto out = nan_filled(pass.outputs);
  const int64_t B = pass.params.B;
  out[1].narrow(0, B, B).zero_();  // as OpCall leaves them: rows no step saves stay zeros
  out[2].narrow(0, B, B).zero_();
  const Schedule sched{static_cast<int>(mode), seed, smem_limit};
  at::Tensor mirror_verdicts = at::empty({0}, scores.options().dtype(at::kInt));
  if (SpanParallelSweeps::applies(pass.params)) {
    SpanParallelSweeps sweeps;
    auto& mirror = sweeps.mirror(pass.params, scores);
    mirror_verdicts =
        run_forward(sched, sweeps.mirrored_scores(), mirror.params, exp, chunk_warmup);
  }
  out.push_back(run_forward(sched, scores, pass.params, exp, chunk_warmup));
  out.push_back(mirror_verdicts);
  return out;
}

// The gradient outputs stay zero-filled, as the host allocates them.
// kSpans: every span recomputed first (FLASHSEMICRF_CUDA_RECOMPUTE=spans),
// else in the sweep.
template <bool kSpans>
std::vector<at::Tensor> backward(at::Tensor grad_log_z, at::Tensor scores, at::Tensor transition,
                                 at::Tensor duration, at::Tensor lengths, at::Tensor st,
                                 at::Tensor et, std::optional<at::Tensor> ss,
                                 std::optional<at::Tensor> es, at::Tensor log_z, at::Tensor ring,
                                 at::Tensor off, int64_t interval, bool boundary_mass,
                                 int64_t mode, int64_t seed, int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.backward(grad_log_z, log_z, ring, off, interval, boundary_mass);
  const Schedule sched{static_cast<int>(mode), seed, smem_limit};
  auto sizes = kSpans ? launch_backward_with_span_recompute(
                            sched, scores, pass.params, cuda::plan_backward_arena_all_spans,
                            log_sweep_kernel, kAll)
                      : launch_per_sequence(sched, scores, pass.params, cuda::plan_backward_arena,
                                            log_sweep_kernel, false, kAll);
  auto& [a0, a1, a2, a3, a4, a5, a6] = pass.outputs;
  return {a0, a1, a2, a3, a4, a5, a6, sizes};
}

// The exp-domain backward as semicrf_cuda.cu runs it for the static
// transition: exp_backward_kernel (spans recomputed in the sweep, or all
// first with kSpans), then backward_kernel for the sequences it marked.
// Returns the seven gradients, the exp sweep's arena sizes and the verdicts
// (1: redone by the log-domain sweep).
template <bool kSpans>
std::vector<at::Tensor> backward_exp(at::Tensor grad_log_z, at::Tensor scores,
                                     at::Tensor transition, at::Tensor duration,
                                     at::Tensor lengths, at::Tensor st, at::Tensor et,
                                     std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                                     at::Tensor log_z, at::Tensor ring, at::Tensor off,
                                     int64_t interval, bool boundary_mass, int64_t mode,
                                     int64_t seed, int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.backward(grad_log_z, log_z, ring, off, interval, boundary_mass);
  TORCH_CHECK(!pass.params.duration_dependent, "backward_exp: static transition only");
  const Schedule sched{static_cast<int>(mode), seed, smem_limit};
  // -7: a verdict the exp sweep did not write shows (and reruns).
  at::Tensor redo =
      at::full({std::max<int64_t>(pass.params.B, 1)}, -7, scores.options().dtype(at::kInt));
  int32_t* marks = redo.data_ptr<int32_t>();
  auto sizes = kSpans ? launch_backward_with_span_recompute(
                            sched, scores, pass.params, cuda::plan_exp_backward_arena_all_spans,
                            exp_sweep_kernel, marks)
                      : launch_per_sequence(sched, scores, pass.params,
                                            cuda::plan_exp_backward_arena, exp_sweep_kernel,
                                            false, marks);
  launch_per_sequence(sched, scores, pass.params, cuda::plan_backward_arena, log_sweep_kernel,
                      false, static_cast<const int32_t*>(marks));
  auto& [a0, a1, a2, a3, a4, a5, a6] = pass.outputs;
  return {a0, a1, a2, a3, a4, a5, a6, sizes, redo.narrow(0, 0, pass.params.B)};
}

// The span-parallel backward as semicrf_cuda.cu runs it
// (FLASHSEMICRF_CUDA_SWEEP=parallel, static transition, more than one span):
// the mirror image's forward (exp_mirror: exp-domain, else log) unless the
// checkpoints hold its rows (2B rows: forward_with_mirror), then one
// backward_kernel CTA a span, then the host's sums. Returns the seven
// gradients, the sweep arena's sizes, and the mirror's log Z, checkpoints,
// offsets and verdicts (empty for log, and all four where it did not run).
std::vector<at::Tensor> backward_parallel(at::Tensor grad_log_z, at::Tensor scores,
                                          at::Tensor transition, at::Tensor duration,
                                          at::Tensor lengths, at::Tensor st, at::Tensor et,
                                          std::optional<at::Tensor> ss,
                                          std::optional<at::Tensor> es, at::Tensor log_z,
                                          at::Tensor ring, at::Tensor off, int64_t interval,
                                          bool boundary_mass, bool exp_mirror, int64_t mode,
                                          int64_t seed, int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.backward(grad_log_z, log_z, ring, off, interval, boundary_mass);
  TORCH_CHECK(SpanParallelSweeps::applies(pass.params),
              "backward_parallel: static transition and more than one span only");
  const Schedule sched{static_cast<int>(mode), seed, smem_limit};
  SpanParallelSweeps sweeps;
  const at::Tensor none = at::empty({0}, scores.options());
  std::vector<at::Tensor> mirror_out{none, none, none};
  at::Tensor verdicts = at::empty({0}, scores.options().dtype(at::kInt));
  if (pass.params.mirror_ring == nullptr) {
    auto& mirror = sweeps.mirror(pass.params, scores);
    mirror_out = nan_filled(mirror.outputs);
    verdicts = run_forward(sched, sweeps.mirrored_scores(), mirror.params, exp_mirror);
  }
  BackwardParams q = pass.params;
  sweeps.attach(q, scores);
  auto sizes = launch_ctas(sched, scores, q, q.B * q.n_ckpt, cuda::plan_backward_arena,
                           log_sweep_kernel, false, kAll);
  sweeps.finish(q);
  auto& [a0, a1, a2, a3, a4, a5, a6] = pass.outputs;
  return {a0, a1, a2, a3, a4, a5, a6, sizes, mirror_out[0], mirror_out[1], mirror_out[2],
          verdicts};
}

std::vector<at::Tensor> viterbi(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                                at::Tensor lengths, at::Tensor st, at::Tensor et,
                                std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                                int64_t mode, int64_t seed, int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.viterbi();
  auto out = nan_filled(pass.outputs);
  out.push_back(launch_per_sequence(
      {static_cast<int>(mode), seed, smem_limit}, scores, pass.params, cuda::plan_viterbi_arena,
      [](auto zero, auto dd) {
        return &cuda::viterbi_kernel<decltype(zero), decltype(dd)::value>;
      }));
  return out;
}

std::vector<at::Tensor> filter(at::Tensor scores, at::Tensor transition, at::Tensor duration,
                               at::Tensor lengths, at::Tensor st, at::Tensor et,
                               std::optional<at::Tensor> ss, std::optional<at::Tensor> es,
                               int64_t mode, int64_t seed, int64_t smem_limit) {
  OpCall call(scores, transition, duration, lengths, st, et, ss, es);
  call.label_major_tables();  // as for CUDA tensors
  auto pass = call.filter();
  auto out = nan_filled(pass.outputs);
  launch_per_sequence(
      {static_cast<int>(mode), seed, smem_limit}, scores, pass.params, cuda::plan_forward_arena,
      [](auto zero, auto dd, auto smem) {
        return &cuda::filter_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
      });
  return out;
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

// The emulator's own test: small kernels that break the rules it says it
// catches, and one that keeps them. Thread i writes i to shared memory and
// reads its neighbour's value after the CTA barrier (kind 0) or without it
// (kind 1, a race: in order, thread 0 reads before thread 1 has written);
// kind 2 shuffles in half a warp, kind 3 with a partial mask (thrown inside
// the fiber), kind 4 leaves a barrier to the other threads; kind 5 sums
// across the warp with shuffles, so values cross fibers through switches.
static void probe_rules_kernel(int kind, float* out) {
  auto* smem = reinterpret_cast<float*>(flashsemicrf::cuda::flashsemicrf_smem);
  const int n = 64, i = static_cast<int>(threadIdx.x);
  float v = static_cast<float>(i);
  if (kind == 2 && i % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  if (kind == 3) v = __shfl_xor_sync(0x0000ffffu, v, 1);
  if (kind == 4 && i >= 32) return;
  if (kind == 5) {
    for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
    out[i] = v;
    return;
  }
  smem[i] = v;
  if (kind != 1) __syncthreads();
  out[i] = smem[(i + 1) % n];
}

static torch::Tensor probe_rules(int64_t kind, int64_t mode, int64_t seed) {
  auto out = torch::full({64}, -1.0, torch::kFloat32);
  emu::launch(static_cast<int>(mode), static_cast<unsigned>(seed), 1, 64, 64 * sizeof(float),
              probe_rules_kernel, static_cast<int>(kind), out.data_ptr<float>());
  return out;
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
  m.def("probe_rules", &probe_rules);
  m.def("launch_log", &launch_log);
  m.def("clear_launch_log", [] { emu::launch_log().clear(); });
  m.def("forward", &forward);
  m.def("forward_exp", &forward_exp);
  m.def("forward_with_mirror", &forward_with_mirror);
  m.def("forward_chunked", &forward_chunked);
  m.def("backward", &backward<false>);
  m.def("backward_spans", &backward<true>);
  m.def("backward_exp", &backward_exp<false>);
  m.def("backward_exp_spans", &backward_exp<true>);
  m.def("backward_parallel", &backward_parallel);
  m.def("viterbi", &viterbi);
  m.def("filter", &filter);
}
