// The exp-domain forward of one sequence by one CTA, static (C, C)
// transition: the C++ CPU kernel's ExpForward (semicrf_cpu.cpp) with its loops
// spread over the CTA. The ring holds probabilities relative to one float64
// offset O, r = exp(entry - O), so that a term is a multiply-add where the
// log-domain CtaScan spends an exp; ghosts (exp_domain.h) bound what underflow
// loses, and a sequence whose log Z they cannot certify is marked in `redo`
// for the log-domain forward_kernel, which then rewrites its log Z and
// checkpoints. The decisions are a function of the inputs, as on the CPU:
// the same charges, the same absorption, the same final check. Sums run in
// another order than the CPU's (a ring pass adds its duration groups in
// group order), so results agree with the CPU kernel's to rounding; the
// device keeps subnormals where the CPU kernel flushes them, and the CPU
// kernel's ghost-free fast paths (which give the same zeros) are left out.
//
// Thread mapping, per step t (one CTA of kThreads per sequence):
//   ring pass  C <= 256: thread g·C + c (g < G = 256 / C) takes label c and
//              the ages d ≡ g+1 (mod G): weighted sum, largest live entry,
//              smallest positive entry, and the previous advance's factor
//              applied on the way (the CPU's ring_chunk_pass); C > 256:
//              labels c ≡ tid, every age.
//   per label  thread c ≡ tid (mod 256): the groups' partials in group order,
//              factors, ghosts, the mat-vec row u[c] = sum_c' alpha[c'] A[c', c].
//   reductions every warp reduces a shared row itself (normalisers, maxima),
//              so that all threads hold the same bits without a broadcast.
// Barriers: after the ring pass, after the end normaliser's candidates,
// after alpha_hat, after the start normaliser's candidates, after the
// advance's maxima, at the end of the step (six), and one after a checkpoint.
#pragma once

#include "common_kernel.cuh"
#include "exp_domain.h"
#include "forward_kernel.cuh"

namespace flashsemicrf {
namespace cuda {

// Arrays of the exp-domain forward, in Arena order.
enum ExpForwardArray {
  kExpRing = 0,         // (K, C) scalars: row s % K holds the entries that started at s
  kExpWeight,           // (K, C) scalars: exp(duration - dur_max[c]), 0 below tiny
  kExpTransition,       // (C, C) scalars: A = exp(transition - col_max[c]), 0 below tiny
  kExpTransitionBound,  // (C, C) doubles: the same in float64, for the ghost mat-vec
  kExpDoubles,          // (kExpDoubleRows, C) doubles, per label
  kExpScalars,          // (kExpScalarRows, C) scalars per label, then the ring pass's
                        // three rows of partial_slots(C) partials
  kExpInts,             // (3C + 3) int32: last duration, reach (two generations), flags
  kExpForwardArrays
};

// Per-label rows of kExpDoubles.
enum ExpDoubleRow {
  kDurMax, kWeightLost, kColMax, kALost, kGhostOld, kGhostNew, kGa, kGs, kYa, kYs, kWork,
  kLemit, kFoD, kFnD, kEndCand, kEndYa, kStartCand, kStartYs, kOldMass, kFreshMass,
  kExpDoubleRows
};
// Per-label rows of kExpScalars.
enum ExpScalarRow {
  kWeightMinpos, kAMinpos, kAcc, kAlpha, kSigma, kU, kEmit, kFo, kFn, kLivemax, kRmin,
  kExpScalarRows
};

// P1-style partial slots: one per (duration group, label), max(C, kThreads).
HOST_DEVICE int64_t exp_partial_slots(int64_t C) { return C > kThreads ? C : kThreads; }

// The sizes of the kExpForwardArrays arrays, with `slots` partials per row
// of the ring pass (the blocked kernel has more).
inline void exp_forward_bytes(const ForwardParams& p, int64_t e, int64_t slots, int64_t* bytes) {
  const int64_t d = sizeof(double), C = p.C, K = p.K;
  bytes[kExpRing] = K * C * e;
  bytes[kExpWeight] = K * C * e;
  bytes[kExpTransition] = C * C * e;
  bytes[kExpTransitionBound] = C * C * d;
  bytes[kExpDoubles] = kExpDoubleRows * C * d;
  bytes[kExpScalars] = (kExpScalarRows * C + 3 * slots) * e;
  bytes[kExpInts] = (3 * C + 3) * static_cast<int64_t>(sizeof(int32_t));
}

inline Arena plan_exp_forward_arena(const ForwardParams& p, size_t elem_bytes, size_t smem_limit) {
  int64_t bytes[kExpForwardArrays];
  exp_forward_bytes(p, static_cast<int64_t>(elem_bytes), exp_partial_slots(p.C), bytes);
  // The float64 transition bound goes first (read only where a ghost is
  // carried), then the scalar transition (C reads a step per thread), then
  // the weights and the ring (K·C reads a step), then the rows.
  const int evict[] = {kExpTransitionBound, kExpTransition, kExpWeight, kExpRing,
                       kExpDoubles,         kExpScalars,    kExpInts};
  return plan_arena(bytes, kExpForwardArrays, evict, 7, smem_limit);
}

// Butterfly reduction of one value per lane with an exact, commutative op
// (max or min), so that every lane ends with the same bits.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The larger of a and b, NaN losing (the CPU's `a < b ? b : a` on lanes).
template <typename T>
__device__ __forceinline__ T max_ignoring_nan(T a, T b) {
  return a < b ? b : a;
}

// The largest of a and of b over the warp, NaN ignored, the two shuffle
// trees interleaved.
__device__ __forceinline__ void warp_max_pair(double& a, double& b) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const double a2 = __shfl_xor_sync(kFullMask, a, o), b2 = __shfl_xor_sync(kFullMask, b, o);
    a = max_ignoring_nan(a, a2);
    b = max_ignoring_nan(b, b2);
  }
}

