// The backward pass of one sequence by one CTA: walk the checkpoints in
// reverse, recompute each span's forward messages into a global buffer with
// CtaScan, and sweep the backward ring down through the span, writing every
// gradient element from one thread at a time (no atomics; barriers order the
// steps). The CPU kernel's backward_sequence, step for step.
//
// The recomputes depend only on the checkpoints, so they can also run before
// the sweep, every span of every sequence at once (recompute_kernel, one CTA
// a span, into a buffer that holds all of a sequence's spans); the sweep then
// reads them (precomputed) and only its own steps stay serial. The same
// CtaScan code computes the same rows, so the gradients are the same bits.
#pragma once

#include "common_kernel.cuh"
#include "forward_kernel.cuh"

namespace flashsemicrf {
namespace cuda {

// Rows of C scalars the sweep stages per step.
constexpr int kSweepRows = 7;
// P1's per-thread partials, one slot per (duration group, label), each
// max(C, kThreads) long: static tau's max and sum (scalars, after the rows),
// and the start mass (doubles, after the sums).
constexpr int kSweepPartials = 2;
HOST_DEVICE int64_t partial_slots(int64_t C) { return C > kThreads ? C : kThreads; }

// Arrays of the backward kernel, in Arena order.
enum BackwardArray {
  kBackwardRing = 0,        // (K, ld) backward ring
  kBackwardScanRing = 1,    // (S, ld) the recompute's forward ring
  kBackwardScanRows = 2,    // (kScanRows, C)
  kBackwardSweepRows = 3,   // (kSweepRows, C), then kSweepPartials rows of partial_slots(C)
  kBackwardSpanAlpha = 4,   // (interval+1, C) the recomputed span's alpha_hat
                            // (every span's, (n_ckpt, interval+1, C), when precomputed)
  kBackwardSpanSigma = 5,   // (interval+1, C) and sigma_hat (the same)
  kBackwardSpanOffset = 6,  // (interval+1) doubles: their offsets (the same)
  kBackwardReduce = 7,      // (kWarps) doubles: one per warp for block sums
  kBackwardSums = 8,        // (2·K·C + (K or 1)·C·C + C + slots) doubles: the
                            // duration and transition gradients, summed in
                            // float64, the coverage ring and running sum, and
                            // P1's start-mass partials
  kBackwardArrays = 9
};

// spans: how many spans the span buffers hold (1, or n_ckpt when the
// recomputes run before the sweep).
inline Arena plan_backward_arena_for(const ForwardParams& p, size_t elem_bytes, size_t smem_limit,
                                     int64_t spans) {
  const int64_t e = static_cast<int64_t>(elem_bytes), ld = padded_row(static_cast<int>(p.C));
  const int64_t span = spans * (p.interval + 1), d = sizeof(double);
  const int64_t sums = 2 * p.K * p.C + (p.duration_dependent ? p.K : 1) * p.C * p.C + p.C +
                       partial_slots(p.C);
  const int64_t rows = kSweepRows * p.C + kSweepPartials * partial_slots(p.C);
  const int64_t bytes[kBackwardArrays] = {
      p.K * ld * e, p.ring_width * ld * e, kScanRows * p.C * e, rows * e,
      span * p.C * e, span * p.C * e, span * d, kWarps * d, sums * d};
  // The forward ring goes first: it is the larger one and is only touched by
  // the recompute; then the sums, touched once per step and element. The
  // span buffers are too large for shared memory.
  const int evict[] = {kBackwardScanRing, kBackwardSums, kBackwardRing, kBackwardScanRows,
                       kBackwardSweepRows};
  return plan_arena(bytes, kBackwardArrays, evict, 5, smem_limit);
}
inline Arena plan_backward_arena(const ForwardParams& p, size_t elem_bytes, size_t smem_limit) {
  return plan_backward_arena_for(p, elem_bytes, smem_limit, 1);
}
inline Arena plan_backward_arena_all_spans(const ForwardParams& p, size_t elem_bytes,
                                           size_t smem_limit) {
  return plan_backward_arena_for(p, elem_bytes, smem_limit, p.n_ckpt);
}

// The span-parallel recompute's own arrays, one set per CTA (span): the
// CtaScan ring and rows, in shared memory where they fit.
enum RecomputeArray { kRecomputeRing = 0, kRecomputeRows = 1, kRecomputeArrays = 2 };
inline Arena plan_recompute_arena(const ForwardParams& p, size_t elem_bytes, size_t smem_limit) {
  const int64_t e = static_cast<int64_t>(elem_bytes), ld = padded_row(static_cast<int>(p.C));
  const int64_t bytes[kRecomputeArrays] = {p.ring_width * ld * e, kScanRows * p.C * e};
  const int evict[] = {kRecomputeRing, kRecomputeRows};
  return plan_arena(bytes, kRecomputeArrays, evict, 2, smem_limit);
}

// Span j's forward messages from its checkpoint (all threads): alpha_hat,
// sigma_hat and their offsets at t = first(j) … last(j, L), in rows t - first.
// Ends after a barrier, with the rows written; the scan's ring is left at
// step last (the open segments [last-d, last)), relative to the offset
// returned (row last's less the max that step last took out).
template <typename scalar_t, bool DD>
__device__ double recompute_span(CtaScan<scalar_t, DD, false>& scan,
                               const SequenceCheckpoints<scalar_t>& ckpt, int64_t j, int64_t L,
                               int C, scalar_t* alpha_buf, scalar_t* sigma_buf, double* off_buf) {
  const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
  scan.load(first, ckpt.at(j), ckpt.offset + j);
  __syncthreads();
  double ring_offset = 0.0;
  for (int64_t t = first; t <= last; ++t) {
    const scalar_t m = scan.step(t);
    for (int c = threadIdx.x; c < C; c += kThreads) {
      alpha_buf[(t - first) * C + c] = scan.alpha[c];
      sigma_buf[(t - first) * C + c] = scan.sigma[c];
    }
    if (threadIdx.x == 0) off_buf[t - first] = scan.offset;
    if (t < last) {
      scan.advance(t, m);
    } else {
      ring_offset = scan.offset - static_cast<double>(m);
    }
    __syncthreads();
  }
  return ring_offset;
}

// The sweeps' shared parts (backward_kernel here, exp_backward_kernel in
// exp_backward_kernel.cuh).

// P1's mapping of threads to (duration group, label): with C < kThreads,
// thread tid = group·C + c takes label c and the durations d ≡ group + 1
// (mod groups), so a warp reads C-contiguous runs of the ring, the duration
// scores and the duration sums; with more labels, labels c ≡ tid and every
// d. Fixed for the whole sweep, so each duration sum has one owner; a
// thread's partials go to slot partial(c).
struct SweepMapping {
  int groups, my_group, my_label, label_stride;
  __device__ explicit SweepMapping(int C)
      : groups(C < kThreads ? kThreads / C : 1),
        my_group(C < kThreads ? static_cast<int>(threadIdx.x) / C : 0),
        my_label(C < kThreads ? (my_group < groups ? static_cast<int>(threadIdx.x) - my_group * C : C)
                              : static_cast<int>(threadIdx.x)),
        label_stride(C < kThreads ? C : kThreads) {}
  __device__ int partial(int c) const { return groups > 1 ? static_cast<int>(threadIdx.x) : c; }
};

// The span rows a sweep reads: span j's alpha_hat, sigma_hat and offsets,
// recomputed from its checkpoint (open, all threads; ends after a barrier)
// or, precomputed, the rows recompute_kernel left in the span buffers
// (every span's, one after another).
template <typename scalar_t>
struct SpanRows {
  scalar_t* const alpha_spans;
  scalar_t* const sigma_spans;
  double* const off_spans;
  scalar_t* alpha;
  scalar_t* sigma;
  double* off;
  __device__ SpanRows(const Arena& arena, int64_t b)
      : alpha_spans(arena.in_workspace<scalar_t>(kBackwardSpanAlpha, b)),
        sigma_spans(arena.in_workspace<scalar_t>(kBackwardSpanSigma, b)),
        off_spans(arena.in_workspace<double>(kBackwardSpanOffset, b)),
        alpha(alpha_spans),
        sigma(sigma_spans),
        off(off_spans) {}
  // Returns recompute_span's ring offset (0 when precomputed: no ring).
  template <bool DD>
  __device__ double open(bool precomputed, CtaScan<scalar_t, DD, false>& scan,
                         const SequenceCheckpoints<scalar_t>& ckpt, int64_t j, int64_t L, int C,
                         int64_t interval) {
    if (precomputed) {
      const int64_t span = interval + 1;
      alpha = alpha_spans + j * span * C;
      sigma = sigma_spans + j * span * C;
      off = off_spans + j * span;
      return 0.0;
    }
    return recompute_span(scan, ckpt, j, L, C, alpha, sigma, off);
  }
};

// S0 of a sweep step: the inputs of step t into shared rows of C
// (alpha_hat[t], sigma_hat[t], start_scores[t], scores[t-1], end_scores[t-1]),
// threads c ≡ tid. The first kThreads labels' values are loaded into
// registers a step ahead (load_ahead), so that S0 does not wait for global
// memory.
template <typename scalar_t>
struct SweepStage {
  scalar_t *alpha, *sigma, *start, *score, *end;  // the rows
  struct Values {
    scalar_t alpha, sigma, start, score, end;
  } next;
  // Thread tid's values of step t (row `row` of the span's buffers).
  __device__ void load_ahead(const SequenceInputs<scalar_t>& in, const SpanRows<scalar_t>& span,
                             int64_t t, int64_t row, int64_t L, int C) {
    const int tid = threadIdx.x;
    next = Values{};
    if (tid < C) {
      next.alpha = span.alpha[row * C + tid];
      next.sigma = span.sigma[row * C + tid];
      if (t < L) next.start = in.start(t, tid);
      if (t > 0) {
        next.score = in.score(t - 1, tid);
        next.end = in.end(t - 1, tid);
      }
    }
  }
  // S0 of step t of the span that starts at `first`: stage its rows, load
  // step t-1's values ahead, and return the offset of its forward rows. The
  // caller's barrier follows.
  __device__ double enter(const SequenceInputs<scalar_t>& in, const SpanRows<scalar_t>& span,
                          int64_t t, int64_t first, int64_t L, int C) {
    const int64_t row = t - first;
    stage(in, span, t, row, L, C);
    if (t > first) load_ahead(in, span, t - 1, row - 1, L, C);
    return span.off[row];
  }
  __device__ void stage(const SequenceInputs<scalar_t>& in, const SpanRows<scalar_t>& span,
                        int64_t t, int64_t row, int64_t L, int C) {
    const int tid = threadIdx.x;
    if (tid < C) {
      alpha[tid] = next.alpha;
      sigma[tid] = next.sigma;
      start[tid] = next.start;
      score[tid] = next.score;
      end[tid] = next.end;
    }
    for (int c = tid + kThreads; c < C; c += kThreads) {
      alpha[c] = span.alpha[row * C + c];
      sigma[c] = span.sigma[row * C + c];
      if (t < L) start[c] = in.start(t, c);
      if (t > 0) {
        score[c] = in.score(t - 1, c);
        end[c] = in.end(t - 1, c);
      }
    }
  }
};

// P1' of label c at step t (thread c ≡ tid), after the barrier that ends
// P1: `mass`, the posteriors of the label-c segments starting at t, is the
// start-score gradient; position t+K-1 is complete (no segment starting
// below t reaches it): its coverage (the running sum `covered` of the
// end-mass slots, see backward_kernel) is its scores gradient, and its slot
// tK = t % K starts over at minus the mass that starts at t, for the
// segments that end at t. At t = 0 no segment starts below 0: positions
// K-2 … 0 are complete too.
//
// A span-parallel sweep (spill non-null) counts only the segments that start
// in its span [first, last]: the positions after `last` go to spill (row
// u - last - 1), for the host to add to the next span's, and at t = first the
// positions first + K - 2 … first are complete as far as its segments go
// (the span before adds the rest).
template <typename scalar_t>
__device__ void finish_label(const SequenceGradients<scalar_t>& grad, double* ends,
                             double* covered, int c, double mass, int64_t t, int tK, int K,
                             int64_t L, int C, int64_t first, int64_t last, double* spill) {
  auto write = [&](int64_t u) {
    if (u >= L) return;
    if (spill && u > last) {
      spill[(u - last - 1) * C + c] = covered[c];
    } else {
      grad.scores[u * C + c] = static_cast<scalar_t>(covered[c]);
    }
  };
  if (grad.start_scores) grad.start_scores[t * C + c] = static_cast<scalar_t>(mass);
  if (t == 0) grad.start_transition[c] = static_cast<scalar_t>(mass);
  double& slot = ends[tK * C + c];
  covered[c] += slot;
  write(t + K - 1);
  slot = -mass;
  if (t == 0 || (spill && t == first)) {
    for (int k = K - 2; k >= 0; --k) {
      covered[c] += ends[slot_after(tK, k + 1, K) * C + c];
      write(t + k);
    }
  }
}

// A dead sequence (log Z = -inf) has no gradient: both kernels skip it.
template <typename scalar_t>
__device__ bool sequence_is_dead(const BackwardParams& p, int64_t b) {
  return static_cast<double>(static_cast<const scalar_t*>(p.log_z)[b]) ==
         -std::numeric_limits<double>::infinity();
}

// This thread's share of the re-anchor total at t = first of span j, tK =
// t % K (see the CPU kernel's "Re-anchor Q"): the mass of a boundary at t,
// sum_c exp(alpha_hat[t,c] + beta_hat[t,c] + shift_beta), plus the mass of the
// segments [t-d1, t+d2) across t (d1, d2 >= 1, d1+d2 <= K, d1 <= t): the
// checkpoint's open segment [t-d1, t) (fwd, duration order; (K, C, C): alpha
// rows 0..K-1 entered through transition[d1+d2-1], then gain rows K..2K-1)
// joined to the backward ring's [t, t+d2) (slot (t+d2) % K) with the
// duration score. Every thread runs the loop over d1 and takes the (d2, c)
// entries i = (d2-1)·C + c with i ≡ tid (mod kThreads), summing in a fixed
// order into a double.
//
// crossing_part is the second sum alone, with the open segments' rows from
// fwd_row(r) (checkpoint row r).
template <typename scalar_t, bool DD, typename FwdRow>
__device__ double crossing_part(const SequenceInputs<scalar_t>& in, int64_t t, int tK, int K,
                                int C, int ld, FwdRow fwd_row, const scalar_t* ring,
                                scalar_t shift_x) {
  const int tid = threadIdx.x;
  double part = 0.0;
  const int d1max = static_cast<int>(t < K - 1 ? t : K - 1);
  for (int d1 = 1; d1 <= d1max; ++d1) {
    const scalar_t* a = fwd_row(d1 - 1);
    const scalar_t* gain = DD ? fwd_row(K + d1 - 1) : nullptr;
    for_each_entry(K - d1, C, tid, kThreads, [&](int r, int c) {
      const int d2 = r + 1, d = d1 + d2;
      scalar_t opened = a[c];
      if (DD) {
        if (d1 < t) opened = lse<scalar_t>(C, [&](int cp) { return a[cp] + in.trans(d, cp, c); });
        opened += gain[c];
      }
      const scalar_t back = ring[slot_after(tK, d2, K) * ld + c];
      part += static_cast<double>(fexp(opened + back + in.dur(d, c) + shift_x));
    });
  }
  return part;
}
template <typename scalar_t, bool DD>
__device__ double reanchor_part(const SequenceInputs<scalar_t>& in, int64_t t, int tK, int K,
                                int C, int ld, const scalar_t* fwd, const scalar_t* ring,
                                const scalar_t* s_alpha, const scalar_t* s_beta, scalar_t q,
                                scalar_t shift_beta, scalar_t shift_x) {
  double part = 0.0;
  for (int c = threadIdx.x; c < C; c += kThreads)
    part += static_cast<double>(fexp(s_alpha[c] + (s_beta[c] - q) + shift_beta));
  return part + crossing_part<scalar_t, DD>(
                    in, t, tK, K, C, ld, [&](int r) { return fwd + r * C; }, ring, shift_x);
}

// One CTA per SM is enough (its working memory rarely leaves room for a
// second): the bound lets a thread keep up to 255 registers, where the
// compiler's default cap of 128 spilled.
// precomputed: recompute_kernel has written every span's rows (the arena
// from plan_backward_arena_all_spans); else each span is recomputed here.
// redo: null, or the exp-domain sweep's verdicts (exp_backward_kernel.cuh):
// only the sequences it marked are computed.
// With p.span_top_ring (static transition, not precomputed, redo null) the
// sweeps are span-parallel: CTA b·n_ckpt + j takes span j of sequence b
// alone, starting from the backward ring at its last position (the mirrored
// forward's checkpoint) instead of the sweep of the span after it, and
// writes its partial sums to p.span_sums and p.span_spill (BackwardParams).
template <typename scalar_t, bool DD, bool kShared>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const BackwardParams p, const Arena arena, bool precomputed,
                    const int32_t* redo) {
  const bool parallel = !DD && p.span_top_ring != nullptr;
  const int64_t cta = blockIdx.x;  // indexes the arena
  const int64_t b = parallel ? cta / p.n_ckpt : cta;
  if (redo && redo[b] == 0) return;
  // The forward's log Z only says whether the sequence is dead (-inf); the
  // sweep recomputes it in float64 at t = L, its first step (float32 log Z
  // carries |log Z|·6e-8 of rounding, too coarse for long sequences).
  double log_z = static_cast<double>(static_cast<const scalar_t*>(p.log_z)[b]);
  if (sequence_is_dead<scalar_t>(p, b)) return;  // outputs stay 0
  const scalar_t g = static_cast<const scalar_t*>(p.grad_log_z)[b];

  const int64_t L = sequence_length(p, b);
  const int K = static_cast<int>(p.K), C = static_cast<int>(p.C), ld = padded_row(C);
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const SequenceInputs<scalar_t> in(p, b);
  const SequenceGradients<scalar_t> grad(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  // The spans this CTA sweeps, last first.
  const int64_t j_top = parallel ? cta - b * p.n_ckpt : ckpt.last_span(L);
  const int64_t j_bottom = parallel ? j_top : 0;
  if (j_top > ckpt.last_span(L)) return;  // parallel: past the sequence's end

  SpanRows<scalar_t> span(arena, cta);  // span j's rows
  double* red = arena.in_workspace<double>(kBackwardReduce, cta);  // block_sum's warp sums
  // The shared parameters' gradients are sums over every position: float32
  // sums of 10^6 terms would lose ~1e-3, so they add up in float64, each
  // element always in the same thread (duration entries (d-1)·C + c in P1's
  // owner of that (d, c); transitions c' ≡ warp, and c ≡ lane or
  // (d-1)·C + c ≡ lane, in P2), in the order of t as on the CPU.
  double* sum_dur = arena.get<double, kShared>(kBackwardSums, cta);  // (K, C)
  double* sum_trans = sum_dur + static_cast<int64_t>(K) * C;        // (C, C) or (K, C, C)
  const int64_t n_trans = static_cast<int64_t>(DD ? K : 1) * C * C;
  // The scores gradient, position u: the mass of the segments that cover u,
  // sum over e > u of the mass of the segments that end at e, less the sum
  // over s > u of the mass of those that start at s (float64 running sums, so
  // that no per-position scan over durations is needed). Both sums take each
  // segment's posterior as P1 computes it, so they cancel to rounding.
  // ends[(e % K)·C + c] gathers, over the steps t = e-1 … e-K, the label-c
  // segments that end at e, starting from minus the mass that starts at e;
  // it is complete at step e - K, when position e - 1 is written, and
  // covered[c] is then its coverage. Entry c of both belongs to thread
  // c mod kThreads outside P1.
  double* ends = sum_trans + n_trans;                         // (K, C)
  double* covered = ends + static_cast<int64_t>(K) * C;       // (C)
  double* part_mass = covered + C;                             // P1's partials
  fill(sum_dur, 2 * K * C + n_trans + C, 0.0);  // ordered by the first span's barrier
  CtaScan<scalar_t, DD, false> scan(p, b, L, arena.get<scalar_t, kShared>(kBackwardScanRing, cta),
                                    arena.get<scalar_t, kShared>(kBackwardScanRows, cta));
  // Backward ring: slot e % K holds the label-c segment [t, e) with its
  // emissions, end score and beta_hat[e], relative to the backward offset Q.
  scalar_t* ring = arena.get<scalar_t, kShared>(kBackwardRing, cta);
  scalar_t* rows = arena.get<scalar_t, kShared>(kBackwardSweepRows, cta);
  double* spill = parallel ? p.span_spill + cta * K * C : nullptr;
  SweepStage<scalar_t> stage{rows, rows + C, rows + 4 * C, rows + 5 * C, rows + 6 * C, {}};
  scalar_t* s_alpha = stage.alpha;    // alpha_hat[t]
  scalar_t* s_sigma = stage.sigma;    // sigma_hat[t]
  scalar_t* s_u = rows + 2 * C;       // static: start_scores[t] + tau[t]
  scalar_t* s_beta = rows + 3 * C;    // beta[t] before normalisation
  scalar_t* s_start = stage.start;    // start_scores[t]
  scalar_t* s_score = stage.score;    // scores[t-1]
  scalar_t* s_end = stage.end;        // end_scores[t-1]
  scalar_t* part_max = rows + kSweepRows * C;  // P1's partials, slot tid (or c)
  scalar_t* part_sum = part_max + partial_slots(C);
  double Q = 0.0;         // the same in every thread
  double coverage = 0.0;  // this thread's share of the mass covering coverage_position(t, K)

  const SweepMapping map(C);  // P1's (duration group, label) of this thread
  const int groups = map.groups;

  scan.reset();
  for (int64_t j = j_top; j >= j_bottom; --j) {
    const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
    __syncthreads();  // the previous span's sweep is done with the buffers
    const double scan_offset = span.open(precomputed, scan, ckpt, j, L, C, p.interval);

    int tK = static_cast<int>(last % K);  // t % K, stepped down with t
    // A span-parallel sweep of any span but the last starts from the
    // mirrored forward's checkpoint: its row d-1 is the segment [last,
    // last+d) (slot (last+d) % K), relative to its offset. S0's barrier
    // orders these writes before the reads.
    const bool top_anchor = parallel && j < ckpt.last_span(L);
    if (top_anchor) {
      const int64_t i = ckpt.last_span(L) - 1 - j;
      const scalar_t* top =
          static_cast<const scalar_t*>(p.span_top_ring) + (b * p.n_ckpt + i) * K * C;
      for_each_entry(K, C, tid, kThreads, [&](int r, int c) {
        ring[slot_after(tK, r + 1, K) * ld + c] = top[r * C + c];
      });
      Q = p.span_top_offset[b * p.n_ckpt + i];
    }
    stage.load_ahead(in, span, last, last - first, L, C);
    for (int64_t t = last; t >= first; --t, tK = tK == 0 ? K - 1 : tK - 1) {
      const double off = stage.enter(in, span, t, first, L, C);  // S0
      __syncthreads();

      if (t == L) {
        // The backward messages start: beta[L] = end_transition. Every warp
        // reduces log Z and q itself.
        log_z = off + static_cast<double>(
                          warp_lse<scalar_t>(C, [&](int c) { return in.last(s_alpha[c], c); }));
        const scalar_t q = finite_or_zero(array_max(in.end_transition, C));
        Q = static_cast<double>(q);
        const scalar_t shift = static_cast<scalar_t>(off + Q - log_z);
        for (int c = tid; c < C; c += kThreads) {
          const scalar_t mass = fexp(s_alpha[c] + (in.end_transition[c] - q) + shift) * g;
          grad.end_transition[c] = mass;
          if (grad.end_scores) grad.end_scores[(L - 1) * C + c] = mass;
        }
        // Position L-1's emissions enter; their max moves into Q.
        const scalar_t emit_max = finite_or_zero(array_max(s_score, C));
        Q += static_cast<double>(emit_max);
        for_each_entry(K, C, tid, kThreads, [&](int slot, int c) {
          ring[slot * ld + c] = slot == tK ? (in.end_transition[c] - q) + s_end[c] +
                                                 (s_score[c] - emit_max)
                                           : neg_inf<scalar_t>();
        });
        __syncthreads();
        continue;
      }

      scalar_t shift = static_cast<scalar_t>(off + Q - log_z);
      const int dmax = static_cast<int>(L - t < K ? L - t : K);
      auto x_at = [&](int d, int c) { return ring[slot_after(tK, d, K) * ld + c] + in.dur(d, c); };
      if (top_anchor && t == last) {
        // Anchor Q where this span's sweep starts, before its first
        // posterior: a segment boundary at t, or one segment across t, has
        // probability 1. The boundary's mass is the label-c segments
        // starting at t (a warp per label); the open segments [t-d1, t) are
        // the recompute's forward ring, left at step t.
        double part = 0.0;
        for (int c = warp; c < C; c += kWarps) {
          const scalar_t tau = warp_lse<scalar_t>(dmax, [&](int i) { return x_at(i + 1, c); });
          if (lane == 0) part += first_segment_mass(s_sigma[c], tau, off + Q - log_z);
        }
        const scalar_t shift_x = static_cast<scalar_t>(scan_offset + Q - log_z);
        part += crossing_part<scalar_t, false>(
            in, t, tK, K, C, ld,
            [&](int r) { return scan.ring + slot_before(scan.tK, r + 1, K) * ld; }, ring, shift_x);
        Q = renormalised(Q, block_sum(part, red));
        shift = static_cast<scalar_t>(off + Q - log_z);
      }
      if (t == 0 && renormalises_within_spans<scalar_t>()) {
        // Every segmentation has a first segment, so the posteriors of the
        // segments starting at 0 sum to 1: measure them (a warp per label),
        // and take out of Q what rounding left since the last re-anchor.
        double part = 0.0;
        for (int c = warp; c < C; c += kWarps) {
          const scalar_t tau = warp_lse<scalar_t>(dmax, [&](int i) { return x_at(i + 1, c); });
          part += first_segment_mass(s_sigma[c], tau, off + Q - log_z);
        }
        Q = renormalised(Q, block_sum(lane == 0 ? part : 0.0, red));
        shift = static_cast<scalar_t>(off + Q - log_z);
      }

      // P1: segments [t, t+d), lanes over labels (the mapping above):
      // posteriors into the duration sums and the ends of t+d, and
      // per-thread partials of their sum over d (the start mass) and,
      // static, of tau = LSE_d x. Where the start term does not depend on d
      // (static, or t = 0), the posterior is factored as on the CPU:
      // exp(sigma + x + shift) = exp(x - top) · exp(sigma + top + shift),
      // top the max of this thread's x (the second factor is the posterior
      // of its best duration, so neither overflows; an all -inf group has
      // weight 0 and scaled terms 0), one exp per term shared with tau.
      const bool factored = !DD || t == 0;
      const bool need_tau = !DD && t > 0;
      const int d_check = K - tK;  // coverage_position(t, K) - t + 1
      const int d_first = map.my_group + 1, d_stride = groups * C;
      // f(d, x, i, e) for this thread's durations d of label c: x the ring
      // entry plus the duration score, i = (d-1)·C + c and e the entry of
      // t+d in `ends`; indices stepped, not recomputed. Unrolled where the
      // terms are short (not for the (K, C, C) posteriors' loop over c').
      auto for_my_durations = [&](int c, auto f) {
        int i = (d_first - 1) * C + c;
        int slot = d_first <= K ? slot_after(tK, d_first, K) : 0;
        auto next = [&]() {
          i += d_stride;
          slot += groups;  // < 2K while d + groups <= dmax <= K
          if (slot >= K) slot -= K;
        };
        if (factored) {
#pragma unroll 4
          for (int d = d_first; d <= dmax; d += groups, next())
            f(d, ring[slot * ld + c] + in.duration[i], i, slot * C + c);
        } else {
#pragma unroll 1
          for (int d = d_first; d <= dmax; d += groups, next())
            f(d, ring[slot * ld + c] + in.duration[i], i, slot * C + c);
        }
      };
      for (int c = map.my_label; c < C; c += map.label_stride) {
        scalar_t mx = neg_inf<scalar_t>();
        if (factored) for_my_durations(c, [&](int, scalar_t x, int, int) { mx = nan_max(mx, x); });
        const scalar_t tau_shift = lse_shift(mx);
        const scalar_t weight = factored ? fexp(s_sigma[c] + mx + shift) * g : scalar_t(0);
        scalar_t tau_sum = 0;
        double mass = 0.0, reaching = 0.0;
        for_my_durations(c, [&](int d, scalar_t xd, int i, int e) {
          scalar_t post_s;
          if (factored) {
            const scalar_t scaled = fexp(xd - tau_shift);
            post_s = scaled * weight;
            tau_sum += scaled;
          } else {
            const scalar_t enter =
                lse<scalar_t>(C, [&](int cp) { return s_alpha[cp] + in.trans(d, cp, c); }) +
                s_start[c];
            post_s = fexp(enter + xd + shift) * g;
          }
          const double post = static_cast<double>(post_s);
          sum_dur[i] += post;
          ends[e] += post;
          mass += post;
          if (d >= d_check) reaching += post;
        });
        if (renormalises_within_spans<scalar_t>()) coverage += reaching;
        const int slot = map.partial(c);
        part_mass[slot] = mass;
        if (need_tau) {
          part_max[slot] = mx;
          part_sum[slot] = tau_sum;
        }
      }
      const bool checked = renormalises_within_spans<scalar_t>() && t > 0 && tK == 0 &&
                           t + K - 1 <= last && t + K - 1 < L;  // coverage_checked_at
      if (checked) {
        // block_sum's barrier is the one between P1 and the partials' sums.
        Q = renormalised(Q, block_sum(coverage, red) / static_cast<double>(g));
        shift = static_cast<scalar_t>(off + Q - log_z);
      } else {
        __syncthreads();
      }
      if (tK == 0) coverage = 0.0;

      // P1': thread c adds label c's partials in group order: the start mass
      // (finish_label: the start-score gradient, and the scores gradient of
      // the position now complete), and, static, tau and u = start + tau.
      for (int c = tid; c < C; c += kThreads) {
        double mass = 0.0;
        scalar_t top = neg_inf<scalar_t>();
        for (int k = 0; k < groups; ++k) {
          mass += part_mass[k * C + c];
          if (need_tau) top = nan_max(top, part_max[k * C + c]);
        }
        finish_label(grad, ends, covered, c, mass, t, tK, K, L, C, first, last, spill);
        if (need_tau) {
          const scalar_t top_shift = lse_shift(top);
          scalar_t sum = 0;
          for (int k = 0; k < groups; ++k) {
            const scalar_t part = part_sum[k * C + c];
            // An empty group (part 0, max -inf) adds nothing.
            if (part != scalar_t(0)) sum += part * fexp(lse_shift(part_max[k * C + c]) - top_shift);
          }
          s_u[c] = s_start[c] + lse_finish(top, sum);
        }
      }
      if (t == 0) break;  // uniform: the last step of the last span
      __syncthreads();
      // A span-parallel sweep ends at its first position: P2 and P3 still
      // give the transition and end-score gradients of t, but no later span
      // needs Q re-anchored or the ring moved.
      const bool ends_here = parallel && t == first;

      // P2: beta[t, c'] (the backward score of "a segment ended at t") and
      // the transition gradients, a warp per c'.
      for (int cp = warp; cp < C; cp += kWarps) {
        const scalar_t a = s_alpha[cp];
        scalar_t v_max = neg_inf<scalar_t>();
        if (!DD) {
          for (int c = lane; c < C; c += kWarpSize) {
            const scalar_t v = in.trans(cp, c) + s_u[c];
            sum_trans[cp * C + c] += static_cast<double>(fexp(a + v + shift) * g);
            v_max = nan_max(v_max, v);
          }
        } else {
          for_each_entry(dmax, C, lane, kWarpSize, [&](int r, int c) {
            const int d = r + 1;
            const scalar_t v = in.trans(d, cp, c) + s_start[c] + x_at(d, c);
            sum_trans[(r * C + cp) * C + c] += static_cast<double>(fexp(a + v + shift) * g);
            v_max = nan_max(v_max, v);
          });
        }
        v_max = warp_max(v_max);
        const scalar_t v_shift = lse_shift(v_max);
        scalar_t sum = 0;
        if (!DD) {
          for (int c = lane; c < C; c += kWarpSize) sum += fexp(in.trans(cp, c) + s_u[c] - v_shift);
        } else {
          for_each_entry(dmax, C, lane, kWarpSize, [&](int r, int c) {
            sum += fexp(in.trans(r + 1, cp, c) + s_start[c] + x_at(r + 1, c) - v_shift);
          });
        }
        sum = warp_sum(sum);
        if (lane == 0) s_beta[cp] = lse_finish(v_max, sum);
      }
      __syncthreads();

      // P3: normalise beta (every warp reduces q itself), the mass of the
      // segments ending at t, and move the ring to step t-1: re-base, open
      // the segments ending at t, add position t-1's emissions (their max
      // moves into Q, as in the forward).
      const scalar_t q = finite_or_zero(array_max(s_beta, C));
      Q += static_cast<double>(q);
      const scalar_t shift_beta = static_cast<scalar_t>(off + Q - log_z);
      if (grad.end_scores) {
        for (int c = tid; c < C; c += kThreads)
          grad.end_scores[(t - 1) * C + c] = fexp(s_alpha[c] + (s_beta[c] - q) + shift_beta) * g;
      }
      if (ends_here) continue;  // uniform; P3's last barrier is not needed
      if (t == first) {
        // Re-anchor Q at every checkpoint (t = j·interval, j >= 1: t = 0 left
        // above, t = L continued): a segment boundary at t, or one segment
        // across t, has probability 1, so the rounding that forward and
        // backward gather over (t, L] cannot pile up over the sequence. The
        // ring is still relative to Q before this step's q. block_sum's
        // barrier also ends the reads of the ring before the update below.
        const scalar_t shift_x =
            static_cast<scalar_t>(ckpt.offset[j] + (Q - static_cast<double>(q)) - log_z);
        const double part = reanchor_part<scalar_t, DD>(in, t, tK, K, C, ld, ckpt.at(j), ring,
                                                        s_alpha, s_beta, q, shift_beta, shift_x);
        Q = renormalised(Q, block_sum(part, red));
      }
      const scalar_t emit_max = finite_or_zero(array_max(s_score, C));
      Q += static_cast<double>(emit_max);
      for_each_entry(K, C, tid, kThreads, [&](int slot, int c) {
        scalar_t& r = ring[slot * ld + c];
        const scalar_t emit = s_score[c] - emit_max;
        r = (slot == tK ? (s_beta[c] - q) + s_end[c] : r - q) + emit;
      });
      __syncthreads();
    }
  }
  __syncthreads();  // the sums' owners are done
  if (parallel) {
    // The host adds up the spans' sums in float64 (sum_dur and sum_trans
    // are contiguous).
    double* out = p.span_sums + cta * (static_cast<int64_t>(K) * C + n_trans);
    for (int64_t i = tid; i < static_cast<int64_t>(K) * C + n_trans; i += kThreads)
      out[i] = sum_dur[i];
    return;
  }
  for (int64_t i = tid; i < static_cast<int64_t>(K) * C; i += kThreads)
    grad.duration[i] = static_cast<scalar_t>(sum_dur[i]);
  for (int64_t i = tid; i < n_trans; i += kThreads)
    grad.transition[i] = static_cast<scalar_t>(sum_trans[i]);
}

// Every span of every sequence recomputed at once, before the sweep: CTA
// b * n_ckpt + j takes span j of sequence b (spans past the sequence's end,
// and dead sequences, have nothing to do) and writes its rows into the
// backward arena's span buffers, which hold all of a sequence's spans.
template <typename scalar_t, bool DD, bool kShared>
__global__ void __launch_bounds__(kThreads, forward_min_blocks<scalar_t>())
    recompute_kernel(const BackwardParams p, const Arena arena, const Arena backward_arena) {
  const int64_t i = blockIdx.x, b = i / p.n_ckpt, j = i - b * p.n_ckpt;
  if (sequence_is_dead<scalar_t>(p, b)) return;
  const int64_t L = sequence_length(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  if (j > ckpt.last_span(L)) return;
  CtaScan<scalar_t, DD, false> scan(p, b, L, arena.get<scalar_t, kShared>(kRecomputeRing, i),
                                    arena.get<scalar_t, kShared>(kRecomputeRows, i));
  scan.reset();
  __syncthreads();
  const int64_t span = p.interval + 1;
  recompute_span(scan, ckpt, j, L, static_cast<int>(p.C),
                 backward_arena.in_workspace<scalar_t>(kBackwardSpanAlpha, b) + j * span * p.C,
                 backward_arena.in_workspace<scalar_t>(kBackwardSpanSigma, b) + j * span * p.C,
                 backward_arena.in_workspace<double>(kBackwardSpanOffset, b) + j * span);
}

}  // namespace cuda
}  // namespace flashsemicrf
