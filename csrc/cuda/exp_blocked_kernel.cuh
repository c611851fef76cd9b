// The exp-domain forward in blocks of positions, static (C, C) transition,
// C <= 32: the per-step kernel's numerics (exp_forward_kernel.cuh) with the
// work rearranged so that a block of up to kBlockSteps positions costs two
// CTA barriers instead of six a position.
//
// Within a block t0 … t0+len-1 the ring entries that started before t0 (the
// far part) keep t0's scale, R[d'][c] at age d' when the block starts. Label
// c's old-entry factors since t0 multiply into a float64 product F[c] (the
// unrounded old_f of every advance), so step t0+k's sum over them is
// F · S_k, S_k[c] = sum_d' R[d'][c] W[d'+k][c]: a Toeplitz product that the
// whole CTA computes for every k of the block at once, with no write-back and
// nothing between the steps to wait for; so are the largest live entry and
// the smallest positive one (F times their maximum and minimum at t0's scale).
// The entries that start inside the block (the near part, at most len a
// label), the factors, normalisers and ghosts run in warp 0 with lane =
// label, synchronised by warp reductions and __syncwarp. At the block's end
// every old entry is rescaled by F once and the near entries join the ring.
// The far part is summed a block ahead: while warp 0 runs a block, warps
// 1 … 7 sum the next block's terms of the entries that started before this
// one (at this block's scale); after the steps the CTA multiplies them by
// this block's F and adds the terms of the entries this block started, so
// that only that join (up to kBlockSteps ages a term) separates two chains.
// The chain's normalisers are powers of two, picked by one integer warp
// reduction each (REDUX from sm_80 on), so that its factors need no float64
// log or exp; the log scan's offset (the checkpoints' terms) is caught up
// once a block from the steps' alpha_hat rows.
//
// Bounds (docs/design.md, "The CUDA exp-domain forward"): a far product
// R · W below tiny loses less than tiny at t0's scale, F · tiny at step
// t0+k's, so that step charges n_old · F (in the ghosts' units) where the
// per-step scan charges n_old; forming F · S_k in float64 and rounding it to
// the dtype is charged like any product that falls below tiny (so is the
// part summed ahead: n_old · F_before · F, and its product with F_before
// rounded to the dtype). Nothing old
// flushes inside a block; the rescale at its end charges as the per-step
// scan charges a flush (2 · min(t, K-1) entries' worth), for every label
// with a positive entry that it takes below tiny. F stays a normal float64
// number inside a block: F leaving [2^-900, 2^900] ends the block at that
// step (an exact zero, from a -inf score, does not).
// The near part, the generations, absorption, the final check and the
// fallback are the per-step scan's. These charges are sound but not the CPU
// kernel's (nor are its scales, which can sit up to a factor 2 from the
// CPU's), so the two can decide differently near the threshold.
#pragma once

#include "exp_forward_kernel.cuh"

namespace flashsemicrf {
namespace cuda {

// Positions a block covers at most (also at most K, a checkpoint interval's
// remainder, and what is left of the sequence).
constexpr int kBlockSteps = 32;
// Labels the blocked forward takes: one warp, one lane a label.
constexpr int kBlockedMaxLabels = kWarpSize;

// Extra arrays of the blocked forward, after the per-step kernel's.
enum ExpBlockedArray {
  kExpNear = kExpForwardArrays,  // (7, kBlockSteps, C) scalars: entries started in the
                                 // block; the block's scores, start scores, end scores;
                                 // alpha_hat of each step; the far sums and live maxima
  kExpBlockDoubles,              // F (C); O, ref_hi, ref_lo; per step of the block: the
                                 // emission maximum, the offset and mes at ends(); the
                                 // far part's charges (kBlockSteps, C)
  kExpBlockInts,                 // flushed at the rescale (C), F an exact zero (C), steps
                                 // run, a staged input unboundable
  kExpBlockedArrays
};

HOST_DEVICE int64_t exp_blocked_partial_slots(int64_t C) {
  return kBlockSteps * C > kThreads ? kBlockSteps * C : kThreads;
}

inline bool uses_blocked_exp_forward(int64_t C) { return C <= kBlockedMaxLabels; }

// The steps of the block that starts at t0: up to kBlockSteps, at most K (the
// far part is then every entry that started before t0), ending at the next
// checkpoint (next_ckpt > t0) and at L.
HOST_DEVICE int blocked_steps(int64_t t0, int64_t next_ckpt, int64_t L, int K) {
  int64_t len = kBlockSteps < K ? kBlockSteps : K;
  if (L + 1 - t0 < len) len = L + 1 - t0;
  if (next_ckpt > t0 && next_ckpt - t0 < len) len = next_ckpt - t0;
  return static_cast<int>(len);
}

inline Arena plan_exp_blocked_arena(const ForwardParams& p, size_t elem_bytes, size_t smem_limit) {
  const int64_t e = static_cast<int64_t>(elem_bytes), C = p.C;
  int64_t bytes[kExpBlockedArrays];
  exp_forward_bytes(p, e, exp_blocked_partial_slots(C), bytes);
  bytes[kExpNear] = 7 * kBlockSteps * C * e;
  bytes[kExpBlockDoubles] =
      (C + 3 + 3 * kBlockSteps + kBlockSteps * C) * static_cast<int64_t>(sizeof(double));
  bytes[kExpBlockInts] = (2 * C + 2) * static_cast<int64_t>(sizeof(int32_t));
  // As the per-step kernel's; the near entries and the block state are read
  // every step by warp 0, the weights and the ring once a block by all.
  const int evict[] = {kExpTransitionBound, kExpTransition, kExpWeight,    kExpRing,
                       kExpDoubles,         kExpScalars,    kExpInts,      kExpNear,
                       kExpBlockDoubles,    kExpBlockInts};
  return plan_arena(bytes, kExpBlockedArrays, evict, 10, smem_limit);
}

// The largest of v over the warp, NaN ignored.
template <typename T>
__device__ __forceinline__ T warp_max_ignoring_nan(T v) {
  return warp_reduce(v, [](T a, T b) { return max_ignoring_nan(a, b); });
}
__device__ __forceinline__ bool warp_any(bool v) { return __any_sync(kFullMask, v) != 0; }

// The warp's largest int: one REDUX instruction from sm_80 on (and in the
// emulator), a shuffle tree before.
__device__ __forceinline__ int warp_max_int(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return warp_reduce(v, [](int a, int b) { return a > b ? a : b; });
#else
  return __reduce_max_sync(kFullMask, v);
#endif
}

// The warp's largest hi and smallest lo, both nonnegative (+inf allowed, no
// NaN). A nonnegative float's bits order as unsigned integers do, so float
// takes two REDUX instructions from sm_80 on; double two shuffle trees.
template <typename T>
__device__ __forceinline__ void warp_range_nonneg(T& hi, T& lo) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (sizeof(T) == sizeof(unsigned)) {
    unsigned h, l;
    std::memcpy(&h, &hi, sizeof(h));
    std::memcpy(&l, &lo, sizeof(l));
    h = __reduce_max_sync(kFullMask, h);
    l = __reduce_min_sync(kFullMask, l);
    std::memcpy(&hi, &h, sizeof(h));
    std::memcpy(&lo, &l, sizeof(l));
    return;
  }
#endif
  hi = warp_reduce(hi, [](T a, T b) { return a < b ? b : a; });
  lo = warp_reduce(lo, [](T a, T b) { return b < a ? b : a; });
}

template <typename scalar_t, bool kShared>
struct CtaExpBlocked : CtaExpForward<scalar_t, kShared> {
  using Base = CtaExpForward<scalar_t, kShared>;
  using Limits = typename Base::Limits;
  using Base::A;
  using Base::A_bound;
  using Base::absorb_factor;
  using Base::boundary;
  using Base::C;
  using Base::in;
  using Base::inv_tiny_d;
  using Base::K;
  using Base::kInf;
  using Base::kNegInf;
  using Base::part;
  using Base::rd;
  using Base::reject;
  using Base::rejected;
  using Base::ring;
  using Base::rs;
  using Base::tiny;
  using Base::tiny_d;
  using Base::weight;