// The largest of a[0 … n-1] (and of b[0 … n-1]), NaN ignored, by every warp
// on its own; init for none. The two shuffle trees interleave, so the pair
// costs about the latency of one.
__device__ __forceinline__ void row_max_pair(const double* a, const double* b, int n, double init,
                                             double* ma, double* mb) {
  double x = init, y = init;
  for (int i = lane_id(); i < n; i += kWarpSize) {
    x = max_ignoring_nan(x, a[i]);
    y = max_ignoring_nan(y, b[i]);
  }
  warp_max_pair(x, y);
  *ma = x;
  *mb = y;
}

// The advance's new offset and factors: the largest mass that can still
// matter (old entries, or new ones at sigma_rel) becomes 1. The factors come
// from the rounded new offset, so that entries and offset stay consistent
// however large the offset grows.
struct AdvanceScale {
  double new_offset, base, so, sn;
};
__device__ __forceinline__ AdvanceScale advance_scale(double old, double fresh, double sigma_rel,
                                                      double O, double m) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  double top = std::max(old > 0 ? ::log(old) : kNegInf,
                        fresh > 0 ? sigma_rel + ::log(fresh) : kNegInf);
  if (top == kNegInf) top = 0.0;
  AdvanceScale s;
  s.new_offset = O + (top + m);
  s.base = (O - s.new_offset) + m;
  s.so = ::exp(s.base);
  s.sn = ::exp(s.base + sigma_rel);
  return s;
}

// alpha_hat's summary over the warp: the largest entry (NaN ignored), the
// range over the labels that can reach an end, whether any carries a ghost;
// the four shuffle trees interleaved.
template <typename scalar_t>
__device__ __forceinline__ void alpha_summary_tree(scalar_t& all, scalar_t& hi, scalar_t& lo,
                                                   int& ghost) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const scalar_t all2 = __shfl_xor_sync(kFullMask, all, o);
    const scalar_t hi2 = __shfl_xor_sync(kFullMask, hi, o);
    const scalar_t lo2 = __shfl_xor_sync(kFullMask, lo, o);
    const int ghost2 = __shfl_xor_sync(kFullMask, ghost, o);
    all = max_ignoring_nan(all, all2);
    hi = hi < hi2 ? hi2 : hi;
    lo = lo2 < lo ? lo2 : lo;
    ghost |= ghost2;
  }
}

template <typename scalar_t, bool kShared>
struct CtaExpForward {
  using Limits = std::numeric_limits<scalar_t>;
  static constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  static constexpr double kInf = std::numeric_limits<double>::infinity();
  static constexpr double kFloor = std::numeric_limits<double>::min();

  const SequenceInputs<scalar_t> in;
  const int K, C;
  const int64_t L;
  const bool boundary;  // start or end scores given
  scalar_t* const ring;
  scalar_t* const weight;
  scalar_t* const A;
  double* const A_bound;
  double* const rows_d;
  scalar_t* const rows_s;
  scalar_t* const part;  // (3, exp_partial_slots(C)): weighted sums, live maxima, positive minima
  int32_t* const ints;   // last_duration (C), reach (2C), flags (3)

  const scalar_t tiny = Limits::min();
  const double tiny_d = static_cast<double>(Limits::min());
  const double inv_tiny_d = 1.0 / static_cast<double>(Limits::min());
  const double absorb_factor;  // exp_domain.h's absorb_factor_for(L)

