// Host side of the CUDA kernels: checks (semicrf_host.h's OpCall), device
// guard, current stream, working-memory placement, launches, and the
// registration for the CUDA dispatch key. The device code is in *_kernel.cuh.
//
// Thread mapping. One CTA of kThreads = 256 threads (8 warps) per sequence,
// grid = B; the CTA walks the positions of its sequence one step at a time
// and spreads each step over labels and durations:
//   forward step t (CtaScan::step / advance, forward_kernel.cuh)
//     A  alpha[t, c]: warp w takes labels c ≡ w (mod 8); lane l takes
//        durations d ≡ l+1 (mod 32) and the warp reduces the LSE over d
//        (duration-dependent: each lane also loops over c' for its d). The
//        duration and (K, C, C) transition scores come from label-major
//        copies (OpCall's duration_by_label, transition_by_label), so the
//        lanes' consecutive d read consecutive addresses; static, float32,
//        K <= 256: each lane keeps its terms in registers between the max
//        and the sum (warp_lse_once), evaluating each once.
//        Threads c ≡ tid (mod 256) stage scores[t], start_scores[t], the
//        first 256 labels loaded before phase A so that the loads overlap it.
//     B  m = max_c alpha, reduced by every warp on its own; alpha_hat;
//        static sigma[t, c]: warp per c, lanes over c'.
//     C  ring update: thread tid owns ring entries i ≡ tid (mod 256),
//        i = slot·C + c.
//   exp-domain forward step t (static transition, with
//   FLASHSEMICRF_CUDA_ALGORITHM=exp; its mapping and six barriers a step are
//   described in exp_forward_kernel.cuh): the ring pass over (duration
//   group, label) threads, per-label factors and ghosts over label threads;
//   sequences it cannot certify are marked, and the log-domain forward
//   above then runs for them only. For C <= 32 it runs in blocks of up to
//   32 positions instead (exp_blocked_kernel.cuh): the steps in warp 0,
//   while warps 1-7 sum the next block's far part; two barriers a block.
//   backward sweep step t (backward_kernel.cuh)
//     S0 threads c ≡ tid (mod 256) stage alpha_hat/sigma_hat rows and the
//        inputs of t; the first 256 labels' values were loaded into
//        registers during the step before.
//     (t = 0) the first segment's mass: warp per c, tau by warp_lse, then a
//        block_sum re-normalises Q.
//     P1 lanes over labels: with C < 256, thread tid = g·C + c (g < 256/C
//        groups) takes label c and durations d ≡ g+1 (mod groups), so a warp
//        reads C-contiguous runs of the ring, the duration scores and sums;
//        with C ≥ 256, labels c ≡ tid and every d. Each thread adds its
//        posteriors into sum_dur[(d-1)·C + c] (owned by it for the whole
//        sweep), into the end-mass ring slot (t+d) mod K, and into its
//        partial start mass (and static tau max/sum), stored per thread; its
//        share of the coverage of coverage_position(t, K) is summed too, and
//        where coverage_checked_at a block_sum of it re-normalises Q.
//     P1' thread c ≡ tid adds label c's partials in group order: start mass
//        (start-score gradient), static u = start + tau; it finishes the
//        running coverage of position t+K-1 from the end-mass slot t mod K,
//        writes its scores gradient once, and restarts the slot at minus
//        the start mass of t (at t = 0 it also finishes positions K-2 … 0).
//     P2 warp per c', lanes over c (static) or over (d, c) pairs (DD): beta
//        and the transition gradients.
//     P3 q = max beta (every warp), end-score masses, ring update as in C.
//        At the first position t = j·interval (j >= 1) of a span, before the
//        ring update, Q is re-anchored: every thread loops over d1 and takes
//        the (d2, c) entries ≡ tid (mod 256) of the crossing mass (plus labels
//        c ≡ tid of the boundary mass), summed in a double, then block_sum.
//     block_sum: warps reduce by butterfly, lane 0 stores one double per
//     warp, and after a barrier every thread adds the 8 in order.
//   exp-domain backward sweep step t (static transition, with
//   FLASHSEMICRF_CUDA_ALGORITHM=exp; exp_backward_kernel.cuh): the phases,
//   mapping and owners above with float64 probabilities for logs; the ring's
//   move to t-1 is fused into P1 (four barriers a step), and a re-anchor's
//   crossing mass is summed before P1 moves the ring. Sequences whose lost
//   mass it cannot bound are marked, and the log-domain sweep above then
//   runs for them only.
//   span-parallel sweeps (FLASHSEMICRF_CUDA_SWEEP=parallel, static
//   transition): grid = B·n_ckpt, CTA b·n_ckpt + j recomputes and sweeps
//   span j of sequence b alone with backward_kernel's mapping, from the
//   backward ring that the forward over the problem's mirror image left in
//   its checkpoints (SpanParallelSweeps, semicrf_host.h), anchoring its
//   offset at its last position before its first posterior. That mirror
//   forward runs in the forward op, beside the forward on a second stream
//   (B more CTAs), and its checkpoints are rows B … 2B-1 of the forward's
//   checkpoint outputs; a backward given B rows runs it itself first.
//   chunked forward (FLASHSEMICRF_CUDA_FORWARD=chunks, static transition):
//   grid = B·chunks, CTA b·chunks + j runs the forward step's mapping over
//   chunk j of sequence b (a warm-up from a guess, then its spans); then
//   junction_kernel, one CTA a sequence, walks the junctions in order:
//   threads over the ring's entries, each junction's range of fitting
//   shifts reduced by shuffles and one slot a warp (two barriers).
//   Viterbi: the forward step in the max semiring; the step's backpointer
//   rows are written by the lane 0 that reduced each label (A: duration,
//   and previous label for the (K, C, C) transition; B: static previous
//   label) into one span's buffer. The first pass saves the ring at every
//   span start; then every thread walks the path back through the buffered
//   span (the same reads, broadcast, so all agree on where the path leaves
//   it), thread 0 writing the labels, and the CTA recomputes the next span
//   from its checkpoint (a barrier after the walk, one after the restore).
//   Counters, not divisions: t % K is kept by CtaScan (tK, stepped in
//   advance(), set once per load()) and by the sweep (stepped down), the
//   forward's next checkpoint by a running position.
//
// Barrier discipline. Shared state of a CTA (rings, rows of C values) is
// written in one phase and read in the next, with __syncthreads() between
// every store and the next read of another thread: step() has one barrier
// after A and one after B, the caller one after C (and after its reads of
// alpha/sigma); the sweep has one after each of S0, P1, P1', P2, P3 (after
// P1 it is block_sum's where the coverage is checked; P1' at t = 0 ends the
// sweep), one in the t = 0 mass and one inside P3 at a re-anchor
// (block_sum's; it also orders the crossing mass's ring reads before the
// ring update). block_sum's slots are written only after a barrier that
// follows the previous reads. Reductions that every thread needs (m, q) are
// recomputed by each warp from the same shared row rather than broadcast,
// so they need no barrier of their own. Gradient elements are written by
// one thread per step; different steps are ordered by these barriers, so
// results are deterministic without atomics. The duration and transition
// gradients add up in float64 sums, each element in one fixed thread for
// the whole sweep, in the order of t; the end-mass ring slots are added to
// by P1's owners of (d, c) and read and restarted by thread c in P1', the
// barrier after P1 between them; a last barrier hands the sums to the
// threads that convert them to the output dtype. Warp collectives
// (shuffles) only run under warp-uniform control flow; padded lanes
// (d > dmax, c ≥ C) form no addresses.
//
// Working memory. Rings, rows and the float64 sums live in dynamic shared
// memory when they fit in the device's opt-in limit (227 KB on H100);
// otherwise the backward's forward ring, then the sums, then the rings, and
// at last the rows move to a global workspace slice per CTA (plan_arena).
// When all of them fit, the kernels run their kShared = true instantiation,
// whose pointers come from the __shared__ array itself, so that the compiler
// emits shared loads (LDS) rather than generic ones (LD.E); otherwise the
// kShared = false one reaches both places through generic pointers
// (__syncthreads() also orders a CTA's global memory accesses). Viterbi has
// only the generic one. Rings are stored slot-major with an odd row stride
// (C | 1), so a warp reading one label across 32 slots hits 32 banks. Per
// sequence, shared memory needs (scalars): forward, Viterbi and filter
// S·(C|1) + 5C (S = K, or 2K for the (K, C, C) transition), and Viterbi
// 2·(interval+1)·C int32 for one span's backpointers (the first to move to
// the workspace, where its n_ckpt·S·C scalars and n_ckpt doubles of
// checkpoints always are: O(sqrt(T·K)·C) per sequence, interval =
// floor(sqrt(T·K))); backward (K + S)·(C|1) + 12C + 2·max(C, 256), plus
// 2·K·C + C² + C + max(C, 256) doubles of sums, end-mass ring, running
// coverage and partial start masses (2·K·C + K·C² + … for the (K, C, C)
// transition). The backward also takes (interval+1)·C scalars twice and
// interval+1 doubles of global memory for the recomputed span (n_ckpt times
// that with FLASHSEMICRF_CUDA_RECOMPUTE=spans, where recompute_kernel, one
// CTA a span, grid = B·n_ckpt, fills every span's rows before the sweep,
// each CTA with its own forward ring and rows), plus 8 doubles for
// block_sum. All of it is one workspace tensor per call, each array
// 16-byte aligned. The span-parallel sweeps take that per span (B·n_ckpt
// CTAs), plus the mirror image's scores (and start/end scores) and
// checkpoints, and (K·C + C²) + K·C doubles of partial sums and coverage
// spill a span: working memory linear in T.
//
// Registers. The backward kernels are bounded for one CTA per SM (up to 255
// registers a thread; at the default cap of 128 they spilled), the forward
// and the filter for four in float32 (64) and two in float64 (128), where
// the compiler's own choice spilled; ptxas_sm90.txt holds the counts.
//
// Numerics follow the CPU kernel step for step (same normalisers, same
// checkpoint contents: the largest emission of each position moves into the
// offset as the ring advances; the backward recomputes log Z in float64 at
// t = L, and re-normalises at the same positions); only the association
// order of the sums differs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "semicrf.h"
#include "semicrf_host.h"
#include "backward_kernel.cuh"
#include "exp_backward_kernel.cuh"
#include "exp_blocked_kernel.cuh"
#include "exp_forward_kernel.cuh"
#include "forward_kernel.cuh"