  scalar_t* const near;
  double* const blk_d;
  int32_t* const blk_i;

  // Warp 0's state. The scalars are the same bits in every lane; the rest is
  // lane c's label (lanes c >= C hold a label with nothing in it).
  // The offset is O + O_e · ln 2: the emission maxima (and step 0's) in O,
  // the normalisers, powers of two, in O_e. The end and start scales are
  // powers of two too, 2^mes_e and 2^mss_e (srel_e = mes_e + mss_e; all
  // integer-valued doubles), so that the advance's factors are exact powers
  // of two found from exponents: no float64 log or exp on the chain.
  // ref_hi + ref_lo: the log scan's offset, caught up once a block.
  double O = 0.0, O_e = 0.0, mes_e = 0.0, srel_e = 0.0;
  double ref_hi = 0.0, ref_lo = 0.0;
  int tK = 0;
  bool owes = false;  // the near entries owe the last advance's factor
  bool valid = false, reach = false;
  int last = 0;
  double dur_max = 0.0, weight_lost = 0.0, col_max = 0.0, a_lost = 0.0;
  scalar_t wminpos = 0, aminpos = 0;
  double ghost_old = 0.0, ghost_new = 0.0, ga = 0.0, gs = 0.0;
  scalar_t alpha = 0, sigma = 0, fo = 0;
  double F = 1.0;
  bool f_zero = false;  // F is an exact zero (a -inf score)
  // From ends(t) for advance(t): the largest live entry, the smallest
  // positive near entry, whether any entry that matters is positive.
  scalar_t livemax = 0, near_min = 0;
  bool any_pos = false;
  // alpha_hat's summary over the labels that can reach an end.
  scalar_t alpha_reach_max = 0, alpha_reach_min = 0;
  bool alpha_ghost = false;

  __device__ CtaExpBlocked(const ForwardParams& p, const Arena& arena, int64_t b, int64_t L_)
      : Base(p, arena, b, L_),
        near(arena.get<scalar_t, kShared>(kExpNear, b)),
        blk_d(arena.get<double, kShared>(kExpBlockDoubles, b)),
        blk_i(arena.get<int32_t, kShared>(kExpBlockInts, b)) {}

  // The offset as one float64 number.
  __device__ double offset() const { return O + O_e * kLn2; }
  // 2^e for an integer-valued e: from the bits where it is a normal
  // float64 number, 0 below float64's range, +inf above it.
  __device__ static double power_of_two(double e) {
    if (e > 1023.0) return kInf;
    if (e < -1022.0) return e < -1074.0 ? 0.0 : ::ldexp(1.0, static_cast<int>(e));
    const uint64_t bits = static_cast<uint64_t>(static_cast<int64_t>(e) + 1023) << 52;
    double v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }

  // A label's rank for the end (or start) scale, an int, so that one warp
  // reduction finds the scale. A label that can reach an end, with a
  // positive sum v and a finite score y, ranks by the exponent of the power
  // of two at or above 2^exponent(v) e^y, ceil(y / ln 2) + exponent(v),
  // above every label with a score alone (ranked by ceil(y / ln 2)); a
  // label with neither: -1. The exponents are clamped to +-2^27 (scores of
  // 9 * 10^7 nats); a scale at a clamp is rejected by scale_exponent.
  static constexpr int kScaleClamp = 1 << 27;
  __device__ static int scale_rank(bool reach, scalar_t v, double y) {
    if (!reach || !(y > kNegInf)) return -1;
    const bool with_sum = v > 0;
    double e = ::ceil(y * (1.0 / kLn2)) + (with_sum ? exponent_of(v) : 0);
    e = e < -kScaleClamp ? -kScaleClamp : (e > kScaleClamp ? kScaleClamp : e);
    return static_cast<int>(e) + kScaleClamp + (with_sum ? 4 * kScaleClamp : 0);
  }
  // The scale's exponent from the warp's largest rank (0 where no label
  // ranks); *clamped where it lies at a clamp.
  __device__ static double scale_exponent(int rank, bool* clamped) {
    if (rank < 0) return 0.0;
    const int e = (rank >= 4 * kScaleClamp ? rank - 4 * kScaleClamp : rank) - kScaleClamp;
    *clamped = e == kScaleClamp || e == -kScaleClamp;
    return static_cast<double>(e);
  }

  // The block's inputs, staged by the whole CTA before its steps so that
  // warp 0's chain waits on no global load: row k holds position t0 + k's
  // scores and start scores, and the end scores of t0 + k - 1.
  __device__ scalar_t* staged_score() const { return near + kBlockSteps * C; }
  __device__ scalar_t* staged_start() const { return near + 2 * kBlockSteps * C; }
  __device__ scalar_t* staged_end() const { return near + 3 * kBlockSteps * C; }
  __device__ double* staged_emit_max() const { return blk_d + C + 3; }
  // alpha_hat of step t0 + k (row k), the offset and mes its ends() had:
  // the log scan's offset is caught up from them once a block.
  __device__ scalar_t* alpha_row(int k) const { return near + (4 * kBlockSteps + k) * C; }
  __device__ double* step_offset() const { return blk_d + C + 3 + kBlockSteps; }
  __device__ double* step_mes() const { return blk_d + C + 3 + 2 * kBlockSteps; }
  // The block's far part a (step, label), at the block start's scale: the
  // sum, the largest live entry, and what the products that fell below tiny
  // can have lost (in kSlack units at that scale; -1 where no old entry is
  // positive), from far_sums() for ends().
  __device__ scalar_t* far_sum() const { return near + 5 * kBlockSteps * C; }
  __device__ scalar_t* far_max() const { return near + 6 * kBlockSteps * C; }
  __device__ double* far_charge() const { return blk_d + C + 3 + 3 * kBlockSteps; }
  __device__ int32_t* flushed() const { return blk_i; }
  __device__ int32_t* f_zero_row() const { return blk_i + C; }
  __device__ int32_t& steps_run() const { return blk_i[2 * C]; }
  // Set while staging, turned into a rejection by warp 0 after the barrier
  // (the loop's rejected() check before staging must read the same in every
  // thread).
  __device__ int32_t& staged_bad() const { return blk_i[2 * C + 1]; }

  // The per-step kernel's tables, reach and empty state; the block state
  // zeroed (a checkpoint at t = 0 reads O = ref = 0); warp 0 takes its
  // labels' constants into registers. Ends with a barrier.
  __device__ void init() {
    for (int i = threadIdx.x; i < C + 3; i += kThreads) blk_d[i] = i < C ? 1.0 : 0.0;
    for (int i = threadIdx.x; i < 2 * C + 2; i += kThreads) blk_i[i] = 0;
    Base::init();
    if (warp_id() != 0) return;
    const int c = lane_id();
    valid = c < C;
    if (!valid) return;
    last = Base::last_duration()[c];
    reach = last > 0;
    dur_max = rd(kDurMax)[c];
    weight_lost = rd(kWeightLost)[c];
    col_max = rd(kColMax)[c];
    a_lost = rd(kALost)[c];
    wminpos = rs(kWeightMinpos)[c];
    aminpos = rs(kAMinpos)[c];
  }

  // Checkpoint at a block's start t0 (the ring owes nothing there), as the
  // log scan writes it. Reads the state warp 0 published.
  __device__ void save(int t0K, scalar_t* out, double* out_offset) const {
    const double O_ = blk_d[C], hi = blk_d[C + 1], lo = blk_d[C + 2];
    const double shift = (O_ - hi) - lo;
    for_each_entry(K, C, threadIdx.x, kThreads, [&](int row, int c) {
      const scalar_t r = ring[slot_before(t0K, row + 1, K) * C + c];
      out[row * C + c] = r > 0 ? static_cast<scalar_t>(::log(static_cast<double>(r)) + shift)
                               : neg_inf<scalar_t>();
    });
    if (threadIdx.x == 0) *out_offset = hi;
  }