  // State, the same bits in every thread: O, the end and start scales, the
  // log scan's offset (ref_hi + ref_lo), whether the ring owes the last
  // advance's factor, and t % K.
  double O = 0.0, mes = 0.0, sigma_rel = 0.0, ref_hi = 0.0, ref_lo = 0.0;
  bool owes_advance = false;
  int tK = 0;
  // Read by every warp at the end of ends(t) for starts(t) and the log
  // scan's offset: alpha_hat's largest entry, its range over the labels
  // that can reach an end, and whether it carries a ghost.
  scalar_t alpha_max = 0, alpha_reach_max = 0, alpha_reach_min = 0;
  bool alpha_ghost = false;
  // The largest score of the position the next advance() adds (NaN
  // ignored; 0 where all are -inf), reduced before the step's ring pass so
  // that its loads are in flight meanwhile.
  double emit_max = 0.0;

  __device__ CtaExpForward(const ForwardParams& p, const Arena& arena, int64_t b, int64_t L_)
      : in(p, b), K(static_cast<int>(p.K)), C(static_cast<int>(p.C)), L(L_),
        boundary(p.start_scores != nullptr || p.end_scores != nullptr),
        ring(arena.get<scalar_t, kShared>(kExpRing, b)),
        weight(arena.get<scalar_t, kShared>(kExpWeight, b)),
        A(arena.get<scalar_t, kShared>(kExpTransition, b)),
        A_bound(arena.get<double, kShared>(kExpTransitionBound, b)),
        rows_d(arena.get<double, kShared>(kExpDoubles, b)),
        rows_s(arena.get<scalar_t, kShared>(kExpScalars, b)),
        part(rows_s + kExpScalarRows * p.C),
        ints(arena.get<int32_t, kShared>(kExpInts, b)),
        absorb_factor(absorb_factor_for<scalar_t>(L_)) {}

  // std::max(x, kFloor), without binding a reference to the static member
  // (which device code cannot take).
  __device__ static double floored(double x) { return x < kFloor ? kFloor : x; }

  __device__ double* rd(int row) const { return rows_d + row * C; }
  __device__ scalar_t* rs(int row) const { return rows_s + row * C; }
  __device__ int32_t* last_duration() const { return ints; }
  // flags[0]: rejected; flags[1 + i % 2]: the reach fixed point changed at iteration i.
  __device__ int32_t* flags() const { return ints + 3 * C; }
  __device__ bool rejected() const { return flags()[0] != 0; }
  __device__ void reject() { flags()[0] = 1; }

  // The per-call tables (the CPU's ExpForward::tables), the empty ring and
  // zero ghosts. Ends with a barrier.
  __device__ void init() {
    const int tid = threadIdx.x;
    int32_t* reach = ints + C;  // generation 0; generation 1 at ints + 2C
    if (tid == 0) {
      flags()[0] = 0;
      flags()[1] = 0;
      flags()[2] = 0;
    }
    for (int c = tid; c < C; c += kThreads) {
      int raw_last = 0;
      double mx = kNegInf;
      for (int d = 1; d <= K; ++d) {
        const double v = in.dur(d, c);
        if (v > kNegInf) raw_last = d;
        if (v > mx) mx = v;
      }
      const double dmax = mx == kNegInf ? 0.0 : mx;
      rd(kDurMax)[c] = dmax;
      scalar_t wmin = Limits::infinity();
      double lost = weight_column(in, K, c, dmax, [&](int64_t d, scalar_t w) {
        weight[(d - 1) * C + c] = w;
        if (w > 0) wmin = wmin < w ? wmin : w;
      });
      rs(kWeightMinpos)[c] = wmin;
      rd(kWeightLost)[c] = 2.0 * lost / tiny_d;  // entries are at most 1 when they meet a weight
      mx = kNegInf;
      for (int cp = 0; cp < C; ++cp) mx = std::max(mx, static_cast<double>(in.trans(cp, c)));
      const double cmax = mx == kNegInf ? 0.0 : mx;
      rd(kColMax)[c] = cmax;
      scalar_t amin = Limits::infinity();
      lost = transition_column(in, C, c, cmax, [&](int64_t cp, scalar_t a, double xb) {
        A[cp * C + c] = a;
        A_bound[cp * C + c] = xb;
        if (a > 0) amin = amin < a ? amin : a;
      });
      rs(kAMinpos)[c] = amin;
      rd(kALost)[c] = lost / tiny_d;
      last_duration()[c] = raw_last;
      reach[c] = raw_last > 0 && in.end_transition[c] > neg_inf<scalar_t>();
      // The empty state.
      rd(kGhostOld)[c] = 0.0;
      rd(kGhostNew)[c] = 0.0;
      rd(kGa)[c] = 0.0;
      rd(kGs)[c] = 0.0;
      rs(kAlpha)[c] = 0;
      rs(kSigma)[c] = 0;
      rs(kFo)[c] = 0;
      rs(kLivemax)[c] = 0;
      rs(kRmin)[c] = Limits::infinity();
    }
    fill(ring, static_cast<int64_t>(K) * C, scalar_t(0));
    // NaN or +inf parameters leave nothing to bound: the log scan gives the NaN.
    bool bad = false;
    for (int i = tid; i < C * C; i += kThreads) bad |= unboundable(in.transition[i]);
    for (int i = tid; i < K * C; i += kThreads) bad |= unboundable(in.duration[i]);
    for (int c = tid; c < C; c += kThreads)
      bad |= unboundable(in.start_transition[c]) | unboundable(in.end_transition[c]);
    __syncthreads();  // flags cleared, tables and reach written
    if (bad) reject();
    // Labels that can reach an end: the least fixed point over the finite
    // transitions, one generation per iteration (reach only grows, so the
    // result is the CPU's whatever the order).
    for (int it = 0;; ++it) {
      const int32_t* cur = ints + C * (1 + (it & 1));
      int32_t* next = ints + C * (1 + ((it + 1) & 1));
      bool changed = false;
      for (int c = tid; c < C; c += kThreads) {
        bool r = cur[c] != 0;
        if (!r && last_duration()[c] > 0)
          for (int c2 = 0; c2 < C && !r; ++c2) r = cur[c2] && in.trans(c, c2) > neg_inf<scalar_t>();
        next[c] = r;
        changed |= r != (cur[c] != 0);
      }
      // flags[1 + it % 2] was cleared before this iteration's reads; the
      // other slot is cleared for the next one after the barrier.
      if (changed) flags()[1 + (it & 1)] = 1;
      __syncthreads();
      const bool again = flags()[1 + (it & 1)] != 0;
      if (tid == 0) flags()[1 + ((it + 1) & 1)] = 0;
      __syncthreads();
      if (!again) {
        for (int c = tid; c < C; c += kThreads)
          if (!next[c]) last_duration()[c] = 0;
        break;
      }
    }
    __syncthreads();
  }

