// The backward pass of one sequence by one CTA: walk the checkpoints in
// reverse, recompute each span's forward messages into a global buffer with
// CtaScan, and sweep the backward ring down through the span, writing every
// gradient element from one thread at a time (no atomics; barriers order the
// steps). The CPU kernel's backward_sequence, step for step.
#pragma once

#include "common_kernel.cuh"
#include "forward_kernel.cuh"

namespace flashsemicrf {
namespace cuda {

// Rows of C scalars the sweep stages per step.
constexpr int kSweepRows = 7;

// Arrays of the backward kernel, in Arena order.
enum BackwardArray {
  kBackwardRing = 0,        // (K, ld) backward ring
  kBackwardScanRing = 1,    // (S, ld) the recompute's forward ring
  kBackwardScanRows = 2,    // (kScanRows, C)
  kBackwardSweepRows = 3,   // (kSweepRows, C)
  kBackwardSpanAlpha = 4,   // (interval+1, C) the recomputed span's alpha_hat
  kBackwardSpanSigma = 5,   // (interval+1, C) and sigma_hat
  kBackwardSpanOffset = 6,  // (interval+1) doubles: their offsets
  kBackwardReduce = 7,      // (kWarps) doubles: one per warp for block sums
  kBackwardSums = 8,        // (K·C + (K or 1)·C·C) doubles: the duration and
                            // transition gradients, summed in float64
  kBackwardArrays = 9
};

inline Arena plan_backward_arena(const ForwardParams& p, size_t elem_bytes, size_t smem_limit) {
  const int64_t e = static_cast<int64_t>(elem_bytes), ld = padded_row(static_cast<int>(p.C));
  const int64_t span = p.interval + 1, d = sizeof(double);
  const int64_t sums = p.K * p.C + (p.duration_dependent ? p.K : 1) * p.C * p.C;
  const int64_t bytes[kBackwardArrays] = {
      p.K * ld * e, p.ring_width * ld * e, kScanRows * p.C * e, kSweepRows * p.C * e,
      span * p.C * e, span * p.C * e, span * d, kWarps * d, sums * d};
  // The forward ring goes first: it is the larger one and is only touched by
  // the recompute; then the sums, touched once per step and element. The
  // span buffers are too large for shared memory.
  const int evict[] = {kBackwardScanRing, kBackwardSums, kBackwardRing, kBackwardScanRows,
                       kBackwardSweepRows};
  return plan_arena(bytes, kBackwardArrays, evict, 5, smem_limit);
}

// This thread's share of the re-anchor total at t = first of span j (see the
// CPU kernel's "Re-anchor Q"): the mass of a boundary at t,
// sum_c exp(alpha_hat[t,c] + beta_hat[t,c] + shift_beta), plus the mass of the
// segments [t-d1, t+d2) across t (d1, d2 >= 1, d1+d2 <= K, d1 <= t): the
// checkpoint's open segment [t-d1, t) (fwd, duration order; (K, C, C): alpha
// rows 0..K-1 entered through transition[d1+d2-1], then gain rows K..2K-1)
// joined to the backward ring's [t, t+d2) (slot (t+d2) % K) with the
// duration score. Every thread runs the loop over d1 and takes the (d2, c)
// entries i = (d2-1)·C + c with i ≡ tid (mod kThreads), summing in a fixed
// order into a double.
template <typename scalar_t, bool DD>
__device__ double reanchor_part(const SequenceInputs<scalar_t>& in, int64_t t, int K, int C,
                                int ld, const scalar_t* fwd, const scalar_t* ring,
                                const scalar_t* s_alpha, const scalar_t* s_beta, scalar_t q,
                                scalar_t shift_beta, scalar_t shift_x) {
  const int tid = threadIdx.x, tK = static_cast<int>(t % K);
  double part = 0.0;
  for (int c = tid; c < C; c += kThreads)
    part += static_cast<double>(fexp(s_alpha[c] + (s_beta[c] - q) + shift_beta));
  const int d1max = static_cast<int>(t < K - 1 ? t : K - 1);
  for (int d1 = 1; d1 <= d1max; ++d1) {
    const scalar_t* a = fwd + (d1 - 1) * C;
    const scalar_t* gain = fwd + (K + d1 - 1) * C;
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
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const BackwardParams p, const Arena arena) {
  const int64_t b = blockIdx.x;
  // The forward's log Z only says whether the sequence is dead (-inf); the
  // sweep recomputes it in float64 at t = L, its first step (float32 log Z
  // carries |log Z|·6e-8 of rounding, too coarse for long sequences).
  double log_z = static_cast<double>(static_cast<const scalar_t*>(p.log_z)[b]);
  if (log_z == -std::numeric_limits<double>::infinity()) return;  // outputs stay 0
  const scalar_t g = static_cast<const scalar_t*>(p.grad_log_z)[b];

  const int64_t L = sequence_length(p, b);
  const int K = static_cast<int>(p.K), C = static_cast<int>(p.C), ld = padded_row(C);
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const SequenceInputs<scalar_t> in(p, b);
  const SequenceGradients<scalar_t> grad(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);

  scalar_t* alpha_buf = arena.get<scalar_t>(kBackwardSpanAlpha, b);
  scalar_t* sigma_buf = arena.get<scalar_t>(kBackwardSpanSigma, b);
  double* off_buf = arena.get<double>(kBackwardSpanOffset, b);
  double* red = arena.get<double>(kBackwardReduce, b);  // block_sum's warp sums
  // The shared parameters' gradients are sums over every position: float32
  // sums of 10^6 terms would lose ~1e-3, so they add up in float64, each
  // element always in the same thread (durations d ≡ -lane (mod 32) of labels
  // c ≡ warp (mod kWarps) in P1; transitions c' ≡ warp, and c ≡ lane or
  // (d-1)·C + c ≡ lane, in P2), in the order of t as on the CPU.
  double* sum_dur = arena.get<double>(kBackwardSums, b);     // (K, C)
  double* sum_trans = sum_dur + static_cast<int64_t>(K) * C;  // (C, C) or (K, C, C)
  const int64_t n_trans = static_cast<int64_t>(DD ? K : 1) * C * C;
  fill(sum_dur, K * C + n_trans, 0.0);  // ordered by the first span's barrier
  CtaScan<scalar_t, DD, false> scan(p, b, L, arena.get<scalar_t>(kBackwardScanRing, b),
                                    arena.get<scalar_t>(kBackwardScanRows, b));
  // Backward ring: slot e % K holds the label-c segment [t, e) with its
  // emissions, end score and beta_hat[e], relative to the backward offset Q.
  scalar_t* ring = arena.get<scalar_t>(kBackwardRing, b);
  scalar_t* rows = arena.get<scalar_t>(kBackwardSweepRows, b);
  scalar_t* s_alpha = rows;           // alpha_hat[t]
  scalar_t* s_sigma = rows + C;       // sigma_hat[t]
  scalar_t* s_u = rows + 2 * C;       // static: start_scores[t] + tau[t]
  scalar_t* s_beta = rows + 3 * C;    // beta[t] before normalisation
  scalar_t* s_start = rows + 4 * C;   // start_scores[t]
  scalar_t* s_score = rows + 5 * C;   // scores[t-1]
  scalar_t* s_end = rows + 6 * C;     // end_scores[t-1]
  double Q = 0.0;                     // the same in every thread
  double coverage = 0.0;  // this thread's share of the mass covering coverage_position(t, K)

  scan.reset();
  for (int64_t j = ckpt.last_span(L); j >= 0; --j) {
    const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
    __syncthreads();  // the previous span's sweep is done with the buffers
    scan.load(first, ckpt.at(j), ckpt.offset + j);
    __syncthreads();
    for (int64_t t = first; t <= last; ++t) {
      const scalar_t m = scan.step(t);
      for (int c = tid; c < C; c += kThreads) {
        alpha_buf[(t - first) * C + c] = scan.alpha[c];
        sigma_buf[(t - first) * C + c] = scan.sigma[c];
      }
      if (tid == 0) off_buf[t - first] = scan.offset;
      if (t < last) scan.advance(t, m);
      __syncthreads();
    }

    for (int64_t t = last; t >= first; --t) {
      // S0: stage this step's rows.
      const int64_t row = t - first;
      for (int c = tid; c < C; c += kThreads) {
        s_alpha[c] = alpha_buf[row * C + c];
        s_sigma[c] = sigma_buf[row * C + c];
        if (t < L) s_start[c] = in.start(t, c);
        if (t > 0) {
          s_score[c] = in.score(t - 1, c);
          s_end[c] = in.end(t - 1, c);
        }
      }
      const double off = off_buf[row];
      __syncthreads();
      const int tK = static_cast<int>(t % K);

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

      // P1: segments [t, t+d), a warp per label, lanes over d in chunks of
      // 32 from the longest down: posteriors, their suffix sums over d (the
      // coverage of position t+d-1) and, static, tau = LSE_d x.
      const bool need_tau = !DD && t > 0;
      const int d_check = static_cast<int>(coverage_position(t, K) - t + 1);
      for (int c = warp; c < C; c += kWarps) {
        scalar_t mx = neg_inf<scalar_t>();
        if (need_tau) {
          for (int d = 1 + lane; d <= dmax; d += kWarpSize) mx = nan_max(mx, x_at(d, c));
          mx = warp_max(mx);
        }
        const scalar_t tau_shift = lse_shift(mx);
        scalar_t carry = 0, tau_sum = 0;
        for (int top = (dmax + kWarpSize - 1) / kWarpSize * kWarpSize; top > 0; top -= kWarpSize) {
          const int d = top - lane;  // >= 1; the lane of each d never changes
          scalar_t post = 0;
          if (d <= dmax) {
            const scalar_t xd = x_at(d, c);
            scalar_t enter;
            if (DD && t > 0) {
              enter = lse<scalar_t>(C, [&](int cp) { return s_alpha[cp] + in.trans(d, cp, c); }) +
                      s_start[c];
            } else {
              enter = s_sigma[c];
            }
            post = fexp(enter + xd + shift) * g;
            if (need_tau) tau_sum += fexp(xd - tau_shift);
          }
          const scalar_t incl = warp_inclusive_scan(post);
          if (d <= dmax) {
            sum_dur[(d - 1) * C + c] += static_cast<double>(post);
            grad.scores[(t + d - 1) * C + c] += carry + incl;
            if (renormalises_within_spans<scalar_t>() && d == d_check)
              coverage += static_cast<double>(carry + incl);
          }
          carry += __shfl_sync(kFullMask, incl, kWarpSize - 1);
        }
        if (lane == 0) {
          if (grad.start_scores) grad.start_scores[t * C + c] = carry;
          if (t == 0) grad.start_transition[c] = carry;
        }
        if (need_tau) {
          tau_sum = warp_sum(tau_sum);
          if (lane == 0) s_u[c] = s_start[c] + lse_finish(mx, tau_sum);
        }
      }
      if (t == 0) break;  // uniform: the last step of the last span
      if (coverage_checked_at<scalar_t>(t, K, last, L)) {
        // block_sum's barrier is the one between P1 and P2.
        Q = renormalised(Q, block_sum(coverage, red) / static_cast<double>(g));
        shift = static_cast<scalar_t>(off + Q - log_z);
      } else {
        __syncthreads();
      }
      if (t % K == 0) coverage = 0.0;

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
      if (t == first) {
        // Re-anchor Q at every checkpoint (t = j·interval, j >= 1: t = 0 left
        // above, t = L continued): a segment boundary at t, or one segment
        // across t, has probability 1, so the rounding that forward and
        // backward gather over (t, L] cannot pile up over the sequence. The
        // ring is still relative to Q before this step's q. block_sum's
        // barrier also ends the reads of the ring before the update below.
        const scalar_t shift_x =
            static_cast<scalar_t>(ckpt.offset[j] + (Q - static_cast<double>(q)) - log_z);
        const double part = reanchor_part<scalar_t, DD>(in, t, K, C, ld, ckpt.at(j), ring, s_alpha,
                                                        s_beta, q, shift_beta, shift_x);
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
  for (int64_t i = tid; i < static_cast<int64_t>(K) * C; i += kThreads)
    grad.duration[i] = static_cast<scalar_t>(sum_dur[i]);
  for (int64_t i = tid; i < n_trans; i += kThreads)
    grad.transition[i] = static_cast<scalar_t>(sum_trans[i]);
}

}  // namespace cuda
}  // namespace flashsemicrf