  // The far part of a block's steps k < len at t0's scale, by threads
  // first … first + n_threads - 1: for each (k, c) the sum over the old ages
  // d' <= min(n0, K - k - shift) of R[d'] W[d'+k+shift], the largest live R
  // and the smallest positive R that meets a weight or can still grow, in G
  // groups of ages (partials in group order). shift = 0 for the block that
  // starts at t0; shift = len for the block after it, whose entries that
  // started before t0 are then the ones of age d' + len (warps 1 … 7 sum
  // them while warp 0 runs the block's chain).
  // A thread's ages run in four stretches, in increasing order: where the
  // ring's slots do not wrap and then where they do, each split where the
  // entries stop being able to grow, so that no loop tests either and the
  // addresses step by G ages.
  __device__ void far_partials(int t0K, int n0, int len, int shift, int first,
                               int n_threads) const {
    const int items = len * C;
    const int G = items >= n_threads ? 1 : n_threads / items;
    const int64_t slots = exp_blocked_partial_slots(C);
    const int64_t step = static_cast<int64_t>(G) * C;
    const scalar_t inf = Limits::infinity();
    for (int i = first; i < G * items; i += n_threads) {
      const int g = i / items, r = i - g * items, k = r / C, c = r - k * C;
      const int ks = k + shift;
      const int top = n0 < K - ks ? n0 : K - ks;
      const int grows = Base::last_duration()[c] - ks - 1;  // ages <= grows can still grow
      scalar_t a = 0, lm = 0, mn = inf;
      // Ages lo … hi congruent to 1 + g (mod G), within one run of slots.
      auto stretch = [&](int lo, int hi, bool keep) {
        int off = (1 + g - lo) % G;
        const int d = lo + (off < 0 ? off + G : off);
        if (d > hi) return;
        const int n = (hi - d) / G + 1;
        const scalar_t* rp = ring + static_cast<int64_t>(d <= t0K ? t0K - d : t0K - d + K) * C + c;
        const scalar_t* wp = weight + static_cast<int64_t>(d + ks - 1) * C + c;
        if (keep) {
#pragma unroll 4
          for (int j = 0; j < n; ++j, rp -= step, wp += step) {
            const scalar_t x = *rp;
            a += x * *wp;
            lm = std::fmax(x, lm);
            mn = std::fmin(x > 0 ? x : inf, mn);
          }
        } else {
#pragma unroll 4
          for (int j = 0; j < n; ++j, rp -= step, wp += step) {
            const scalar_t x = *rp, w = *wp;
            a += x * w;
            mn = std::fmin((x > 0 && w > 0) ? x : inf, mn);
          }
        }
      };
      const int unwrapped = t0K < top ? t0K : top;
      stretch(1, unwrapped < grows ? unwrapped : grows, true);
      stretch(grows + 1 > 1 ? grows + 1 : 1, unwrapped, false);
      stretch(t0K + 1, top < grows ? top : grows, true);
      stretch(grows + 1 > t0K + 1 ? grows + 1 : t0K + 1, top, false);
      part[i] = a;
      part[slots + i] = lm;
      part[2 * slots + i] = mn;
    }
  }

  // The far part of the block at t0 (all threads, before its barrier), for
  // ends(): the partials far_partials() left, summed in group order (G from
  // the n_threads that wrote them), and, where they were written the block
  // before (ahead), at its start's scale: then times that block's F (the
  // factor its rescale() applies to them) and joined by the entries that
  // block started, ages 1 … k_prev at t0, read here from the ring. A
  // product below tiny loses at most tiny at its own scale: F tiny at t0's
  // for the older entries; an F · sum that falls below tiny, tiny, whether
  // the dtype's rounding or float64's own underflow (to a subnormal or to 0:
  // a float64 far sum at the block before's scale can be 2^-1000 smaller at
  // t0's) took it there.
  __device__ void far_sums(int t0K, int64_t t0, int len, bool ahead, int k_prev,
                           int n_threads) const {
    const int items = len * C;
    const int G = items >= n_threads ? 1 : n_threads / items;
    const int64_t slots = exp_blocked_partial_slots(C);
    const scalar_t big = Limits::max(), inf = Limits::infinity();
    const double big_d = static_cast<double>(big);
    for (int i = threadIdx.x; i < items; i += kThreads) {
      const int k = i / C, c = i - k * C;
      const scalar_t wmin = Base::rs(kWeightMinpos)[c];
      scalar_t so = 0, lmo = 0, mno = inf;
      for (int g = 0; g < G; ++g) {
        const int j = g * items + i;
        so += part[j];
        lmo = part[slots + j] > lmo ? part[slots + j] : lmo;
        mno = part[2 * slots + j] < mno ? part[2 * slots + j] : mno;
      }
      // F = 0 only as an exact zero (a -inf score): the old entries are zeros.
      const double Fb = ahead ? blk_d[c] : 1.0;
      if (!(Fb > 0.0)) {
        so = 0;
        lmo = 0;
        mno = inf;
      }
      const double fs = so > 0 ? Fb * static_cast<double>(so) : 0.0;
      const scalar_t s_old = static_cast<scalar_t>(fs < big_d ? fs : big_d);
      const double fl = lmo > 0 ? Fb * static_cast<double>(lmo) : 0.0;
      scalar_t lm = static_cast<scalar_t>(fl < big_d ? fl : big_d);
      // The entries the block before started, at t0's scale already.
      scalar_t sm = 0, mnm = inf;
      const int top = k_prev < K - k ? k_prev : K - k;
      const int grows = Base::last_duration()[c] - k - 1;
      for (int d = 1; d <= top; ++d) {
        const scalar_t x = ring[slot_before(t0K, d, K) * C + c];
        const scalar_t w = weight[(d + k - 1) * C + c];
        sm += x * w;
        const bool keep = d <= grows;
        lm = keep ? std::fmax(x, lm) : lm;
        mnm = std::fmin((x > 0 && (w > 0 || keep)) ? x : inf, mnm);
      }
      const int64_t t = t0 + k;
      const double n_old = static_cast<double>((t < K ? t : K) - k);
      double q = -1.0;
      if (mno < inf || mnm < inf) {
        q = 0.0;
        if (mno < inf && static_cast<double>(mno * wmin) < tiny_d) q += n_old * Fb;
        if (mnm < inf && static_cast<double>(mnm * wmin) < tiny_d) q += n_old;
        const double rounded = static_cast<double>(s_old);
        if (so > 0 && rounded < tiny_d) q += 1.0;
      }
      far_sum()[i] = s_old + sm;
      far_max()[i] = lm;
      far_charge()[i] = q;
    }
  }

