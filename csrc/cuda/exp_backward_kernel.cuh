// The exp-domain backward sweep (static transition, with
// FLASHSEMICRF_CUDA_ALGORITHM=exp): backward_kernel's walk (spans in
// reverse, each recomputed by the log-domain CtaScan from its checkpoint, or
// read from recompute_kernel's buffers), with the sweep's messages kept as
// float64 probabilities relative to the float64 offset Q instead of logs. A
// step then costs K·C multiply-adds (P1), C² (P2) and O(C) exps, where the
// log sweep takes an exp for each of the K·C + C² terms. The forward rows
// stay log-domain (one exp a label turns them into weights); the gradients,
// the owners of every sum and the renormalisations are backward_kernel's.
//
// Exactness. Every message is a sum of products of nonnegative float64
// terms, so rounding is relative (1e-16 a term); what underflow drops is the
// only mass the sweep can lose. Per label, two bounds follow it all along:
// what beta_hat lacked when it opened an entry, relative to that entry (so
// that later it meets the entry's own duration weight, moves with it, and
// stays as small relative to the messages as it started), and an absolute
// "ghost" for entries that fell below float64's smallest normal (in a move,
// or when opened) with what they stood for. beta_hat's bound is the same
// mat-vec through the transition over what each label's v lacks, and K + 1
// smallest normals a term cover the products that underflow within a step.
// Both bounds live in two generations of K steps, as the entries they
// stand for do. At every step a label's bound times its posterior weight
// bounds what its segments' posteriors can lack, and the alpha part times
// beta_hat's bound what the transition posteriors can; past
// exp_sweep_tolerance (far below either dtype's resolution) or at a NaN or
// an infinity, the sequence is marked and backward_kernel redoes it in the
// log domain, the forward's verdict scheme. Labels that no start can reach
// still count for the ring's normaliser, which can only make the
// certificate stricter. The CPU kernel's exp-domain backward certifies by
// coverage instead (every position's posteriors must sum to 1): it
// recomputes the forward in float64, where this sweep reads the log-domain
// recompute's rows, whose float32 rounding a coverage test could not tell
// from lost mass.
#pragma once

#include "backward_kernel.cuh"
#include "exp_domain.h"