  __device__ bool reaches(int c) const { return last_duration()[c] > 0; }

  // The end and start factors are normalised against the mass they
  // multiply: label c's candidate is its score y plus log2 of its mass v
  // (in ln units), none where it cannot reach an end or carries nothing.
  __device__ static double scale_candidate(bool reach, scalar_t v, double y) {
    return reach && v > 0 ? y + exponent_of(v) * kLn2 : kNegInf;
  }
  // The scale: the largest candidate, else the largest score of a label that
  // can reach an end, else 0.
  __device__ static double scale_of(double top, double y_max) {
    return top > kNegInf ? top : (y_max > kNegInf ? y_max : 0.0);
  }

  // Step 0: sigma_hat[0] relative to O = its finite max. Per label.
  __device__ void first() {
    double m = kNegInf;
    for (int c = lane_id(); c < C; c += kWarpSize) m = std::max(m, static_cast<double>(in.first(c)));
    m = warp_reduce(m, [](double a, double b) { return std::max(a, b); });
    O = m == kNegInf ? 0.0 : m;
    sigma_rel = 0.0;
    ref_hi = O;
    ref_lo = 0.0;
    for (int c = threadIdx.x; c < C; c += kThreads) {
      const double x = static_cast<double>(in.first(c)) - O;
      const scalar_t s = fexp(static_cast<scalar_t>(x));
      rs(kSigma)[c] = s;
      rd(kGs)[c] = ghost_through_factor(0.0, scalar_t(1), s, x);
    }
  }