  // Stage the inputs of steps t0 … t0+len-1 (all threads, before the
  // block's barrier), with each position's largest score (NaN ignored; 0
  // where all are -inf); mark NaN or +inf inputs of positions t < L, which
  // the per-step kernel's advance rejects.
  __device__ void stage_inputs(int64_t t0, int len) {
    bool bad = false;
    for (int i = threadIdx.x; i < len * C; i += kThreads) {
      const int k = i / C, c = i - k * C;
      const int64_t t = t0 + k;
      if (t < Base::L) {
        const scalar_t sc = in.score(t, c), st = in.start(t, c);
        staged_score()[i] = sc;
        staged_start()[i] = st;
        bad |= unboundable(sc) || (boundary && (unboundable(st) || unboundable(in.end(t, c))));
      }
      if (t >= 1) staged_end()[i] = in.end(t - 1, c);
    }
    if (bad) staged_bad() = 1;
    for (int k = warp_id(); k < len; k += kWarps) {
      const int64_t t = t0 + k;
      if (t >= Base::L) break;
      double m = kNegInf;
      for (int c = lane_id(); c < C; c += kWarpSize)
        m = max_ignoring_nan(m, static_cast<double>(in.score(t, c)));
      m = warp_max_ignoring_nan(m);
      if (lane_id() == 0) staged_emit_max()[k] = m == kNegInf ? 0.0 : m;
    }
  }

  // Step 0 (warp 0): sigma_hat[0] relative to O = its finite max.
  __device__ void first() {
    const int c = lane_id();
    const double v = valid ? static_cast<double>(in.first(c)) : kNegInf;
    const double m = warp_reduce(v, [](double a, double b) { return std::max(a, b); });
    O = m == kNegInf ? 0.0 : m;
    O_e = 0.0;
    srel_e = 0.0;
    ref_hi = O;
    ref_lo = 0.0;
    if (valid) {
      const double x = v - O;
      sigma = fexp(static_cast<scalar_t>(x));
      gs = ghost_through_factor(0.0, scalar_t(1), sigma, x);
    }
  }

  // Step t = t0 + k >= 1 (warp 0): alpha_hat and its ghost, from the near
  // entries and the far partials of step k.
  __device__ void ends(int64_t t, int k) {
    const int c = lane_id();
    const int n = static_cast<int>(t < K ? t : K);
    const scalar_t big = Limits::max(), inf = Limits::infinity();
    if (tK == 0) {  // t % K == 0: generation 0 expires
      ghost_old = ghost_new;
      ghost_new = 0.0;
    }
    scalar_t a = 0, lm = 0, mn = inf;
    if (valid) {
      // Near ages 1 … k: entry j = k - d started at t0 + j; ages >= 2 take
      // the last advance's factor on the way (the per-step ring pass).
      for (int d = 1; d <= k; ++d) {
        scalar_t* r = near + (k - d) * C + c;
        scalar_t x = *r;
        if (d >= 2 && owes) {
          x = x * fo;
          x = x < big ? x : big;
          *r = x;
        }
        const scalar_t w = weight[(d - 1) * C + c];
        a += x * w;
        const bool keep = d < last;
        lm = keep ? std::fmax(x, lm) : lm;
        mn = std::fmin((x > 0 && (w > 0 || keep)) ? x : inf, mn);
      }
    }
    owes = false;
    double g = ghost_old + ghost_new;
    const bool has_near = mn < inf;
    bool has_far = false;
    if (valid) {
      const int i = k * C + c;
      const scalar_t s = far_sum()[i], flm = far_max()[i];
      const double q = far_charge()[i];
      // F = 0 only as an exact zero inside a block: the old entries are zeros.
      has_far = F > 0.0 && q >= 0.0;
      const double fd = F > 0.0 && s > 0 ? F * static_cast<double>(s) : 0.0;
      const double big_d = static_cast<double>(big);
      const scalar_t far_sum = static_cast<scalar_t>(fd < big_d ? fd : big_d);
      a = far_sum + a;
      if (F > 0.0 && flm > 0) {
        const double x = F * static_cast<double>(flm);
        const scalar_t xs = static_cast<scalar_t>(x < big_d ? x : big_d);
        lm = xs > lm ? xs : lm;
      }
      // Products below tiny: n_near at this step's scale; the far part's
      // (far_sums(): in tiny units at t0's scale), F · tiny each at this
      // step's; the far sum's own rounding.
      if (has_near && static_cast<double>(mn * wminpos) < tiny_d)
        g += static_cast<double>(k) * kSlack;
      if (has_far) g += q * kSlack * F * kUp;
      // (F · s can underflow float64 to 0 where the dtype is float64.)
      if (F > 0.0 && s > 0 && fd < tiny_d) g += kSlack;
      if (has_near || has_far) g += weight_lost;
    }
    livemax = lm;
    near_min = mn;
    any_pos = has_near || has_far;
    const double ya =
        valid ? static_cast<double>(staged_end()[k * C + c]) + dur_max : kNegInf;
    bool clamped = false;
    mes_e = scale_exponent(warp_max_int(scale_rank(reach, a, ya)), &clamped);
    const double mes = mes_e * kLn2;
    alpha = 0;
    ga = 0.0;
    if (valid) {
      const scalar_t endf = fexp(static_cast<scalar_t>(ya - mes));
      const scalar_t x = big < a ? big : a;
      const scalar_t prod = x * endf;
      alpha = x > 0 ? (big < prod ? big : prod) : scalar_t(0);
      bool lost = false;
      g = ghost_of_alpha(g, x, endf, ya - mes, alpha, absorb_factor, &lost);
      if (!reach) {  // a label that cannot reach an end feeds only its like
        g = 0.0;
        lost = false;
      }
      ga = g;
      if (lost) reject();
      // The rows starts() and finish() read (after a __syncwarp).
      alpha_row(k)[c] = alpha;
      rd(kGa)[c] = ga;
    }
    // alpha_hat's range over the labels that can reach an end, and whether
    // any label carries a ghost (the log scan's offset is caught up from the
    // rows once a block).
    scalar_t hi = reach ? alpha : scalar_t(0), lo = reach && alpha > 0 ? alpha : inf;
    warp_range_nonneg(hi, lo);
    alpha_reach_max = hi;
    alpha_reach_min = lo;
    alpha_ghost = warp_any(ga > 0.0);
    if (clamped) reject();
    if (c == 0) {
      step_offset()[k] = offset();
      step_mes()[k] = mes;
    }
  }