namespace flashsemicrf {
namespace {

using cuda::Arena;

// One launch of grid CTAs of kThreads on the current stream, with the
// arena's shared memory, checked.
template <typename P, typename KernelFor, typename... Extra>
void launch_kernel(const at::Tensor& scores, const P& p, int64_t grid, const Arena& arena,
                   KernelFor kernel_for, Extra... extra) {
  const size_t smem = static_cast<size_t>(arena.smem_bytes);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "flashsemicrf_cuda", [&] {
    const auto kernel = p.duration_dependent
                            ? cuda::pick_kernel(kernel_for, scalar_t(0), std::true_type{}, arena)
                            : cuda::pick_kernel(kernel_for, scalar_t(0), std::false_type{}, arena);
    // Above 48 KB a kernel must opt in to more dynamic shared memory.
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(grid), cuda::kThreads, smem,
             at::cuda::getCurrentCUDAStream()>>>(p, arena, extra...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_cuda(const at::Tensor& scores) {
  TORCH_CHECK(scores.is_cuda(), "flashsemicrf: the CUDA kernels need CUDA tensors, got scores on ",
              scores.device());
}

// The launch every op shares, under a device guard: the arena planned for
// this device's opt-in shared memory, a workspace for the arrays it places in
// global memory (freed into the caching allocator on return, which keeps it
// for this stream's later work), then the kernel with one CTA of kThreads
// per sequence on the current stream, checked. plan(p, elem_bytes,
// smem_limit) -> Arena; kernel_for(scalar_t{}, std::bool_constant<DD>{}[,
// std::bool_constant<kShared>{}]) -> the kernel (cuda::pick_kernel); extra
// arguments follow (p, arena) in the kernel's call.
// launch_ctas: the same with `ctas` CTAs, each with its own workspace slice
// (launch_per_sequence: one a sequence).
template <typename P, typename Plan, typename KernelFor, typename... Extra>
void launch_ctas(const at::Tensor& scores, const P& p, int64_t ctas, Plan plan,
                 KernelFor kernel_for, Extra... extra) {
  check_cuda(scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  if (ctas == 0) return;
  const size_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  Arena arena = plan(p, scores.element_size(), smem_limit);
  at::Tensor workspace;
  if (arena.workspace_stride > 0) {
    workspace = at::empty({ctas * arena.workspace_stride}, scores.options().dtype(at::kByte));
    arena.workspace = workspace.data_ptr<uint8_t>();
  }
  launch_kernel(scores, p, ctas, arena, kernel_for, extra...);
}
template <typename P, typename Plan, typename KernelFor, typename... Extra>
void launch_per_sequence(const at::Tensor& scores, const P& p, Plan plan, KernelFor kernel_for,
                         Extra... extra) {
  launch_ctas(scores, p, p.B, plan, kernel_for, extra...);
}

// FLASHSEMICRF_CUDA_RECOMPUTE=spans: every span's recompute first, one CTA a
// span (recompute_kernel), then the sweeps reading them; the two kernels
// share one workspace (the sweep's arena from plan_all_spans, whose span
// buffers hold every span, then one recompute arena a span). sweep_for
// picks the sweep kernel as launch_kernel's kernel_for; extra follows
// (p, arena, precomputed = true) in its call.
template <typename PlanAllSpans, typename SweepFor, typename... Extra>
void launch_backward_with_span_recompute(const at::Tensor& scores, const BackwardParams& p,
                                         PlanAllSpans plan_all_spans, SweepFor sweep_for,
                                         Extra... extra) {
  check_cuda(scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  if (p.B == 0) return;
  const size_t smem_limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t e = scores.element_size();
  Arena sweep = plan_all_spans(p, e, smem_limit);
  Arena recompute = cuda::plan_recompute_arena(p, e, smem_limit);
  const int64_t spans = p.B * p.n_ckpt;
  at::Tensor workspace = at::empty(
      {p.B * sweep.workspace_stride + spans * recompute.workspace_stride},
      scores.options().dtype(at::kByte));
  sweep.workspace = workspace.data_ptr<uint8_t>();
  recompute.workspace = sweep.workspace + p.B * sweep.workspace_stride;
  launch_kernel(scores, p, spans, recompute, [](auto zero, auto dd, auto smem) {
    return &cuda::recompute_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
  }, sweep);
  launch_kernel(scores, p, p.B, sweep, sweep_for, true, extra...);
}

// The log-domain sweep, for every sequence (redo null) or for those the
// exp-domain sweep marked.
auto log_sweep_kernel = [](auto zero, auto dd, auto smem) {
  return &cuda::backward_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
};
// The exp-domain sweep (static transition only).
auto exp_sweep_kernel = [](auto zero, auto, auto smem) {
  return &cuda::exp_backward_kernel<decltype(zero), decltype(smem)::value>;
};

// Work queued on `to` from here on waits for what is queued on `from` so far
// (an event without timing; ATen's CUDAEvent header warns under gcc).
void stream_waits_for(cudaStream_t to, cudaStream_t from) {
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, from));
  C10_CUDA_CHECK(cudaStreamWaitEvent(to, event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));  // released once the wait is done
}

// FLASHSEMICRF_CUDA_SWEEP=parallel: the span-parallel backward.
bool uses_parallel_sweeps() {
  return env_switch("FLASHSEMICRF_CUDA_SWEEP", "parallel", "serial", false);
}

// FLASHSEMICRF_CUDA_FORWARD=chunks: the chunked forward (forward_kernel's
// chunks), static transition.
bool uses_chunked_forward(const ForwardParams& p) {
  return !p.duration_dependent &&
         env_switch("FLASHSEMICRF_CUDA_FORWARD", "chunks", "serial", false);
}

// The chunked forward's launches (cuda::run_chunk_tries: one CTA a chunk,
// then one a sequence for the junctions, twice), where the sequences make two
// chunks or more (cuda::chunked); returns the verdicts (B,), 1 for the
// sequences the serial forward must redo, or an undefined tensor where
// nothing ran. Its buffers are freed into this stream's pool, which keeps
// them until the work queued on it is done.
at::Tensor run_chunked_forward(const ForwardParams& p, const at::Tensor& scores) {
  check_cuda(scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  const ForwardParams q = cuda::chunked(p, cuda::chunk_warmup(p.K, scores.element_size()));
  if (q.chunks < 2 || p.B == 0) return at::Tensor();
  at::Tensor verdicts = at::empty({p.B}, scores.options().dtype(at::kInt));
  at::Tensor ring = at::empty({cuda::chunk_ring_scalars(q)}, scores.options());
  at::Tensor doubles = at::empty({cuda::chunk_doubles(q)}, scores.options().dtype(at::kDouble));
  cuda::run_chunk_tries(
      q, ring.data_ptr(), doubles.data_ptr<double>(), verdicts.data_ptr<int32_t>(),
      [&](const ForwardParams& r, const int32_t* redo) {
        launch_ctas(scores, r, r.B * r.chunks, cuda::plan_forward_arena,
                    [](auto zero, auto dd, auto smem) {
                      return &cuda::forward_kernel<decltype(zero), decltype(dd)::value,
                                                   decltype(smem)::value>;
                    },
                    redo);
      },
      [&](const ForwardParams& r, int32_t* marks, bool retry) {
        AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "flashsemicrf_cuda_junctions", [&] {
          cuda::junction_kernel<scalar_t><<<static_cast<unsigned>(r.B), cuda::kThreads,
                                            cuda::junction_smem_bytes(),
                                            at::cuda::getCurrentCUDAStream()>>>(r, marks, retry);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return verdicts;
}

struct Cuda {
  // With the span-parallel sweeps and the static transition the forward
  // also saves the mirror image's checkpoints (rows B … 2B-1 of its
  // checkpoint outputs; flashsemicrf._contract's fake says the same), so
  // that the backward starts with its sweeps.
  static bool saves_mirror(const ForwardParams& p) {
    return !p.duration_dependent && uses_parallel_sweeps();
  }

  // FLASHSEMICRF_CUDA_FORWARD=chunks, static transition, two chunks or
  // more: the chunked forward (run_chunked_forward), then the serial
  // log-domain forward for the sequences its junctions rejected (whatever
  // the algorithm switch says). Else FLASHSEMICRF_CUDA_ALGORITHM=exp,
  // static transition: the exp-domain forward (in blocks of positions for
  // C <= 32, else step by step), then the log-domain forward for the
  // sequences whose log Z it could not certify (its CTAs for the others
  // return at once, so nothing waits on the host). Otherwise (log, the
  // default until a GPU has timed both: bench/results/gpu-forecast.md) the
  // log-domain forward for all. Where p.mirror_ring is set (saves_mirror)
  // and there is more than one span, the mirror image's forward runs beside
  // it on a second stream: B more CTAs at once, which the GPU has room for at
  // small B, so that the backward's chain is already done when the backward
  // starts.
  static void run(const ForwardParams& p, const at::Tensor& scores) {
    if (p.mirror_ring != nullptr && SpanParallelSweeps::applies(p)) {
      check_cuda(scores);
      const c10::cuda::CUDAGuard guard(scores.device());
      SpanParallelSweeps sweeps;
      auto& mirror = sweeps.mirror(p, scores);  // the mirrored copy, on this stream
      const at::cuda::CUDAStream main = at::cuda::getCurrentCUDAStream();
      const at::cuda::CUDAStream side = at::cuda::getStreamFromPool(false, main.device_index());
      stream_waits_for(side, main);
      {
        // Its workspace comes from the side stream's pool; what it reads
        // from this one is freed only after this stream has waited for it.
        const c10::cuda::CUDAStreamGuard on_side(side);
        run_forward(mirror.params, sweeps.mirrored_scores());
      }
      run_forward(p, scores);
      stream_waits_for(main, side);
      return;
    }
    run_forward(p, scores);
  }
  static void run_forward(const ForwardParams& p, const at::Tensor& scores) {
    const int32_t* redo = nullptr;
    at::Tensor verdicts;
    if (uses_chunked_forward(p)) verdicts = run_chunked_forward(p, scores);
    if (verdicts.defined()) {
      redo = verdicts.data_ptr<int32_t>();
    } else if (!p.duration_dependent && uses_exp_domain("FLASHSEMICRF_CUDA_ALGORITHM", false)) {
      verdicts = at::empty({std::max<int64_t>(p.B, 1)}, scores.options().dtype(at::kInt));
      const bool blocked = cuda::uses_blocked_exp_forward(p.C);
      launch_per_sequence(
          scores, p, blocked ? cuda::plan_exp_blocked_arena : cuda::plan_exp_forward_arena,
          [blocked](auto zero, auto, auto smem) {
            return blocked ? &cuda::exp_blocked_kernel<decltype(zero), decltype(smem)::value>
                           : &cuda::exp_forward_kernel<decltype(zero), decltype(smem)::value>;
          },
          verdicts.data_ptr<int32_t>());
      redo = verdicts.data_ptr<int32_t>();
    }
    launch_per_sequence(
        scores, p, cuda::plan_forward_arena,
        [](auto zero, auto dd, auto smem) {
          return &cuda::forward_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
        },
        redo);
  }
  // FLASHSEMICRF_CUDA_RECOMPUTE: `sweep` (default) recomputes each span in
  // the backward kernel as its sweep reaches it; `spans` recomputes them all
  // at once beforehand (launch_backward_with_span_recompute), taking
  // 2·B·T·C scalars more working memory so that only the sweep stays serial.
  // FLASHSEMICRF_CUDA_ALGORITHM=exp, static transition: the exp-domain
  // sweep, then the log-domain one for the sequences it could not certify
  // (those recompute their spans themselves).
  // FLASHSEMICRF_CUDA_SWEEP=parallel, static transition: the mirror
  // image's forward (with the forward's algorithm) gives the backward ring at
  // the end of every span, and then one CTA a span recomputes and sweeps it
  // (backward_kernel, log domain), all spans at once; the host adds up their
  // partial sums (SpanParallelSweeps). The two switches above do not apply.
  // Where the forward saved the mirror's checkpoints (p.mirror_ring) the
  // sweeps start from those; else the mirror's forward runs here first.
  static void run(const BackwardParams& p, const at::Tensor& scores) {
    const bool spans = env_switch("FLASHSEMICRF_CUDA_RECOMPUTE", "spans", "sweep", false);
    if (uses_parallel_sweeps() && SpanParallelSweeps::applies(p)) {
      SpanParallelSweeps sweeps;
      if (p.mirror_ring == nullptr) {
        auto& mirror = sweeps.mirror(p, scores);
        run_forward(mirror.params, sweeps.mirrored_scores());
      }
      BackwardParams q = p;
      sweeps.attach(q, scores);
      launch_ctas(scores, q, q.B * q.n_ckpt, cuda::plan_backward_arena, log_sweep_kernel, false,
                  static_cast<const int32_t*>(nullptr));
      sweeps.finish(q);
      return;
    }
    const int32_t* redo = nullptr;
    at::Tensor verdicts;
    if (!p.duration_dependent && uses_exp_domain("FLASHSEMICRF_CUDA_ALGORITHM", false)) {
      verdicts = at::empty({std::max<int64_t>(p.B, 1)}, scores.options().dtype(at::kInt));
      int32_t* marks = verdicts.data_ptr<int32_t>();
      if (spans) {
        launch_backward_with_span_recompute(scores, p, cuda::plan_exp_backward_arena_all_spans,
                                            exp_sweep_kernel, marks);
      } else {
        launch_per_sequence(scores, p, cuda::plan_exp_backward_arena, exp_sweep_kernel, false,
                            marks);
      }
      redo = marks;
    } else if (spans) {
      launch_backward_with_span_recompute(scores, p, cuda::plan_backward_arena_all_spans,
                                          log_sweep_kernel, static_cast<const int32_t*>(nullptr));
      return;
    }
    launch_per_sequence(scores, p, cuda::plan_backward_arena, log_sweep_kernel, false, redo);
  }
  static void run(const ViterbiParams& p, const at::Tensor& scores) {
    launch_per_sequence(scores, p, cuda::plan_viterbi_arena, [](auto zero, auto dd) {
      return &cuda::viterbi_kernel<decltype(zero), decltype(dd)::value>;
    });
  }
  static void run(const FilterParams& p, const at::Tensor& scores) {
    launch_per_sequence(scores, p, cuda::plan_forward_arena, [](auto zero, auto dd, auto smem) {
      return &cuda::filter_kernel<decltype(zero), decltype(dd)::value, decltype(smem)::value>;
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(flashsemicrf, CUDA, m) { OpEntries<Cuda>::register_all(m); }

}  // namespace flashsemicrf