  // The ring pass of step t (n = min(t, K) ages): partial sums per group,
  // as the CPU's ring_chunk_pass computes them per age. The ages a thread
  // takes are split where its label's entries stop being able to grow
  // (keep), so that neither loop tests it; the ring and weight addresses
  // step by G ages (the ring's backwards, wrapping once at most: G <= K
  // whenever a second age is taken, since n <= K).
  __device__ void ring_pass(int n) {
    const int tid = threadIdx.x;
    const int G = C <= kThreads ? kThreads / C : 1;
    const int64_t slots = exp_partial_slots(C);
    const scalar_t big = Limits::max(), inf = Limits::infinity();
    const scalar_t* fo = rs(kFo);
    auto pass = [&](int g, int c) {
      scalar_t a = 0, lm = 0, mn = inf;
      // Ages >= 2 take the last advance's factor (none owed: 1, exact).
      const scalar_t f = owes_advance ? fo[c] : scalar_t(1);
      const int last = last_duration()[c];
      // Ages d0+1 with d0 + 2 <= last can still grow.
      const int alive = last - 1 < n ? (last - 1 > 0 ? last - 1 : 0) : n;
      int d0 = g;
      scalar_t* r = ring + slot_before(tK, d0 + 1, K) * C + c;
      const scalar_t* w = weight + static_cast<int64_t>(d0) * C + c;
      const int64_t step = static_cast<int64_t>(G) * C;
      auto next = [&]() {
        d0 += G;
        r -= step;
        if (r < ring) r += static_cast<int64_t>(K) * C;
        w += step;
      };
      auto load = [&](bool scale) {
        scalar_t x = *r;
        if (scale) {
          x = x * f;
          x = x < big ? x : big;
          *r = x;
        }
        return x;
      };
      if (d0 == 0 && n > 0) {  // age 1: the entries that started at t - 1, new
        const scalar_t x = load(false), wd = *w;
        a += x * wd;
        const bool keep = 0 < alive;
        const scalar_t live = keep ? x : scalar_t(0);
        lm = live > lm ? live : lm;
        const scalar_t pos = (x > 0 && (wd > 0 || keep)) ? x : inf;
        mn = pos < mn ? pos : mn;
        next();
      }
      // std::fmax / std::fmin: the CPU's `x > m ? x : m` and `x < m ? x : m`
      // for numbers (one instruction instead of a compare and a select).
#pragma unroll 2
      for (; d0 < alive; next()) {
        const scalar_t x = load(true);
        a += x * *w;
        lm = std::fmax(x, lm);
        mn = std::fmin(x > 0 ? x : inf, mn);
      }
      // Only entries that meet a weight now can lose anything.
#pragma unroll 2
      for (; d0 < n; next()) {
        const scalar_t x = load(true), wd = *w;
        a += x * wd;
        mn = std::fmin((x > 0 && wd > 0) ? x : inf, mn);
      }
      const int i = g * C + c;
      part[i] = a;
      part[slots + i] = lm;
      part[2 * slots + i] = mn;
    };
    if (C <= kThreads) {
      if (tid < G * C) pass(tid / C, tid % C);
    } else {
      for (int c = tid; c < C; c += kThreads) pass(0, c);
    }
  }

  // Step t >= 1: alpha_hat[t] and its ghost ga (the CPU's ends). Three
  // barriers; on return alpha_hat and ga are readable by every thread.
  __device__ void ends(int64_t t) {
    const int tid = threadIdx.x;
    const int n = static_cast<int>(t < K ? t : K);
    if (tK == 0) {  // t % K == 0: generation 0 expires
      for (int c = tid; c < C; c += kThreads) {
        rd(kGhostOld)[c] = rd(kGhostNew)[c];
        rd(kGhostNew)[c] = 0.0;
      }
    }
    ring_pass(n);
    owes_advance = false;
    __syncthreads();
    const int G = C <= kThreads ? kThreads / C : 1;
    const int64_t slots = exp_partial_slots(C);
    for (int c = tid; c < C; c += kThreads) {
      scalar_t a = 0, lm = 0, mn = Limits::infinity();
      for (int g = 0; g < G; ++g) {
        const int i = g * C + c;
        a += part[i];
        lm = part[slots + i] > lm ? part[slots + i] : lm;
        mn = part[2 * slots + i] < mn ? part[2 * slots + i] : mn;
      }
      rs(kAcc)[c] = a;
      rs(kLivemax)[c] = lm;
      rs(kRmin)[c] = mn;
      const double ya = static_cast<double>(in.end(t - 1, c)) + rd(kDurMax)[c];
      rd(kYa)[c] = ya;
      // Labels that cannot reach an end set no scale.
      const bool reach = reaches(c);
      rd(kEndCand)[c] = scale_candidate(reach, a, ya);
      rd(kEndYa)[c] = reach ? ya : kNegInf;
    }
    __syncthreads();
    double top, ya_max;
    row_max_pair(rd(kEndCand), rd(kEndYa), C, kNegInf, &top, &ya_max);
    mes = scale_of(top, ya_max);
    const scalar_t big = Limits::max();
    const double n_charge = static_cast<double>(n) * kSlack;
    for (int c = tid; c < C; c += kThreads) {
      const double ya = rd(kYa)[c];
      const scalar_t endf = fexp(static_cast<scalar_t>(ya - mes));
      const scalar_t a = rs(kAcc)[c];
      const scalar_t x = big < a ? big : a;
      const scalar_t prod = x * endf;
      const scalar_t y = x > 0 ? (big < prod ? big : prod) : scalar_t(0);
      rs(kAlpha)[c] = y;
      // ga: the ring's ghosts, a product below tiny anywhere in the pass,
      // flushed weights, then through the end factor.
      const scalar_t rmn = rs(kRmin)[c];
      const bool has = static_cast<double>(rmn) < kInf;
      double g = rd(kGhostOld)[c] + rd(kGhostNew)[c];
      g += has && static_cast<double>(rmn * rs(kWeightMinpos)[c]) < tiny_d ? n_charge : 0.0;
      g += has ? rd(kWeightLost)[c] : 0.0;
      bool lost = false;
      g = ghost_of_alpha(g, x, endf, ya - mes, y, absorb_factor, &lost);
      // A label that cannot reach an end feeds only its like.
      if (!reaches(c)) {
        g = 0.0;
        lost = false;
      }
      rd(kGa)[c] = g;
      if (lost) reject();
    }
    __syncthreads();
    alpha_summary();
    // The offset the log scan would have: its step subtracts its max alpha.
    two_sum_add(ref_hi, ref_lo, log_scan_step(alpha_max, (O - ref_hi) - ref_lo, mes));
  }