  // t < L, t >= 1 (warp 0): sigma_hat[t] and its ghost.
  __device__ void starts(int k) {
    const int c = lane_id();
    const scalar_t big = Limits::max();
    const scalar_t amax = alpha_reach_max, amin = alpha_reach_min;
    // u = alpha_hat A, each sum over c' in order, from the rows ends()
    // wrote (a broadcast load a term; a zero alpha adds an exact zero, as
    // the per-step kernel's skipped term does: A is finite).
    __syncwarp();
    const scalar_t* alpha_hat = alpha_row(k);
    const double* ga_row = rd(kGa);
    scalar_t u = 0;
    double work = 0.0;
    if (valid) {
      for (int cp = 0; cp < C; ++cp) u += alpha_hat[cp] * A[cp * C + c];
      // The exact ghost mat-vec, where alpha_hat carries a ghost.
      if (alpha_ghost) {
        for (int cp = 0; cp < C; ++cp) {
          const double gcp = ga_row[cp];
          if (gcp != 0.0) {
            const double row = A_bound[cp * C + c];
            if (row > 0) work += Base::floored(gcp * row);
          }
        }
      }
    }
    const double ys =
        valid ? static_cast<double>(staged_start()[k * C + c]) + col_max : kNegInf;
    const scalar_t x = big < u ? big : u;
    bool clamped = false;
    const double mss_e = scale_exponent(warp_max_int(scale_rank(reach, x, ys)), &clamped);
    if (clamped) reject();
    const double mss = mss_e * kLn2;
    srel_e = mes_e + mss_e;
    sigma = 0;
    gs = 0.0;
    if (!valid) return;
    const scalar_t h = fexp(static_cast<scalar_t>(ys - mss));
    const scalar_t prod = x * h;
    sigma = x > 0 ? (big < prod ? big : prod) : scalar_t(0);
    if (!reach) return;
    double g = work;
    if (amax > 0) {
      if (a_lost > 0) g += Base::floored(static_cast<double>(amax) * a_lost);
      if (amin * aminpos < tiny) g += static_cast<double>(C) * kSlack;
    }
    g = ghost_through_factor(g, x, h, ys - mss);
    if (x > 0 && h >= tiny && sigma < tiny) g += kSlack;
    if (g > 0 && sigma > 0 && g * absorb_factor <= static_cast<double>(sigma)) g = 0.0;
    if (!(g < 1e300)) reject();
    gs = g;
  }

  // Move to step t+1 = t0+k+1 (warp 0, t < L): the per-step kernel's
  // advance, with the old entries' factor folded into F and the new entry
  // kept as near entry k. Returns whether the block must end here (F left
  // the range where its float64 products are exact to rounding; the rescale
  // then charges what it flushes).
  __device__ bool advance(int64_t t, int k) {
    const int c = lane_id();
    const double m = staged_emit_max()[k];
    const double lemit = valid ? static_cast<double>(staged_score()[k * C + c]) - m : kNegInf;
    const scalar_t emit = fexp(static_cast<scalar_t>(lemit));
    const bool flushed = static_cast<double>(emit) < tiny_d && lemit > kNegInf;
    const double e_mass = flushed ? ::exp(lemit) : static_cast<double>(emit);
    const double old_mass = valid ? static_cast<double>(livemax) * e_mass : 0.0;
    const double fresh_mass = reach ? static_cast<double>(sigma) * e_mass : 0.0;
    // The normaliser 2^j: the power of two at or below the largest new entry
    // (an old entry times its factor, or a fresh one, at 2^srel_e), one
    // integer shuffle tree. j is clamped to +-2^30: a j that scores of 10^9
    // would need makes a factor overflow or flush, which is rejected or
    // charged as any other.
    constexpr int kNone = -(1 << 30) - 1;
    int jc = kNone;
    if (old_mass > 0 || fresh_mass > 0) {
      const double eo = old_mass > 0 ? exponent_of(old_mass) : kNegInf;
      const double ef = fresh_mass > 0 ? exponent_of(fresh_mass) + srel_e : kNegInf;
      const double top = eo > ef ? eo : ef;
      jc = static_cast<int>(top < -0x1p30 ? -0x1p30 : (top > 0x1p30 ? 0x1p30 : top));
    }
    jc = warp_max_int(jc);
    const double j = jc == kNone ? 0.0 : static_cast<double>(jc);
    const double base = -j * kLn2, so = power_of_two(-j), sn = power_of_two(srel_e - j);
    const double big = static_cast<double>(Limits::max());
    const double old_charge = 2.0 * static_cast<double>(t < K - 1 ? t : K - 1) * kSlack;
    bool cut = false;
    if (valid) {
      const double e = static_cast<double>(emit);
      const double old_f = flushed ? ::exp(lemit + base) : (e == 0.0 ? 0.0 : e * so);
      const double new_f =
          flushed ? ::exp(lemit + base + srel_e * kLn2) : (e == 0.0 ? 0.0 : e * sn);
      if (reach && ((any_pos && old_f > big) || (sigma > 0 && new_f > big))) reject();
      fo = static_cast<scalar_t>(big < old_f ? big : old_f);
      const scalar_t fn = static_cast<scalar_t>(big < new_f ? big : new_f);
      const bool exact_zero = lemit == kNegInf;
      const bool fresh_lost =
          !exact_zero && sigma > 0 && static_cast<double>(sigma * fn) < tiny_d;
      // Only the near entries take fo; the old ones are charged at the
      // rescale where it flushes them.
      const bool old_lost = !exact_zero && near_min < Limits::infinity() &&
                            (static_cast<double>(fo) < tiny_d ||
                             static_cast<double>(near_min * fo) < tiny_d);
      const double go = scaled_ghost(ghost_old, old_f, exact_zero);
      double gn = scaled_ghost(ghost_new, old_f, exact_zero) + scaled_ghost(gs, new_f, exact_zero);
      gn += fresh_lost ? (static_cast<double>(sigma) * new_f * inv_tiny_d + 2.0) * kSlack : 0.0;
      gn += old_lost ? old_charge : 0.0;
      if (reach && !(go + gn < 1e300)) reject();
      ghost_old = reach ? go : 0.0;
      ghost_new = reach ? gn : 0.0;
      const scalar_t entry = sigma * fn;
      near[k * C + c] = Limits::max() < entry ? Limits::max() : entry;
      // F: the old entries' factors since t0, unrounded.
      if (exact_zero) {
        F = 0.0;
        f_zero = true;
      } else if (!f_zero) {
        F *= old_f;
        cut = !(F >= 0x1p-900 && F <= 0x1p900);
      }
    }
    owes = true;
    O += m;
    O_e += j;
    tK = tK + 1 == K ? 0 : tK + 1;
    return warp_any(cut);
  }