namespace flashsemicrf {
namespace cuda {

// The scalar rows the sweep stages per step: alpha_hat[t], sigma_hat[t],
// start_scores[t], scores[t-1], end_scores[t-1].
constexpr int kExpStagedRows = 5;

// Per-label float64 rows of the exp sweep (in its table array, after W and
// A): tables built once, and the state of the step.
enum ExpSweepRow {
  kRowDurMax = 0,   // finite max over d of duration[d, c] (0 if none)
  kRowStartMax,     // dur_max + col_max: what v's exponent adds to start_scores
  kRowLast,         // the longest finite duration of c (0: none)
  kRowWeight,       // P1 -> P1': the posterior weight of c's segments, without g
  kRowFactor,       // P1 -> P1': the move's factor of c
  kRowV,            // P1' -> P2: v = tau_hat · exp(start terms), relative to Q + mv
  kRowVLost,        // P1' -> P2: bound on what v lacks
  kRowBeta,         // P2 -> P3: beta_hat[t], relative to Q + mv
  kRowBetaLost,     // P2 -> P3: bound on what beta_hat lacks
  kRowLargest,      // the largest ring entry of c that can still matter
  kRowGhost,        // the ghost of c's ring entries added since the last t ≡ 0 (mod K)
  kRowGhostOld,     // and of those added in the K steps before
  kRowRelative,     // what c's entries added since then lack, relative to each entry
  kRowRelativeOld,  // and those added in the K steps before
  kExpSweepRows
};
// Per-thread partials of P1, one slot each (partial_slots): tau, the largest
// moved entry, whether a moved entry underflowed, and the start mass.
constexpr int kExpPartials = 4;

// The exp sweep's arrays: backward_kernel's, the ring in float64 and the
// staged rows kExpStagedRows long, plus the tables. The span buffers keep
// their indices, so recompute_kernel fills this arena's as it fills
// backward_kernel's.
constexpr int kExpBackwardTables = kBackwardArrays;  // W (K, C), A (C, C), rows, partials, flag
constexpr int kExpBackwardArrays = kBackwardArrays + 1;
static_assert(kExpBackwardArrays <= Arena::kMaxArrays, "Arena holds every array");

HOST_DEVICE int64_t exp_sweep_table_doubles(int64_t K, int64_t C) {
  return K * C + C * C + kExpSweepRows * C + kExpPartials * partial_slots(C) + 1;
}

inline Arena plan_exp_backward_arena_for(const ForwardParams& p, size_t elem_bytes,
                                         size_t smem_limit, int64_t spans) {
  const int64_t e = static_cast<int64_t>(elem_bytes), ld = padded_row(static_cast<int>(p.C));
  const int64_t span = spans * (p.interval + 1), d = sizeof(double);
  const int64_t sums = 2 * p.K * p.C + p.C * p.C + p.C;
  int64_t bytes[kExpBackwardArrays] = {};
  bytes[kBackwardRing] = p.K * ld * d;
  bytes[kBackwardScanRing] = p.ring_width * ld * e;
  bytes[kBackwardScanRows] = kScanRows * p.C * e;
  bytes[kBackwardSweepRows] = kExpStagedRows * p.C * e;
  bytes[kBackwardSpanAlpha] = span * p.C * e;
  bytes[kBackwardSpanSigma] = span * p.C * e;
  bytes[kBackwardSpanOffset] = span * d;
  bytes[kBackwardReduce] = kWarps * d;
  bytes[kBackwardSums] = sums * d;
  bytes[kExpBackwardTables] = exp_sweep_table_doubles(p.K, p.C) * d;
  // As backward_kernel's: the recompute's ring first, then the sums; the
  // tables (W is read with every ring entry) before the ring.
  const int evict[] = {kBackwardScanRing, kBackwardSums, kBackwardRing, kExpBackwardTables,
                       kBackwardScanRows, kBackwardSweepRows};
  return plan_arena(bytes, kExpBackwardArrays, evict, 6, smem_limit);
}
inline Arena plan_exp_backward_arena(const ForwardParams& p, size_t elem_bytes,
                                     size_t smem_limit) {
  return plan_exp_backward_arena_for(p, elem_bytes, smem_limit, 1);
}
inline Arena plan_exp_backward_arena_all_spans(const ForwardParams& p, size_t elem_bytes,
                                               size_t smem_limit) {
  return plan_exp_backward_arena_for(p, elem_bytes, smem_limit, p.n_ckpt);
}

// The largest loss the certificate accepts in any posterior (in units of
// grad_log_z): far below each dtype's resolution, and some 290 orders of
// magnitude above the K + 1 smallest normals a product's underflow can
// lose.
template <typename scalar_t>
HOST_DEVICE constexpr double exp_sweep_tolerance() {
  return sizeof(scalar_t) < sizeof(double) ? 0x1p-44 : 0x1p-60;
}

// The power of two 2^-e that brings top into [1, 2) (e clamped to normal
// exponents), as (factor, log factor); (1, 0) where top is 0, infinite or
// NaN.
struct PowerOfTwo {
  double value = 1.0, log = 0.0;
};
__device__ __forceinline__ PowerOfTwo normaliser_of(double top) {
  if (!(top > 0.0 && top < std::numeric_limits<double>::infinity())) return {};
  const int e0 = exponent_of(top), e = e0 < -1022 ? -1022 : e0;
  return {::ldexp(1.0, -e), -static_cast<double>(e) * kLn2};
}

// The verdicts of the exp sweep: redo[b] = 1 where backward_kernel must redo
// sequence b in the log domain (its CTAs for the others return at once).
template <typename scalar_t, bool kShared>
__global__ void __launch_bounds__(kThreads, 1)
    exp_backward_kernel(const BackwardParams p, const Arena arena, bool precomputed,
                        int32_t* redo) {
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  if (sequence_is_dead<scalar_t>(p, b)) {  // outputs stay 0
    if (tid == 0) redo[b] = 0;
    return;
  }
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr double kFloor = std::numeric_limits<double>::min();
  constexpr double kTol = exp_sweep_tolerance<scalar_t>();
  double log_z = 0.0;  // recomputed in float64 at t = L, as backward_kernel does
  const scalar_t g = static_cast<const scalar_t*>(p.grad_log_z)[b];
  const double gd = static_cast<double>(g);

  const int64_t L = sequence_length(p, b);
  const int K = static_cast<int>(p.K), C = static_cast<int>(p.C), ld = padded_row(C);
  const SequenceInputs<scalar_t> in(p, b);
  const SequenceGradients<scalar_t> grad(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);

  SpanRows<scalar_t> span(arena, b);  // span j's rows
  double* red = arena.in_workspace<double>(kBackwardReduce, b);
  // backward_kernel's float64 sums, owners and running coverage. The
  // transition sums gather alpha-part · v; the end multiplies them by A.
  double* sum_dur = arena.get<double, kShared>(kBackwardSums, b);  // (K, C)
  double* sum_trans = sum_dur + static_cast<int64_t>(K) * C;        // (C, C)
  double* ends = sum_trans + static_cast<int64_t>(C) * C;           // (K, C)
  double* covered = ends + static_cast<int64_t>(K) * C;             // (C)
  fill(sum_dur, 2 * K * C + C * C + C, 0.0);

  double* tables = arena.get<double, kShared>(kExpBackwardTables, b);
  double* W = tables;                                        // (K, C) exp(duration - dur_max)
  double* A = W + static_cast<int64_t>(K) * C;               // (C, C) exp(transition - col_max)
  double* row = A + static_cast<int64_t>(C) * C;             // kExpSweepRows rows of C
  auto at_row = [&](int r) { return row + r * C; };
  double* dur_max = at_row(kRowDurMax);
  double* start_max = at_row(kRowStartMax);
  double* last_d = at_row(kRowLast);
  double* weight = at_row(kRowWeight);
  double* factor = at_row(kRowFactor);
  double* v_row = at_row(kRowV);
  double* v_lost = at_row(kRowVLost);
  double* beta_row = at_row(kRowBeta);
  double* beta_lost = at_row(kRowBetaLost);
  double* largest = at_row(kRowLargest);
  double* ghost = at_row(kRowGhost);
  double* ghost_old = at_row(kRowGhostOld);
  double* rel = at_row(kRowRelative);
  double* rel_old = at_row(kRowRelativeOld);
  const int64_t slots = partial_slots(C);
  double* part_tau = row + kExpSweepRows * C;
  double* part_lm = part_tau + slots;
  double* part_lost = part_lm + slots;
  double* part_mass = part_lost + slots;
  double* flag = part_mass + slots;  // nonzero: the log-domain backward redoes the sequence
  auto mark = [&]() { *flag = 1.0; };  // every writer stores the same value

  // The tables, a label a thread. NaN or +inf in a parameter, or a finite
  // entry of W or A that underflows, marks the sequence.
  if (tid == 0) *flag = 0.0;
  __syncthreads();  // before any thread can mark
  for (int c = tid; c < C; c += kThreads) {
    double dm = -kInf, lst = 0.0;
    bool bad = !(static_cast<double>(in.start_transition[c]) < kInf) ||
               !(static_cast<double>(in.end_transition[c]) < kInf);
    for (int d = 1; d <= K; ++d) {
      const double x = static_cast<double>(in.dur(d, c));
      bad = bad || !(x < kInf);
      if (x > -kInf) lst = d;
      dm = x > dm ? x : dm;
    }
    dm = dm > -kInf ? dm : 0.0;
    for (int d = 1; d <= K; ++d) {
      const double x = static_cast<double>(in.dur(d, c)) - dm;
      const double w = ::exp(x);
      bad = bad || (x > -kInf && w < kFloor);
      W[(d - 1) * C + c] = w;
    }
    double cm = -kInf;
    for (int k = 0; k < C; ++k) {
      const double x = static_cast<double>(in.trans(k, c));
      bad = bad || !(x < kInf);
      cm = x > cm ? x : cm;
    }
    cm = cm > -kInf ? cm : 0.0;
    for (int k = 0; k < C; ++k) {
      const double x = static_cast<double>(in.trans(k, c)) - cm;
      const double a = ::exp(x);
      bad = bad || (x > -kInf && a < kFloor);
      A[k * C + c] = a;
    }
    dur_max[c] = dm;
    start_max[c] = dm + cm;
    last_d[c] = lst;
    largest[c] = 0.0;
    ghost[c] = ghost_old[c] = rel[c] = rel_old[c] = 0.0;
    if (bad) mark();
  }

  CtaScan<scalar_t, false, false> scan(p, b, L, arena.get<scalar_t, kShared>(kBackwardScanRing, b),
                                       arena.get<scalar_t, kShared>(kBackwardScanRows, b));
  // Backward ring: slot e % K holds the label-c segment [t, e) with its
  // emissions, end score and beta_hat[e], as a probability relative to Q.
  double* ring = arena.get<double, kShared>(kBackwardRing, b);
  scalar_t* rows = arena.get<scalar_t, kShared>(kBackwardSweepRows, b);
  SweepStage<scalar_t> stage{rows, rows + C, rows + 2 * C, rows + 3 * C, rows + 4 * C, {}};
  const scalar_t* s_alpha = stage.alpha;  // alpha_hat[t]
  const scalar_t* s_sigma = stage.sigma;  // sigma_hat[t]
  const scalar_t* s_start = stage.start;  // start_scores[t]
  const scalar_t* s_score = stage.score;  // scores[t-1]
  const scalar_t* s_end = stage.end;      // end_scores[t-1]
  double Q = 0.0;         // the same in every thread
  double coverage = 0.0;  // this thread's share of the mass covering coverage_position(t, K)
  const SweepMapping map(C);  // P1's (duration group, label), backward_kernel's
  const int groups = map.groups;

  scan.reset();
  for (int64_t j = ckpt.last_span(L); j >= 0; --j) {
    const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
    __syncthreads();  // the previous span's sweep is done with the buffers
    if (*flag != 0.0) break;  // uniform: no thread writes the flag before the next barrier
    span.open(precomputed, scan, ckpt, j, L, C, p.interval);

    int tK = static_cast<int>(last % K);  // t % K, stepped down with t
    stage.load_ahead(in, span, last, last - first, L, C);
    for (int64_t t = last; t >= first; --t, tK = tK == 0 ? K - 1 : tK - 1) {
      const double off = stage.enter(in, span, t, first, L, C);  // S0
      __syncthreads();

      // The largest emission of position t-1 (it moves into Q with the
      // ring), every warp on its own.
      const double m = t > 0 ? static_cast<double>(finite_or_zero(array_max(s_score, C))) : 0.0;

      if (t == L) {
        // beta[L] = end_transition; log Z in float64 as backward_kernel has
        // it. The segments ending at L open the ring, scaled by a power of
        // two that brings the largest into [1, 2).
        log_z = off + static_cast<double>(
                          warp_lse<scalar_t>(C, [&](int c) { return in.last(s_alpha[c], c); }));
        const double q = static_cast<double>(finite_or_zero(array_max(in.end_transition, C)));
        auto opened = [&](int c) {  // beta_hat[L, c] · exp(end + score - m), relative to q + m
          const double e = (static_cast<double>(s_score[c]) - m) + static_cast<double>(s_end[c]);
          return last_d[c] > 0.0 ? ::exp(static_cast<double>(in.end_transition[c]) - q + e) : 0.0;
        };
        double top = 0.0;
        for (int c = lane; c < C; c += kWarpSize) top = nan_max(top, opened(c));
        const PowerOfTwo n = normaliser_of(warp_max(top));
        for (int c = tid; c < C; c += kThreads) {
          const double mass = ::exp(static_cast<double>(s_alpha[c]) +
                                    static_cast<double>(in.end_transition[c]) + (off - log_z)) *
                              gd;
          grad.end_transition[c] = static_cast<scalar_t>(mass);
          if (grad.end_scores) grad.end_scores[(L - 1) * C + c] = static_cast<scalar_t>(mass);
          const double o = opened(c), fresh = o * n.value;
          if (!(fresh < kInf)) mark();
          largest[c] = last_d[c] > 1.0 ? fresh : 0.0;
          ghost[c] = o > 0.0 && fresh < kFloor ? kFloor : 0.0;
          ghost_old[c] = rel[c] = rel_old[c] = 0.0;
        }
        for_each_entry(K, C, tid, kThreads, [&](int slot, int c) {
          ring[slot * ld + c] = slot == tK ? opened(c) * n.value : 0.0;
        });
        Q = q + (m - n.log);
        __syncthreads();
        continue;
      }

      const int dmax = static_cast<int>(L - t < K ? L - t : K);
      if (t == 0 && renormalises_within_spans<scalar_t>()) {
        // The first segment's mass is 1 (backward_kernel's renormalisation):
        // tau by a warp per label.
        double part = 0.0;
        for (int c = warp; c < C; c += kWarps) {
          double tau = 0.0;
          for (int d = lane + 1; d <= dmax; d += kWarpSize)
            tau += ring[slot_after(tK, d, K) * ld + c] * W[(d - 1) * C + c];
          tau = warp_sum(tau);
          if (tau > 0.0)
            part += tau * ::exp(static_cast<double>(s_sigma[c]) + (off + Q - log_z) + dur_max[c]);
        }
        Q = renormalised(Q, block_sum(lane == 0 ? part : 0.0, red));
      }

      // A re-anchor at the span's first position (j >= 1; t = L continued
      // above): the segments covering position t have probability 1. Those
      // that start at t are P1's; the ones across t (the checkpoint's open
      // segment [t-d1, t) joined to the ring's [t, t+d2)) are summed here,
      // before P1 moves the ring, each thread over its (d1, c) entries.
      const bool reanchor = t == first && j > 0;
      const double anchor_q = Q;  // what the re-anchor's total is relative to
      double anchor_part = 0.0;
      if (reanchor) {
        const scalar_t* ck = ckpt.at(j);
        const double base = ckpt.offset[j] + Q - log_z;
        const int d1max = static_cast<int>(t < K - 1 ? t : K - 1);
        for_each_entry(d1max, C, tid, kThreads, [&](int r1, int c) {
          const int d1 = r1 + 1;
          const double arg = static_cast<double>(ck[r1 * C + c]) + base + dur_max[c];
          if (arg == -kInf) return;
          const double open = ::exp(arg);
          double s = 0.0;
          for (int d2 = 1; d1 + d2 <= K; ++d2)
            s += ring[slot_after(tK, d2, K) * ld + c] * W[(d1 + d2 - 1) * C + c];
          // The ring's entries are not bounded by 1 (a new entry is beta_hat
          // times its end terms), so an open part below the smallest normal
          // can still stand for mass: less than s of them.
          if (open < kFloor && !(s * kFloor <= kTol)) mark();
          anchor_part += open * s;
        });
        anchor_part *= gd;
        __syncthreads();  // P1 moves the entries just read
      }

      // The move to step t-1 (t > 0), fused into P1: entries times
      // exp(scores[t-1] - m) over a power of two that brings the largest
      // entry that can still matter into [1, 2) (from the last move's
      // largest, so the entries are rescaled as they are read).
      const bool moves = t > 0;
      PowerOfTwo n;
      if (moves) {
        double top = 0.0;
        for (int c = lane; c < C; c += kWarpSize)
          top = nan_max(top, largest[c] * ::exp(static_cast<double>(s_score[c]) - m));
        n = normaliser_of(warp_max(top));
      }

      // P1: segments [t, t+d), backward_kernel's mapping and sums; x = ring ·
      // W, the posterior x · weight.
      const double shift = off + Q - log_z;
      const int d_check = K - tK;  // coverage_position(t, K) - t + 1
      const int d_first = map.my_group + 1, d_stride = groups * C;
      for (int c = map.my_label; c < C; c += map.label_stride) {
        const double w0 = ::exp(static_cast<double>(s_sigma[c]) + shift + dur_max[c]);
        const double w = w0 * gd;
        const double f = moves ? ::exp(static_cast<double>(s_score[c]) - m) * n.value : 0.0;
        const int lc = static_cast<int>(last_d[c]);
        if (map.my_group == 0) {
          weight[c] = w0;
          factor[c] = f;
        }
        // The posteriors are x · w (the coverage part's sum is taken over x
        // and multiplied once; the start mass adds the posteriors themselves,
        // so that it cancels the end-mass slots' to rounding, as in
        // backward_kernel). lost: a positive entry that
        // moves on fell below the smallest normal. The entries that move on
        // ([t-1, t+d) at most c's longest duration: d < lc) take one loop,
        // the rest (and all at t = 0) another, which zeroes them (t > 0);
        // pointers stepped, not recomputed.
        double tau = 0.0, mass = 0.0, reaching = 0.0, lm = 0.0;
        bool lost = false;
        const int d_keep = moves ? (lc - 1 < dmax ? lc - 1 : dmax) : 0;
        const double* w_at = W + (d_first - 1) * C + c;
        double* sum_at = sum_dur + (d_first - 1) * C + c;
        int slot = d_first <= K ? slot_after(tK, d_first, K) : 0;
        int d = d_first;
        auto sweep_durations = [&](int d_end, auto move) {
#pragma unroll 4
          for (; d <= d_end; d += groups) {
            double& entry = ring[slot * ld + c];
            const double x0 = entry, x = x0 * *w_at;
            tau += x;
            const double post = x * w;
            *sum_at += post;
            ends[slot * C + c] += post;
            mass += post;
            if (d >= d_check) reaching += x;
            if (decltype(move)::value) {
              const double moved = x0 * f;
              lost = lost || (x0 > 0.0 && moved < kFloor);
              entry = moved;
              lm = moved > lm ? moved : lm;  // NaN entries show in tau
            } else if (moves) {
              entry = 0.0;
            }
            w_at += d_stride;
            sum_at += d_stride;
            slot += groups;  // < 2K while d + groups <= dmax <= K
            if (slot >= K) slot -= K;
          }
        };
        sweep_durations(d_keep, std::true_type{});
        sweep_durations(dmax, std::false_type{});
        if (renormalises_within_spans<scalar_t>()) coverage += reaching * w;
        const int s = map.partial(c);
        part_tau[s] = tau;
        part_lm[s] = lm;
        part_lost[s] = lost ? 1.0 : 0.0;
        part_mass[s] = mass;
      }
      const bool checked = renormalises_within_spans<scalar_t>() && t > 0 && tK == 0 &&
                           t + K - 1 <= last && t + K - 1 < L;  // coverage_checked_at
      if (checked) {
        Q = renormalised(Q, block_sum(coverage, red) / gd);
      } else {
        __syncthreads();
      }
      if (tK == 0) coverage = 0.0;

      // P1': thread c adds label c's partials in group order; the start
      // mass, the coverage and the scores gradient as backward_kernel's;
      // the certificate's check of this step's posteriors, and the ghost
      // moved with the ring; v for P2.
      double mv = -kInf;  // the largest start term, every warp on its own
      for (int c = lane; c < C; c += kWarpSize)
        mv = nan_max(mv, static_cast<double>(s_start[c]) + start_max[c]);
      mv = finite_or_zero(warp_max(mv));
      for (int c = tid; c < C; c += kThreads) {
        double mass = 0.0, tau = 0.0, lm = 0.0;
        bool lost = false;
        for (int k = 0; k < groups; ++k) {
          mass += part_mass[k * C + c];
          tau += part_tau[k * C + c];
          lm = nan_max(lm, part_lm[k * C + c]);
          lost = lost || part_lost[k * C + c] != 0.0;
        }
        finish_label(grad, ends, covered, c, mass, t, tK, K, L, C, first, last, nullptr);
        if (reanchor) anchor_part += mass;
        // Ghosts in two generations of K steps: an entry added at step s is
        // read down to step s - K at most, so the older generation is gone
        // once t ≡ 0 (mod K) comes again.
        if (tK == 0) {
          ghost_old[c] = ghost[c];
          rel_old[c] = rel[c];
          ghost[c] = rel[c] = 0.0;
        }
        // What this step's posteriors of c can lack: the relative bounds
        // times tau (they meet the same W as their entries), the ghosts of
        // the entries read (W <= 1), and up to K + 1 underflowed products a
        // term.
        const double rel_c = rel[c] > rel_old[c] ? rel[c] : rel_old[c];
        const double lacking = rel_c * tau + ghost[c] + ghost_old[c] + (K + 1) * kFloor;
        if (!(lacking * weight[c] <= kTol) || !(tau < kInf)) mark();
        // The posterior weight itself below the smallest normal: the
        // posteriors x · weight lack up to tau of them (tau need not be
        // small: the ring's entries are relative to the ring's largest).
        if (weight[c] < kFloor && static_cast<double>(s_sigma[c]) > -kInf &&
            !(tau * kFloor <= kTol))
          mark();
        if (moves) {
          // A -inf score is an exact zero factor; any other factor that
          // leaves a positive bound below the smallest normal rounds it up
          // to that, and every move rounds up by kUp.
          const bool zero_factor = static_cast<double>(s_score[c]) == -kInf;
          auto moved_bound = [&](double gh) {
            const double v = gh * factor[c] * kUp;
            return gh > 0.0 && !zero_factor && v < kFloor ? kFloor : v;
          };
          // Up to K entries fell below the smallest normal: each stood for
          // at most that, and lacked its relative part of it.
          const double lost_entries = lost && !zero_factor ? K * kFloor * (1.0 + rel_c) : 0.0;
          ghost[c] = moved_bound(ghost[c]) + lost_entries;
          ghost_old[c] = moved_bound(ghost_old[c]);
          largest[c] = lm;
          const double e = ::exp(static_cast<double>(s_start[c]) + start_max[c] - mv);
          v_row[c] = tau > 0.0 ? tau * e : 0.0;
          v_lost[c] = lacking * e + kFloor;
        }
      }
      if (t == 0) break;  // uniform: the last step of the last span
      __syncthreads();

      // P2: beta_hat[t, c'] = sum_c A[c', c] · v[c] and the transition
      // posteriors' alpha-part · v, a warp per c' (backward_kernel's owners);
      // what beta_hat lacks is bounded by the same sum over v_lost, plus C
      // underflowed products, and so is what row c' of the transition
      // posteriors and its end-score mass lack, times the alpha part.
      const double shift_b = off + (Q + mv) - log_z;
      for (int cp = warp; cp < C; cp += kWarps) {
        const double a0 = ::exp(static_cast<double>(s_alpha[cp]) + shift_b);
        const double a = a0 * gd;
        double beta = 0.0, lost = 0.0;
        for (int c = lane; c < C; c += kWarpSize) {
          const double v = v_row[c], ac = A[cp * C + c];
          beta += ac * v;
          lost += ac * v_lost[c];
          sum_trans[cp * C + c] += a * v;
        }
        beta = warp_sum(beta);
        lost = warp_sum(lost) + C * kFloor;
        if (lane == 0) {
          beta_row[cp] = beta;
          beta_lost[cp] = lost;
          if (grad.end_scores) grad.end_scores[(t - 1) * C + cp] = static_cast<scalar_t>(a * beta);
          if (!(a0 < kInf) || !(a0 * lost <= kTol) || !(beta < kInf)) mark();
          // An alpha part below the smallest normal: row cp's transition
          // posteriors and end-score mass, a0 · beta, lack up to beta of them.
          if (a0 < kFloor && static_cast<double>(s_alpha[cp]) > -kInf &&
              !(beta * kFloor <= kTol))
            mark();
        }
      }
      __syncthreads();

      // P3: re-anchor Q; the segments ending at t open in slot t % K (its
      // duration-K entry moved out in P1): beta_hat · exp(end_scores[t-1] +
      // scores[t-1]), relative to the moved ring's offset. What beta_hat
      // lacked goes with them: relative to the new entry where that is a
      // normal number (so that it meets the entry's W later), else as a
      // ghost.
      // (It supersedes a coverage renormalisation of this step: both
      // measure the same scale, the re-anchor all of it.)
      if (reanchor) Q = renormalised(anchor_q, block_sum(anchor_part, red) / gd);
      // (Q + mv) less the moved ring's offset Q + m - n.log, with the m that
      // scores[t-1] - m takes already.
      const double open_shift = mv + n.log;
      for (int c = tid; c < C; c += kThreads) {
        const double beta = beta_row[c], lc = last_d[c];
        const double arg = (static_cast<double>(s_score[c]) - m) +
                           static_cast<double>(s_end[c]) + open_shift;
        const double ex = ::exp(arg);
        // beta_hat is not bounded by 1 (only the ring's largest entry that
        // can still matter is brought near 1), so its product with a factor
        // below the smallest normal can be an ordinary number: then it is
        // taken from the logs, and so is its bound. (A factor past the
        // largest double still gives inf, which hands the sequence over.)
        const bool wide = arg > -kInf && ex < kFloor;
        const auto times_ex = [&](double x) {
          return x > 0.0 ? (wide ? ::exp(::log(x) + arg) : x * ex) : 0.0;
        };
        const double fresh = lc > 0.0 ? times_ex(beta) : 0.0;
        ring[tK * ld + c] = fresh;
        if (lc > 0.0) {
          double gh = ghost[c];
          if (fresh >= kFloor) {
            const double r = beta_lost[c] / beta * kUp;
            rel[c] = rel[c] > r ? rel[c] : r;
            if (!(r < kInf)) mark();
          } else {
            gh += times_ex(beta_lost[c]) * kUp + (beta > 0.0 && arg > -kInf ? kFloor : 0.0);
          }
          ghost[c] = gh;
          if (!(fresh < kInf) || !(gh < kInf)) mark();
        }
        if (lc > 1.0) largest[c] = nan_max(largest[c], fresh);
      }
      Q += m - n.log;
      __syncthreads();
    }
  }
  __syncthreads();  // the sums' owners are done; the flag is final
  const bool certified = *flag == 0.0;
  if (tid == 0) redo[b] = certified ? 0 : 1;
  if (!certified) return;  // backward_kernel writes every output of b
  for (int64_t i = tid; i < static_cast<int64_t>(K) * C; i += kThreads)
    grad.duration[i] = static_cast<scalar_t>(sum_dur[i]);
  for (int64_t i = tid; i < static_cast<int64_t>(C) * C; i += kThreads)
    grad.transition[i] = static_cast<scalar_t>(A[i] * sum_trans[i]);
}

}  // namespace cuda
}  // namespace flashsemicrf