  // alpha_max, alpha_reach_max, alpha_reach_min and alpha_ghost from the
  // alpha_hat and ga rows, by every warp, the four shuffle trees interleaved.
  __device__ void alpha_summary() {
    scalar_t all = 0, hi = 0, lo = Limits::infinity();
    int ghost = 0;
    for (int c = lane_id(); c < C; c += kWarpSize) {
      const scalar_t a = rs(kAlpha)[c];
      all = max_ignoring_nan(all, a);
      ghost |= rd(kGa)[c] > 0.0;
      if (!reaches(c)) continue;
      hi = hi < a ? a : hi;
      lo = a > 0 && a < lo ? a : lo;
    }
    alpha_summary_tree(all, hi, lo, ghost);
    alpha_max = all;
    alpha_reach_max = hi;
    alpha_reach_min = lo;
    alpha_ghost = ghost != 0;
  }

  // t < L, t >= 1: sigma_hat[t] and its ghost gs (the CPU's starts). One
  // barrier; sigma_hat and gs are then the calling thread's own (label c).
  __device__ void starts(int64_t t) {
    const int tid = threadIdx.x;
    // alpha's range over the labels that can reach an end, and whether
    // alpha_hat carries any ghost: where none does, the ghost mat-vec below
    // adds nothing and is skipped (the CPU's `ghost`).
    const scalar_t amax = alpha_reach_max, amin = alpha_reach_min;
    const bool ghost = alpha_ghost;
    const scalar_t big = Limits::max();
    const scalar_t* alpha = rs(kAlpha);
    const double* ga = rd(kGa);
    for (int c = tid; c < C; c += kThreads) {
      // u = alpha_hat A, each sum over c' in order; zeros add exact zeros.
      scalar_t u = 0;
      for (int cp = 0; cp < C; ++cp) {
        const scalar_t a = alpha[cp];
        if (a != 0) u += a * A[cp * C + c];
      }
      // The ghost mat-vec is exact: the cheap bound (largest ghost times the
      // column sum) would spread one label's ghost into every column.
      double work = 0.0;
      if (ghost) {
        for (int cp = 0; cp < C; ++cp) {
          const double gcp = ga[cp];
          if (gcp != 0.0) {
            const double row = A_bound[cp * C + c];
            if (row > 0) work += floored(gcp * row);
          }
        }
      }
      const double ys = static_cast<double>(in.start(t, c)) + rd(kColMax)[c];
      const scalar_t x = big < u ? big : u;
      rs(kU)[c] = x;
      rd(kWork)[c] = work;
      rd(kYs)[c] = ys;
      const bool reach = reaches(c);
      rd(kStartCand)[c] = scale_candidate(reach, x, ys);
      rd(kStartYs)[c] = reach ? ys : kNegInf;
    }
    __syncthreads();
    double top, ys_max;
    row_max_pair(rd(kStartCand), rd(kStartYs), C, kNegInf, &top, &ys_max);
    const double mss = scale_of(top, ys_max);
    sigma_rel = mes + mss;
    for (int c = tid; c < C; c += kThreads) {
      const double ys = rd(kYs)[c];
      const scalar_t h = fexp(static_cast<scalar_t>(ys - mss));
      const scalar_t u = rs(kU)[c];
      const scalar_t prod = u * h;
      const scalar_t s = u > 0 ? (big < prod ? big : prod) : scalar_t(0);
      rs(kSigma)[c] = s;
      if (!reaches(c)) {
        rd(kGs)[c] = 0.0;
        continue;
      }
      double g = rd(kWork)[c];
      if (amax > 0) {
        if (rd(kALost)[c] > 0) g += floored(static_cast<double>(amax) * rd(kALost)[c]);
        if (amin * rs(kAMinpos)[c] < tiny) g += static_cast<double>(C) * kSlack;
      }
      g = ghost_through_factor(g, u, h, ys - mss);
      if (u > 0 && h >= tiny && s < tiny) g += kSlack;
      if (g > 0 && s > 0 && g * absorb_factor <= static_cast<double>(s)) g = 0.0;
      if (!(g < 1e300)) reject();
      rd(kGs)[c] = g;
    }
  }