  // Warp 0, step L = t0 + k: log Z if the bounds certify it (from the
  // alpha_hat and ghost rows ends() wrote), else reject.
  __device__ void finish(int k, scalar_t* log_z) {
    __syncwarp();
    if (lane_id() == 0 && !rejected()) {
      double z = 0.0;
      if (certified_log_z(in, C, alpha_row(k), rd(kGa), offset(), mes_e * kLn2, &z)) {
        *log_z = static_cast<scalar_t>(z);
      } else {
        reject();
      }
    }
  }

  // Warp 0 after the block's steps (k_run of them, the last at t1 - 1 < L):
  // F, whether it is an exact zero, the scalars; the near entries join the
  // ring with the last advance's factor applied (their slots held entries
  // that have left it).
  __device__ void publish(int t0K, int k_run, int64_t t0) {
    const int c = lane_id();
    const scalar_t big = Limits::max();
    catch_up_log_scan(t0 == 0 ? 1 : 0, k_run);
    if (valid) {
      blk_d[c] = F;
      f_zero_row()[c] = f_zero;
      for (int j = 0; j < k_run; ++j) {
        scalar_t x = near[j * C + c];
        if (owes && j < k_run - 1) {
          x = x * fo;
          x = x < big ? x : big;
        }
        const int slot = t0K + j < K ? t0K + j : t0K + j - K;
        ring[slot * C + c] = x;
      }
    }
    owes = false;
    if (c == 0) {
      staged_bad() = 0;  // every lane read it before the steps' __syncwarp
      blk_d[C] = offset();
      blk_d[C + 1] = ref_hi;
      blk_d[C + 2] = ref_lo;
      steps_run() = k_run;
    }
    F = 1.0;
    f_zero = false;
  }

  // Warp 0: the offset the log scan would have after the block's k_run
  // steps (its step subtracts its largest alpha, its advance the emission
  // maximum), from the alpha_hat rows and offsets ends() kept (steps
  // k_first …; step 0 of the sequence has none). Each lane takes one step's
  // log; the sum runs in order, as the per-step kernel's does.
  __device__ void catch_up_log_scan(int k_first, int k_run) {
    const int k = lane_id();
    double log_max = kNegInf;
    if (k >= k_first && k < k_run) {
      scalar_t amax = 0;
      const scalar_t* row = alpha_row(k);
      for (int i = 0; i < C; ++i) amax = max_ignoring_nan(amax, row[i]);
      if (amax > 0) log_max = ::log(static_cast<double>(amax));
    }
    for (int i = 0; i < k_run; ++i) {
      const double li = __shfl_sync(kFullMask, log_max, i);
      if (li > kNegInf) {
        const double shift = (step_offset()[i] - ref_hi) - ref_lo;
        two_sum_add(ref_hi, ref_lo, log_scan_step_from_log<scalar_t>(li, shift, step_mes()[i]));
      }
      two_sum_add(ref_hi, ref_lo, staged_emit_max()[i]);
    }
  }

  // All threads, after publish: the old entries still in the ring at t1 =
  // t0 + k_run rescaled by F; a label with a positive entry taken below
  // tiny is marked for the flush charge.
  __device__ void rescale(int t0K, int n0, int k_run) const {
    const scalar_t big = Limits::max();
    const double big_d = static_cast<double>(big);
    const int top = n0 < K - k_run ? n0 : K - k_run;
    for_each_entry(top, C, threadIdx.x, kThreads, [&](int row, int c) {
      scalar_t& r = ring[slot_before(t0K, row + 1, K) * C + c];
      const scalar_t x = r;
      // F can pass float64's range where a label has no positive entry
      // (nothing bounds its factors then): zeros stay zeros.
      const double y = x > 0 ? static_cast<double>(x) * blk_d[c] : 0.0;
      const scalar_t ys = static_cast<scalar_t>(y < big_d ? y : big_d);
      r = ys;
      if (x > 0 && ys < tiny && f_zero_row()[c] == 0) flushed()[c] = 1;
    });
  }