  // emit_max for position t < L.
  __device__ void reduce_emit_max(int64_t t) {
    double m = kNegInf;
    for (int c = lane_id(); c < C; c += kWarpSize)
      m = max_ignoring_nan(m, static_cast<double>(in.score(t, c)));
    m = warp_reduce(m, [](double a, double b) { return max_ignoring_nan(a, b); });
    emit_max = m == kNegInf ? 0.0 : m;
  }

  // Move the ring to step t+1 (t < L): position t's emissions, the segments
  // starting at t, the normaliser (the largest entry that can still matter
  // becomes 1) and the ghosts (the CPU's advance). One barrier; the caller
  // puts another before the next step.
  __device__ void advance(int64_t t) {
    const int tid = threadIdx.x;
    // Position t's scores relative to their finite max m (NaN or +inf:
    // rejected below).
    const double m = emit_max;
    two_sum_add(ref_hi, ref_lo, m);
    for (int c = tid; c < C; c += kThreads) {
      const double lemit = static_cast<double>(in.score(t, c)) - m;
      const scalar_t emit = fexp(static_cast<scalar_t>(lemit));
      rd(kLemit)[c] = lemit;
      rs(kEmit)[c] = emit;
      // A label whose emission factor flushed takes its factors from
      // float64, so that a flush never loses more than the final factor's
      // underflow.
      const bool flushed = static_cast<double>(emit) < tiny_d && lemit > kNegInf;
      const double e = flushed ? ::exp(lemit) : static_cast<double>(emit);
      rd(kOldMass)[c] = static_cast<double>(rs(kLivemax)[c]) * e;
      rd(kFreshMass)[c] = reaches(c) ? static_cast<double>(rs(kSigma)[c]) * e : 0.0;
    }
    __syncthreads();
    double old, fresh;
    row_max_pair(rd(kOldMass), rd(kFreshMass), C, 0.0, &old, &fresh);
    const AdvanceScale sc = advance_scale(old, fresh, sigma_rel, O, m);
    const double new_offset = sc.new_offset, base = sc.base, so = sc.so, sn = sc.sn;
    const double big = static_cast<double>(Limits::max());
    const double old_charge = 2.0 * static_cast<double>(t < K - 1 ? t : K - 1) * kSlack;
    for (int c = tid; c < C; c += kThreads) {
      const double lemit = rd(kLemit)[c];
      const scalar_t emit = rs(kEmit)[c];
      const bool flushed = static_cast<double>(emit) < tiny_d && lemit > kNegInf;
      const double e = static_cast<double>(emit);
      const double old_f = flushed ? ::exp(lemit + base) : (e == 0.0 ? 0.0 : e * so);
      const double new_f = flushed ? ::exp(lemit + base + sigma_rel) : (e == 0.0 ? 0.0 : e * sn);
      const bool reach = reaches(c);
      const scalar_t sig = rs(kSigma)[c], rmn = rs(kRmin)[c];
      // A factor past the dtype's range has no bound where it multiplies
      // something.
      if (reach && ((static_cast<double>(rmn) < kInf && old_f > big) || (sig > 0 && new_f > big)))
        reject();
      const scalar_t fo = static_cast<scalar_t>(big < old_f ? big : old_f);
      const scalar_t fn = static_cast<scalar_t>(big < new_f ? big : new_f);
      rs(kFo)[c] = fo;
      // Ghosts: every generation follows its entries; the new entries bring
      // sigma's ghost; entries that this step takes below tiny are charged
      // in full; a -inf score's exact zeros are not charged.
      const bool exact_zero = lemit == kNegInf;
      const bool fresh_lost = !exact_zero && sig > 0 && static_cast<double>(sig * fn) < tiny_d;
      const bool old_lost = !exact_zero && static_cast<double>(rmn) < kInf &&
                            (static_cast<double>(fo) < tiny_d ||
                             static_cast<double>(rmn * fo) < tiny_d);
      const double go = scaled_ghost(rd(kGhostOld)[c], old_f, exact_zero);
      double gn = scaled_ghost(rd(kGhostNew)[c], old_f, exact_zero) +
                  scaled_ghost(rd(kGs)[c], new_f, exact_zero);
      gn += fresh_lost ? (static_cast<double>(sig) * new_f * inv_tiny_d + 2.0) * kSlack : 0.0;
      gn += old_lost ? old_charge : 0.0;
      if (reach && !(go + gn < 1e300)) reject();
      // Labels that cannot reach an end carry no ghost.
      rd(kGhostOld)[c] = reach ? go : 0.0;
      rd(kGhostNew)[c] = reach ? gn : 0.0;
      // The segments starting at t enter the ring.
      const scalar_t entry = sig * fn;
      ring[tK * C + c] = Limits::max() < entry ? Limits::max() : entry;
      if (unboundable(in.score(t, c)) ||
          (boundary && (unboundable(in.start(t, c)) || unboundable(in.end(t, c)))))
        reject();
    }
    owes_advance = true;
    O = new_offset;
    tK = tK + 1 == K ? 0 : tK + 1;
  }