  // Warp 0 at a block's start: the rejection staging marked; the flush
  // charges of the last rescale, into the newest generation (where the
  // per-step scan's advance puts them).
  __device__ void take_flush_charges(int64_t t) {
    const int c = lane_id();
    if (staged_bad() != 0) reject();  // cleared by publish(), after the steps
    if (!valid) return;
    if (flushed()[c] != 0) {
      const int64_t s = t - 1;
      if (reach) ghost_new += 2.0 * static_cast<double>(s < K - 1 ? s : K - 1) * kSlack;
      flushed()[c] = 0;
      if (reach && !(ghost_old + ghost_new < 1e300)) reject();
    }
  }
};

// The blocked exp-domain forward: as exp_forward_kernel (log Z and the
// checkpoints where the bounds certify log Z, redo[b] = 1 elsewhere), for
// C <= kBlockedMaxLabels.
template <typename scalar_t, bool kShared>
__global__ void __launch_bounds__(kThreads, exp_forward_min_blocks<scalar_t, kShared>())
    exp_blocked_kernel(const ForwardParams p, const Arena arena, int32_t* redo) {
  const int64_t b = blockIdx.x;
  const int64_t L = sequence_length(p, b);
  CtaExpBlocked<scalar_t, kShared> scan(p, arena, b, L);
  const int K = scan.K;
  const bool warp0 = warp_id() == 0;
  constexpr int kAhead = kThreads - kWarpSize;  // warps 1 … 7
  scan.init();
  // The checkpoints saved; whether scan.part holds this block's partials,
  // summed ahead at the block before's scale; the steps that block ran.
  // (Few registers live across the chain: the float64 instantiation in
  // shared memory is capped at 128, so the schedule and the checkpoints'
  // pointers are recomputed where they are needed.)
  int64_t j = 0, t0 = 0;
  bool ahead = false;
  int k_run = 0;
  for (;;) {
    if (scan.rejected()) break;  // every thread reads it after the same barrier
    const int t0K = static_cast<int>(t0 % K);
    const int n0 = static_cast<int>(t0 < K ? t0 : K);
    // The block before's old entries to this block's scale (its near
    // entries, published at it, are not touched: the far sums read them).
    if (t0 > 0) {
      const int64_t t_prev = t0 - k_run;
      const int prev_t0K = t0K >= k_run ? t0K - k_run : t0K - k_run + K;
      scan.rescale(prev_t0K, static_cast<int>(t_prev < K ? t_prev : K), k_run);
    }
    const bool save_here = t0 == checkpoint_step<scalar_t>(p, j, L);
    if (save_here || !ahead) __syncthreads();
    if (save_here) {
      const SequenceCheckpoints<scalar_t> ckpt(p, b);
      scan.save(t0K, ckpt.at(j), ckpt.offset + j);
      ++j;
    }
    const int64_t next_ckpt = checkpoint_step<scalar_t>(p, j, L);
    const int len = blocked_steps(t0, next_ckpt, L, K);
    if (!ahead) {  // the first block, or the block before ended early
      scan.far_partials(t0K, n0, len, 0, threadIdx.x, kThreads);
      __syncthreads();
    }
    scan.far_sums(t0K, t0, len, ahead, ahead ? k_run : 0, ahead ? kAhead : kThreads);
    scan.stage_inputs(t0, len);
    __syncthreads();
    // The next block, if this one runs all its steps.
    const int64_t t1 = t0 + len;
    bool done = false;
    if (warp0) {
      scan.tK = t0K;
      scan.take_flush_charges(t0);
      // The step at L, if the block reaches it (an int: L itself need not
      // stay in a register across the chain).
      const int k_last = L - t0 < len ? static_cast<int>(L - t0) : len;
      int k = 0;
      for (; k < len; ++k) {
        const int64_t t = t0 + k;
        __syncwarp();
        if (scan.rejected()) break;
        if (t == 0) {
          scan.first();
        } else {
          scan.ends(t, k);
        }
        if (k == k_last) {
          scan.finish(k, static_cast<scalar_t*>(p.log_z) + b);
          done = true;
          break;
        }
        if (t > 0) scan.starts(k);
        if (scan.advance(t, k)) {
          ++k;
          break;
        }
      }
      if (done) {
        if (lane_id() == 0) scan.steps_run() = -1;
      } else {
        scan.publish(t0K, k, t0);
      }
    } else if (t1 <= L) {
      // Meanwhile the next block's partials over the entries that started
      // before t0 (the ring slots publish() writes hold none of them).
      const int64_t ckpt1 = t1 == next_ckpt ? checkpoint_step<scalar_t>(p, j + 1, L) : next_ckpt;
      scan.far_partials(t0K, n0, blocked_steps(t1, ckpt1, L, K), len,
                        static_cast<int>(threadIdx.x) - kWarpSize, kAhead);
    }
    __syncthreads();
    k_run = scan.steps_run();
    if (scan.rejected() || k_run < 0) break;
    ahead = k_run == len && t1 <= L;
    t0 += k_run;
  }
  hand_over_or_clear(p, SequenceCheckpoints<scalar_t>(p, b), b, L, scan.rejected(), redo);
}

}  // namespace cuda
}  // namespace flashsemicrf