  // Checkpoint at step t, as the log scan writes it: the owed factor applied,
  // logs relative to that scan's offset ref_hi less the rounding it carries,
  // -inf for 0. Each thread writes back only the ring entries it reads; a
  // barrier after it orders the writes before the ring pass.
  __device__ void save(int64_t t, scalar_t* out, double* out_offset) {
    const scalar_t big = Limits::max();
    const int n = static_cast<int>(t < K ? t : K);
    const double shift = (O - ref_hi) - ref_lo;
    const scalar_t* fo = rs(kFo);
    for_each_entry(K, C, threadIdx.x, kThreads, [&](int row, int c) {
      const int d = row + 1;
      scalar_t& r = ring[slot_before(tK, d, K) * C + c];
      if (owes_advance && d >= 2 && d <= n) {
        const scalar_t x = r * fo[c];
        r = x < big ? x : big;
      }
      out[row * C + c] = r > 0 ? static_cast<scalar_t>(::log(static_cast<double>(r)) + shift)
                               : neg_inf<scalar_t>();
    });
    owes_advance = false;
    if (threadIdx.x == 0) *out_offset = ref_hi;
  }
};

// CTAs per SM the exp-domain forward asks room for: two (128 registers a
// thread) when its arrays are in shared memory, one for the workspace
// instantiations (generic pointers, more live addresses). At the log
// forward's four in float32 (64 registers) ptxas spilled 32-48 bytes, and
// the workspace instantiations spilled 16-24 at 128: the per-label bounds
// keep many float64 values live.
template <typename scalar_t, bool kShared>
constexpr int exp_forward_min_blocks() {
  return kShared ? 2 : 1;
}

// The end of an exp-domain forward kernel (all threads, after a barrier that
// makes `rejected` the same in each): the verdict, and for a certified
// sequence the checkpoints past its end, which are never read, set to the
// empty state, so that outputs do not depend on memory contents.
template <typename scalar_t>
__device__ void hand_over_or_clear(const ForwardParams& p, const SequenceCheckpoints<scalar_t>& ckpt,
                                   int64_t b, int64_t L, bool rejected, int32_t* redo) {
  if (threadIdx.x == 0) redo[b] = rejected ? 1 : 0;
  if (rejected) return;
  const int64_t j0 = ckpt.saved(L);
  if (j0 < p.n_ckpt) {
    fill(ckpt.at(j0), (p.n_ckpt - j0) * ckpt.stride, neg_inf<scalar_t>());
    for (int64_t i = j0 + threadIdx.x; i < p.n_ckpt; i += kThreads) ckpt.offset[i] = 0.0;
  }
}

// The exp-domain forward: log Z and the checkpoints for every sequence whose
// log Z its bounds certify; redo[b] = 1 for the others (their outputs are
// left to the log-domain forward_kernel, launched after it with redo).
template <typename scalar_t, bool kShared>
__global__ void __launch_bounds__(kThreads, exp_forward_min_blocks<scalar_t, kShared>())
    exp_forward_kernel(const ForwardParams p, const Arena arena, int32_t* redo) {
  const int64_t b = blockIdx.x;
  const int64_t L = sequence_length(p, b);
  CtaExpForward<scalar_t, kShared> scan(p, arena, b, L);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  scan.init();
  int64_t j = 0, next_ckpt = checkpoint_step<scalar_t>(p, 0, L);
  for (int64_t t = 0; t <= L; ++t) {
    if (scan.rejected()) break;  // every thread reads it after the same barrier
    if (t == next_ckpt) {
      scan.save(t, ckpt.at(j), ckpt.offset + j);
      next_ckpt = checkpoint_step<scalar_t>(p, ++j, L);
      __syncthreads();
    }
    if (t < L) scan.reduce_emit_max(t);
    if (t == 0) {
      scan.first();
    } else {
      scan.ends(t);
    }
    if (t == L) {
      if (threadIdx.x == 0 && !scan.rejected()) {
        double log_z = 0.0;
        if (certified_log_z(scan.in, scan.C, scan.rs(kAlpha), scan.rd(kGa), scan.O, scan.mes,
                            &log_z)) {
          static_cast<scalar_t*>(p.log_z)[b] = static_cast<scalar_t>(log_z);
        } else {
          scan.reject();
        }
      }
    } else {
      if (t > 0) scan.starts(t);
      scan.advance(t);
    }
    __syncthreads();
  }
  hand_over_or_clear(p, ckpt, b, L, scan.rejected(), redo);
}

}  // namespace cuda
}  // namespace flashsemicrf
