// The C++ CPU kernels: the streaming scan of flashsemicrf/reference.py, one
// sequence per task (at::parallel_for over the batch), rings stored
// circularly (the entry of a segment starting or ending at position s lives in
// slot s % K) so nothing is shifted. Deterministic: every output element is
// written by one task in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "exp_domain.h"
#include "semicrf.h"
#include "semicrf_host.h"

namespace flashsemicrf {
namespace {

// Column-wise log-sum-exp of rows[r][c] (r < n_rows, c < C) into out[c]; the
// loops run along c, contiguous, so they vectorise. `top` receives the column
// maxima and `scaled` (n_rows × C) exp(rows - top), for callers that reuse
// the terms. An all -inf column has top = out = -inf and scaled = 0, so that
// scaled · exp(anything + top) is 0, never 0 · inf.
template <typename scalar_t>
void lse_columns(const scalar_t* rows, int64_t n_rows, int64_t C, scalar_t* out, scalar_t* top,
                 scalar_t* scaled) {
  for (int64_t c = 0; c < C; ++c) top[c] = neg_inf<scalar_t>();
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = 0; c < C; ++c) top[c] = nan_max(top[c], rows[r * C + c]);
  for (int64_t c = 0; c < C; ++c) out[c] = lse_shift(top[c]);
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = 0; c < C; ++c) scaled[r * C + c] = fexp(rows[r * C + c] - out[c]);
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = 0; c < C; ++c) out[c] += scaled[r * C + c];
  for (int64_t c = 0; c < C; ++c) out[c] = lse_finish(top[c], out[c]);
}

// Log-sum-exp and argmax of x[0 … n-1].
template <typename scalar_t>
scalar_t lse_of(const scalar_t* x, int64_t n) {
  return lse<scalar_t>(static_cast<int>(n), [&](int i) { return x[i]; });
}
template <typename scalar_t>
int argmax_of(const scalar_t* x, int64_t n, scalar_t* best) {
  return argmax<scalar_t>(static_cast<int>(n), [&](int i) { return x[i]; }, best);
}

// Column-wise argmax of value(r, c) over the rows r = 0 … n_rows-1 (n_rows ≥
// 1), for every c < C, in argmax's order (semicrf.h): best[c] receives the
// value, arg[c] its row. Rows outer and labels inner, with selects instead of
// branches, so that the inner loop vectorises; each column still sees its
// rows in increasing order, so the results are argmax's, tie rule included.
template <typename scalar_t, typename Value>
void argmax_columns(int64_t n_rows, int64_t C, Value value, scalar_t* __restrict best,
                    int32_t* __restrict arg) {
  for (int64_t c = 0; c < C; ++c) {
    best[c] = value(0, c);
    arg[c] = 0;
  }
  for (int64_t r = 1; r < n_rows; ++r) {
    const int32_t row = static_cast<int32_t>(r);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t x = value(r, c);
      const bool wins = beats_later(x, best[c]);
      best[c] = wins ? x : best[c];
      arg[c] = wins ? row : arg[c];
    }
  }
}

// The forward scan of one sequence. MAX selects the max semiring (Viterbi),
// DD the duration-dependent (K, C, C) transition.
template <typename scalar_t, bool DD, bool MAX>
struct ForwardScan {
  const SequenceInputs<scalar_t>& in;
  const int64_t K, C, L;
  // Static: K slots of sigma_hat[s] + gain. DD: K alpha slots, then K gain slots.
  std::vector<scalar_t> ring;
  std::vector<scalar_t> alpha, sigma;  // (C): this step's normalised messages
  std::vector<scalar_t> terms;         // scratch (K, C)
  std::vector<scalar_t> pairs;         // scratch (C, C)
  std::vector<scalar_t> scratch;       // scratch (max(K, C), C)
  std::vector<scalar_t> entered, top, emit;  // scratch (C)
  std::vector<int32_t> term_prev;      // MAX && DD: best previous label per (d, c)
  std::vector<int32_t> arg;            // MAX: scratch (C)
  double offset = 0.0;                 // O_t

  ForwardScan(const SequenceInputs<scalar_t>& in_, int64_t K_, int64_t C_, int64_t L_)
      : in(in_), K(K_), C(C_), L(L_),
        ring((DD ? 2 : 1) * K_ * C_, neg_inf<scalar_t>()), alpha(C_), sigma(C_),
        terms(K_ * C_), pairs(C_ * C_), scratch(std::max(K_, C_) * C_), entered(C_), top(C_),
        emit(C_), term_prev(K_ * C_), arg(C_) {}

  // Step t: alpha_hat[t] (t > 0) and sigma_hat[t] (t < L), both relative to
  // O_t. Returns the max m_t subtracted. bp_*: this step's backpointer rows.
  scalar_t step(int64_t t, int32_t* bp_duration = nullptr, int32_t* bp_previous = nullptr) {
    scalar_t m = neg_inf<scalar_t>();
    if (t == 0) {
      for (int64_t c = 0; c < C; ++c) {
        sigma[c] = in.first(c);
        m = nan_max(m, sigma[c]);
      }
      m = finite_or_zero(m);
      for (int64_t c = 0; c < C; ++c) sigma[c] -= m;
      offset += m;
      return m;
    }
    const int64_t dmax = std::min(K, t);
    const int tK = static_cast<int>(t % K);
    // terms[d-1][c]: the open segment [t-d, t) with its duration score.
    for (int64_t d = 1; d <= dmax; ++d) {
      const int64_t s = t - d, slot = slot_before(tK, d, K);
      scalar_t* row = terms.data() + (d - 1) * C;
      const scalar_t* dur = in.duration + (d - 1) * C;
      if (!DD) {
        const scalar_t* r = ring.data() + slot * C;
        for (int64_t c = 0; c < C; ++c) row[c] = r[c] + dur[c];
      } else {
        const scalar_t* prev = ring.data() + slot * C;  // alpha_hat[s], or start_transition - O_0
        const scalar_t* gain = ring.data() + (K + slot) * C;
        if (s == 0) {
          for (int64_t c = 0; c < C; ++c) row[c] = prev[c] + gain[c] + dur[c];
          if (MAX)
            for (int64_t c = 0; c < C; ++c) term_prev[(d - 1) * C + c] = -1;
        } else {
          into(prev, in.transition + (d - 1) * C * C,
               MAX ? term_prev.data() + (d - 1) * C : nullptr);
          for (int64_t c = 0; c < C; ++c) row[c] = entered[c] + gain[c] + dur[c];
        }
      }
    }
    if (MAX) {
      const scalar_t* tm = terms.data();
      argmax_columns(
          dmax, C, [&](int64_t i, int64_t c) { return tm[i * C + c]; }, alpha.data(),
          arg.data());
      for (int64_t c = 0; c < C; ++c) alpha[c] += in.end(t - 1, c);
      if (bp_duration)
        for (int64_t c = 0; c < C; ++c) bp_duration[c] = arg[c] + 1;
      if (DD && bp_previous)
        for (int64_t c = 0; c < C; ++c) bp_previous[c] = term_prev[arg[c] * C + c];
    } else {
      lse_columns(terms.data(), dmax, C, alpha.data(), top.data(), scratch.data());
      for (int64_t c = 0; c < C; ++c) alpha[c] += in.end(t - 1, c);
    }
    for (int64_t c = 0; c < C; ++c) m = nan_max(m, alpha[c]);
    m = finite_or_zero(m);
    for (int64_t c = 0; c < C; ++c) alpha[c] -= m;
    offset += m;
    if (!DD && t < L) {
      into(alpha.data(), in.transition, bp_previous);
      for (int64_t c = 0; c < C; ++c) sigma[c] = entered[c] + in.start(t, c);
    }
    return m;
  }

  // entered[c] = reduce_c' (prev[c'] + trans[c', c]) for one (C, C) matrix,
  // row by row so the inner loops run along c. MAX: argmax c' into best.
  void into(const scalar_t* prev, const scalar_t* trans, int32_t* best) {
    if (MAX) {
      argmax_columns(
          C, C, [&](int64_t cp, int64_t c) { return prev[cp] + trans[cp * C + c]; },
          entered.data(), best ? best : arg.data());
      return;
    }
    for (int64_t cp = 0; cp < C; ++cp) {
      scalar_t* row = pairs.data() + cp * C;
      for (int64_t c = 0; c < C; ++c) row[c] = prev[cp] + trans[cp * C + c];
    }
    lse_columns(pairs.data(), C, C, entered.data(), top.data(), scratch.data());
  }

  // Move the ring from step t to step t+1 (t < L): re-base every entry by m,
  // open the segments starting at t, and add position t's emissions. Their
  // largest value moves into the offset so that entries stay O(1) between
  // steps (adding raw emissions of size 1e4 would cost float32 ~1e-3 a step).
  void advance(int64_t t, scalar_t m) {
    scalar_t emit_max = neg_inf<scalar_t>();
    for (int64_t c = 0; c < C; ++c) emit_max = nan_max(emit_max, in.score(t, c));
    emit_max = finite_or_zero(emit_max);
    for (int64_t c = 0; c < C; ++c) emit[c] = in.score(t, c) - emit_max;
    offset += emit_max;
    const int64_t fresh = t % K;
    for (int64_t slot = 0; slot < K; ++slot) {
      scalar_t* gain = ring.data() + ((DD ? K : 0) + slot) * C;
      if (slot == fresh) {
        for (int64_t c = 0; c < C; ++c) gain[c] = (DD ? in.start(t, c) : sigma[c]) + emit[c];
      } else {
        for (int64_t c = 0; c < C; ++c) gain[c] = (gain[c] - m) + emit[c];
      }
    }
    if (DD) {
      scalar_t* slot_alpha = ring.data() + fresh * C;
      for (int64_t c = 0; c < C; ++c)
        slot_alpha[c] = t == 0 ? in.start_transition[c] - m : alpha[c];
    }
  }

  // The ring in the checkpoint layout (ring_row_of_checkpoint_row), and back.
  void save(int64_t t, scalar_t* out, double* out_offset) const {
    const int tK = static_cast<int>(t % K);
    for (int row = 0; row < (DD ? 2 : 1) * K; ++row)
      std::copy_n(ring.data() + ring_row_of_checkpoint_row(row, tK, K) * C, C, out + row * C);
    *out_offset = offset;
  }

  void load(int64_t t, const scalar_t* src, double src_offset) {
    const int tK = static_cast<int>(t % K);
    for (int row = 0; row < (DD ? 2 : 1) * K; ++row)
      std::copy_n(src + row * C, C, ring.data() + ring_row_of_checkpoint_row(row, tK, K) * C);
    offset = src_offset;
  }

  // The last segment closes at L = t: log Z relative to the offset (MAX: the
  // best score, its last label into *label).
  scalar_t end_value(int* label = nullptr) const {
    auto f = [&](int c) { return in.last(alpha[c], c); };
    if (!MAX) return lse<scalar_t>(static_cast<int>(C), f);
    scalar_t v;
    const int c = argmax<scalar_t>(static_cast<int>(C), f, &v);
    if (label) *label = c;
    return v;
  }
};

template <typename scalar_t, bool DD>
void forward_sequence(const ForwardParams& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = sequence_length(p, b);
  ForwardScan<scalar_t, DD, false> scan(in, p.K, p.C, L);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  for (int64_t t = 0; t <= L; ++t) {
    if (ckpt.due(t)) scan.save(t, ckpt.at(t / p.interval), ckpt.offset + t / p.interval);
    const scalar_t m = scan.step(t);
    if (t == L) {
      static_cast<scalar_t*>(p.log_z)[b] =
          static_cast<scalar_t>(scan.offset + static_cast<double>(scan.end_value()));
    } else {
      scan.advance(t, m);
    }
  }
  // Checkpoints past the end of a short sequence are never read: fill them
  // with the empty state so that outputs do not depend on memory contents.
  for (int64_t j = ckpt.first_unused(L); j < p.n_ckpt; ++j) {
    std::fill_n(ckpt.at(j), ckpt.stride, neg_inf<scalar_t>());
    ckpt.offset[j] = 0.0;
  }
}

// ---------------------------------------------------------------------------
// The scaled exp-domain forward (static (C, C) transition). The ring holds
// probabilities relative to one float64 offset O per sequence, r = exp(entry
// - O), so that a step costs K·C multiply-adds and O(C) exps instead of
// K·C + C² exps. Exactness: positive sums and products make only relative
// rounding errors; what underflow loses ("ghost" mass) is bounded all along
// the scan, and log Z is accepted only if
// Z ≥ rho · ghost(Z). Otherwise the caller recomputes the sequence with the
// log-domain scan above, so the result is exact either way and the decision
// is a deterministic function of the inputs. docs/design.md has the
// derivation; the bounds arithmetic that the CUDA kernel shares is in
// exp_domain.h.

// N lanes of float or double (GCC/Clang vector extensions), for the
// per-label arithmetic of the exp-domain kernels: four lanes of double are
// one AVX register, eight one AVX-512 register (two AVX or four SSE ones
// where the build targets less). Written out because the compiler does not
// if-convert that arithmetic's selects on its own; the lanes compute exactly
// what the scalar expressions compute.
// (Builds without AVX pass these by value in several SSE registers: GCC's
// note that this differs from AVX builds' ABI does not apply to functions
// internal to this file.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <typename T, int N>
struct Lanes {
  typedef T type __attribute__((vector_size(sizeof(T) * N)));
};
using f64x4 = Lanes<double, 4>::type;
using f64x8 = Lanes<double, 8>::type;
using i64x4 = Lanes<int64_t, 4>::type;  // a comparison of f64x4: 0 or -1
using i64x8 = Lanes<int64_t, 8>::type;
// The number of lanes of a vector V.
template <typename V>
constexpr int lanes_of = static_cast<int>(sizeof(V) / sizeof(std::declval<V>()[0]));

template <int N, typename T>
inline typename Lanes<T, N>::type load_lanes(const T* p) {
  typename Lanes<T, N>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, typename V>
inline void store_lanes(T* p, V v) {
  static_assert(std::is_same_v<V, typename Lanes<T, lanes_of<V>>::type>);
  std::memcpy(p, &v, sizeof(v));
}
// Float lanes as double lanes (exact); double lanes unchanged.
template <typename V>
inline auto widen(V v) {
  constexpr int N = lanes_of<V>;
  if constexpr (sizeof(v[0]) == sizeof(double)) return v;
  else return __builtin_convertvector(v, typename Lanes<double, N>::type);
}
template <typename M>
inline bool any_lane(M m) {
  int64_t any = 0;
  for (int i = 0; i < lanes_of<M>; ++i) any |= m[i];
  return any != 0;
}
// exponent_of, lane by lane, as double lanes.
template <typename V>
inline auto exponent_lanes(V v) {
  constexpr int N = lanes_of<V>;
  using F = typename Lanes<double, N>::type;
  if constexpr (sizeof(v[0]) == sizeof(float)) {
    using I = typename Lanes<int32_t, N>::type;
    I b;
    std::memcpy(&b, &v, sizeof(b));
    const I e = (b >> 23) & 0xff;
    return __builtin_convertvector(e == 0 ? I{} - 150 : e - 127, F);
  } else {
    using I = typename Lanes<int64_t, N>::type;
    I b;
    std::memcpy(&b, &v, sizeof(b));
    const I e = (b >> 52) & 0x7ff;
    return __builtin_convertvector(e == 0 ? I{} - 1075 : e - 1023, F);
  }
}
// m ? a : b with a float64 comparison's mask, for lanes of either dtype.
template <typename M, typename V>
inline V select_lanes(M m, V a, V b) {
  if constexpr (sizeof(a[0]) == sizeof(double)) {
    return m ? a : b;
  } else {
    using I = typename Lanes<int32_t, lanes_of<V>>::type;
    return __builtin_convertvector(m, I) ? a : b;
  }
}
// max/min over the lanes (std::max/std::min order: any order gives the same
// value for the non-NaN values these take).
template <typename V>
inline double max_lane(V v) {
  double m = v[0];
  for (int i = 1; i < lanes_of<V>; ++i) m = std::max(m, v[i]);
  return m;
}
template <typename V>
inline double min_lane(V v) {
  double m = v[0];
  for (int i = 1; i < lanes_of<V>; ++i) m = std::min(m, v[i]);
  return m;
}

// The largest of y[c] + exponent_of(val[c]) · ln2 over c < n with val[c] > 0
// (and gate[c] > 0 where a gate is given): log(val) + y within a factor 2;
// kNegInf if none. Four lanes at a time (the same max in any order).
inline double top_log_bound(const double* y, const double* val, const double* gate, int64_t n) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  f64x4 top = {kNegInf, kNegInf, kNegInf, kNegInf};
  const f64x4 none = top;
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const f64x4 v = load_lanes<4>(val + c);
    const f64x4 cand = load_lanes<4>(y + c) + exponent_lanes(v) * kLn2;
    i64x4 live = v > 0;
    if (gate) live &= load_lanes<4>(gate + c) > 0;
    const f64x4 x = select_lanes(live, cand, none);
    top = x > top ? x : top;
  }
  double out = max_lane(top);
  for (; c < n; ++c)
    if (val[c] > 0 && (!gate || gate[c] > 0))
      out = std::max(out, y[c] + exponent_of(val[c]) * kLn2);
  return out;
}
// The largest of x[c] over c < n (-inf for none), N lanes at a time (the
// same max in any order for the non-NaN values it takes).
template <int N = 4, typename T>
inline T max_of(const T* x, int64_t n) {
  using V = typename Lanes<T, N>::type;
  V top = V{} - std::numeric_limits<T>::infinity();
  int64_t c = 0;
  for (; c + N <= n; c += N) {
    const V v = load_lanes<N>(x + c);
    top = v > top ? v : top;
  }
  T out = top[0];
  for (int i = 1; i < N; ++i) out = std::max(out, top[i]);
  for (; c < n; ++c) out = std::max(out, x[c]);
  return out;
}

// Labels per chunk of the exp-domain passes over a ring: the forward's ring,
// weight and keep rows are padded to a multiple of it with zeros (the
// backward's passes take C % 8 == 0 only), so that a pass runs whole vectors
// and a chunk's sums stay in registers across the K rows.
constexpr int64_t kRingLanes = 8;
inline int64_t padded_labels(int64_t C) { return (C + kRingLanes - 1) / kRingLanes * kRingLanes; }

// Calls fn(c0, NC) over the chunks of C labels (C % kRingLanes == 0), NC =
// up to three chunks at a time: each label's sums in a pass are chains of
// dependent operations, one link per ring row, and three chunks' chains
// interleave where one chunk's would wait on its own latency.
template <typename Fn>
inline void for_chunk_groups(int64_t C, Fn fn) {
  int64_t c0 = 0;
  for (; c0 + 3 * kRingLanes <= C; c0 += 3 * kRingLanes) fn(c0, std::integral_constant<int, 3>{});
  if (C - c0 == 2 * kRingLanes) fn(c0, std::integral_constant<int, 2>{});
  if (C - c0 == kRingLanes) fn(c0, std::integral_constant<int, 1>{});
}

// One ring row of ring_chunk_pass, kWidth lanes. kAllAlive: every lane's
// entry stays alive (keep = 1), so the masks of the general body are known
// to be true.
template <bool kAllAlive, int kWidth, typename scalar_t>
inline void ring_row(scalar_t* __restrict r, const scalar_t* __restrict wd,
                     const scalar_t* __restrict kd, const scalar_t* __restrict f, bool scale,
                     scalar_t* __restrict a, scalar_t* __restrict lm, scalar_t* __restrict mn) {
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  constexpr scalar_t big = std::numeric_limits<scalar_t>::max();
#pragma omp simd
  for (int64_t i = 0; i < kWidth; ++i) {
    scalar_t x = r[i];
    if (scale) {
      x = x * f[i];
      x = x < big ? x : big;
      r[i] = x;
    }
    a[i] += x * wd[i];
    if constexpr (kAllAlive) {
      lm[i] = x > lm[i] ? x : lm[i];
      const scalar_t pos = x > 0 ? x : inf;
      mn[i] = pos < mn[i] ? pos : mn[i];
    } else {
      const scalar_t live = x * kd[i];
      lm[i] = live > lm[i] ? live : lm[i];
      // Only entries that meet a weight now or stay alive can lose anything.
      const scalar_t pos = (x > 0 && wd[i] + kd[i] > 0) ? x : inf;
      mn[i] = pos < mn[i] ? pos : mn[i];
    }
  }
}

// The hot loop of the exp-domain forward, for the NC chunks of labels c0 …
// c0 + NC·kRingLanes side by side (for_chunk_groups): the duration-weighted
// sum over the n ring rows of ages 1..n, the largest entry that stays alive
// and the smallest positive entry. Rows older than age 1 first take the
// previous step's factor f (the advance of the ring, fused into this pass
// so the ring is read once per step); an entry is capped at the dtype's
// largest value, so that an entry that can no longer matter meets its zero
// weight as 0, never as inf · 0. Each lane computes what it computes alone.
template <int NC, typename scalar_t>
inline void ring_chunk_pass(scalar_t* const* rows, int64_t c0, int64_t n, int64_t n_alive,
                            bool advance_old, const scalar_t* __restrict w,
                            const scalar_t* __restrict kp, int64_t stride,
                            const scalar_t* __restrict f, scalar_t* __restrict acc,
                            scalar_t* __restrict livemax, scalar_t* __restrict rmin) {
  constexpr int kWidth = NC * kRingLanes;
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  scalar_t a[kWidth], lm[kWidth], mn[kWidth];
  for (int64_t i = 0; i < kWidth; ++i) {
    a[i] = 0;
    lm[i] = 0;
    mn[i] = inf;
  }
  // Row 0 (the entries that started at t - 1) is new: the rows after it
  // take the last advance's factor first, in the same pass.
  for (int64_t d = 0; d < n; ++d) {
    scalar_t* __restrict r = rows[d] + c0;
    const scalar_t* __restrict wd = w + d * stride;
    const scalar_t* __restrict kd = kp + d * stride;
    const bool scale = advance_old && d > 0;
    if (d < n_alive) {
      ring_row<true, kWidth>(r, wd, kd, f, scale, a, lm, mn);
    } else {
      ring_row<false, kWidth>(r, wd, kd, f, scale, a, lm, mn);
    }
  }
  for (int64_t i = 0; i < kWidth; ++i) {
    acc[i] = a[i];
    livemax[i] = lm[i];
    rmin[i] = mn[i];
  }
}

// out[0 : Cp] = sum over cp of x[cp] · table[cp, 0 : Cp] (table rows padded
// to Cp), zeros of x skipped (they add exact zeros). Up to four chunks of
// sums are kept in registers at once, so that their chains of dependent
// multiply-adds interleave; each sum runs over cp in order, as row by row.
template <int kChunks, typename scalar_t>
inline void matvec_chunks(const scalar_t* __restrict x, const scalar_t* __restrict table,
                          int64_t C, int64_t Cp, int64_t c0, scalar_t* __restrict out) {
  constexpr int64_t kWidth = kChunks * kRingLanes;
  scalar_t sum[kWidth] = {};
  for (int64_t cp = 0; cp < C; ++cp) {
    const scalar_t a = x[cp];
    if (a == 0) continue;
    const scalar_t* __restrict row = table + cp * Cp + c0;
#pragma omp simd
    for (int64_t i = 0; i < kWidth; ++i) sum[i] += a * row[i];
  }
  for (int64_t i = 0; i < kWidth; ++i) out[c0 + i] = sum[i];
}
template <typename scalar_t>
inline void matvec_padded(const scalar_t* x, const scalar_t* table, int64_t C, int64_t Cp,
                          scalar_t* out) {
  int64_t c0 = 0;
  for (; c0 + 4 * kRingLanes <= Cp; c0 += 4 * kRingLanes)
    matvec_chunks<4>(x, table, C, Cp, c0, out);
  switch ((Cp - c0) / kRingLanes) {
    case 3: matvec_chunks<3>(x, table, C, Cp, c0, out); break;
    case 2: matvec_chunks<2>(x, table, C, Cp, c0, out); break;
    case 1: matvec_chunks<1>(x, table, C, Cp, c0, out); break;
    default: break;
  }
}

// out[c] = fexp(x[c]) for c < C, in a loop of its own so that it vectorises.
template <typename scalar_t>
inline void exp_row(const scalar_t* __restrict x, scalar_t* __restrict out, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = fexp(x[c]);
}

template <typename scalar_t>
bool unboundable_position(const SequenceInputs<scalar_t>& in, int64_t t, int64_t C) {
  bool any = false;
  for (int64_t c = 0; c < C; ++c)
    any |= unboundable(in.score(t, c)) | unboundable(in.start(t, c)) | unboundable(in.end(t, c));
  return any;
}
template <typename scalar_t>
bool unboundable_parameters(const SequenceInputs<scalar_t>& in, int64_t n_transition, int64_t K,
                            int64_t C) {
  bool any = false;
  for (int64_t i = 0; i < n_transition; ++i) any |= unboundable(in.transition[i]);
  for (int64_t i = 0; i < K * C; ++i) any |= unboundable(in.duration[i]);
  for (int64_t c = 0; c < C; ++c)
    any |= unboundable(in.start_transition[c]) | unboundable(in.end_transition[c]);
  return any;
}

// The maximum the log scan's step subtracts (in its dtype), from alpha_hat
// relative to that scan's offset + shift + mes; 0 where every label is 0.
// alpha has Cp (a multiple of 8) entries, 0 in the padding.
template <typename scalar_t>
double log_scan_step_max(const scalar_t* alpha, int64_t Cp, double shift, double mes) {
  return log_scan_step(max_of<8>(alpha, Cp), shift, mes);
}

template <typename scalar_t>
struct ExpForward {
  using Limits = std::numeric_limits<scalar_t>;
  static constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  static constexpr double kFloor = std::numeric_limits<double>::min();
  const SequenceInputs<scalar_t>& in;
  const int64_t K, C, L;
  const int64_t Cp;  // C padded to whole ring chunks: the stride of ring, weight and keep
  const scalar_t tiny = Limits::min();
  const double tiny_d = static_cast<double>(Limits::min());
  // A power of 2, so that x * inv_tiny_d is exactly x / tiny_d.
  const double inv_tiny_d = 1.0 / static_cast<double>(Limits::min());
  static constexpr double kInf = std::numeric_limits<double>::infinity();
  // exp_domain.h's absorb_factor_for: ghost · absorb_factor <= value absorbs.
  double absorb_factor;

  // Per-call tables.
  std::vector<double> dur_max;          // (C) finite max over d of duration[d-1, c] (0 if none)
  std::vector<scalar_t> weight;         // (K, Cp) exp(duration - dur_max), 0 below tiny
  std::vector<scalar_t> keep;           // (K, Cp) 1 where an entry of age d+1 can still matter
  // (Cp / kRingLanes) the number of ages 1, 2, ... at which every label of
  // the chunk has keep = 1: min over its labels of last_duration - 1.
  std::vector<int64_t> chunk_alive_ages;
  std::vector<double> weight_lost;      // (Cp) 2 · the flushed true weights, in tiny units
  std::vector<scalar_t> weight_minpos;  // (Cp) smallest positive weight
  std::vector<int> last_duration;       // (C) longest duration, 0 if the label cannot reach an end
  std::vector<double> col_max;          // (C) finite max over c' of transition[c', c]
  std::vector<double> A_bound;          // (C, C) exp(transition - col_max[c]), float64 (ghosts)
  std::vector<double> A_lost;           // (C) the column's flushed true entries, tiny units
  std::vector<scalar_t> A_minpos;       // (C) smallest positive entry of the column
  std::vector<scalar_t> A_padded;       // (C, Cp) the same in the dtype, 0 below tiny, zero-padded

  // State. Entries are relative to O; alpha_hat to O + mes; sigma_hat to
  // O + sigma_rel (kept apart from O so that no large sum rounds them).
  std::vector<scalar_t> ring;  // (K, Cp)
  // The ring's entries older than age 1 still owe the last advance's factor
  // fo (the next ring pass applies it).
  bool owes_advance = false;
  std::vector<scalar_t*> rows;  // (K) the ring rows of ages 1..K at this step
  double O = 0.0, mes = 0.0, sigma_rel = 0.0;
  // The offset the log-domain scan would have, O_t of the shared checkpoint
  // layout: the sum of its per-step maxima, kept with its rounding error
  // (ref_lo) so that checkpoints can be written exactly as that scan writes
  // them, rounding included.
  double ref_hi = 0.0, ref_lo = 0.0;
  // Per-label ghosts of the ring entries in two generations by the time of
  // the charge: an entry leaves the ring at most K steps after it was
  // charged, so generation 0 expires every K steps.
  std::vector<double> ghost_old, ghost_new;
  std::vector<scalar_t> acc, alpha, sigma, u, emit, fo, fn, livemax, rmin, arg, factor;
  std::vector<double> ga, gs, work, work_ys, lemit, fo_d, fn_d;
  bool rejected = false;  // no bound could be kept: the caller falls back
  // Fast paths. Where no ghost is left to carry, a step checks in one
  // vectorised loop that none of its charges fires and skips the per-label
  // bound arithmetic, which would return the same zeros (sigma_hat's, on
  // ordinary inputs nearly always; the ring's generations swap only when
  // they hold a ghost).
  bool ring_ghost_free = true;  // ghost_old and ghost_new are all 0
  bool alpha_ghost_free = true;  // ga is all 0
  bool sigma_ghost_free = true;  // gs is all 0
  bool any_A_lost = false;  // over the labels that can reach an end
  scalar_t A_minpos_min;  // min of A_minpos over the labels that can reach an end
  std::vector<char> reaches;  // (C) last_duration > 0
  std::vector<double> reach_mask;  // (Cp) the same as 1.0 / 0.0, 0 in the padding
  std::vector<scalar_t> srow;  // (Cp) position t's scores, -inf in the padding
  bool bad_scores = false;  // position t has a NaN or +inf score

  ExpForward(const SequenceInputs<scalar_t>& in_, int64_t K_, int64_t C_, int64_t L_)
      : in(in_), K(K_), C(C_), L(L_), Cp(padded_labels(C_)), dur_max(C_, 0.0),
        weight(K_ * Cp, 0), keep(K_ * Cp, 0), chunk_alive_ages(Cp / kRingLanes, 0),
        weight_lost(Cp, 0.0), weight_minpos(Cp, 0), last_duration(C_, 0), col_max(C_, 0.0),
        A_bound(C_ * C_), A_lost(C_, 0.0), A_minpos(C_), A_padded(C_ * Cp, 0), ring(K_ * Cp, 0),
        rows(K_),
        ghost_old(Cp, 0.0), ghost_new(Cp, 0.0), acc(Cp), alpha(Cp, 0), sigma(Cp, 0), u(Cp),
        emit(Cp, 0), fo(Cp, 0), fn(Cp, 0), livemax(Cp, 0), rmin(Cp, Limits::infinity()), arg(Cp, 0),
        factor(Cp, 0), ga(Cp, 0.0), gs(Cp, 0.0), work(C_), work_ys(Cp, 0.0), lemit(Cp, 0.0),
        fo_d(Cp, 0.0),
        fn_d(Cp, 0.0), reaches(C_, 0), reach_mask(Cp, 0.0),
        srow(Cp, -Limits::infinity()) {
    absorb_factor = absorb_factor_for<scalar_t>(L);
    rejected = bad_parameters();
    tables();
  }

  void tables() {
    std::vector<int> raw_last(C, 0);
    for (int64_t c = 0; c < C; ++c) {
      double mx = kNegInf;
      for (int64_t d = 1; d <= K; ++d) {
        const double v = in.dur(d, c);
        if (v > kNegInf) raw_last[c] = static_cast<int>(d);
        if (v > mx) mx = v;
      }
      dur_max[c] = mx == kNegInf ? 0.0 : mx;
      weight_minpos[c] = Limits::infinity();
      const double lost = weight_column(in, K, c, dur_max[c], [&](int64_t d, scalar_t w) {
        weight[(d - 1) * Cp + c] = w;
        if (w > 0) weight_minpos[c] = std::min(weight_minpos[c], w);
      });
      // Entries are at most 1 (times rounding) when they meet a weight.
      weight_lost[c] = 2.0 * lost / tiny_d;
    }
    for (int64_t c = 0; c < C; ++c) {
      double mx = kNegInf;
      for (int64_t cp = 0; cp < C; ++cp) mx = std::max(mx, static_cast<double>(in.trans(cp, c)));
      col_max[c] = mx == kNegInf ? 0.0 : mx;
      A_minpos[c] = Limits::infinity();
      const double lost =
          transition_column(in, C, c, col_max[c], [&](int64_t cp, scalar_t a, double xb) {
            A_padded[cp * Cp + c] = a;
            A_bound[cp * C + c] = xb;
            if (a > 0) A_minpos[c] = std::min(A_minpos[c], a);
          });
      A_lost[c] = lost / tiny_d;
    }
    // Labels that can reach an end: a fixed point over the finite
    // transitions. Entries of other labels, and entries older than their
    // label's longest duration, can never contribute to Z: they are kept at
    // exactly 0, so that they can neither set the normaliser nor flush the
    // mass that matters.
    std::vector<char> reach(C, 0);
    for (int64_t c = 0; c < C; ++c)
      reach[c] = raw_last[c] > 0 && in.end_transition[c] > neg_inf<scalar_t>();
    for (bool changed = true; changed;) {
      changed = false;
      for (int64_t c = 0; c < C; ++c) {
        if (reach[c] || raw_last[c] == 0) continue;
        for (int64_t c2 = 0; c2 < C; ++c2)
          if (reach[c2] && in.trans(c, c2) > neg_inf<scalar_t>()) {
            reach[c] = 1;
            changed = true;
            break;
          }
      }
    }
    A_minpos_min = Limits::infinity();
    for (int64_t c = 0; c < C; ++c) {
      last_duration[c] = reach[c] ? raw_last[c] : 0;
      for (int64_t d = 1; d <= K; ++d) keep[(d - 1) * Cp + c] = d + 1 <= last_duration[c] ? 1 : 0;
      reaches[c] = last_duration[c] > 0;
      reach_mask[c] = reaches[c] ? 1.0 : 0.0;
      if (!reaches[c]) continue;
      any_A_lost |= A_lost[c] > 0;
      A_minpos_min = std::min(A_minpos_min, A_minpos[c]);
    }
    for (int64_t chunk = 0; chunk < Cp / kRingLanes; ++chunk) {
      int64_t alive = K;
      for (int64_t c = chunk * kRingLanes; c < std::min(C, (chunk + 1) * kRingLanes); ++c)
        alive = std::min<int64_t>(alive, std::max(last_duration[c] - 1, 0));
      chunk_alive_ages[chunk] = alive;
    }
  }

  bool bad_position(int64_t t) const { return unboundable_position(in, t, C); }
  bool bad_parameters() const { return unboundable_parameters(in, C * C, K, C); }

  double through_factor(double g, scalar_t x, scalar_t f, double log_f) const {
    return ghost_through_factor(g, x, f, log_f);
  }

  // Step 0: sigma_hat[0] relative to O = its finite max.
  void first() {
    double m = kNegInf;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(in.first(c)));
    O = m == kNegInf ? 0.0 : m;
    sigma_rel = 0.0;
    ref_hi = O;
    ref_lo = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double x = static_cast<double>(in.first(c)) - O;
      sigma[c] = fexp(static_cast<scalar_t>(x));
      gs[c] = through_factor(0.0, 1, sigma[c], x);
    }
    sigma_ghost_free = std::all_of(gs.begin(), gs.end(), [](double g) { return g == 0.0; });
  }

  // Step t ≥ 1: alpha_hat[t] and its ghost ga.
  void ends(int64_t t) {
    if (t % K == 0 && !ring_ghost_free) {
      ghost_old.swap(ghost_new);
      std::fill(ghost_new.begin(), ghost_new.end(), 0.0);
      update_ring_ghost_free();
    }
    const int64_t n = std::min(t, K);
    const int tK = static_cast<int>(t % K);
    for (int64_t d = 1; d <= n; ++d)
      rows[d - 1] = ring.data() + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * Cp;
    // A group's rows are all alive up to its chunks' smallest such age.
    for_chunk_groups(Cp, [&](int64_t c0, auto nc) {
      constexpr int NC = decltype(nc)::value;
      int64_t alive = n;
      for (int64_t k = c0 / kRingLanes; k < c0 / kRingLanes + NC; ++k)
        alive = std::min(alive, chunk_alive_ages[k]);
      ring_chunk_pass<NC>(rows.data(), c0, n, alive, owes_advance, weight.data() + c0,
                          keep.data() + c0, Cp, fo.data() + c0, acc.data() + c0,
                          livemax.data() + c0, rmin.data() + c0);
    });
    owes_advance = false;
    // The end factor is normalised against the mass it multiplies, so that
    // a label that holds the mass is never flushed by another label's larger
    // end score. (Maxima in eight lanes, as in advance.)
    for (int64_t c = 0; c < C; ++c)
      lemit[c] = static_cast<double>(in.end(t - 1, c)) + dur_max[c];  // ya
    f64x8 top8 = f64x8{} + kNegInf, ya8 = top8;
    for (int64_t c = 0; c < Cp; c += 8) {
      const auto a8 = load_lanes<8>(&acc[c]);
      const f64x8 ya = load_lanes<8>(&lemit[c]), cand = ya + exponent_lanes(a8) * kLn2;
      // Labels that cannot reach an end set no scale.
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0;
      ya8 = reach & (ya8 < ya) ? ya : ya8;
      top8 = reach & (widen(a8) > 0.0) & (top8 < cand) ? cand : top8;
    }
    const double top = max_lane(top8), ya_max = max_lane(ya8);
    mes = top > kNegInf ? top : (ya_max > kNegInf ? ya_max : 0.0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) arg[c] = static_cast<scalar_t>(lemit[c] - mes);
    exp_row(arg.data(), factor.data(), C);
    // alpha_hat, and whether any of its ghost's charges can fire: with the
    // ring's ghosts all 0, the ghost loop below gives ga = 0 unless a label
    // that can reach an end has rmin · (smallest weight) below tiny, a
    // flushed weight, or a positive acc whose end factor or product falls
    // below tiny.
    using S8 = typename Lanes<scalar_t, 8>::type;
    const S8 big8 = S8{} + Limits::max(), zero_s = S8{};
    i64x8 charged8 = {};
    for (int64_t c = 0; c < Cp; c += 8) {
      const S8 endf = load_lanes<8>(&factor[c]), a8 = load_lanes<8>(&acc[c]);
      const S8 x = big8 < a8 ? big8 : a8;
      store_lanes(&acc[c], x);
      const S8 prod = x * endf;
      const S8 y = x > 0 ? (big8 < prod ? big8 : prod) : zero_s;
      store_lanes(&alpha[c], y);
      const S8 rmn = load_lanes<8>(&rmin[c]);
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0, has = widen(rmn) < kInf;
      const f64x8 ef = widen(endf), xw = widen(x), yw = widen(y);
      charged8 |= reach & ((has & (small_product_charged(rmn, c) |
                                   (load_lanes<8>(&weight_lost[c]) != 0.0))) |
                           ((xw > 0.0) & ((ef < tiny_d) | (yw < tiny_d))));
    }
    if (ring_ghost_free && !any_lane(charged8)) {
      if (!alpha_ghost_free) std::fill(ga.begin(), ga.end(), 0.0);
      alpha_ghost_free = true;
    } else {
      alpha_ghost(n);
    }
    ref_add(log_scan_step_max(alpha.data(), Cp, (O - ref_hi) - ref_lo, mes));
  }

  // Labels c … c+7 where some ring entry times a weight may fall below tiny:
  // the smallest positive entry rmn times the smallest positive weight.
  i64x8 small_product_charged(typename Lanes<scalar_t, 8>::type rmn, int64_t c) const {
    return widen(rmn * load_lanes<8>(&weight_minpos[c])) < tiny_d;
  }

  // ends' ghost of alpha_hat: the ring's, weights that flushed, products
  // below tiny (ghost_of_alpha, written out branch-free with & and | so
  // that it vectorises: a charge that does not apply adds an exact 0).
  void alpha_ghost(int64_t n) {
    using S8 = typename Lanes<scalar_t, 8>::type;
    const f64x8 zero = f64x8{}, floor8 = zero + kFloor;
    const double n_charge = static_cast<double>(n) * kSlack;
    i64x8 lost8 = {}, any8 = {};
    for (int64_t c = 0; c < Cp; c += 8) {
      const S8 endf = load_lanes<8>(&factor[c]), x = load_lanes<8>(&acc[c]), y = load_lanes<8>(&alpha[c]);
      const S8 rmn = load_lanes<8>(&rmin[c]);
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0, has = widen(rmn) < kInf;
      f64x8 g = load_lanes<8>(&ghost_old[c]) + load_lanes<8>(&ghost_new[c]);
      g += has & small_product_charged(rmn, c) ? zero + n_charge : zero;
      g += has ? load_lanes<8>(&weight_lost[c]) : zero;
      // Through the end factor (ghost_through_factor).
      const f64x8 ef = widen(endf), xw = widen(x), yw = widen(y);
      const f64x8 via = g * ef * kUp;
      const f64x8 spill = (g * tiny_d + xw) * kSlack;
      const i64x8 exact = (load_lanes<8>(&lemit[c]) - mes == -kInf) | ((g == 0.0) & (xw == 0.0));
      f64x8 ga_c = ef >= tiny_d ? (g > 0.0 ? (via < kFloor ? floor8 : via) : zero)
                                : (exact ? zero : (spill < kFloor ? floor8 : spill));
      ga_c += (xw > 0.0) & (ef >= tiny_d) & (yw < tiny_d) ? zero + kSlack : zero;
      ga_c = (ga_c > 0.0) & (yw > 0.0) & (ga_c * absorb_factor <= yw) ? zero : ga_c;
      lost8 |= reach & ~(ga_c < 1e300);
      ga_c = reach ? ga_c : zero;  // a label that cannot reach an end feeds only its like
      any8 |= ga_c != 0.0;
      store_lanes(&ga[c], ga_c);
    }
    alpha_ghost_free = !any_lane(any8);
    if (any_lane(lost8)) rejected = true;
  }

  // t = L: log Z, or false where the ghost bound cannot certify it.
  bool finish(double* log_z) const {
    return !rejected && certified_log_z(in, C, alpha.data(), ga.data(), O, mes, log_z);
  }

  // t < L, t ≥ 1: sigma_hat[t] and its ghost gs.
  void starts(int64_t t) {
    // alpha's range over the labels that can reach an end (a label that
    // cannot has no finite transition into one that can: it adds exact
    // zeros to every column that matters), in eight lanes.
    const f64x8 zero = f64x8{};
    f64x8 amax8 = zero, amin8 = zero + kInf;
    for (int64_t c = 0; c < Cp; c += 8) {
      const f64x8 a = widen(load_lanes<8>(&alpha[c]));
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0;
      amax8 = reach & (amax8 < a) ? a : amax8;
      amin8 = reach & (a > 0.0) & (a < amin8) ? a : amin8;
    }
    const scalar_t amax = static_cast<scalar_t>(max_lane(amax8));
    const scalar_t amin = static_cast<scalar_t>(min_lane(amin8));
    const bool ghost =
        !alpha_ghost_free && std::any_of(ga.begin(), ga.end(), [](double g) { return g > 0.0; });
    // u = alpha_hat A.
    matvec_padded(alpha.data(), A_padded.data(), C, Cp, u.data());
    // The ghost mat-vec is exact: the cheap bound (largest ghost times the
    // column sum) would spread one label's ghost into every column.
    std::fill(work.begin(), work.end(), 0.0);
    if (ghost)
      for (int64_t cp = 0; cp < C; ++cp) {
        if (ga[cp] == 0.0) continue;
        const double* row = A_bound.data() + cp * C;
        for (int64_t c = 0; c < C; ++c)
          if (row[c] > 0) work[c] += std::max(ga[cp] * row[c], kFloor);
      }
    for (int64_t c = 0; c < C; ++c)
      work_ys[c] = static_cast<double>(in.start(t, c)) + col_max[c];
    using S8 = typename Lanes<scalar_t, 8>::type;
    const S8 big8 = S8{} + Limits::max();
    f64x8 top8 = zero + kNegInf, ys8 = top8;
    for (int64_t c = 0; c < Cp; c += 8) {
      const S8 u8 = load_lanes<8>(&u[c]);
      const S8 x = big8 < u8 ? big8 : u8;  // std::min(u, max)
      store_lanes(&u[c], x);
      const f64x8 ys = load_lanes<8>(&work_ys[c]), cand = ys + exponent_lanes(x) * kLn2;
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0;
      ys8 = reach & (ys8 < ys) ? ys : ys8;
      top8 = reach & (widen(x) > 0.0) & (top8 < cand) ? cand : top8;
    }
    const double top = max_lane(top8), ys_max = max_lane(ys8);
    const double mss = top > kNegInf ? top : (ys_max > kNegInf ? ys_max : 0.0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) arg[c] = static_cast<scalar_t>(work_ys[c] - mss);
    exp_row(arg.data(), factor.data(), C);
    sigma_rel = mes + mss;
    if (!ghost && !any_A_lost && !(amax > 0 && amin * A_minpos_min < tiny)) {
      // With no ghost to carry, sigma_hat's is 0 unless the start factor or
      // sigma_hat fell below tiny (the padding's u and factor are 0).
      const S8 zero_s = S8{};
      i64x8 charged8 = {};
      for (int64_t c = 0; c < Cp; c += 8) {
        const S8 x = load_lanes<8>(&u[c]), h = load_lanes<8>(&factor[c]), prod = x * h;
        const S8 y = x > 0 ? (big8 < prod ? big8 : prod) : zero_s;
        store_lanes(&sigma[c], y);
        charged8 |= (load_lanes<8>(&reach_mask[c]) != 0.0) & (widen(x) != 0.0) &
                    ((widen(h) < tiny_d) | (widen(y) < tiny_d));
      }
      if (!any_lane(charged8)) {
        if (!sigma_ghost_free) std::fill(gs.begin(), gs.end(), 0.0);
        sigma_ghost_free = true;
        return;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const double ys = static_cast<double>(in.start(t, c)) + col_max[c];
      const scalar_t h = factor[c];
      sigma[c] = u[c] > 0 ? std::min(u[c] * h, Limits::max()) : scalar_t(0);
      if (last_duration[c] == 0) {
        gs[c] = 0.0;
        continue;
      }
      double g = work[c];
      if (amax > 0) {
        if (A_lost[c] > 0) g += std::max(static_cast<double>(amax) * A_lost[c], kFloor);
        if (amin * A_minpos[c] < tiny) g += static_cast<double>(C) * kSlack;
      }
      g = through_factor(g, u[c], h, ys - mss);
      if (u[c] > 0 && h >= tiny && sigma[c] < tiny) g += kSlack;
      if (g > 0 && sigma[c] > 0 && g * absorb_factor <= static_cast<double>(sigma[c])) g = 0.0;
      if (!(g < 1e300)) rejected = true;
      gs[c] = g;
    }
    sigma_ghost_free = std::all_of(gs.begin(), gs.end(), [](double g) { return g == 0.0; });
  }

  // Move the ring to step t+1 (t < L): position t's emissions, the segments
  // starting at t, and the normaliser: the largest entry that can still
  // matter becomes 1.
  void advance(int64_t t) {
    // Position t's scores relative to their finite max m, eight labels at a
    // time (the row is copied into srow, padded with -inf; a max over the
    // same values is the same in any order).
    const scalar_t* row = in.scores + t * in.s_t;
    if (in.s_c == 1) {
      std::memcpy(srow.data(), row, C * sizeof(scalar_t));
    } else {
      for (int64_t c = 0; c < C; ++c) srow[c] = row[c * in.s_c];
    }
    f64x8 m8 = f64x8{} + kNegInf;
    i64x8 bad8 = {};
    for (int64_t c = 0; c < Cp; c += 8) {
      const f64x8 x = widen(load_lanes<8>(&srow[c]));
      m8 = m8 < x ? x : m8;  // std::max(m, x)
      bad8 |= ~(x < kInf);   // NaN or +inf: the log scan gives the NaN
    }
    bad_scores = any_lane(bad8);
    double m = max_lane(m8);
    if (m == kNegInf) m = 0.0;
    ref_add(m);
    for (int64_t c = 0; c < Cp; c += 8) {
      const f64x8 x = widen(load_lanes<8>(&srow[c])) - m;
      store_lanes(&lemit[c], x);
      store_lanes(&arg[c], __builtin_convertvector(x, typename Lanes<scalar_t, 8>::type));
    }
    exp_row(arg.data(), emit.data(), C);
    // A label whose emission factor flushed takes its factors from float64,
    // so that a flush never loses more than the final factor's underflow.
    const f64x8 zero = f64x8{};
    i64x8 flushed8 = {};
    f64x8 old8 = zero, fresh8 = zero;
    for (int64_t c = 0; c < Cp; c += 8) {
      const f64x8 e = widen(load_lanes<8>(&emit[c]));
      flushed8 |= (e < tiny_d) & (load_lanes<8>(&lemit[c]) > kNegInf);
      const f64x8 o = widen(load_lanes<8>(&livemax[c])) * e, f = widen(load_lanes<8>(&sigma[c])) * e;
      old8 = old8 < o ? o : old8;
      fresh8 = (load_lanes<8>(&reach_mask[c]) != 0.0) & (fresh8 < f) ? f : fresh8;
    }
    const bool any_flushed = any_lane(flushed8);
    if (any_flushed) {  // rare: redo with the float64 factors where they flushed
      old8 = zero;
      fresh8 = zero;
      for (int64_t c = 0; c < C; ++c) {
        const double e = emit_flushed(c) ? std::exp(lemit[c]) : static_cast<double>(emit[c]);
        old8[0] = std::max(old8[0], static_cast<double>(livemax[c]) * e);
        if (reaches[c]) fresh8[0] = std::max(fresh8[0], static_cast<double>(sigma[c]) * e);
      }
    }
    const double old = max_lane(old8), fresh = max_lane(fresh8);
    double top = std::max(old > 0 ? std::log(old) : kNegInf,
                          fresh > 0 ? sigma_rel + std::log(fresh) : kNegInf);
    if (top == kNegInf) top = 0.0;
    // The factors come from the rounded new offset, so that entries and
    // offset stay consistent however large the offset grows.
    const double new_offset = O + (top + m);
    const double base = (O - new_offset) + m;
    const double so = std::exp(base), sn = std::exp(base + sigma_rel);
    const double big = static_cast<double>(Limits::max());
    // A factor past the dtype's range has no bound: reject where it
    // multiplies something; elsewhere it multiplies exact zeros. A -inf
    // score (emit 0) gives exact zeros. Flushed labels are redone below.
    // (Bitwise & and | rather than && and ||: every operand is evaluated,
    // so the loop has no control flow and vectorises.)
    const f64x8 big8 = zero + big;
    // The ghost charges for entries that this step takes below tiny: new
    // ones (sigma · fn) and old ones (fo, or rmin · fo); a -inf score's
    // exact zeros are not charged.
    auto lost_charges = [&](auto sig, auto fns, auto fos, auto rmn, i64x8 exact_zero) {
      const i64x8 fresh = ~exact_zero & (widen(sig) > 0.0) & (widen(sig * fns) < tiny_d);
      const i64x8 old = ~exact_zero & (widen(rmn) < kInf) &
                        ((widen(fos) < tiny_d) | (widen(rmn * fos) < tiny_d));
      return std::pair{fresh, old};
    };
    // charged8: those charges, which are all the ghost loop below adds
    // where no ghost is carried.
    i64x8 past8 = {}, charged8 = {};
    for (int64_t c = 0; c < Cp; c += 8) {
      const f64x8 e = widen(load_lanes<8>(&emit[c]));
      const i64x8 zero_e = e == 0.0;
      const f64x8 old_f = zero_e ? zero : e * so, new_f = zero_e ? zero : e * sn;
      const i64x8 flushed = (e < tiny_d) & (load_lanes<8>(&lemit[c]) > kNegInf);
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0;
      const auto sig = load_lanes<8>(&sigma[c]), rmn = load_lanes<8>(&rmin[c]);
      const f64x8 sig_w = widen(sig), rmin_w = widen(rmn);
      past8 |= reach & ~flushed &
               (((rmin_w < kInf) & (old_f > big)) | ((sig_w > 0.0) & (new_f > big)));
      store_lanes(&fo_d[c], old_f);
      store_lanes(&fn_d[c], new_f);
      // std::min(f, big), then the dtype's rounding, as static_cast gives it.
      using S8 = typename Lanes<scalar_t, 8>::type;
      const S8 fos = __builtin_convertvector(big8 < old_f ? big8 : old_f, S8);
      const S8 fns = __builtin_convertvector(big8 < new_f ? big8 : new_f, S8);
      store_lanes(&fo[c], fos);
      store_lanes(&fn[c], fns);
      const auto [fresh_lost, old_lost] =
          lost_charges(sig, fns, fos, rmn, load_lanes<8>(&lemit[c]) == kNegInf);
      charged8 |= reach & (fresh_lost | old_lost);
    }
    bool past = any_lane(past8);
    if (any_flushed)
      for (int64_t c = 0; c < C; ++c) {
        if (!emit_flushed(c)) continue;
        const double old_f = std::exp(lemit[c] + base);
        const double new_f = std::exp(lemit[c] + base + sigma_rel);
        past |= reaches[c] && ((rmin[c] < Limits::infinity() && old_f > big) ||
                               (sigma[c] > 0 && new_f > big));
        fo_d[c] = old_f;
        fn_d[c] = new_f;
        fo[c] = static_cast<scalar_t>(std::min(old_f, big));
        fn[c] = static_cast<scalar_t>(std::min(new_f, big));
      }
    if (past) rejected = true;
    if (!any_flushed && ring_ghost_free && sigma_ghost_free && !any_lane(charged8)) {
      // Every ghost stays 0.
      finish_advance(t, new_offset);
      return;
    }
    // Ghosts: every generation follows its entries; the new entries bring
    // sigma's ghost; entries that this step takes below tiny are charged in
    // full. Only a -inf score makes a factor exactly 0: a factor that
    // underflowed even float64 is bounded by float64's smallest normal.
    // Branch-free, so that it vectorises: a charge that does not apply adds
    // an exact 0.
    const double n_old = static_cast<double>(std::min(t, K - 1));
    const double old_charge = 2.0 * n_old * kSlack;
    const f64x8 floor8 = zero + kFloor;
    // exp_domain.h's scaled_ghost, eight labels at a time.
    auto scaled8 = [&](f64x8 g, f64x8 f, i64x8 exact_zero) {
      const f64x8 scaled = g * (f < kFloor ? floor8 : f) * kUp;
      return (g == 0.0) | exact_zero ? zero : (scaled < kFloor ? floor8 : scaled);
    };
    i64x8 lost8 = {}, any8 = {};
    for (int64_t c = 0; c < Cp; c += 8) {
      const i64x8 exact_zero = load_lanes<8>(&lemit[c]) == kNegInf;
      const i64x8 reach = load_lanes<8>(&reach_mask[c]) != 0.0;
      const f64x8 fod = load_lanes<8>(&fo_d[c]), fnd = load_lanes<8>(&fn_d[c]);
      const f64x8 go = scaled8(load_lanes<8>(&ghost_old[c]), fod, exact_zero);
      f64x8 gn = scaled8(load_lanes<8>(&ghost_new[c]), fod, exact_zero) +
                 scaled8(load_lanes<8>(&gs[c]), fnd, exact_zero);
      const auto sig = load_lanes<8>(&sigma[c]), fns = load_lanes<8>(&fn[c]), fos = load_lanes<8>(&fo[c]),
                 rmn = load_lanes<8>(&rmin[c]);
      const auto [fresh_lost, old_lost] = lost_charges(sig, fns, fos, rmn, exact_zero);
      gn += fresh_lost ? (widen(sig) * fnd * inv_tiny_d + 2.0) * kSlack : zero;
      gn += old_lost ? zero + old_charge : zero;
      // Labels that cannot reach an end carry no ghost.
      const f64x8 go_kept = reach ? go : zero, gn_kept = reach ? gn : zero;
      store_lanes(&ghost_old[c], go_kept);
      store_lanes(&ghost_new[c], gn_kept);
      lost8 |= reach & ~(go + gn < 1e300);
      any8 |= (go_kept != 0.0) | (gn_kept != 0.0);
    }
    const bool lost = any_lane(lost8), any = any_lane(any8);
    if (lost) rejected = true;
    ring_ghost_free = !any;
    finish_advance(t, new_offset);
  }

  // The end of advance(t): the segments starting at t enter the ring.
  void finish_advance(int64_t t, double new_offset) {
    if (bad_scores || ((in.start_scores || in.end_scores) && bad_position(t))) rejected = true;
    owes_advance = true;
    scalar_t* r = ring.data() + (t % K) * Cp;
    for (int64_t c = 0; c < C; ++c) r[c] = std::min(sigma[c] * fn[c], Limits::max());
    O = new_offset;
  }

  void update_ring_ghost_free() {
    ring_ghost_free = true;
    for (int64_t c = 0; c < C; ++c) ring_ghost_free &= ghost_old[c] == 0.0 && ghost_new[c] == 0.0;
  }

  void ref_add(double m) { two_sum_add(ref_hi, ref_lo, m); }

  bool emit_flushed(int64_t c) const { return emit[c] < tiny && lemit[c] > kNegInf; }

  // The ring in the checkpoint layout, as the log scan writes it: logs
  // relative to its offset ref_hi, less the rounding that offset carries
  // (so a log-domain recompute from here follows the log scan's own), and
  // -inf for 0. K·C logs per checkpoint.
  void save(int64_t t, scalar_t* out, double* out_offset) {
    const int tK = static_cast<int>(t % K);
    if (owes_advance) {  // the entries of ages 2 .. min(t, K) take the last factor
      const scalar_t big = Limits::max();
      for (int64_t d = 2; d <= std::min<int64_t>(t, K); ++d) {
        scalar_t* r = ring.data() + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * Cp;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t x = r[c] * fo[c];
          r[c] = x < big ? x : big;
        }
      }
      owes_advance = false;
    }
    const double shift = (O - ref_hi) - ref_lo;
    for (int row = 0; row < K; ++row) {
      const scalar_t* r =
          ring.data() + ring_row_of_checkpoint_row(row, tK, static_cast<int>(K)) * Cp;
      for (int64_t c = 0; c < C; ++c)
        out[row * C + c] = r[c] > 0 ? static_cast<scalar_t>(std::log(static_cast<double>(r[c])) + shift)
                                    : neg_inf<scalar_t>();
    }
    *out_offset = ref_hi;
  }
};

// Subnormal operands cost x86 cores ~100 cycles each, and an exp-domain
// ring is full of entries on their way to 0: the exp-domain forward runs
// with flush-to-zero and denormals-are-zero set on its thread, restored on
// exit (the log scan, its fallback, runs with the caller's modes). Its
// bounds charge every value below the smallest normal as lost, so they hold
// with or without these modes.
struct FlushSubnormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

// Deterministic fallbacks to the log scan since the extension loaded,
// exposed to tests and the benchmark by flashsemicrf_testing::cpu_exp_fallbacks.
std::atomic<int64_t> exp_fallbacks{0};

// The exp-domain forward of sequence b with either scan (ExpForward for the
// static transition, ExpForwardDD for the (K, C, C) one); false (outputs
// partly written) when its bounds cannot certify log Z, and the caller reruns
// the log scan.
template <template <typename> class Scan, typename scalar_t>
bool forward_sequence_exp(const ForwardParams& p, int64_t b) {
  const FlushSubnormals flush_subnormals;
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = sequence_length(p, b);
  Scan<scalar_t> scan(in, p.K, p.C, L);
  if (scan.rejected) return false;
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  double log_z = 0.0;
  for (int64_t t = 0; t <= L; ++t) {
    if (ckpt.due(t)) scan.save(t, ckpt.at(t / p.interval), ckpt.offset + t / p.interval);
    if (t == 0) scan.first();
    else scan.ends(t);
    if (scan.rejected) return false;
    if (t == L) {
      if (!scan.finish(&log_z)) return false;
    } else {
      if (t > 0) scan.starts(t);
      scan.advance(t);
      if (scan.rejected) return false;
    }
  }
  static_cast<scalar_t*>(p.log_z)[b] = static_cast<scalar_t>(log_z);
  for (int64_t j = ckpt.first_unused(L); j < p.n_ckpt; ++j) {
    std::fill_n(ckpt.at(j), ckpt.stride, neg_inf<scalar_t>());
    ckpt.offset[j] = 0.0;
  }
  return true;
}

// G mat-vecs through one table in one pass over it: out[j] = x[j] · table,
// each as matvec_padded computes it: every sum over cp in order, and the
// zeros of x that matvec_padded skips add exact zeros here (the table's
// entries are finite and the sums never -0), cheaper than testing. The table is
// read from L2 once for all G, and the G · kChunks chains of multiply-adds
// interleave. Chunks per pass: about ten vector registers of sums, so that
// AVX2's sixteen hold them with the broadcasts and the row.
template <int G, int kChunks, typename scalar_t>
inline void matvec_group_chunks(const scalar_t* const* x, const scalar_t* __restrict table,
                                int64_t C, int64_t Cp, int64_t c0, scalar_t* const* out) {
  constexpr int64_t kWidth = kChunks * kRingLanes;
  scalar_t sum[G][kWidth] = {};
  for (int64_t cp = 0; cp < C; ++cp) {
    const scalar_t* __restrict row = table + cp * Cp + c0;
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) {
#pragma omp simd
      for (int64_t i = 0; i < kWidth; ++i) sum[j][i] += x[j][cp] * row[i];
    }
  }
  for (int j = 0; j < G; ++j)
    for (int64_t i = 0; i < kWidth; ++i) out[j][c0 + i] = sum[j][i];
}
template <int G, typename scalar_t>
inline void matvec_group(const scalar_t* const* x, const scalar_t* table, int64_t C, int64_t Cp,
                         scalar_t* const* out) {
  constexpr int kRegisters = sizeof(scalar_t) / sizeof(float);  // AVX2 registers per chunk
  constexpr int kMax = std::max(1, std::min(3, 10 / (G * kRegisters)));
  int64_t c0 = 0;
  for (; c0 + kMax * kRingLanes <= Cp; c0 += kMax * kRingLanes)
    matvec_group_chunks<G, kMax>(x, table, C, Cp, c0, out);
  switch ((Cp - c0) / kRingLanes) {
    case 2: matvec_group_chunks<G, 2>(x, table, C, Cp, c0, out); break;
    case 1: matvec_group_chunks<G, 1>(x, table, C, Cp, c0, out); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------
// The scaled exp-domain forward for the duration-dependent (K, C, C)
// transition. The log scan's step takes K·C² exps (one per previous label,
// label and duration); here the segments [t-d, t) cost one mat-vec each with
// the table A_d = exp(transition[d-1] - col_max) built once per call, so a
// step is K mat-vecs of multiply-adds and O(C) exps. Two rings, as the log
// scan's: alpha_hat[s] (normalised at step s) and gain[s][c] = exp(start(s,
// c) + the emissions of s … t-1 + the scale of alpha_hat[s] - O), so that
// the segment [s, t) of label c weighs
//   (alpha_hat[s] · A_d)[c] · gain[s][c] · weight[d-1][c]
// relative to O + col_max[c] + dur_max[c]: the scales of the different steps
// s live in the gains, and a term is multiply-adds only.
// The certificate is the static path's: both rings carry ghosts (what
// underflow lost, in units of the dtype's smallest normal), alpha_hat's
// follow the K mat-vecs through the same tables, a ghost is absorbed into
// relative error where it is below its value / (4 rho L), and log Z is
// accepted only if Z ≥ rho · ghost(Z); otherwise the sequence goes to the
// log scan. So do sequences whose tables flush a finite entry (the static
// path bounds those; here they would need a ghost in every mat-vec).
// docs/design.md has the argument.
template <typename scalar_t>
struct ExpForwardDD {
  using Limits = std::numeric_limits<scalar_t>;
  static constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  static constexpr double kFloor = std::numeric_limits<double>::min();
  const SequenceInputs<scalar_t>& in;
  const int64_t K, C, L;
  const int64_t Cp;  // C padded to whole chunks of kRingLanes: the stride of A_padded and u
  const scalar_t tiny = Limits::min();
  const double tiny_d = static_cast<double>(Limits::min());
  double absorb_factor;  // as ExpForward's: at most L absorptions along a chain

  // Per-call tables.
  std::vector<double> col_max;        // (C) finite max over d, c' of transition[d][c', c]
  std::vector<double> dur_max;        // (C) finite max over d of duration[d-1, c]
  std::vector<scalar_t> A_minpos;     // (C) smallest positive entry of column c, all d
  std::vector<scalar_t> A_padded;     // (K, C, Cp) exp(transition - col_max[c]), zero-padded rows
  scalar_t A_minpos_min;              // min over c of A_minpos
  std::vector<scalar_t> weight;       // (K, C) exp(duration - dur_max)
  std::vector<scalar_t> first_alpha;  // (C) exp(start_transition - col_max - first_max)
  double first_max = 0.0;
  // Labels that can reach an end (a superset, from the finite entries):
  // the others never contribute to Z and are kept at exactly 0, so that
  // they can neither set a normaliser nor flush the mass that matters.
  std::vector<char> reach;

  // State: the rings (slot s % K), their ghosts (tiny units) and, per
  // slot, whether any ghost is nonzero and alpha_hat's smallest positive
  // entry (for the mat-vec's underflow check).
  std::vector<scalar_t> alpha_ring, gain;
  std::vector<double> alpha_ghost, gain_ghost;
  std::vector<char> slot_alpha_ghost, slot_ghost;
  std::vector<scalar_t> alpha_minpos;
  double O = 0.0, mes = 0.0;  // gains relative to O; alpha_hat[t] to O + mes
  std::vector<scalar_t> acc, alpha, u, livemax, arg, factor;
  std::vector<double> gacc, ga, gu, lemit, lfresh, old_factor;
  // Steps share their passes over the tables: step t's pass over A_d also
  // gives step t+j's mat-vec alpha_hat[t+j-d] · A_d (j < kAhead, d > j:
  // that row is known at step t), kept in u_ahead row ((t+j) % kAhead, d-1)
  // with its step in u_ahead_step, so that the K mat-vecs of a step read A
  // from L2 about K/3 + 1 times rather than K.
  static constexpr int kAhead = 3;
  std::vector<scalar_t> u_ahead;       // (kAhead, K, Cp)
  std::vector<int64_t> u_ahead_step;   // (kAhead, K) the step a row is for; -1: none
  // The log scan's offset (ExpForward's ref_hi, ref_lo) and, per slot, the
  // absolute scale of alpha_hat[s] and the log scan's offset after its step
  // s, so that checkpoints are written in that scan's terms.
  double ref_hi = 0.0, ref_lo = 0.0;
  std::vector<double> slot_scale, slot_ref_hi, slot_ref_lo;
  scalar_t first_m = 0;  // the log scan's step-0 maximum
  bool rejected = false;

  ExpForwardDD(const SequenceInputs<scalar_t>& in_, int64_t K_, int64_t C_, int64_t L_)
      : in(in_), K(K_), C(C_), L(L_), Cp(padded_labels(C_)), col_max(C_, 0.0), dur_max(C_, 0.0),
        A_minpos(C_, Limits::infinity()), A_padded(K_ * C_ * Cp, 0), weight(K_ * C_),
        first_alpha(C_), reach(C_, 0),
        alpha_ring(K_ * C_, 0), gain(K_ * C_, 0), alpha_ghost(K_ * C_, 0.0), gain_ghost(K_ * C_, 0.0),
        slot_alpha_ghost(K_, 0), slot_ghost(K_, 0), alpha_minpos(K_, Limits::infinity()), acc(C_),
        alpha(Cp, 0), u(Cp, 0), livemax(C_), arg(C_), factor(C_), gacc(C_), ga(C_, 0.0), gu(C_),
        lemit(C_), lfresh(C_), old_factor(C_), u_ahead(kAhead * K_ * Cp, 0),
        u_ahead_step(kAhead * K_, -1), slot_scale(K_, 0.0), slot_ref_hi(K_, 0.0), slot_ref_lo(K_, 0.0) {
    absorb_factor = absorb_factor_for<scalar_t>(L);
    rejected = bad_parameters() || !tables();
  }

  // False where a finite entry flushes: its loss would need a ghost in
  // every mat-vec, and such parameters are far from ordinary.
  bool tables() {
    for (int64_t c = 0; c < C; ++c) {
      double mx = kNegInf, dm = kNegInf;
      for (int64_t d = 1; d <= K; ++d) {
        dm = std::max(dm, static_cast<double>(in.dur(d, c)));
        for (int64_t cp = 0; cp < C; ++cp) mx = std::max(mx, static_cast<double>(in.trans(d, cp, c)));
      }
      col_max[c] = mx == kNegInf ? 0.0 : mx;
      dur_max[c] = dm == kNegInf ? 0.0 : dm;
    }
    auto table_exp = [&](double x, scalar_t* out) {
      const scalar_t v = fexp(static_cast<scalar_t>(x));
      *out = v;
      return !(x > kNegInf && v < tiny);
    };
    bool ok = true;
    for (int64_t d = 1; d <= K; ++d)
      for (int64_t cp = 0; cp < C; ++cp)
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* a = A_padded.data() + ((d - 1) * C + cp) * Cp + c;
          ok &= table_exp(static_cast<double>(in.trans(d, cp, c)) - col_max[c], a);
          if (*a > 0) A_minpos[c] = std::min(A_minpos[c], *a);
        }
    A_minpos_min = *std::min_element(A_minpos.begin(), A_minpos.end());
    for (int64_t d = 1; d <= K; ++d)
      for (int64_t c = 0; c < C; ++c)
        ok &= table_exp(static_cast<double>(in.dur(d, c)) - dur_max[c],
                        weight.data() + (d - 1) * C + c);
    double fm = kNegInf;
    for (int64_t c = 0; c < C; ++c)
      fm = std::max(fm, static_cast<double>(in.start_transition[c]) - col_max[c]);
    first_max = fm == kNegInf ? 0.0 : fm;
    for (int64_t c = 0; c < C; ++c)
      ok &= table_exp(static_cast<double>(in.start_transition[c]) - col_max[c] - first_max,
                      first_alpha.data() + c);
    std::vector<char> ends_somewhere(C, 0);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t d = 1; d <= K; ++d) ends_somewhere[c] |= in.dur(d, c) > neg_inf<scalar_t>();
      reach[c] = ends_somewhere[c] && in.end_transition[c] > neg_inf<scalar_t>();
    }
    for (bool changed = true; changed;) {
      changed = false;
      for (int64_t c = 0; c < C; ++c) {
        if (reach[c] || !ends_somewhere[c]) continue;
        for (int64_t d = 1; d <= K && !reach[c]; ++d)
          for (int64_t c2 = 0; c2 < C; ++c2)
            if (reach[c2] && in.trans(d, c, c2) > neg_inf<scalar_t>()) {
              reach[c] = 1;
              changed = true;
              break;
            }
      }
    }
    return ok;
  }

  // An upper bound of a · b (a, b ≥ 0) that never rounds a positive
  // product to 0.
  static double bound_product(double a, double b) {
    return a > 0 && b > 0 ? std::max(a * b, kFloor) : 0.0;
  }

  bool bad_position(int64_t t) const { return unboundable_position(in, t, C); }
  bool bad_parameters() const { return unboundable_parameters(in, K * C * C, K, C); }

  // Step 0: the log scan's offset starts at the largest first score.
  void first() {
    scalar_t m = neg_inf<scalar_t>();
    for (int64_t c = 0; c < C; ++c) m = nan_max(m, in.first(c));
    first_m = finite_or_zero(m);
    ref_hi = static_cast<double>(first_m);
    ref_lo = 0.0;
  }

  void ref_add(double m) { two_sum_add(ref_hi, ref_lo, m); }

  // Step t ≥ 1: alpha_hat[t] and its ghost ga.
  void ends(int64_t t) {
    const int64_t n = std::min(t, K);
    const int tK = static_cast<int>(t % K);
    std::fill(acc.begin(), acc.end(), scalar_t(0));
    std::fill(livemax.begin(), livemax.end(), scalar_t(0));
    std::fill(gacc.begin(), gacc.end(), 0.0);
    for (int64_t d = 1; d <= n; ++d) {
      const int64_t s = t - d;
      const int slot = slot_before(tK, static_cast<int>(d), static_cast<int>(K));
      const scalar_t* __restrict g = gain.data() + slot * C;
      const scalar_t* __restrict w = weight.data() + (d - 1) * C;
      scalar_t* __restrict uu = u.data();
      bool matvec_flush = false;
      if (s == 0) {
        std::copy_n(first_alpha.data(), C, uu);
      } else {
        const int64_t row = (t % kAhead) * K + (d - 1);
        if (u_ahead_step[row] == t) {
          uu = u_ahead.data() + row * Cp;
        } else {
          // This step's mat-vec and those of the next steps that have not
          // got theirs yet and whose alpha_hat row is known.
          const scalar_t* xs[kAhead];
          scalar_t* outs[kAhead];
          xs[0] = alpha_ring.data() + slot * C;
          outs[0] = uu;
          int nx = 1;
          for (int64_t j = 1; j < kAhead && t + j <= L && d > j; ++j) {
            const int64_t ahead = ((t + j) % kAhead) * K + (d - 1);
            if (u_ahead_step[ahead] == t + j) continue;
            u_ahead_step[ahead] = t + j;
            xs[nx] = alpha_ring.data() + ((t + j - d) % K) * C;
            outs[nx++] = u_ahead.data() + ahead * Cp;
          }
          const scalar_t* table = A_padded.data() + (d - 1) * C * Cp;
          switch (nx) {
            case 1: matvec_padded(xs[0], table, C, Cp, uu); break;
            case 2: matvec_group<2>(xs, table, C, Cp, outs); break;
            case 3: matvec_group<3>(xs, table, C, Cp, outs); break;
            default: matvec_group<kAhead>(xs, table, C, Cp, outs); break;
          }
        }
        // Some product below tiny: alpha_minpos · A_minpos[c] < tiny for a c.
        matvec_flush = alpha_minpos[slot] * A_minpos_min < tiny;
      }
      const bool alpha_ghosts = s > 0 && slot_alpha_ghost[slot];
      scalar_t* __restrict ac = acc.data();
      scalar_t* __restrict lm = livemax.data();
      const bool live = d + 1 <= K;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        ac[c] += (uu[c] * g[c]) * w[c];
        const scalar_t keep = live ? g[c] : scalar_t(0);
        lm[c] = keep > lm[c] ? keep : lm[c];
      }
      // Whether one of the term's two products fell below tiny (& and |, so
      // that the loop vectorises; a loop of its own, so that the sum above
      // keeps its fused multiply-add).
      int product_flush = 0;
#pragma omp simd reduction(| : product_flush)
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t p = uu[c] * g[c];
        product_flush |=
            ((uu[c] > 0) & (g[c] > 0) & (p < tiny)) | ((p > 0) & (w[c] > 0) & (p * w[c] < tiny));
      }
      // Ghosts: the gains', the mat-vec's products below tiny (C at most),
      // and the term's own two products.
      if (!(slot_ghost[slot] || alpha_ghosts || matvec_flush || product_flush)) continue;
      // The mat-vec's ghost: alpha_hat's ghosts through the same table
      // (exact, so that one label's ghost stays in the columns it reaches),
      // and at most C products below tiny.
      std::fill(gu.begin(), gu.end(), 0.0);
      if (alpha_ghosts) {
        const double* ag = alpha_ghost.data() + slot * C;
        for (int64_t cp = 0; cp < C; ++cp) {
          if (ag[cp] == 0.0) continue;
          const scalar_t* row = A_padded.data() + ((d - 1) * C + cp) * Cp;
          for (int64_t c = 0; c < C; ++c)
            if (row[c] > 0) gu[c] += std::max(ag[cp] * static_cast<double>(row[c]) * kUp, kFloor);
        }
      }
      const double* gg = gain_ghost.data() + slot * C;
      // Four labels at a time, branch-free (bound_product written out), then
      // the scalar loop below for the last C mod 4: the same arithmetic.
      // Where the mat-vec is exact (gu = 0, nothing charged) the bounds of
      // gu's products are +0 and drop out of the sum exactly, and where the
      // gains are exact too (gg = 0) so does the rest: the hot cases skip
      // that arithmetic, with the same bits.
      {
        using S4 = typename Lanes<scalar_t, 4>::type;
        const f64x4 zero = {0.0, 0.0, 0.0, 0.0}, floor4 = zero + kFloor;
        auto bound4 = [&](f64x4 a, f64x4 b) {
          const f64x4 ab = a * b;
          return (a > 0.0) & (b > 0.0) ? (ab < kFloor ? floor4 : ab) : zero;
        };
        const double matvec_charge = static_cast<double>(C) * kSlack;
        const scalar_t amp = alpha_minpos[slot];
        const int64_t C4 = C & ~int64_t{3};
        auto term_ghosts = [&](auto exact_matvec, auto exact_gains) {
          for (int64_t c = 0; c < C4; c += 4) {
            const S4 ws = load_lanes<4>(&w[c]), gs4 = load_lanes<4>(&g[c]), us = load_lanes<4>(&uu[c]);
            f64x4 term = zero;
            if constexpr (!decltype(exact_matvec)::value) {
              const f64x4 gg4 = load_lanes<4>(&gg[c]);
              const i64x4 charged = (s > 0 ? ~i64x4{} : i64x4{}) &
                                    (widen(amp * load_lanes<4>(&A_minpos[c])) < tiny_d);
              const f64x4 gu_c = load_lanes<4>(&gu[c]) + (charged ? zero + matvec_charge : zero);
              term = bound4(bound4(gu_c, widen(gs4) * kUp) + bound4(widen(us) * kUp, gg4) +
                                bound4(bound4(gu_c, gg4), zero + tiny_d),
                            widen(ws) * kUp);
            } else if constexpr (!decltype(exact_gains)::value) {
              term = bound4(bound4(widen(us) * kUp, load_lanes<4>(&gg[c])), widen(ws) * kUp);
            }
            const S4 p = us * gs4;
            const f64x4 pw = widen(p), uw = widen(us), gw = widen(gs4);
            term += (uw > 0.0) & (gw > 0.0) & (pw < tiny_d) ? zero + kSlack : zero;
            term += (pw > 0.0) & (widen(p * ws) < tiny_d) ? zero + kSlack : zero;
            const f64x4 add = term * kSlack;
            // A -inf duration score (w = 0) is exact: nothing to add.
            const i64x4 adds = (widen(ws) != 0.0) & (term > 0.0);
            store_lanes(&gacc[c], load_lanes<4>(&gacc[c]) + (adds ? (add < kFloor ? floor4 : add) : zero));
          }
        };
        using Yes = std::true_type;
        using No = std::false_type;
        if (alpha_ghosts || matvec_flush) term_ghosts(No{}, No{});
        else if (slot_ghost[slot]) term_ghosts(Yes{}, No{});
        else term_ghosts(Yes{}, Yes{});
      }
      for (int64_t c = C & ~int64_t{3}; c < C; ++c) {
        if (w[c] == 0) continue;  // a -inf duration score: exact
        const double gu_c =
            gu[c] + (s > 0 && alpha_minpos[slot] * A_minpos[c] < tiny ? static_cast<double>(C) * kSlack : 0.0);
        // (u + gu)(g + gg) · w less u · g · w, every product kept above 0.
        double term = bound_product(
            bound_product(gu_c, static_cast<double>(g[c]) * kUp) +
                bound_product(static_cast<double>(uu[c]) * kUp, gg[c]) +
                bound_product(bound_product(gu_c, gg[c]), tiny_d),
            static_cast<double>(w[c]) * kUp);
        const scalar_t p = uu[c] * g[c];
        if (uu[c] > 0 && g[c] > 0 && p < tiny) term += kSlack;
        if (p > 0 && p * w[c] < tiny) term += kSlack;
        if (term > 0) gacc[c] += std::max(term * kSlack, kFloor);
      }
    }
    double top = kNegInf, ya_max = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      if (!reach[c]) continue;
      const double ya = static_cast<double>(in.end(t - 1, c)) + col_max[c] + dur_max[c];
      ya_max = std::max(ya_max, ya);
      if (acc[c] > 0) top = std::max(top, ya + exponent_of(acc[c]) * kLn2);
    }
    mes = top > kNegInf ? top : (ya_max > kNegInf ? ya_max : 0.0);
    for (int64_t c = 0; c < C; ++c)
      arg[c] = static_cast<scalar_t>(static_cast<double>(in.end(t - 1, c)) + col_max[c] +
                                     dur_max[c] - mes);
    exp_row(arg.data(), factor.data(), C);
    for (int64_t c = 0; c < C; ++c) {
      const double ya = static_cast<double>(in.end(t - 1, c)) + col_max[c] + dur_max[c];
      const scalar_t endf = factor[c];
      if (!reach[c]) {  // contributes nothing to Z: exactly 0
        alpha[c] = 0;
        ga[c] = 0.0;
        continue;
      }
      if (!(acc[c] < Limits::max())) rejected = true;
      alpha[c] = acc[c] > 0 ? acc[c] * endf : scalar_t(0);
      if (!(alpha[c] < Limits::max())) rejected = true;
      ga[c] = ghost_of_alpha(gacc[c], acc[c], endf, ya - mes, alpha[c], absorb_factor, &rejected);
    }
    ref_add(log_scan_step_max(alpha.data(), Cp, (O - ref_hi) - ref_lo, mes));
  }

  // t = L: log Z, or false where it cannot be certified.
  bool finish(double* log_z) const {
    return !rejected && certified_log_z(in, C, alpha.data(), ga.data(), O, mes, log_z);
  }

  // The static scan's sigma step has no counterpart here: the start terms
  // of the segments beginning at t enter the gain ring in advance(t).
  void starts(int64_t) {}

  // Move the rings to step t+1 (t < L): position t's emissions, the
  // segments starting at t, and the normaliser: the largest gain that can
  // still matter becomes about 1.
  void advance(int64_t t) {
    if (bad_position(t)) rejected = true;
    double m = kNegInf;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(in.score(t, c)));
    if (m == kNegInf) m = 0.0;
    // alpha_hat[t]'s scale relative to O (step 0: first_alpha's).
    const double scale = t == 0 ? first_max : mes;
    double top = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      lemit[c] = static_cast<double>(in.score(t, c)) - m;
      lfresh[c] = reach[c] ? static_cast<double>(in.start(t, c)) + lemit[c] + scale : kNegInf;
      top = std::max(top, lfresh[c]);
      if (livemax[c] > 0 && lemit[c] > kNegInf)
        top = std::max(top, std::log(static_cast<double>(livemax[c])) + lemit[c]);
    }
    if (top == kNegInf) top = 0.0;
    const double new_offset = O + (top + m);
    const double base = (O - new_offset) + m;
    const double big = static_cast<double>(Limits::max());
    const int tK = static_cast<int>(t % K);
    slot_scale[tK] = O + scale;
    slot_ref_hi[tK] = ref_hi;
    slot_ref_lo[tK] = ref_lo;
    ref_add(m);
    // The old gains' factors, once per label (C exps).
    for (int64_t c = 0; c < C; ++c) old_factor[c] = std::exp(lemit[c] + base);
    for (int64_t d = 1; d <= std::min(t, K - 1); ++d) {
      const int slot = slot_before(tK, static_cast<int>(d), static_cast<int>(K));
      scalar_t* g = gain.data() + slot * C;
      double* gg = gain_ghost.data() + slot * C;
      // Four labels at a time, branch-free, then the scalar loop below for
      // the last C mod 4: the same arithmetic. A gain is finite and ≥ +0,
      // and a -inf score's factor is exactly 0, so that x = g · f is 0 (or
      // NaN, 0 · inf) wherever g = 0 or the score is -inf: there v ≥ tiny
      // and x > big fail without the scalar loop's masks, and the new gain
      // is v ≥ tiny ? v : 0, a comparison in the gains' own lanes.
      using S4 = typename Lanes<scalar_t, 4>::type;
      const S4 zero_s = S4{};
      const f64x4 zero = {0.0, 0.0, 0.0, 0.0}, floor4 = zero + kFloor, big4 = zero + big;
      i64x4 any4 = {0, 0, 0, 0}, past4 = {0, 0, 0, 0};
      const int64_t C4 = C & ~int64_t{3};
      if (!slot_ghost[slot]) {
        // Every ghost of the slot is 0: only the gains that fall below tiny
        // start one.
        for (int64_t c = 0; c < C4; c += 4) {
          const i64x4 exact_zero = load_lanes<4>(&lemit[c]) == kNegInf;  // a -inf score
          const f64x4 f = load_lanes<4>(&old_factor[c]);
          const f64x4 gw = widen(load_lanes<4>(&g[c]));
          const f64x4 x = gw * f;
          past4 |= x > big;
          const S4 v = __builtin_convertvector(big4 < x ? big4 : x, S4);
          const i64x4 fresh = ~exact_zero & (gw > 0.0) & (widen(v) < tiny_d);
          store_lanes(&g[c], v >= tiny ? v : zero_s);
          store_lanes(&gg[c], fresh ? zero + kSlack : zero);
          any4 |= fresh;
        }
      } else {
        for (int64_t c = 0; c < C4; c += 4) {
          const i64x4 exact_zero = load_lanes<4>(&lemit[c]) == kNegInf;  // a -inf score
          const f64x4 f = load_lanes<4>(&old_factor[c]), gg0 = load_lanes<4>(&gg[c]);
          const f64x4 gw = widen(load_lanes<4>(&g[c]));
          const f64x4 scaled = gg0 * (f < kFloor ? floor4 : f) * kUp;
          const f64x4 gg1 = gg0 > 0.0 ? (scaled < kFloor ? floor4 : scaled) : gg0;
          const f64x4 x = gw * f;
          past4 |= x > big;
          const S4 v = __builtin_convertvector(big4 < x ? big4 : x, S4);
          const i64x4 under = (gw > 0.0) & (widen(v) < tiny_d);
          const f64x4 gg2 = exact_zero ? zero : (under ? gg1 + kSlack : gg1);
          store_lanes(&g[c], v >= tiny ? v : zero_s);
          store_lanes(&gg[c], gg2);
          any4 |= ~exact_zero & (gg2 > 0.0);
          past4 |= ~exact_zero & ~(gg2 < 1e300);
        }
      }
      if (any_lane(past4)) rejected = true;
      bool any = any_lane(any4);
      for (int64_t c = C4; c < C; ++c) {
        if (lemit[c] == kNegInf) {  // a -inf score: everything exactly 0
          g[c] = 0;
          gg[c] = 0.0;
          continue;
        }
        const double f = old_factor[c];
        if (gg[c] > 0) gg[c] = std::max(gg[c] * std::max(f, kFloor) * kUp, kFloor);
        if (g[c] > 0) {
          const double x = static_cast<double>(g[c]) * f;
          if (x > big) rejected = true;
          const scalar_t v = static_cast<scalar_t>(std::min(x, big));
          if (v < tiny) {
            gg[c] += kSlack;
            g[c] = 0;
          } else {
            g[c] = v;
          }
        }
        any |= gg[c] > 0;
        if (!(gg[c] < 1e300)) rejected = true;
      }
      slot_ghost[slot] = any;
    }
    // The segments starting at t: alpha_hat[t] and its gain.
    scalar_t* g = gain.data() + tK * C;
    double* gg = gain_ghost.data() + tK * C;
    bool any = false;
    for (int64_t c = 0; c < C; ++c) {
      gg[c] = 0.0;
      g[c] = 0;
      if (lfresh[c] == kNegInf) continue;
      const double x = std::exp(lfresh[c] + base);
      if (x > big) rejected = true;
      const scalar_t v = static_cast<scalar_t>(std::min(x, big));
      if (v < tiny) {
        gg[c] = kSlack;
        any = true;
      } else {
        g[c] = v;
      }
    }
    slot_ghost[tK] = any;
    scalar_t amin = Limits::infinity();
    scalar_t* a = alpha_ring.data() + tK * C;
    double* ag = alpha_ghost.data() + tK * C;
    bool alpha_any = false;
    for (int64_t c = 0; c < C; ++c) {
      a[c] = t == 0 ? scalar_t(0) : alpha[c];
      ag[c] = t == 0 ? 0.0 : ga[c];
      alpha_any |= ag[c] > 0;
      if (a[c] > 0) amin = std::min(amin, a[c]);
    }
    alpha_minpos[tK] = amin;
    slot_alpha_ghost[tK] = alpha_any;
    O = new_offset;
  }

  // The rings in the checkpoint layout, as the log scan writes them: alpha
  // rows relative to that scan's offset after step s (step 0's row is its
  // start_transition - first_m), gain rows relative to its offset now less
  // that one, and -inf for 0. 2K·C logs per checkpoint.
  void save(int64_t t, scalar_t* out, double* out_offset) const {
    const int tK = static_cast<int>(t % K);
    const double now = (O - ref_hi) - ref_lo;
    for (int64_t d = 1; d <= K; ++d) {
      const int64_t s = t - d;
      const int slot = slot_before(tK, static_cast<int>(d), static_cast<int>(K));
      scalar_t* alpha_row = out + (d - 1) * C;
      scalar_t* gain_row = out + (K + d - 1) * C;
      if (s < 0) {
        std::fill_n(alpha_row, C, neg_inf<scalar_t>());
        std::fill_n(gain_row, C, neg_inf<scalar_t>());
        continue;
      }
      const double to_ref = (slot_scale[slot] - slot_ref_hi[slot]) - slot_ref_lo[slot];
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t a = alpha_ring[slot * C + c], g = gain[slot * C + c];
        if (s == 0) alpha_row[c] = in.start_transition[c] - first_m;
        else alpha_row[c] = a > 0 ? static_cast<scalar_t>(std::log(static_cast<double>(a)) + to_ref)
                                  : neg_inf<scalar_t>();
        gain_row[c] = g > 0 ? static_cast<scalar_t>(std::log(static_cast<double>(g)) + now - to_ref)
                            : neg_inf<scalar_t>();
      }
    }
    *out_offset = ref_hi;
  }
};

// FLASHSEMICRF_CPU_ALGORITHM (semicrf_host.h's uses_exp_domain): the
// exp-domain forward and backward (both transition forms, the default), or
// the log domain everywhere.
bool cpu_uses_exp_domain() { return uses_exp_domain("FLASHSEMICRF_CPU_ALGORITHM", true); }

template <typename scalar_t, bool DD>
void backward_sequence(const BackwardParams& p, int64_t b) {
  const int64_t K = p.K, C = p.C, L = sequence_length(p, b);
  // The forward's log Z only says whether the sequence is dead (-inf): in
  // float32 it holds |log Z|·6e-8 of rounding, too coarse to normalise the
  // posteriors of a long sequence; the backward recomputes it in float64 at
  // t = L, its first step.
  double log_z = static_cast<double>(static_cast<const scalar_t*>(p.log_z)[b]);
  const scalar_t g = static_cast<const scalar_t*>(p.grad_log_z)[b];
  if (log_z == -std::numeric_limits<double>::infinity()) return;  // outputs stay 0

  const SequenceInputs<scalar_t> in(p, b);
  const SequenceGradients<scalar_t> grad(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  ForwardScan<scalar_t, DD, false> scan(in, K, C, L);
  const int64_t span = p.interval + 1;
  std::vector<scalar_t> alpha_buf(span * C), sigma_buf(span * C);
  std::vector<double> off_buf(span);
  // The shared parameters' gradients are sums over every position: float32
  // sums of 10^6 terms would lose ~1e-3, so they add up in float64.
  std::vector<double> sum_trans((DD ? K : 1) * C * C, 0.0), sum_dur(K * C, 0.0);

  // Backward ring: slot e % K holds the label-c segment [t, e) with its
  // emissions, end score and beta_hat[e], relative to the backward offset Q.
  std::vector<scalar_t> ring(K * C, neg_inf<scalar_t>());
  std::vector<scalar_t> x(K * C), scaled(K * C), post(K * C), inner(K * C), pairs(C * C);
  std::vector<scalar_t> beta(C), u(C), tau(C), top(C), weight(C), covered(C), emit(C);
  // emit[c] = scores[t, c] - max_c scores[t, c]; returns that max (0 if not finite).
  auto emissions = [&](int64_t t, std::vector<scalar_t>& out) -> double {
    scalar_t mx = neg_inf<scalar_t>();
    for (int64_t c = 0; c < C; ++c) mx = nan_max(mx, in.score(t, c));
    mx = finite_or_zero(mx);
    for (int64_t c = 0; c < C; ++c) out[c] = in.score(t, c) - mx;
    return static_cast<double>(mx);
  };
  double Q = 0.0;
  double coverage = 0.0;  // the mass that covers position coverage_position(t, K)

  // The mass of "a segment boundary at t, or one segment across t" (1 in
  // exact arithmetic, times exp of the offsets' error): alpha_hat[t] at
  // offset off and the forward ring `fwd` (checkpoint layout) at fwd_offset,
  // against the backward state beta, back_ring, Q, q at t.
  auto boundary_mass = [&](int64_t t, const scalar_t* alpha, double off, const scalar_t* fwd,
                           double fwd_offset, const scalar_t* beta, const scalar_t* back_ring,
                           double Q, double q) {
    const int tK = static_cast<int>(t % K);
    const scalar_t shift_beta = static_cast<scalar_t>(off + Q - log_z);
    double total = 0.0;
    for (int64_t c = 0; c < C; ++c)
      total += static_cast<double>(fexp(alpha[c] + beta[c] + shift_beta));
    const scalar_t shift_x = static_cast<scalar_t>(fwd_offset + (Q - q) - log_z);
    for (int64_t d1 = 1; d1 <= std::min(K - 1, t); ++d1) {  // open segments [t-d1, t)
      for (int64_t d2 = 1; d1 + d2 <= K; ++d2) {
        const int64_t d = d1 + d2;
        const scalar_t* opened = fwd + (d1 - 1) * C;
        if (DD) {
          if (d1 < t) {
            scan.into(opened, in.transition + (d - 1) * C * C, nullptr);
            opened = scan.entered.data();
          }
          for (int64_t c = 0; c < C; ++c) u[c] = opened[c] + fwd[(K + d1 - 1) * C + c];
          opened = u.data();
        }
        const scalar_t* back = back_ring + slot_after(tK, d2, K) * C;  // [t, t+d2)
        const scalar_t* dur = in.duration + (d - 1) * C;
        scalar_t part = 0;
        for (int64_t c = 0; c < C; ++c) part += fexp(opened[c] + back[c] + dur[c] + shift_x);
        total += static_cast<double>(part);
      }
    }
    return total;
  };
  // A checkpoint from another algorithm (the exp-domain forward) need not
  // equal what this scan's recompute of the span before it reaches at its
  // end: their roundings differ by up to ~1e-4 relative over a long float32
  // span, and the posteriors of that span's last positions would carry it
  // until the first coverage check. So each span's recompute runs one step
  // past its end, measures the boundary mass there against the mass the next
  // span's re-anchor measured from its checkpoint (the same computation), and
  // spreads the log ratio over the span's offsets, from 0 at its own
  // checkpoint. From this scan's own checkpoints the two are bitwise equal
  // and nothing changes. Only rounding is spread so: a larger ratio (above
  // kMaxDrift) is a checkpoint that means something else, and stays in the
  // span before it, as in every backend.
  struct Anchor {
    int64_t t = -1;
    double total = 0.0, Q = 0.0, q = 0.0;
  } anchor;
  std::vector<scalar_t> anchor_beta(C), anchor_ring(K * C), ext_rows(DD ? 0 : K * C);

  for (int64_t j = ckpt.last_span(L); j >= 0; --j) {
    const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
    scan.load(first, ckpt.at(j), ckpt.offset[j]);
    scalar_t m_last = 0;
    for (int64_t t = first; t <= last; ++t) {
      const scalar_t m = scan.step(t);
      std::copy_n(scan.alpha.data(), C, alpha_buf.data() + (t - first) * C);
      std::copy_n(scan.sigma.data(), C, sigma_buf.data() + (t - first) * C);
      off_buf[t - first] = scan.offset;
      if (t < last) scan.advance(t, m);
      m_last = m;
    }
    if (!DD && anchor.t == last + 1) {
      scan.advance(last, m_last);
      double ext_offset = 0.0;
      scan.save(last + 1, ext_rows.data(), &ext_offset);
      scan.step(last + 1);
      const double total = boundary_mass(last + 1, scan.alpha.data(), scan.offset, ext_rows.data(),
                                         ext_offset, anchor_beta.data(), anchor_ring.data(),
                                         anchor.Q, anchor.q);
      const bool usable = total > 0.0 && anchor.total > 0.0 &&
                          total <= std::numeric_limits<double>::max() &&
                          anchor.total <= std::numeric_limits<double>::max();
      const double drift = usable ? std::log(total) - std::log(anchor.total) : 0.0;
      constexpr double kMaxDrift = 1e-2;
      if (drift != 0.0 && std::abs(drift) <= kMaxDrift) {
        const double span_steps = static_cast<double>(last + 1 - first);
        for (int64_t t = first; t <= last; ++t)
          off_buf[t - first] -= drift * static_cast<double>(t - first) / span_steps;
      }
    }
    anchor.t = -1;

    for (int64_t t = last; t >= first; --t) {
      const scalar_t* alpha = alpha_buf.data() + (t - first) * C;  // alpha_hat[t]
      const scalar_t* sigma = sigma_buf.data() + (t - first) * C;
      const double off = off_buf[t - first];

      const int tK = static_cast<int>(t % K);
      if (t == L) {
        auto closed = [&](int c) { return in.last(alpha[c], c); };
        log_z = off + static_cast<double>(lse<scalar_t>(static_cast<int>(C), closed));
        scalar_t q = neg_inf<scalar_t>();
        for (int64_t c = 0; c < C; ++c) q = nan_max(q, beta[c] = in.end_transition[c]);
        q = finite_or_zero(q);
        Q = q;
        const scalar_t shift = static_cast<scalar_t>(off + Q - log_z);
        for (int64_t c = 0; c < C; ++c) {
          beta[c] -= q;
          const scalar_t mass = exp(alpha[c] + beta[c] + shift) * g;
          grad.end_transition[c] = mass;
          if (grad.end_scores) grad.end_scores[(L - 1) * C + c] = mass;
        }
        std::fill(ring.begin(), ring.end(), neg_inf<scalar_t>());
        Q += emissions(L - 1, emit);
        for (int64_t c = 0; c < C; ++c) ring[tK * C + c] = beta[c] + in.end(L - 1, c) + emit[c];
        continue;
      }

      // Segments [t, t+d): x[d-1][c] = backward ring + duration score, and
      // scaled = exp(x - top[c]); tau[c] = LSE_d x shares those exps with the
      // posteriors exp(enter + x + shift).
      scalar_t shift = static_cast<scalar_t>(off + Q - log_z);
      const int64_t dmax = std::min(K, L - t);
      for (int64_t d = 1; d <= dmax; ++d) {
        const scalar_t* r = ring.data() + slot_after(tK, d, K) * C;
        const scalar_t* dur = in.duration + (d - 1) * C;
        scalar_t* row = x.data() + (d - 1) * C;
        for (int64_t c = 0; c < C; ++c) row[c] = r[c] + dur[c];
      }
      lse_columns(x.data(), dmax, C, tau.data(), top.data(), scaled.data());
      if (t == 0 && renormalises_within_spans<scalar_t>()) {
        // Every segmentation has a first segment, so the posteriors of the
        // segments starting at 0 sum to 1: measure them, and take out of Q
        // what forward and backward rounding left since the last re-anchor.
        double total = 0.0;
        for (int64_t c = 0; c < C; ++c)
          total += first_segment_mass(sigma[c], tau[c], off + Q - log_z);
        Q = renormalised(Q, total);
        shift = static_cast<scalar_t>(off + Q - log_z);
      }
      if (DD && t > 0) {
        // The start term depends on d through transition[d-1], so the
        // posterior takes its own exp: splitting it as scaled · exp(enter_d +
        // top + shift) could overflow where scaled underflows.
        for (int64_t d = 1; d <= dmax; ++d) {
          scan.into(alpha, in.transition + (d - 1) * C * C, nullptr);
          scalar_t* row = post.data() + (d - 1) * C;
          const scalar_t* xd = x.data() + (d - 1) * C;
          for (int64_t c = 0; c < C; ++c)
            row[c] = fexp(scan.entered[c] + in.start(t, c) + xd[c] + shift) * g;
        }
      } else {
        // exp(sigma + x + shift) = scaled · exp(sigma + top + shift): the
        // second factor is the posterior of the best-scoring duration, ≤ 1.
        for (int64_t c = 0; c < C; ++c) weight[c] = fexp(sigma[c] + top[c] + shift) * g;
        for (int64_t d = 1; d <= dmax; ++d) {
          scalar_t* row = post.data() + (d - 1) * C;
          const scalar_t* sc = scaled.data() + (d - 1) * C;
          for (int64_t c = 0; c < C; ++c) row[c] = sc[c] * weight[c];
        }
      }
      // Position t+d-1 lies in every segment [t, t+d') with d' >= d.
      const int64_t d_check = coverage_position(t, K) - t + 1;
      for (int64_t c = 0; c < C; ++c) covered[c] = 0;
      for (int64_t d = dmax; d >= 1; --d) {
        const scalar_t* row = post.data() + (d - 1) * C;
        double* gd = sum_dur.data() + (d - 1) * C;
        scalar_t* gs = grad.scores + (t + d - 1) * C;
        for (int64_t c = 0; c < C; ++c) {
          gd[c] += row[c];
          covered[c] += row[c];
          gs[c] += covered[c];
        }
        if (renormalises_within_spans<scalar_t>() && d == d_check)
          for (int64_t c = 0; c < C; ++c) coverage += static_cast<double>(covered[c]);
      }
      if (coverage_checked_at<scalar_t>(t, K, last, L)) {
        Q = renormalised(Q, coverage / static_cast<double>(g));
        shift = static_cast<scalar_t>(off + Q - log_z);
      }
      if (t % K == 0) coverage = 0.0;
      if (grad.start_scores) std::copy_n(covered.data(), C, grad.start_scores + t * C);
      if (t == 0) {
        std::copy_n(covered.data(), C, grad.start_transition);
        break;
      }

      // beta[t, c']: the backward score of "a segment ended at t", and the
      // transition posteriors exp(alpha[c'] + v[c] + shift), sharing exps.
      if (!DD) {
        for (int64_t c = 0; c < C; ++c) u[c] = in.start(t, c) + tau[c];
        for (int64_t cp = 0; cp < C; ++cp) {
          scalar_t* row = pairs.data() + cp * C;
          const scalar_t* tr = in.transition + cp * C;
          for (int64_t c = 0; c < C; ++c) row[c] = tr[c] + u[c];
        }
        // Rows are c' here: reduce each row over c.
        for (int64_t cp = 0; cp < C; ++cp) {
          const scalar_t* row = pairs.data() + cp * C;
          scalar_t mx = neg_inf<scalar_t>();
          for (int64_t c = 0; c < C; ++c) mx = nan_max(mx, row[c]);
          if (mx == neg_inf<scalar_t>()) {
            beta[cp] = mx;
            continue;
          }
          const scalar_t w = fexp(alpha[cp] + mx + shift) * g;
          scalar_t sum = 0;
          double* gt = sum_trans.data() + cp * C;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t e = fexp(row[c] - mx);
            sum += e;
            gt[c] += e * w;
          }
          beta[cp] = mx + std::log(sum);
        }
      } else {
        for (int64_t cp = 0; cp < C; ++cp) {
          scalar_t mx = neg_inf<scalar_t>();
          for (int64_t d = 1; d <= dmax; ++d) {
            const scalar_t* tr = in.transition + ((d - 1) * C + cp) * C;
            const scalar_t* xd = x.data() + (d - 1) * C;
            scalar_t* row = inner.data() + (d - 1) * C;
            for (int64_t c = 0; c < C; ++c) {
              row[c] = tr[c] + in.start(t, c) + xd[c];
              mx = nan_max(mx, row[c]);
            }
          }
          if (mx == neg_inf<scalar_t>()) {
            beta[cp] = mx;
            continue;
          }
          const scalar_t w = fexp(alpha[cp] + mx + shift) * g;
          scalar_t sum = 0;
          for (int64_t d = 1; d <= dmax; ++d) {
            const scalar_t* row = inner.data() + (d - 1) * C;
            double* gt = sum_trans.data() + ((d - 1) * C + cp) * C;
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t e = fexp(row[c] - mx);
              sum += e;
              gt[c] += e * w;
            }
          }
          beta[cp] = mx + std::log(sum);
        }
      }
      scalar_t q = neg_inf<scalar_t>();
      for (int64_t c = 0; c < C; ++c) q = nan_max(q, beta[c]);
      q = finite_or_zero(q);
      Q += q;
      const scalar_t shift_beta = static_cast<scalar_t>(off + Q - log_z);
      for (int64_t c = 0; c < C; ++c) {
        beta[c] -= q;
        if (grad.end_scores)
          grad.end_scores[(t - 1) * C + c] = fexp(alpha[c] + beta[c] + shift_beta) * g;
      }
      if (t == first) {
        // Re-anchor Q at every checkpoint: a segment boundary at t, or one
        // segment across t, has probability 1, so the rounding that forward
        // and backward gather over (t, L] cannot pile up over the sequence.
        const double total = boundary_mass(t, alpha, off, ckpt.at(j), ckpt.offset[j], beta.data(),
                                           ring.data(), Q, q);
        if (!DD) {  // kept for the span before this one (see below)
          anchor = Anchor{t, total, Q, q};
          std::copy(beta.begin(), beta.end(), anchor_beta.begin());
          std::copy(ring.begin(), ring.end(), anchor_ring.begin());
        }
        Q = renormalised(Q, total);
      }

      // Move the ring to step t-1: re-base, open the segments ending at t,
      // add position t-1's emissions (their max moves into Q, as forward).
      Q += emissions(t - 1, emit);
      for (int64_t slot = 0; slot < K; ++slot) {
        scalar_t* r = ring.data() + slot * C;
        if (slot == tK) {
          for (int64_t c = 0; c < C; ++c) r[c] = beta[c] + in.end(t - 1, c) + emit[c];
        } else {
          for (int64_t c = 0; c < C; ++c) r[c] = (r[c] - q) + emit[c];
        }
      }
    }
  }
  std::copy(sum_trans.begin(), sum_trans.end(), grad.transition);
  std::copy(sum_dur.begin(), sum_dur.end(), grad.duration);
}

// ---------------------------------------------------------------------------
// The scaled exp-domain backward (both transition forms). It walks the
// spans as the log-domain backward above does, re-anchoring at every
// checkpoint, but keeps every message as a float64 probability relative to
// a float64 log offset: a span's forward recompute (from the log-layout
// checkpoint) and the beta sweep cost K·C multiply-adds and O(C) exps a
// position instead of K·C + C² exps (with the (K, C, C) transition, 4 K·C²
// multiply-adds instead of ~3 K·C² exps). Float64 inside, whatever the dtype: it
// rounds 1e-16 a step, so a span's recompute is consistent with its
// checkpoint to the last bits and needs no renormalisation, and it
// underflows only 708 nats below the normaliser.
//
// Exactness is certified, not assumed. Every computed posterior is a sum of
// products of nonnegative terms, at most the exact one times rounding:
// underflow can only lose mass. The posteriors of the segments that cover a
// position sum to 1 in exact arithmetic, so the kernel sums them for every
// position and accepts the sequence only if every sum is 1 within
// exp_backward_tolerance, every re-anchor measures the boundary mass it
// must, no checkpoint entry underflows on loading, and log Z (from this
// recompute) agrees with the log-domain scan of the last span. Otherwise
// the caller reruns the log-domain backward for the sequence.
// docs/design.md has the argument.

// The certificate's tolerances. Coverage and re-anchoring compare float64
// sums of float64 products: their rounding is a few ulp of the float64
// offsets (1e-16 · |log Z|) plus the float32 inputs' conversion, far below
// both dtypes' targets. log Z is compared with the log-domain scan of the
// last span, whose own rounding grows with the span: eps · |log Z| per step
// in its float64 offset, and (float32) ~eps32 · |entries| in its messages.
template <typename scalar_t>
double exp_backward_tolerance(double log_z) {
  const double own = 16.0 * std::numeric_limits<double>::epsilon() * std::abs(log_z);
  return (sizeof(scalar_t) < sizeof(double) ? 1e-6 : 1e-10) + own;
}
template <typename scalar_t>
double exp_backward_log_z_tolerance(double log_z, int64_t steps) {
  const double root = std::sqrt(static_cast<double>(steps + 1));
  const double offset = 8.0 * std::numeric_limits<double>::epsilon() * std::abs(log_z) * root;
  return offset + (sizeof(scalar_t) < sizeof(double) ? 4e-6 : 1e-12) * root;
}

// exp in float64 written so that loops calling it vectorise (std::exp does
// not): Cody-Waite reduction to |r| <= ln2/2 and the Taylor polynomial to
// degree 13 (truncation 4e-18 relative), ~2 ulp. exp(-inf) = 0, NaN stays
// NaN; results below 2^-1021 flush to 0 (as flush-to-zero would make them)
// and above 2^1023 are inf.
__attribute__((always_inline)) inline double exp_f64(double x) {
  const double lo = -708.0, hi = 709.08;
  const double xc = x < lo ? lo : (x > hi ? hi : x);
  const double n = (xc * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
  const double r = (xc - n * 0.693145751953125) - n * 1.4286068203094172321e-6;
  double y = 1.0 / 6227020800.0;
  y = y * r + 1.0 / 479001600.0;
  y = y * r + 1.0 / 39916800.0;
  y = y * r + 1.0 / 3628800.0;
  y = y * r + 1.0 / 362880.0;
  y = y * r + 1.0 / 40320.0;
  y = y * r + 1.0 / 5040.0;
  y = y * r + 1.0 / 720.0;
  y = y * r + 1.0 / 120.0;
  y = y * r + 1.0 / 24.0;
  y = y * r + 1.0 / 6.0;
  y = y * r + 0.5;
  y = y * r + 1.0;
  y = y * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  double res = y * scale;
  res = x < lo ? 0.0 : res;
  res = x > hi ? std::numeric_limits<double>::infinity() : res;
  return x != x ? x : res;
}

// out[c] = exp_f64(x[c]) for c < n.
inline void exp_row_f64(const double* __restrict x, double* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = exp_f64(x[c]);
}

// A ring entry x0 of age `age` moved on by one step: times the label's
// factor, or exactly 0 once older than `last`, its label's longest
// duration; lm keeps the largest moved entry.
__attribute__((always_inline)) inline double moved_entry(double x0, double age, double last,
                                                         double scale, double& lm) {
  const double moved = age < last ? x0 * scale : 0.0;
  lm = moved > lm ? moved : lm;
  return moved;
}

// The passes of the exp-domain backward over its rings, a group of label
// chunks at a time (C % 8 == 0, for_chunk_groups), so that the per-label
// sums stay in registers across the durations instead of going through
// memory for every row. The generic loops in ExpBackward are the same
// arithmetic in the same order.

// Forward recompute, step t: acc[c] = sum_{d <= n} ring[t-d][c] · W[d-1][c];
// with ADVANCE, every entry also moves to the next step: times scale[c], or
// to exactly 0 once older than last[c], the label's longest duration (it
// meets only zero weights from then on, and must neither set a normaliser
// nor overflow); lm[c] receives the largest moved entry.
template <bool ADVANCE, int NC>
inline void forward_pass_chunks(double* ring, const double* W, const double* last,
                                const double* scale, double* acc, double* lm, int tK, int64_t n,
                                int64_t K, int64_t C, int64_t c0) {
  constexpr int kW = NC * kRingLanes;
  double a[kW] = {}, mx[kW] = {}, sc[kW], lt[kW];
  for (int k = 0; k < kW; ++k) {
    sc[k] = scale[c0 + k];
    lt[k] = last[c0 + k];
  }
  for (int64_t d = 1; d <= n; ++d) {
    double* __restrict r = ring + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * C + c0;
    const double* __restrict w = W + (d - 1) * C + c0;
    const double age = static_cast<double>(d);
#pragma omp simd
    for (int k = 0; k < kW; ++k) {
      const double x0 = r[k];
      a[k] += x0 * w[k];
      if (ADVANCE) r[k] = moved_entry(x0, age, lt[k], sc[k], mx[k]);
    }
  }
  for (int k = 0; k < kW; ++k) {
    acc[c0 + k] = a[k];
    if (ADVANCE) lm[c0 + k] = mx[k];
  }
}
template <bool ADVANCE>
void forward_pass8(double* ring, const double* W, const double* last, const double* scale,
                   double* acc, double* lm, int tK, int64_t n, int64_t K, int64_t C) {
  for_chunk_groups(C, [&](int64_t c0, auto nc) {
    forward_pass_chunks<ADVANCE, decltype(nc)::value>(ring, W, last, scale, acc, lm, tK, n, K, C,
                                                      c0);
  });
}

// Backward sweep, step t: for d = dmax … 1, x = ring[t+d][c] · W[d-1][c]
// into tau, the posterior x · ws into sum_dur[d-1], the running coverage
// into pending (position t+d-1); with MOVE, the entry moves to step t-1 as
// in forward_pass8.
template <bool MOVE, int NC>
inline void backward_pass_chunks(double* ring, const double* W, const double* last,
                                 const double* ws, const double* scale, double* tau,
                                 double* covered, double* lm, double* sum_dur, double* pending,
                                 int64_t t, int tK, int64_t dmax, int64_t K, int64_t C,
                                 int64_t c0) {
  constexpr int kW = NC * kRingLanes;
  double ta[kW] = {}, cv[kW] = {}, mx[kW] = {}, wv[kW], sc[kW], lt[kW];
  for (int k = 0; k < kW; ++k) {
    wv[k] = ws[c0 + k];
    sc[k] = scale[c0 + k];
    lt[k] = last[c0 + k];
  }
  // pending's slot of position t+d-1, stepped down with d (no division).
  int64_t slot = (t + dmax - 1) % K;
  for (int64_t d = dmax; d >= 1; --d, slot = slot == 0 ? K - 1 : slot - 1) {
    double* __restrict r = ring + slot_after(tK, static_cast<int>(d), static_cast<int>(K)) * C + c0;
    const double* __restrict w = W + (d - 1) * C + c0;
    double* __restrict sd = sum_dur + (d - 1) * C + c0;
    double* __restrict pd = pending + slot * C + c0;
    const double age = static_cast<double>(d);
#pragma omp simd
    for (int k = 0; k < kW; ++k) {
      const double x0 = r[k];
      const double xv = x0 * w[k];
      ta[k] += xv;
      const double post = xv * wv[k];
      sd[k] += post;
      cv[k] += post;
      pd[k] += cv[k];
      if (MOVE) r[k] = moved_entry(x0, age, lt[k], sc[k], mx[k]);
    }
  }
  for (int k = 0; k < kW; ++k) {
    tau[c0 + k] = ta[k];
    covered[c0 + k] = cv[k];
    if (MOVE) lm[c0 + k] = mx[k];
  }
}
template <bool MOVE>
void backward_pass8(double* ring, const double* W, const double* last, const double* ws,
                    const double* scale, double* tau, double* covered, double* lm,
                    double* sum_dur, double* pending, int64_t t, int tK, int64_t dmax, int64_t K,
                    int64_t C) {
  for_chunk_groups(C, [&](int64_t c0, auto nc) {
    backward_pass_chunks<MOVE, decltype(nc)::value>(ring, W, last, ws, scale, tau, covered, lm,
                                                    sum_dur, pending, t, tK, dmax, K, C, c0);
  });
}


// The normaliser of a ring move: the power of two 2^-e that brings `top`
// (the move's largest entry) into [1, 2), clamped to a normal number; 1
// where top is 0 or not finite. A power of two scales every entry without
// rounding, and its log, -e·ln2, needs no call to log.
struct Normaliser {
  double value = 1.0, log = 0.0;
};
inline Normaliser normaliser_for(double top) {
  if (!(top > 0.0 && top < std::numeric_limits<double>::infinity())) return {};
  const int e = std::max(exponent_of(top), -1022);
  const int64_t bits = static_cast<int64_t>(1023 - e) << 52;
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return {value, -static_cast<double>(e) * kLn2};
}

// A float64 log offset kept as an unevaluated sum hi + lo (two-sum): an
// offset of 1e5 gathers 1e-11 of rounding per addition, which thousands of
// steps would turn into 1e-8 of relative error on every posterior.
struct Offset {
  double hi = 0.0, lo = 0.0;
  void add(double x) {
    const double s = hi + x, bb = s - hi;
    lo += (hi - (s - bb)) + (x - bb);
    hi = s;
  }
  Offset plus(double x) const { return {hi, lo + x}; }
};

// out[k] = sum_{r < n} a[r] · M[r·stride + k] for k < len: the (K, C, C)
// backward's mat-vecs. Blocks of W outputs stay in registers across r
// (W / 4 independent chains of vector multiply-adds), the sums in the order
// of r.
template <int W>
inline void vecmat_block(const double* a, const double* M, double* out, int64_t n,
                         int64_t stride) {
  double s[W] = {};
  for (int64_t r = 0; r < n; ++r) {
    const double x = a[r];
    const double* __restrict row = M + r * stride;
#pragma omp simd
    for (int j = 0; j < W; ++j) s[j] += x * row[j];
  }
  for (int j = 0; j < W; ++j) out[j] = s[j];
}
// The columns k0 … len-1 of a · M one by one (fewer than 8 remain).
inline void vecmat_tail(const double* a, const double* M, double* out, int64_t n, int64_t k0,
                        int64_t len, int64_t stride) {
  for (; k0 < len; ++k0) {
    double s = 0.0;
    for (int64_t r = 0; r < n; ++r) s += a[r] * M[r * stride + k0];
    out[k0] = s;
  }
}
inline void vecmat(const double* a, const double* M, double* out, int64_t n, int64_t len,
                   int64_t stride) {
  int64_t k0 = 0;
  for (; k0 + 32 <= len; k0 += 32) vecmat_block<32>(a, M + k0, out + k0, n, stride);
  if (len - k0 >= 24) {
    vecmat_block<24>(a, M + k0, out + k0, n, stride);
    k0 += 24;
  } else if (len - k0 >= 16) {
    vecmat_block<16>(a, M + k0, out + k0, n, stride);
    k0 += 16;
  }
  if (len - k0 >= 8) {
    vecmat_block<8>(a, M + k0, out + k0, n, stride);
    k0 += 8;
  }
  vecmat_tail(a, M, out, n, k0, len, stride);
}

// The (K, C, C) forward recompute's mat-vecs: out_p[(d-1)·C + k] =
// sum_{r < C} a_p[d-1][r] · A[r·stride + (d-1)·C + k] for d ≤ nd, k < C,
// for P = 1 or 2 sets of row vectors a_p (two positions' segment starts:
// the table, streamed from L2, is read once for both). One vecmat per
// duration runs a few chains of C dependent multiply-adds; here D
// durations (adjacent in A's rows) times P vectors share the pass over r,
// D·P·V chains of four lanes in flight (at most 12 vectors: no spills with
// 16 registers). Every output is still summed over r in ascending order,
// as vecmat sums it.
template <int V, int D, int P>
inline void vecmat_durations_block(const double* const* const* a, const double* M,
                                   double* const* out, int64_t nd, int64_t C, int64_t stride) {
  if constexpr (D > 1)
    if (nd < D) return vecmat_durations_block<V, D - 1, P>(a, M, out, nd, C, stride);
  int64_t g0 = 0;
  for (; g0 + D <= nd; g0 += D) {
    f64x4 s[P][D][V] = {};
    for (int64_t r = 0; r < C; ++r) {
      const double* row = M + r * stride + g0 * C;
      for (int g = 0; g < D; ++g)
        for (int q = 0; q < P; ++q) {
          const double xs = a[q][g0 + g][r];
          const f64x4 x = {xs, xs, xs, xs};
          for (int j = 0; j < V; ++j) s[q][g][j] += x * load_lanes<4>(row + g * C + 4 * j);
        }
    }
    for (int q = 0; q < P; ++q)
      for (int g = 0; g < D; ++g)
        for (int j = 0; j < V; ++j) store_lanes(out[q] + (g0 + g) * C + 4 * j, s[q][g][j]);
  }
  if constexpr (D > 1)
    if (g0 < nd) {
      const double* const* a2[P];
      double* o2[P];
      for (int q = 0; q < P; ++q) {
        a2[q] = a[q] + g0;
        o2[q] = out[q] + g0 * C;
      }
      vecmat_durations_block<V, D - 1, P>(a2, M + g0 * C, o2, nd - g0, C, stride);
    }
}
template <int V, int P>
inline void vecmat_durations_cols(const double* const* const* a, const double* M,
                                  double* const* out, int64_t k0, int64_t nd, int64_t C,
                                  int64_t stride) {
  constexpr int D = 12 / (V * P) < 4 ? (12 / (V * P) > 0 ? 12 / (V * P) : 1) : 4;
  double* o[P];
  for (int q = 0; q < P; ++q) o[q] = out[q] + k0;
  vecmat_durations_block<V, D, P>(a, M + k0, o, nd, C, stride);
}
template <int P>
inline void vecmat_durations(const double* const* const* a, const double* M, double* const* out,
                             int64_t nd, int64_t C, int64_t stride) {
  int64_t k0 = 0;
  for (; k0 + 24 <= C; k0 += 24) vecmat_durations_cols<6, P>(a, M, out, k0, nd, C, stride);
  if (C - k0 >= 16) {
    vecmat_durations_cols<4, P>(a, M, out, k0, nd, C, stride);
    k0 += 16;
  } else if (C - k0 >= 8) {
    vecmat_durations_cols<2, P>(a, M, out, k0, nd, C, stride);
    k0 += 8;
  }
  // The last C % 8 columns as vecmat takes them (the same loop, so that
  // the compiler rounds them alike).
  if (k0 < C)
    for (int q = 0; q < P; ++q)
      for (int64_t g = 0; g < nd; ++g)
        vecmat_tail(a[q][g], M + g * C, out[q] + g * C, C, k0, C, stride);
}

// max(0, max over c of x[c] · y[c]), four lanes at a time (the same max in
// any order).
inline double max_product(const double* x, const double* y, int64_t C) {
  f64x4 top = {};
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const f64x4 p = load_lanes<4>(x + c) * load_lanes<4>(y + c);
    top = p > top ? p : top;
  }
  double out = max_lane(top);
  for (; c < C; ++c) out = std::max(out, x[c] * y[c]);
  return out;
}

// DD: the duration-dependent (K, C, C) transition. Its forward recompute
// keeps the exp-domain forward's two rings (alpha_hat of each open
// segment's start, and a gain per label with that start's scale, the start
// score and the emissions since), so that segment [s, t) of label c weighs
// (alpha_hat[s] · A_d)[c] · gain[s][c] · W[d-1][c]: K mat-vecs a position.
// The backward ring is the static one; at a position t ≥ 1 the posteriors
// of the segments [t, t+d) take alpha_hat[t] · A_d for every d, beta_hat
// the K mat-vecs A_d · v_d and the transition posteriors K outer products:
// K·C² multiply-adds each, never exps.
template <typename scalar_t, bool DD>
struct ExpBackward {
  static constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const SequenceInputs<scalar_t>& in;
  const int64_t K, C, L;
  const int64_t Cp;  // C padded to whole chunks of kRingLanes (the static mat-vecs' tables)

  // Per-call tables, float64.
  std::vector<double> dur_max;  // (C) finite max over d of duration (0 if none)
  std::vector<double> W;        // (K, C) exp(duration - dur_max)
  // Labels that can reach an end (forward) or be reached from a start
  // (backward), a fixed point over the finite transitions: the others carry
  // no mass to Z, and are kept at exactly 0 so that they cannot set a
  // normaliser. *_last: the longest duration of such a label, else 0;
  // keep_f: (K, C) 1 where a forward entry of age d can still matter after
  // a move.
  std::vector<int> fwd_last, bwd_last;
  std::vector<double> keep_f, fwd_last_d, bwd_last_d;
  std::vector<int> last_raw;    // (C) longest finite duration (0: none)
  std::vector<double> col_max;  // (C) finite max over c' (and d, DD) of transition[(d,) c', c]
  // exp(transition - col_max[c]) as (C, C), or DD as (C, K, C): entry
  // [c'][d-1][c], so that everything leaving c' is one contiguous row.
  std::vector<double> A;
  // Static: A and its transpose with rows padded to Cp, for the mat-vecs.
  std::vector<double> A_pad, At_pad;
  // DD: the ring entry of a label-c segment, times its weight, is relative
  // to the offset + seg_max[c] (static: dur_max[c]); u0 = exp(start_transition
  // - col_max - first_max) is the first segment's alpha_hat · A_d (for every
  // d); tables_flush: a finite entry of A or u0 underflowed (the log backward
  // takes such parameters, as the forward's log scan does).
  std::vector<double> seg_max, u0;
  double first_max = 0.0;
  bool tables_flush = false;
  // Without start/end scores most per-label factors of a step are a table
  // times one exp: e_dur = exp(dur_max - its max), e_col = exp(col_max -
  // its max), e_cd = exp(col_max + dur_max - its max) (usable only where
  // no entry underflows).
  std::vector<double> e_dur, e_col, e_cd;
  double dur_top = 0.0, col_top = 0.0, cd_top = 0.0;
  bool tables_ok = false;

  // The span's forward messages: alpha_hat[t] relative to aoff[t], sigma_hat
  // relative to soff[t].
  std::vector<double> ahat, shat;
  std::vector<Offset> aoff, soff;
  // Forward ring (circular, slot s % K), relative to Oa; DD: the gains, and
  // aring the alpha_hat of each slot's start (relative to the gain's
  // scale; the slot of s = 0 holds u0).
  std::vector<double> fring, aring;
  Offset Oa;
  // The checkpoint's ring in duration order (row d-1: [t-d, t); DD: K alpha
  // rows then K gain rows), relative to ck_off.
  std::vector<double> ck_rows;
  Offset ck_off;
  // exp(scores[t] - m_t) and m_t, the emission max, at the span's positions:
  // the forward recompute's, reused by the backward sweep.
  std::vector<double> fe_buf, m_buf;
  // The largest entry of each label that can still matter, in the forward
  // and backward rings: the next step's normaliser.
  std::vector<double> lm_f, lm_b;
  // Scratch.
  std::vector<double> acc, u, fe, fs, fnew, lg, arg, ex, tau, v, bet, ws, covered, fval, wrow;
  std::vector<double> row_scale;  // DD: (K) the checkpoint's alpha rows' maxima
  // The last few positions' v-parts (kBatch, C; DD: v_d, (kBatch, K, C),
  // the slot of this one holding ring · W first) and alpha-parts (kBatch,
  // C), whose transition posteriors join trans_acc together
  // (flush_transitions): trans_acc is read and written once a batch.
  static constexpr int64_t kBatch = 8;
  // flush_transitions' register block, R rows by V vectors of four: R·V
  // sums and V entries of v in vector registers (16 with AVX2, 32 with
  // AVX-512's).
#if defined(__AVX512F__)
  static constexpr int kFlushRows = 4, kFlushVectors = 4;
#else
  static constexpr int kFlushRows = 4, kFlushVectors = 2;
#endif
  std::vector<double> vbatch, wbatch;
  int64_t n_batch = 0;
  std::vector<double> ubuf;       // DD: (K, C) alpha_hat[t] · A_d for every d
  // DD forward recompute: (K, C) alpha_hat[t-d] · A_d for every d, and the
  // ring rows alpha_hat[t-d].
  // unext: step t+1's rows d ≥ 2 when made along (opened_for = t+1).
  std::vector<double> uopen, unext;
  std::vector<const double*> arows;
  int64_t opened_for = -1;
  bool opened_next = false;
  std::vector<double> trans_acc;  // as A: sum over t of alpha-part · v-part
  std::vector<double> sum_dur;    // (K, C)
  std::vector<double> pending;    // (K, C): score gradients of positions not yet complete
  // Backward ring (slot e % K: the segment [t, e)), relative to Q; beta_hat
  // relative to Qb.
  std::vector<double> bring;
  Offset Q, Qb;
  double log_z = 0.0;
  double tol;  // set with log Z (exp_backward_tolerance)
  bool failed = false;

  ExpBackward(const SequenceInputs<scalar_t>& in_, int64_t K_, int64_t C_, int64_t L_,
              int64_t span)
      : in(in_), K(K_), C(C_), L(L_), Cp(padded_labels(C_)), dur_max(C_, 0.0), W(K_ * C_), fwd_last(C_, 0), bwd_last(C_, 0), keep_f(K_ * C_), fwd_last_d(C_), bwd_last_d(C_),
        last_raw(C_, 0), col_max(C_, 0.0), A(n_matrices() * C_ * C_),
        A_pad(DD ? 0 : C_ * Cp, 0.0), At_pad(DD ? 0 : C_ * Cp, 0.0),
        seg_max(C_), u0(DD ? C_ : 0), e_dur(C_), e_col(C_), e_cd(C_), ahat((span + 1) * C_),
        shat((span + 1) * C_), aoff(span + 1), soff(span + 1), fring(K_ * C_, 0.0),
        aring(DD ? K_ * C_ : 0, 0.0), ck_rows((DD ? 2 : 1) * K_ * C_), fe_buf((span + 1) * C_),
        m_buf(span + 1), lm_f(C_, 0.0), lm_b(C_, 0.0), acc(C_), u(Cp, 0.0), fe(C_), fs(C_), fnew(C_),
        lg(C_), arg(C_), ex(C_), tau(C_), v(C_), bet(Cp, 0.0), ws(C_), covered(C_), fval(C_),
        wrow(C_), row_scale(DD ? K_ : 0), vbatch(kBatch * (DD ? K_ : 1) * C_),
        wbatch(kBatch * C_), ubuf(DD ? K_ * C_ : 0), uopen(DD ? K_ * C_ : 0), unext(DD ? K_ * C_ : 0),
        arows(DD ? K_ : 0),
        trans_acc(n_matrices() * C_ * C_, 0.0),
        sum_dur(K_ * C_, 0.0), pending(K_ * C_, 0.0), bring(K_ * C_, 0.0),
        tol(0.0) {
    // transition[c', c] (static) or transition[d-1, c', c] (DD), as a double.
    auto trans = [&](int64_t d, int64_t cp, int64_t c) {
      return static_cast<double>(DD ? in.trans(d, cp, c) : in.trans(cp, c));
    };
    const int64_t n_tr = n_matrices();
    for (int64_t c = 0; c < C; ++c) {
      double mx = kNegInf;
      for (int64_t d = 1; d <= K; ++d) {
        const double w = in.dur(d, c);
        if (w > kNegInf) last_raw[c] = static_cast<int>(d);
        mx = std::max(mx, w);
      }
      dur_max[c] = mx > kNegInf ? mx : 0.0;
      for (int64_t d = 1; d <= K; ++d) {
        W[(d - 1) * C + c] = std::exp(static_cast<double>(in.dur(d, c)) - dur_max[c]);

      }
      mx = kNegInf;
      for (int64_t d = 1; d <= n_tr; ++d)
        for (int64_t cp = 0; cp < C; ++cp) mx = std::max(mx, trans(d, cp, c));
      col_max[c] = mx > kNegInf ? mx : 0.0;
      for (int64_t d = 1; d <= n_tr; ++d)
        for (int64_t cp = 0; cp < C; ++cp) {
          const double x = trans(d, cp, c);
          const double a = std::exp(x - col_max[c]);
          tables_flush = tables_flush || (DD && x > kNegInf && a == 0.0);
          A[(cp * n_tr + d - 1) * C + c] = a;
          if (!DD) {
            A_pad[cp * Cp + c] = a;
            At_pad[c * Cp + cp] = a;
          }
        }
      seg_max[c] = DD ? col_max[c] + dur_max[c] : dur_max[c];
    }
    dur_top = *std::max_element(dur_max.begin(), dur_max.end());
    col_top = *std::max_element(col_max.begin(), col_max.end());
    cd_top = kNegInf;
    for (int64_t c = 0; c < C; ++c) cd_top = std::max(cd_top, col_max[c] + dur_max[c]);
    tables_ok = true;
    for (int64_t c = 0; c < C; ++c) {
      e_dur[c] = std::exp(dur_max[c] - dur_top);
      e_col[c] = std::exp(col_max[c] - col_top);
      e_cd[c] = std::exp(col_max[c] + dur_max[c] - cd_top);
      tables_ok = tables_ok && e_dur[c] > 0.0 && e_col[c] > 0.0 && e_cd[c] > 0.0;
    }
    std::vector<char> to_end(C, 0), from_start(C, 0);
    for (int64_t c = 0; c < C; ++c) {
      to_end[c] = last_raw[c] > 0 && in.end_transition[c] > neg_inf<scalar_t>();
      from_start[c] = last_raw[c] > 0 && in.start_transition[c] > neg_inf<scalar_t>();
    }
    // linked[c][c2]: a finite transition c -> c2 (for some duration, DD).
    std::vector<char> linked(C * C, 0);
    for (int64_t d = 1; d <= n_tr; ++d)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t c2 = 0; c2 < C; ++c2) linked[c * C + c2] |= trans(d, c, c2) > kNegInf;
    for (bool changed = true; changed;) {
      changed = false;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t c2 = 0; c2 < C; ++c2) {
          if (!linked[c * C + c2] || last_raw[c] == 0 || last_raw[c2] == 0) continue;
          if (!to_end[c] && to_end[c2]) to_end[c] = changed = true;
          if (from_start[c] && !from_start[c2]) from_start[c2] = changed = true;
        }
    }
    for (int64_t c = 0; c < C; ++c) {
      fwd_last[c] = to_end[c] ? last_raw[c] : 0;
      bwd_last[c] = from_start[c] ? last_raw[c] : 0;
      fwd_last_d[c] = fwd_last[c];
      bwd_last_d[c] = bwd_last[c];
      for (int64_t d = 1; d <= K; ++d) {
        keep_f[(d - 1) * C + c] = d + 1 <= fwd_last[c] ? 1.0 : 0.0;
      }
    }
    if (DD) {
      double fm = kNegInf;
      for (int64_t c = 0; c < C; ++c)
        if (fwd_last[c] > 0)
          fm = std::max(fm, static_cast<double>(in.start_transition[c]) - col_max[c]);
      first_max = fm > kNegInf ? fm : 0.0;
      for (int64_t c = 0; c < C; ++c) {
        const double x = static_cast<double>(in.start_transition[c]) - col_max[c] - first_max;
        u0[c] = fwd_last[c] > 0 ? std::exp(x) : 0.0;
        tables_flush = tables_flush || (fwd_last[c] > 0 && x > kNegInf && u0[c] == 0.0);
      }
    }
  }

  int64_t n_matrices() const { return DD ? K : 1; }

  // NaN or +inf anywhere: the log backward gives the NaN. So it does with
  // tables that flushed a finite entry.
  static bool bad(scalar_t v) { return !(v < std::numeric_limits<scalar_t>::infinity()); }
  bool bad_inputs() const {
    bool any = tables_flush;
    for (int64_t i = 0; i < n_matrices() * C * C; ++i) any |= bad(in.transition[i]);
    for (int64_t i = 0; i < K * C; ++i) any |= bad(in.duration[i]);
    for (int64_t c = 0; c < C; ++c) any |= bad(in.start_transition[c]) | bad(in.end_transition[c]);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t c = 0; c < C; ++c)
        any |= bad(in.score(t, c)) | bad(in.start(t, c)) | bad(in.end(t, c));
    return any;
  }

  // Scaled copies of a log-layout ring (rows d-1 = [t-d, t), relative to
  // off): out = exp(row - M), *out_off = off + M, M the finite max.
  void scaled_rows(const scalar_t* rows, double off, double* out, Offset* out_off) const {
    double M = kNegInf;
    for (int64_t i = 0; i < K * C; ++i) M = std::max(M, static_cast<double>(rows[i]));
    if (M == kNegInf) M = 0.0;
    for (int64_t i = 0; i < K * C; ++i) out[i] = std::exp(static_cast<double>(rows[i]) - M);
    *out_off = Offset{off, M};
  }

  // Checkpoint j of the span starting at `first` into the forward ring.
  bool load(int64_t first, const scalar_t* rows, double off) {
    opened_for = -1;
    if (DD) return load_dd(first, rows, off);
    scaled_rows(rows, off, ck_rows.data(), &ck_off);
    // Entries older than their label's longest duration meet only zero
    // weights; the exp-domain forward keeps them (capped), so they must not
    // set the scale.
    bool rescale = false;
    for (int64_t d = 1; d <= K; ++d)
      for (int64_t c = 0; c < C; ++c)
        if (d > fwd_last[c] && ck_rows[(d - 1) * C + c] > 0) rescale = true;
    if (rescale) {
      double M = kNegInf;
      for (int64_t d = 1; d <= K; ++d)
        for (int64_t c = 0; c < C; ++c)
          if (d <= fwd_last[c]) M = std::max(M, static_cast<double>(rows[(d - 1) * C + c]));
      if (M == kNegInf) M = 0.0;
      for (int64_t d = 1; d <= K; ++d)
        for (int64_t c = 0; c < C; ++c)
          ck_rows[(d - 1) * C + c] =
              d <= fwd_last[c] ? std::exp(static_cast<double>(rows[(d - 1) * C + c]) - M) : 0.0;
      ck_off = Offset{off, M};
    }
    // A finite entry that underflows here is mass lost before any check
    // could see it: the log backward takes the sequence.
    for (int64_t d = 1; d <= K; ++d)
      for (int64_t c = 0; c < C; ++c)
        if (d <= fwd_last[c] && ck_rows[(d - 1) * C + c] == 0.0 &&
            rows[(d - 1) * C + c] > neg_inf<scalar_t>())
          return false;
    const int tK = static_cast<int>(first % K);
    for (int64_t d = 1; d <= K; ++d)
      std::copy_n(ck_rows.data() + (d - 1) * C, C,
                  fring.data() + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * C);
    Oa = ck_off;
    for (int64_t c = 0; c < C; ++c) {
      lm_f[c] = 0.0;
      for (int64_t d = 1; d <= K; ++d)
        lm_f[c] = std::max(lm_f[c], ck_rows[(d - 1) * C + c] * keep_f[(d - 1) * C + c]);
    }
    return true;
  }

  // DD: the alpha rows (row d-1: alpha at t-d relative to the log scan's
  // offset after that step; for t-d = 0 the start transitions) times A_d's
  // scale, each row scaled to its largest entry of a label that can reach an
  // end (the others carry no mass to Z: 0); the row of the first segment in
  // u0's terms. The gain rows (relative to the checkpoint's offset less
  // their alpha row's) take each alpha row's scale, and the ring its
  // largest entry that can still matter. A finite entry that matters and
  // underflows fails, as in load. Both scales leave a factor 8 of headroom:
  // the exp-domain forward keeps entries down to float64's smallest normal
  // relative to its own normaliser, which differs from these maxima by up
  // to a factor 2 (its alpha_hat rows are normalised to within one), and
  // such an entry must not flush here.
  bool load_dd(int64_t first, const scalar_t* rows, double off) {
    constexpr double kHeadroom = 3.0 * kLn2;
    for (int64_t d = 1; d <= K; ++d) {
      const scalar_t* ar = rows + (d - 1) * C;
      double* out = ck_rows.data() + (d - 1) * C;
      const bool start_row = first - d == 0;
      double M = kNegInf;
      for (int64_t c = 0; c < C; ++c)
        if (fwd_last[c] > 0)
          M = std::max(M, static_cast<double>(ar[c]) - (start_row ? col_max[c] : 0.0));
      M = M == kNegInf ? 0.0 : M - kHeadroom;
      row_scale[d - 1] = M;
      for (int64_t c = 0; c < C; ++c)
        out[c] = fwd_last[c] > 0
                     ? std::exp(static_cast<double>(ar[c]) - (start_row ? col_max[c] : 0.0) - M)
                     : 0.0;
    }
    const scalar_t* gr = rows + K * C;
    double G = kNegInf;
    for (int64_t d = 1; d <= K; ++d)
      for (int64_t c = 0; c < C; ++c)
        if (d <= fwd_last[c])
          G = std::max(G, static_cast<double>(gr[(d - 1) * C + c]) + row_scale[d - 1]);
    G = G == kNegInf ? 0.0 : G - kHeadroom;
    for (int64_t d = 1; d <= K; ++d) {
      double* out = ck_rows.data() + (K + d - 1) * C;
      const double* alpha_row = ck_rows.data() + (d - 1) * C;
      bool row_matters = false;
      for (int64_t c = 0; c < C; ++c) {
        const double x = static_cast<double>(gr[(d - 1) * C + c]);
        const bool matters = d <= fwd_last[c] && x > kNegInf;
        out[c] = d <= fwd_last[c] ? std::exp(x + row_scale[d - 1] - G) : 0.0;
        if (matters && out[c] == 0.0) return false;
        row_matters = row_matters || matters;
      }
      if (!row_matters) continue;
      for (int64_t c = 0; c < C; ++c)
        if (fwd_last[c] > 0 && alpha_row[c] == 0.0 && rows[(d - 1) * C + c] > neg_inf<scalar_t>())
          return false;
    }
    ck_off = Offset{off, G};
    const int tK = static_cast<int>(first % K);
    for (int64_t d = 1; d <= K; ++d) {
      const int slot = slot_before(tK, static_cast<int>(d), static_cast<int>(K));
      std::copy_n(ck_rows.data() + (d - 1) * C, C, aring.data() + slot * C);
      std::copy_n(ck_rows.data() + (K + d - 1) * C, C, fring.data() + slot * C);
    }
    Oa = ck_off;
    for (int64_t c = 0; c < C; ++c) {
      lm_f[c] = 0.0;
      for (int64_t d = 1; d <= K; ++d)
        lm_f[c] = std::max(lm_f[c], ck_rows[(K + d - 1) * C + c] * keep_f[(d - 1) * C + c]);
    }
    return true;
  }

  // DD forward recompute, step t: uopen row d-1 = alpha_hat[t-d] · A_d for
  // d ≤ n (the slot of s = 0 holds u0 itself, which the caller reads from
  // the ring). Step t+1's products with d ≥ 2 take the same blocks of A
  // (alpha_hat[t+1-d] is already in the ring): every other step computes
  // them along into unext, and the next step only its d = 1 row. The ring's
  // alpha rows never change once written, so products made a step early
  // are the ones that step would make; load() drops them.
  void open_segments(int64_t t, int tK, int64_t n) {
    for (int64_t d = 1; d <= n; ++d)
      arows[d - 1] = aring.data() + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * C;
    const double* const* one[1] = {arows.data()};
    double* first[1] = {uopen.data()};
    vecmat_durations<1>(one, A.data(), first, 1, C, K * C);
    if (opened_for == t) return;  // d ≥ 2 made the step before
    if (n >= 2) {
      const double* const* two[2] = {arows.data() + 1, arows.data()};
      double* rest[2] = {uopen.data() + C, unext.data() + C};
      vecmat_durations<2>(two, A.data() + C, rest, n - 1, C, K * C);
    }
    opened_next = true;
  }

  // DD: the alpha_hat part of segment [s, s+d): u0 for s = 0 (`arow`
  // holds it), else arow · A_d into out.
  const double* opened(int64_t s, int64_t d, const double* arow, double* out) const {
    if (s == 0) return arow;
    vecmat(arow, A.data() + (d - 1) * C, out, C, C, K * C);
    return out;
  }

  // out[c] = table[c] · exp(e), when that exp is a normal number: one exp
  // for a row. False (out untouched) otherwise; the caller takes the row's
  // exps one by one.
  static bool table_row(const double* table, double e, double* out, int64_t n) {
    const double f = std::exp(e);
    if (!(f > std::numeric_limits<double>::min() && f < std::numeric_limits<double>::max()))
      return false;
    for (int64_t c = 0; c < n; ++c) out[c] = table[c] * f;
    return true;
  }

  // exp(a + b + extra - log Z), the sum taken so that the large parts cancel
  // first.
  double rel(const Offset& a, const Offset& b, double extra = 0.0) const {
    return ((a.hi - log_z) + b.hi) + ((a.lo + b.lo) + extra);
  }

  // largest of y[c] + log(val[c]) over val > 0, from the exponent (within a
  // factor 2); kNegInf if none.
  double log_scale(const double* y, const double* val) const {
    return top_log_bound(y, val, nullptr, C);
  }

  // f[c] = exp(scores[t, c] - m) for m, returned, the finite max of the
  // row (0 if none).
  double emissions(int64_t t, double* f) {
    for (int64_t c = 0; c < C; ++c) arg[c] = static_cast<double>(in.score(t, c));
    double m = max_of(arg.data(), C);
    if (m == kNegInf) m = 0.0;
    for (int64_t c = 0; c < C; ++c) arg[c] -= m;
    exp_row_f64(arg.data(), f, C);
    return m;
  }

  // Forward step t of the span (row i of the buffers): alpha_hat[t] (t ≥ 1)
  // and sigma_hat[t] (t < L). With `advance` (t < L) the ring moves on to
  // step t+1 in the same pass over it: position t's emissions, the segments
  // opening at t, and the normaliser, which makes the largest entry that
  // can still matter about 1 (from the previous step's largest, so that
  // entries are rescaled as they are read; float64 has room for the lag).
  void forward_step(int64_t t, int64_t i, bool advance) {
    double* a = ahat.data() + i * C;
    double* s = shat.data() + i * C;
    double* f = fe_buf.data() + i * C;
    double m = 0.0;
    Normaliser inv;
    if (advance) {
      m = emissions(t, f);
      m_buf[i] = m;
      const double top = max_product(lm_f.data(), f, C);
      inv = normaliser_for(top);
      for (int64_t c = 0; c < C; ++c) fs[c] = f[c] * inv.value;
    }
    if (t == 0) {
      std::fill_n(a, C, 0.0);
      aoff[i] = Oa;
      for (int64_t c = 0; c < C; ++c) lg[c] = in.first(c);
      double m0 = kNegInf;
      for (int64_t c = 0; c < C; ++c) m0 = std::max(m0, lg[c]);
      if (m0 == kNegInf) m0 = 0.0;
      for (int64_t c = 0; c < C; ++c) arg[c] = lg[c] - m0;
      exp_row_f64(arg.data(), s, C);
      soff[i] = Offset{m0, 0.0};
      std::fill(lm_f.begin(), lm_f.end(), 0.0);
    } else {
      const int tK = static_cast<int>(t % K);
      const int64_t n = std::min(K, t);
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(lm_f.begin(), lm_f.end(), 0.0);
      if (C % 8 == 0 && !DD) {
        if (advance)
          forward_pass8<true>(fring.data(), W.data(), fwd_last_d.data(), fs.data(), acc.data(),
                              lm_f.data(), tK, n, K, C);
        else
          forward_pass8<false>(fring.data(), W.data(), fwd_last_d.data(), fs.data(), acc.data(),
                               lm_f.data(), tK, n, K, C);
      }
      // DD: the ring holds the gains, and the weight of [t-d, t) is
      // (alpha_hat[t-d] · A_d) · W[d-1] (a mat-vec per d).
      if (DD) open_segments(t, tK, n);
      for (int64_t d = 1; d <= (C % 8 == 0 && !DD ? 0 : n); ++d) {
        const int slot = slot_before(tK, static_cast<int>(d), static_cast<int>(K));
        double* __restrict r = fring.data() + slot * C;
        const double* w = W.data() + (d - 1) * C;
        if (DD) {
          const double* o = t == d ? aring.data() + slot * C : uopen.data() + (d - 1) * C;
          for (int64_t c = 0; c < C; ++c) wrow[c] = o[c] * w[c];
          w = wrow.data();
        }
        double* __restrict ac = acc.data();
        if (advance) {
          const double* __restrict sc = fs.data();
          double* __restrict lm = lm_f.data();
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const double x0 = r[c];
            ac[c] += x0 * w[c];
            const double moved = static_cast<double>(d) < fwd_last_d[c] ? x0 * sc[c] : 0.0;
            r[c] = moved;
            lm[c] = moved > lm[c] ? moved : lm[c];
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ac[c] += r[c] * w[c];
        }
      }
      if (DD) {
        if (opened_next) std::swap(uopen, unext);
        opened_for = opened_next ? t + 1 : -1;
        opened_next = false;
      }
      for (int64_t c = 0; c < C; ++c) lg[c] = seg_max[c] + static_cast<double>(in.end(t - 1, c));
      double ma = log_scale(lg.data(), acc.data());
      if (ma == kNegInf) ma = 0.0;
      const double* end_table = DD ? e_cd.data() : e_dur.data();
      const double end_top = DD ? cd_top : dur_top;
      if (!(tables_ok && !in.end_scores && table_row(end_table, end_top - ma, ex.data(), C))) {
        for (int64_t c = 0; c < C; ++c) arg[c] = lg[c] - ma;
        exp_row_f64(arg.data(), ex.data(), C);
      }
      for (int64_t c = 0; c < C; ++c) a[c] = acc[c] > 0 ? acc[c] * ex[c] : 0.0;
      aoff[i] = Oa.plus(ma);
      if (!DD && t < L) {
        matvec_padded(a, A_pad.data(), C, Cp, u.data());  // u = alpha_hat A
        for (int64_t c = 0; c < C; ++c) lg[c] = col_max[c] + static_cast<double>(in.start(t, c));
        double ms = log_scale(lg.data(), u.data());
        if (ms == kNegInf) ms = 0.0;
        if (!(tables_ok && !in.start_scores &&
              table_row(e_col.data(), col_top - ms, ex.data(), C))) {
          for (int64_t c = 0; c < C; ++c) arg[c] = lg[c] - ms;
          exp_row_f64(arg.data(), ex.data(), C);
        }
        for (int64_t c = 0; c < C; ++c) s[c] = u[c] > 0 ? u[c] * ex[c] : 0.0;
        soff[i] = aoff[i].plus(ms);
      }
    }
    if (!advance) return;
    // The segments opening at t: sigma_hat[t] · exp(scores[t]); DD: their
    // gains exp(start(t) + scores[t]) with alpha_hat[t]'s scale, and
    // alpha_hat[t] (u0 at t = 0) into its slot.
    const Offset src = !DD ? soff[i] : (t == 0 ? Offset{first_max, 0.0} : aoff[i]);
    const double shift = (src.hi - Oa.hi) + (src.lo - Oa.lo) + inv.log;
    for (int64_t c = 0; c < C; ++c)
      arg[c] = static_cast<double>(in.score(t, c)) - m + shift +
               (DD ? static_cast<double>(in.start(t, c)) : 0.0);
    const double* val = s;
    if (DD) {
      const double* opening = t == 0 ? u0.data() : a;
      std::copy_n(opening, C, aring.data() + (t % K) * C);
      bool any = false;
      for (int64_t c = 0; c < C; ++c) any = any || opening[c] > 0;
      std::fill(fval.begin(), fval.end(), any ? 1.0 : 0.0);
      val = fval.data();
    }
    const double extra = fresh_scale(arg.data(), val, fwd_last_d.data());
    if (extra != 0.0) rescale(fring.data(), lm_f.data(), extra);
    if (!(!(DD && in.start_scores) && table_row(f, shift - extra, ex.data(), C)))
      exp_row_f64(arg.data(), ex.data(), C);
    double* fresh = fring.data() + (t % K) * C;
    for (int64_t c = 0; c < C; ++c) {
      const double v0 = val[c] > 0 && fwd_last[c] > 0 ? val[c] * ex[c] : 0.0;
      if (!(v0 < std::numeric_limits<double>::infinity())) failed = true;
      fresh[c] = v0;
      lm_f[c] = std::max(lm_f[c], fwd_last[c] > 1 ? v0 : 0.0);
    }
    Oa.add((m - inv.log) + extra);
  }

  // The normaliser of a move comes from the previous step's entries; when
  // the entries arriving now, val[c] · exp(arg[c]), lie far above them
  // (beyond 2^400: scores of 1e4 do that), the move takes the excess out of
  // everything instead: returns it (0 otherwise), already taken out of arg.
  double fresh_scale(double* arg_, const double* val, const double* last) const {
    const double top = top_log_bound(arg_, val, last, C);
    if (!(top > 400.0 * kLn2)) return 0.0;
    for (int64_t c = 0; c < C; ++c) arg_[c] -= top;
    return top;
  }

  // Every entry of a ring, and its largest-entry record, times exp(-extra).
  void rescale(double* ring, double* lm, double extra) const {
    const double f = std::exp(-extra);
    for (int64_t k = 0; k < K * C; ++k) ring[k] *= f;
    for (int64_t c = 0; c < C; ++c) lm[c] *= f;
  }

  // The forward ring at step t in duration order (rows d-1 = [t-d, t); DD:
  // the alpha rows, then the gain rows), as ck_rows.
  void ring_rows(int64_t t, double* out) const {
    const int tK = static_cast<int>(t % K);
    for (int64_t d = 1; d <= K; ++d) {
      const int slot = slot_before(tK, static_cast<int>(d), static_cast<int>(K));
      if (DD) {
        std::copy_n(aring.data() + slot * C, C, out + (d - 1) * C);
        std::copy_n(fring.data() + slot * C, C, out + (K + d - 1) * C);
      } else {
        std::copy_n(fring.data() + slot * C, C, out + (d - 1) * C);
      }
    }
  }

  // The boundary mass at t (1 in exact arithmetic): alpha_hat (offset
  // a_off) against beta_hat (offset qb), plus the segments across t, from
  // the forward rows (duration order, offset f_off) and the backward ring
  // `back` (offset q).
  double boundary_mass(int64_t t, const double* alpha, const Offset& a_off, const double* rows,
                       const Offset& f_off, const double* beta, const Offset& qb,
                       const double* back, const Offset& q) {
    const int tK = static_cast<int>(t % K);
    double total = 0.0;
    const double sb = std::exp(rel(a_off, qb));
    for (int64_t c = 0; c < C; ++c) total += alpha[c] * beta[c] * sb;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t d1 = 1; d1 <= std::min(K - 1, t); ++d1) {
      const double* __restrict f = rows + ((DD ? K : 0) + d1 - 1) * C;
      for (int64_t d2 = 1; d1 + d2 <= K; ++d2) {
        const double* __restrict b = back + slot_after(tK, static_cast<int>(d2), static_cast<int>(K)) * C;
        const double* __restrict w = W.data() + (d1 + d2 - 1) * C;
        // DD: the open part's alpha_hat · A_d depends on the whole duration.
        double* __restrict ac = acc.data();
        if (DD) {
          const double* __restrict o = opened(t - d1, d1 + d2, rows + (d1 - 1) * C, u.data());
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ac[c] += o[c] * f[c] * b[c] * w[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) ac[c] += f[c] * b[c] * w[c];
        }
      }
    }
    for (int64_t c = 0; c < C; ++c)
      if (acc[c] > 0) total += acc[c] * std::exp(rel(f_off, q, seg_max[c]));
    return total;
  }

  // Position u's score gradients are complete: write them, and check that
  // the posteriors covering u sum to 1.
  void flush_position(int64_t u, scalar_t g, scalar_t* grad_scores) {
    double* row = pending.data() + (u % K) * C;
    double total = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      total += row[c];
      grad_scores[u * C + c] = static_cast<scalar_t>(row[c] * static_cast<double>(g));
      row[c] = 0.0;
    }
    if (!(std::abs(total - 1.0) <= tol)) failed = true;
  }

  // The batch's transition posteriors into trans_acc, position by position
  // (the sums of adding them one position at a time; a zero alpha-part adds
  // nothing, as it would add an exact 0). Up to 32 entries at a time stay in
  // registers across the batch.
  template <int W>
  void flush_block(double* __restrict ta, int64_t cp, int64_t k0, int64_t len) const {
    double a[W];
    for (int j = 0; j < W; ++j) a[j] = ta[k0 + j];
    for (int64_t p = 0; p < n_batch; ++p) {
      const double w = wbatch[p * C + cp];
      if (w == 0.0) continue;
      const double* __restrict vb = vbatch.data() + p * len + k0;
#pragma omp simd
      for (int j = 0; j < W; ++j) a[j] += w * vb[j];
    }
    for (int j = 0; j < W; ++j) ta[k0 + j] = a[j];
  }
  // R rows cp … cp+R-1 and W = 4·V entries at a time: each block of a
  // position's v-part is loaded once for R rows (each row's sums as
  // flush_block's). Where one of the R alpha-parts is 0 the position adds
  // row by row, skipping it.
  template <int R, int V>
  void flush_rows_block(double* __restrict ta, int64_t cp, int64_t k0, int64_t len) const {
    f64x4 a[R][V];
    for (int q = 0; q < R; ++q)
      for (int j = 0; j < V; ++j) a[q][j] = load_lanes<4>(ta + q * len + k0 + 4 * j);
    for (int64_t p = 0; p < n_batch; ++p) {
      const double* __restrict wp = wbatch.data() + p * C + cp;
      f64x4 vb[V];
      for (int j = 0; j < V; ++j) vb[j] = load_lanes<4>(vbatch.data() + p * len + k0 + 4 * j);
      bool all = true;
      for (int q = 0; q < R; ++q) all = all && wp[q] != 0.0;
      if (all) {
        for (int q = 0; q < R; ++q) {
          const f64x4 w = {wp[q], wp[q], wp[q], wp[q]};
          for (int j = 0; j < V; ++j) a[q][j] += w * vb[j];
        }
      } else {
        for (int q = 0; q < R; ++q) {
          if (wp[q] == 0.0) continue;
          const f64x4 w = {wp[q], wp[q], wp[q], wp[q]};
          for (int j = 0; j < V; ++j) a[q][j] += w * vb[j];
        }
      }
    }
    for (int q = 0; q < R; ++q)
      for (int j = 0; j < V; ++j) store_lanes(ta + q * len + k0 + 4 * j, a[q][j]);
  }
  // Row cp's entries k0 … len-1, as many as fit at a time.
  void flush_row(int64_t cp, int64_t k0, int64_t len) {
    double* __restrict ta = trans_acc.data() + cp * len;
    for (; k0 + 32 <= len; k0 += 32) flush_block<32>(ta, cp, k0, len);
    switch ((len - k0) / 8) {
      case 3: flush_block<24>(ta, cp, k0, len); break;
      case 2: flush_block<16>(ta, cp, k0, len); break;
      case 1: flush_block<8>(ta, cp, k0, len); break;
      default: break;
    }
    k0 += (len - k0) / 8 * 8;
    for (; k0 + 4 <= len; k0 += 4) flush_block<4>(ta, cp, k0, len);
    for (; k0 < len; ++k0) flush_block<1>(ta, cp, k0, len);
  }
  void flush_transitions() {
    constexpr int R = kFlushRows, V = kFlushVectors, W = 4 * V;
    const int64_t len = n_matrices() * C;
    int64_t cp = 0;
    for (; cp + R <= C; cp += R) {
      double* __restrict ta = trans_acc.data() + cp * len;
      int64_t k0 = 0;
      for (; k0 + W <= len; k0 += W) flush_rows_block<R, V>(ta, cp, k0, len);
      for (int q = 0; q < R; ++q) flush_row(cp + q, k0, len);
    }
    for (; cp < C; ++cp) flush_row(cp, 0, len);
    n_batch = 0;
  }

  // dots[i] = sum_{k < n} M[i·stride + k] · y[k] for i < m, and vm[k] =
  // sum_{i < m} a[i] · M[i·stride + k] for k < n, in one pass over M (the
  // (K, C, C) table, streamed from L2 at every position: each row block
  // loaded serves both). A dot product keeps eight partial sums over blocks
  // of eight, adds its last n % 8 terms first and then the partials in
  // order, four rows at a time (loads of y shared); a row left over is one
  // chain. vm[k] is summed over i in ascending order, its last n % 8
  // entries as vecmat takes them.
  static void dots_and_vecmat(const double* M, const double* y, const double* a, double* dots,
                              double* vm, int64_t m, int64_t n, int64_t stride) {
    const int64_t n8 = n / 8 * 8;
    std::fill_n(vm, n8, 0.0);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      const double* __restrict r0 = M + i * stride;
      const double* __restrict r1 = r0 + stride;
      const double* __restrict r2 = r1 + stride;
      const double* __restrict r3 = r2 + stride;
      double* __restrict v = vm;
      const double a0 = a[i], a1 = a[i + 1], a2 = a[i + 2], a3 = a[i + 3];
      double s0[8] = {}, s1[8] = {}, s2[8] = {}, s3[8] = {};
      int64_t k0 = 0;
      for (; k0 + 8 <= n; k0 += 8) {
#pragma omp simd
        for (int j = 0; j < 8; ++j) {
          const double yv = y[k0 + j];
          const double x0 = r0[k0 + j], x1 = r1[k0 + j], x2 = r2[k0 + j], x3 = r3[k0 + j];
          s0[j] += x0 * yv;
          s1[j] += x1 * yv;
          s2[j] += x2 * yv;
          s3[j] += x3 * yv;
          double acc = v[k0 + j];
          acc += a0 * x0;
          acc += a1 * x1;
          acc += a2 * x2;
          acc += a3 * x3;
          v[k0 + j] = acc;
        }
      }
      double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0;
      for (; k0 < n; ++k0) {
        t0 += r0[k0] * y[k0];
        t1 += r1[k0] * y[k0];
        t2 += r2[k0] * y[k0];
        t3 += r3[k0] * y[k0];
      }
      for (int j = 0; j < 8; ++j) {
        t0 += s0[j];
        t1 += s1[j];
        t2 += s2[j];
        t3 += s3[j];
      }
      dots[i] = t0;
      dots[i + 1] = t1;
      dots[i + 2] = t2;
      dots[i + 3] = t3;
    }
    for (; i < m; ++i) {
      const double* __restrict row = M + i * stride;
      double* __restrict v = vm;
      double t = 0.0;
      for (int64_t k = 0; k < n; ++k) t += row[k] * y[k];
      dots[i] = t;
      const double ai = a[i];
#pragma omp simd
      for (int64_t k = 0; k < n8; ++k) v[k] += ai * row[k];
    }
    vecmat_tail(a, M, vm, m, n8, n, stride);
  }

  // DD, position t ≥ 1 of the beta sweep: x_d = ring · W for every d (and,
  // fused, the ring's move to step t-1 as in backward_pass8), v_d = x_d ·
  // exp(start terms) (relative to Qb = Q + mv), the posteriors (alpha_hat ·
  // A_d)[c] · v_d[c] into the duration gradient and the coverage, beta_hat
  // = sum_d A_d v_d and the transition posteriors alpha_hat ⊗ v_d.
  void sweep_dd(int64_t t, int64_t dmax, bool fused, const double* alpha, const Offset& aoff) {
    const int tK = static_cast<int>(t % K);
    std::fill(tau.begin(), tau.end(), 0.0);
    for (int64_t d = dmax; d >= 1; --d) {
      double* __restrict r =
          bring.data() + slot_after(tK, static_cast<int>(d), static_cast<int>(K)) * C;
      const double* __restrict w = W.data() + (d - 1) * C;
      double* __restrict xd = vbatch.data() + (n_batch * K + d - 1) * C;
      double* __restrict ta = tau.data();
      if (fused) {
        const double* __restrict sc = fs.data();
        const double* __restrict last = bwd_last_d.data();
        double* __restrict lm = lm_b.data();
        const double age = static_cast<double>(d);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          xd[c] = r[c] * w[c];
          ta[c] += xd[c];
          r[c] = moved_entry(r[c], age, last[c], sc[c], lm[c]);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double xv = r[c] * w[c];
          xd[c] = xv;
          ta[c] += xv;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) lg[c] = seg_max[c] + static_cast<double>(in.start(t, c));
    double mv = log_scale(lg.data(), tau.data());
    if (mv == kNegInf) mv = 0.0;
    if (!(tables_ok && !in.start_scores && table_row(e_cd.data(), cd_top - mv, ex.data(), C))) {
      for (int64_t c = 0; c < C; ++c) arg[c] = lg[c] - mv;
      exp_row_f64(arg.data(), ex.data(), C);
    }
    Qb = Q.plus(mv);
    const double sa = std::exp(rel(aoff, Qb));
    if (!(sa < std::numeric_limits<double>::infinity())) failed = true;  // as below
    double* __restrict w_t = wbatch.data() + n_batch * C;
    for (int64_t c = 0; c < C; ++c) w_t[c] = alpha[c] * sa;
    // v_d in place of x_d (0 past dmax, for the batch); beta_hat[c'] =
    // sum_{d,c} A[c'][d][c] v_d[c], one long dot product per c'; u_d =
    // (alpha_hat · A_d) · sa, a mat-vec per d.
    const int64_t len = dmax * C;
    double* __restrict vf = vbatch.data() + n_batch * K * C;
    for (int64_t d = 0; d < dmax; ++d)
      for (int64_t c = 0; c < C; ++c) {
        const double x = vf[d * C + c];
        vf[d * C + c] = x > 0 ? x * ex[c] : 0.0;
      }
    std::fill(vf + len, vf + K * C, 0.0);
    double* __restrict uf = ubuf.data();
    dots_and_vecmat(A.data(), vf, w_t, bet.data(), uf, C, len, K * C);
    if (++n_batch == kBatch) flush_transitions();
    // The posteriors (alpha_hat · A_d)[c] · v_d[c] of the segments [t, t+d):
    // the duration gradient and the coverage of positions t … t+dmax-1.
    std::fill(covered.begin(), covered.end(), 0.0);
    for (int64_t d = dmax; d >= 1; --d) {
      double* __restrict sd = sum_dur.data() + (d - 1) * C;
      double* __restrict pd = pending.data() + ((t + d - 1) % K) * C;
      double* __restrict cv = covered.data();
      const double* __restrict uu = uf + (d - 1) * C;
      const double* __restrict vv = vf + (d - 1) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double post = uu[c] * vv[c];
        sd[c] += post;
        cv[c] += post;
        pd[c] += cv[c];
      }
    }
  }
};

// Deterministic fallbacks of the exp-domain backward to the log-domain one,
// exposed by flashsemicrf_testing::cpu_exp_backward_fallbacks.
std::atomic<int64_t> exp_backward_fallbacks{0};

// The exp-domain backward of sequence b (DD: the (K, C, C) transition);
// false (outputs partly written) when the certificate fails, and the caller
// reruns the log-domain backward.
template <typename scalar_t, bool DD>
bool backward_sequence_exp(const BackwardParams& p, int64_t b) {
  const int64_t K = p.K, C = p.C, L = sequence_length(p, b);
  const double fwd_log_z = static_cast<double>(static_cast<const scalar_t*>(p.log_z)[b]);
  const scalar_t g = static_cast<const scalar_t*>(p.grad_log_z)[b];
  if (fwd_log_z == -std::numeric_limits<double>::infinity()) return true;  // outputs stay 0
  if (!(std::abs(fwd_log_z) < std::numeric_limits<double>::infinity())) return false;
  const SequenceInputs<scalar_t> in(p, b);
  const SequenceGradients<scalar_t> grad(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  const int64_t span = p.interval + 1;
  ExpBackward<scalar_t, DD> eb(in, K, C, L, span);
  if (eb.bad_inputs()) return false;
  const double gd = static_cast<double>(g);
  constexpr double kMaxDrift = 1e-2;  // as the log-domain backward

  ForwardScan<scalar_t, DD, false> scan(in, K, C, L);  // log Z's certificate
  std::vector<double> ext_rows((DD ? 2 : 1) * K * C);
  struct Anchor {
    int64_t t = -1;
    double total = 0.0;
    Offset Q, Qb;
  } anchor;
  std::vector<double> anchor_beta(C), anchor_ring(K * C);
  std::vector<double>& ahat = eb.ahat;
  std::vector<double>& shat = eb.shat;

  for (int64_t j = ckpt.last_span(L); j >= 0; --j) {
    const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
    if (!eb.load(first, ckpt.at(j), ckpt.offset[j])) return false;
    for (int64_t t = first; t <= last; ++t) {
      eb.forward_step(t, t - first, t < L);
    }
    if (eb.failed) return false;
    double span_drift = 0.0;
    if (last == L) {
      // log Z from this recompute, which every posterior shares; the log
      // scan of the span (the log backward's own log Z) certifies it.
      const int64_t i = L - first;
      double et_max = -std::numeric_limits<double>::infinity();
      for (int64_t c = 0; c < C; ++c) et_max = std::max(et_max, static_cast<double>(in.end_transition[c]));
      if (et_max == -std::numeric_limits<double>::infinity()) return false;
      double z = 0.0;
      for (int64_t c = 0; c < C; ++c)
        z += ahat[i * C + c] * std::exp(static_cast<double>(in.end_transition[c]) - et_max);
      if (!(z > 0.0 && z < std::numeric_limits<double>::infinity())) return false;
      eb.log_z = eb.aoff[i].hi + (eb.aoff[i].lo + (et_max + std::log(z)));
      scan.load(first, ckpt.at(j), ckpt.offset[j]);
      for (int64_t t = first; t <= L; ++t) {
        const scalar_t m = scan.step(t);
        if (t < L) scan.advance(t, m);
      }
      const double log_z_scan = scan.offset + static_cast<double>(scan.end_value());
      if (!(std::abs(eb.log_z - log_z_scan) <=
            exp_backward_log_z_tolerance<scalar_t>(eb.log_z, L - first)))
        return false;
      eb.tol = exp_backward_tolerance<scalar_t>(eb.log_z);
    } else if (anchor.t == last + 1) {
      // One step past the span: the boundary mass there against what the
      // next span's re-anchor measured from its checkpoint, as the log
      // backward does. Their log ratio is the two checkpoints' rounding
      // difference (plus any mass this recompute lost); the float64
      // recompute adds none within the span, so it is taken out of the
      // whole span (the log backward, whose recompute rounds step by step,
      // spreads it). A larger ratio is a checkpoint that means something
      // else: the log backward keeps it in the span before.
      const int64_t i = last + 1 - first;
      eb.ring_rows(last + 1, ext_rows.data());
      eb.forward_step(last + 1, i, false);
      const double total =
          eb.boundary_mass(last + 1, ahat.data() + i * C, eb.aoff[i], ext_rows.data(), eb.Oa,
                           anchor_beta.data(), anchor.Qb, anchor_ring.data(), anchor.Q);
      if (!(total > 0.0 && total < std::numeric_limits<double>::infinity())) return false;
      span_drift = std::log(total) - std::log(anchor.total);
      if (!(std::abs(span_drift) <= kMaxDrift)) return false;
      for (int64_t t = first; t <= last; ++t) {
        eb.aoff[t - first].lo -= span_drift;
        eb.soff[t - first].lo -= span_drift;
      }
    }
    anchor.t = -1;

    for (int64_t t = last; t >= first; --t) {
      const int64_t i = t - first;
      const double* alpha = ahat.data() + i * C;
      const double* sigma = shat.data() + i * C;
      const Offset aoff = eb.aoff[i];
      const int tK = static_cast<int>(t % K);
      if (t == L) {
        double q = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < C; ++c) q = std::max(q, static_cast<double>(in.end_transition[c]));
        if (q == -std::numeric_limits<double>::infinity()) q = 0.0;
        eb.Qb = Offset{q, 0.0};
        const double sb = std::exp(eb.rel(aoff, eb.Qb));
        if (!(sb < std::numeric_limits<double>::infinity())) return false;  // as below
        for (int64_t c = 0; c < C; ++c) {
          eb.bet[c] = std::exp(static_cast<double>(in.end_transition[c]) - q);
          const scalar_t mass = static_cast<scalar_t>(alpha[c] * eb.bet[c] * sb * gd);
          grad.end_transition[c] = mass;
          if (grad.end_scores) grad.end_scores[(L - 1) * C + c] = mass;
        }
        std::fill(eb.bring.begin(), eb.bring.end(), 0.0);
        // Open the segments ending at L.
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t c = 0; c < C; ++c) m = std::max(m, static_cast<double>(in.score(L - 1, c)));
        if (m == -std::numeric_limits<double>::infinity()) m = 0.0;
        double top = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double e = static_cast<double>(in.end(L - 1, c)) +
                           static_cast<double>(in.score(L - 1, c)) - m;
          eb.fnew[c] = eb.bet[c] > 0 && eb.bwd_last[c] > 0 ? eb.bet[c] * std::exp(e) : 0.0;
          top = std::max(top, eb.fnew[c]);
        }
        if (!(top > 0) || !(top < std::numeric_limits<double>::infinity())) top = 1.0;
        for (int64_t c = 0; c < C; ++c) {
          eb.bring[tK * C + c] = eb.fnew[c] / top;
          eb.lm_b[c] = eb.bwd_last[c] > 1 ? eb.bring[tK * C + c] : 0.0;
        }
        eb.Q = eb.Qb;
        eb.Q.add(m + std::log(top));
        continue;
      }

      // Segments [t, t+d): x = ring · W, tau_hat = sum_d x (relative to Q +
      // dur_max), their posteriors sigma_hat · x · ws, and (except at a
      // span's first position, whose re-anchor needs the ring as it is) the
      // ring's move to step t-1, all in one pass over the ring. The move
      // multiplies by exp(scores[t-1] - m) over the normaliser, which makes
      // the largest entry that can still matter about 1 (from the previous
      // step's largest, as in the forward recompute).
      const int64_t dmax = std::min(K, L - t);
      const bool fused = t > first;
      const bool per_duration = DD && t > 0;  // the posteriors' start part depends on d
      if (!per_duration) {
        if (!(eb.tables_ok &&
              eb.table_row(eb.e_dur.data(), eb.rel(eb.soff[i], eb.Q, eb.dur_top), eb.ws.data(), C))) {
          for (int64_t c = 0; c < C; ++c) eb.arg[c] = eb.rel(eb.soff[i], eb.Q, eb.dur_max[c]);
          exp_row_f64(eb.arg.data(), eb.ws.data(), C);
        }
        for (int64_t c = 0; c < C; ++c) eb.ws[c] = sigma[c] > 0 ? sigma[c] * eb.ws[c] : 0.0;
      }
      double m = 0.0;
      Normaliser inv;
      if (fused) {
        const double* f = eb.fe_buf.data() + (i - 1) * C;  // position t-1
        m = eb.m_buf[i - 1];
        const double top = max_product(eb.lm_b.data(), f, C);
        inv = normaliser_for(top);
        for (int64_t c = 0; c < C; ++c) eb.fs[c] = f[c] * inv.value;
        std::fill(eb.lm_b.begin(), eb.lm_b.end(), 0.0);
      }
      std::fill(eb.tau.begin(), eb.tau.end(), 0.0);
      std::fill(eb.covered.begin(), eb.covered.end(), 0.0);
      if (per_duration) {
        eb.sweep_dd(t, dmax, fused, alpha, aoff);
      } else if (C % 8 == 0) {
        if (fused)
          backward_pass8<true>(eb.bring.data(), eb.W.data(), eb.bwd_last_d.data(), eb.ws.data(),
                               eb.fs.data(), eb.tau.data(), eb.covered.data(), eb.lm_b.data(),
                               eb.sum_dur.data(), eb.pending.data(), t, tK, dmax, K, C);
        else
          backward_pass8<false>(eb.bring.data(), eb.W.data(), eb.bwd_last_d.data(), eb.ws.data(),
                                eb.fs.data(), eb.tau.data(), eb.covered.data(), eb.lm_b.data(),
                                eb.sum_dur.data(), eb.pending.data(), t, tK, dmax, K, C);
      }
      for (int64_t d = (C % 8 == 0 || per_duration ? 0 : dmax); d >= 1; --d) {
        double* __restrict r =
            eb.bring.data() + slot_after(tK, static_cast<int>(d), static_cast<int>(K)) * C;
        const double* __restrict w = eb.W.data() + (d - 1) * C;
        const double* __restrict wsv = eb.ws.data();
        double* __restrict ta = eb.tau.data();
        double* __restrict sd = eb.sum_dur.data() + (d - 1) * C;
        double* __restrict cv = eb.covered.data();
        double* __restrict pd = eb.pending.data() + ((t + d - 1) % K) * C;
        if (fused) {
          const double* __restrict sc = eb.fs.data();
          double* __restrict lm = eb.lm_b.data();
          const double age = static_cast<double>(d);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const double xv = r[c] * w[c];
            ta[c] += xv;
            const double post = xv * wsv[c];
            sd[c] += post;
            cv[c] += post;
            pd[c] += cv[c];
            r[c] = moved_entry(r[c], age, eb.bwd_last_d[c], sc[c], lm[c]);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const double xv = r[c] * w[c];
            ta[c] += xv;
            const double post = xv * wsv[c];
            sd[c] += post;
            cv[c] += post;
            pd[c] += cv[c];
          }
        }
      }
      if (t + K - 1 < L) eb.flush_position(t + K - 1, g, grad.scores);
      if (grad.start_scores)
        for (int64_t c = 0; c < C; ++c)
          grad.start_scores[t * C + c] = static_cast<scalar_t>(eb.covered[c] * gd);
      if (t == 0) {
        for (int64_t c = 0; c < C; ++c)
          grad.start_transition[c] = static_cast<scalar_t>(eb.covered[c] * gd);
        for (int64_t u = std::min(K - 1, L) - 1; u >= 0; --u) eb.flush_position(u, g, grad.scores);
        break;
      }

      // beta_hat[t, c'] = sum_c A[c', c] · v[c], v = tau_hat · exp(start
      // terms), and the transition posteriors alpha_hat[c'] A[c', c] v[c]
      // (DD: sweep_dd has them, per duration).
      if (!DD) {
        for (int64_t c = 0; c < C; ++c)
          eb.lg[c] = eb.col_max[c] + static_cast<double>(in.start(t, c)) + eb.dur_max[c];
        double mv = eb.log_scale(eb.lg.data(), eb.tau.data());
        if (mv == -std::numeric_limits<double>::infinity()) mv = 0.0;
        if (!(eb.tables_ok && !in.start_scores &&
              eb.table_row(eb.e_cd.data(), eb.cd_top - mv, eb.v.data(), C))) {
          for (int64_t c = 0; c < C; ++c) eb.arg[c] = eb.lg[c] - mv;
          exp_row_f64(eb.arg.data(), eb.v.data(), C);
        }
        for (int64_t c = 0; c < C; ++c) eb.v[c] = eb.tau[c] > 0 ? eb.tau[c] * eb.v[c] : 0.0;
        eb.Qb = eb.Q.plus(mv);
        // beta_hat = A v, along c' (rows of A's transpose): no horizontal sums.
        matvec_padded(eb.v.data(), eb.At_pad.data(), C, eb.Cp, eb.bet.data());
      }
      const double sa = std::exp(eb.rel(aoff, eb.Qb));
      // alpha_hat's and beta_hat's scales so far apart (boundary scores of
      // hundreds of nats can put them there) that their product's scale
      // leaves float64: a label with alpha_hat 0 would give 0 · inf = NaN
      // posteriors, which no coverage sum sees. The log domain redoes it.
      if (!(sa < std::numeric_limits<double>::infinity())) return false;
      if (grad.end_scores)
        for (int64_t cp = 0; cp < C; ++cp)
          grad.end_scores[(t - 1) * C + cp] =
              static_cast<scalar_t>(alpha[cp] * sa * eb.bet[cp] * gd);
      if (!DD) {
        // The transition posteriors alpha_hat[c'] A[c', c] v[c], a batch at
        // a time (sweep_dd batches DD's).
        double* __restrict w_t = eb.wbatch.data() + eb.n_batch * C;
        for (int64_t cp = 0; cp < C; ++cp) w_t[cp] = alpha[cp] * sa;
        std::copy_n(eb.v.data(), C, eb.vbatch.data() + eb.n_batch * C);
        if (++eb.n_batch == eb.kBatch) eb.flush_transitions();
      }
      if (t == first) {
        // Re-anchor at the checkpoint, as the log backward does; the
        // certificate requires the boundary mass there to be 1.
        // alpha_hat here without the span's drift correction, as the
        // checkpoint rows it is measured with.
        const double total = eb.boundary_mass(t, alpha, aoff.plus(span_drift), eb.ck_rows.data(),
                                              eb.ck_off, eb.bet.data(), eb.Qb, eb.bring.data(),
                                              eb.Q);
        anchor = {t, total, eb.Q, eb.Qb};
        std::copy_n(eb.bet.begin(), C, anchor_beta.begin());
        std::copy(eb.bring.begin(), eb.bring.end(), anchor_ring.begin());
        // It is exp(span_drift) in exact arithmetic: what this span's beta
        // sweep lost to underflow shows here.
        if (!(total > 0.0 && std::abs(std::log(total) - span_drift) <= eb.tol)) return false;
        eb.Q.lo -= std::log(total);
        eb.Qb.lo -= std::log(total);
      }

      if (!fused) {
        // The move at a span's first position, in a pass of its own.
        m = eb.emissions(t - 1, eb.fe.data());
        inv = normaliser_for(max_product(eb.lm_b.data(), eb.fe.data(), C));
        for (int64_t c = 0; c < C; ++c) eb.fs[c] = eb.fe[c] * inv.value;
        std::fill(eb.lm_b.begin(), eb.lm_b.end(), 0.0);
        for (int64_t d = 1; d <= std::min(K, L - t); ++d) {
          double* __restrict r =
              eb.bring.data() + slot_after(tK, static_cast<int>(d), static_cast<int>(K)) * C;
          const double* __restrict sc = eb.fs.data();
          double* __restrict lm = eb.lm_b.data();
          const double age = static_cast<double>(d);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c)
            r[c] = moved_entry(r[c], age, eb.bwd_last_d[c], sc[c], lm[c]);
        }
      }
      // The segments ending at t: beta_hat[t] · exp(end_scores[t-1] +
      // scores[t-1]), in slot t % K (the duration-K segment's, now too long).
      const double shift = (eb.Qb.hi - eb.Q.hi) + (eb.Qb.lo - eb.Q.lo) + inv.log;
      for (int64_t c = 0; c < C; ++c)
        eb.arg[c] = static_cast<double>(in.score(t - 1, c)) - m + shift +
                    static_cast<double>(in.end(t - 1, c));
      const double extra = eb.fresh_scale(eb.arg.data(), eb.bet.data(), eb.bwd_last_d.data());
      if (extra != 0.0) eb.rescale(eb.bring.data(), eb.lm_b.data(), extra);
      // exp(scores[t-1] - m), the forward recompute's where it has it.
      const double* f_prev = fused ? eb.fe_buf.data() + (i - 1) * C : eb.fe.data();
      if (!(!in.end_scores && eb.table_row(f_prev, shift - extra, eb.ex.data(), C)))
        exp_row_f64(eb.arg.data(), eb.ex.data(), C);
      double* fresh = eb.bring.data() + tK * C;
      for (int64_t c = 0; c < C; ++c) {
        const double v0 = eb.bet[c] > 0 && eb.bwd_last[c] > 0 ? eb.bet[c] * eb.ex[c] : 0.0;
        if (!(v0 < std::numeric_limits<double>::infinity())) return false;
        fresh[c] = v0;
        eb.lm_b[c] = std::max(eb.lm_b[c], eb.bwd_last[c] > 1 ? v0 : 0.0);
      }
      eb.Q.add((m - inv.log) + extra);
    }
    if (eb.failed) return false;
  }
  if (eb.failed) return false;
  // (C, C), or DD [c'][d-1][c] into transition's [d-1][c'][c].
  eb.flush_transitions();
  const int64_t n_tr = eb.n_matrices();
  for (int64_t d = 1; d <= n_tr; ++d)
    for (int64_t cp = 0; cp < C; ++cp)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = (cp * n_tr + d - 1) * C + c;
        grad.transition[((d - 1) * C + cp) * C + c] =
            static_cast<scalar_t>(eb.A[k] * eb.trans_acc[k] * gd);
      }
  for (int64_t i = 0; i < K * C; ++i)
    grad.duration[i] = static_cast<scalar_t>(eb.sum_dur[i] * gd);
  return true;
}

// Zeroes sequence b's gradient outputs (before the log-domain backward
// reruns it: it accumulates into the score gradients).
template <typename scalar_t>
void clear_gradients(const BackwardParams& p, int64_t b) {
  const SequenceGradients<scalar_t> grad(p, b);
  const int64_t T = p.T, C = p.C, K = p.K;
  std::fill_n(grad.scores, T * C, scalar_t(0));
  std::fill_n(grad.transition, (p.duration_dependent ? K : 1) * C * C, scalar_t(0));
  std::fill_n(grad.duration, K * C, scalar_t(0));
  std::fill_n(grad.start_transition, C, scalar_t(0));
  std::fill_n(grad.end_transition, C, scalar_t(0));
  if (grad.start_scores) std::fill_n(grad.start_scores, T * C, scalar_t(0));
  if (grad.end_scores) std::fill_n(grad.end_scores, T * C, scalar_t(0));
}
// The largest working memory (bytes: checkpoints and one span's
// backpointers) a sequence of the CPU Viterbi has held since
// flashsemicrf_testing::cpu_viterbi_workspace_bytes last read it.
std::atomic<int64_t> viterbi_workspace_bytes{0};

// Viterbi of one sequence in two passes over the scan. The first keeps the
// ring at the start of every span but the last (checkpoints) and the last
// span's backpointers; then the traceback follows the path down through the
// spans, recomputing each span it enters from its checkpoint. The recompute
// repeats the first pass's arithmetic, so its backpointers are the ones a
// full table would hold. Working memory O(sqrt(T·K)·C) instead of (T+1, C).
template <typename scalar_t, bool DD>
void viterbi_sequence(const ViterbiParams& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = sequence_length(p, b), C = p.C, I = p.interval;
  ForwardScan<scalar_t, DD, true> scan(in, p.K, C, L);
  std::vector<scalar_t> ckpt_ring(p.n_ckpt * p.ring_width * C);
  std::vector<double> ckpt_offset(p.n_ckpt);
  std::vector<int32_t> span_buffer(2 * span_rows(I) * C);
  const int64_t bytes = static_cast<int64_t>(ckpt_ring.size() * sizeof(scalar_t) +
                                             ckpt_offset.size() * sizeof(double) +
                                             span_buffer.size() * sizeof(int32_t));
  int64_t seen = viterbi_workspace_bytes.load(std::memory_order_relaxed);
  while (seen < bytes && !viterbi_workspace_bytes.compare_exchange_weak(seen, bytes)) {
  }
  const SequenceCheckpoints<scalar_t> ckpt(ckpt_ring.data(), ckpt_offset.data(), p, I, p.n_ckpt);
  SpanBackpointers span(span_buffer.data(), I, C);
  // Step t, its backpointers into the span buffer from row span.first on.
  auto step = [&](int64_t t) {
    return t < span.first ? scan.step(t)
                          : scan.step(t, span.duration_row(t, C), span.previous_row(t, C));
  };
  const int64_t last = ckpt.last_span(L);
  span.first = ckpt.first(last);
  int64_t c = 0;
  scalar_t* best = static_cast<scalar_t*>(p.best) + b;
  for (int64_t t = 0; t <= L; ++t) {
    if (ckpt.due(t) && t < span.first)
      scan.save(t, ckpt.at(t / I), ckpt.offset + t / I);
    const scalar_t m = step(t);
    if (t == L) {
      int a = 0;
      const scalar_t v = scan.end_value(&a);
      c = a;
      *best = static_cast<scalar_t>(scan.offset + static_cast<double>(v));
    } else {
      scan.advance(t, m);
    }
  }
  int64_t* label = p.segment_label + b * p.T;
  std::fill_n(label, p.T, int64_t(-1));
  PathWalk walk(L, c, *best > neg_inf<scalar_t>());  // not -inf or NaN: a path
  for (;;) {
    walk.follow<DD>(span, C, label);
    if (walk.done) break;
    const int64_t j = ckpt.span_of(walk.row, L);  // below the span just walked
    span.first = ckpt.first(j);
    const int64_t span_last = ckpt.last(j, L);
    scan.load(span.first, ckpt.at(j), ckpt.offset[j]);
    for (int64_t t = span.first; t <= span_last; ++t) {
      const scalar_t m = step(t);
      if (t < span_last) scan.advance(t, m);
    }
  }
}

template <typename scalar_t, bool DD>
void filter_sequence(const FilterParams& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = sequence_length(p, b), C = p.C, T = p.T;
  ForwardScan<scalar_t, DD, false> scan(in, p.K, C, L);
  using History = SequenceHistory<scalar_t>;
  const History out(p, b);
  std::fill_n(out.alpha, (T + 1) * C, neg_inf<scalar_t>());
  std::fill_n(out.sigma, (T + 1) * C, neg_inf<scalar_t>());
  std::fill_n(out.offset, T + 1, 0.0);
  for (int64_t t = 0; t <= L; ++t) {
    const scalar_t m = scan.step(t);
    if (History::has_alpha(t)) std::copy_n(scan.alpha.data(), C, out.alpha + t * C);
    if (History::has_sigma(t, L, DD)) std::copy_n(scan.sigma.data(), C, out.sigma + t * C);
    out.offset[t] = scan.offset;
    if (t < L) scan.advance(t, m);
  }
}

// Runs fn(scalar_t{}, std::bool_constant<DD>{}, b) for every sequence b,
// dispatched on the compute dtype and the transition form, in parallel over
// the batch (each task writes only its own sequences' outputs).
template <typename Fn>
void for_each_sequence(const Params& p, at::ScalarType dtype, Fn fn) {
  AT_DISPATCH_FLOATING_TYPES(dtype, "flashsemicrf_cpu", [&] {
    at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (p.duration_dependent) fn(scalar_t(0), std::true_type{}, b);
        else fn(scalar_t(0), std::false_type{}, b);
      }
    });
  });
}

struct Cpu {
  // The CPU backward sweeps serially: no mirror image's checkpoints.
  static bool saves_mirror(const ForwardParams&) { return false; }
  static void run(const ForwardParams& p, const at::Tensor& scores) {
    const bool exp_domain = cpu_uses_exp_domain();
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      using scalar_t = decltype(zero);
      if (exp_domain) {
        const bool done = decltype(dd)::value ? forward_sequence_exp<ExpForwardDD, scalar_t>(p, b)
                                              : forward_sequence_exp<ExpForward, scalar_t>(p, b);
        if (done) return;
        exp_fallbacks.fetch_add(1, std::memory_order_relaxed);
      }
      forward_sequence<scalar_t, decltype(dd)::value>(p, b);
    });
  }
  static void run(const BackwardParams& p, const at::Tensor& scores) {
    const bool exp_domain = cpu_uses_exp_domain();
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      using scalar_t = decltype(zero);
      if (exp_domain) {
        const FlushSubnormals flush_subnormals;
        if (backward_sequence_exp<scalar_t, decltype(dd)::value>(p, b)) return;
        exp_backward_fallbacks.fetch_add(1, std::memory_order_relaxed);
        clear_gradients<scalar_t>(p, b);
      }
      backward_sequence<scalar_t, decltype(dd)::value>(p, b);
    });
  }
  static void run(const ViterbiParams& p, const at::Tensor& scores) {
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      viterbi_sequence<decltype(zero), decltype(dd)::value>(p, b);
    });
  }
  static void run(const FilterParams& p, const at::Tensor& scores) {
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      filter_sequence<decltype(zero), decltype(dd)::value>(p, b);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(flashsemicrf, CPU, m) { OpEntries<Cpu>::register_all(m); }

// Outside the op contract, for tests and the benchmark only: how many
// sequences the exp-domain forward (backward) has handed to the log-domain
// scan (backward) so far; the Viterbi's working memory per sequence (read
// and reset).
TORCH_LIBRARY(flashsemicrf_testing, m) {
  m.def("cpu_exp_fallbacks() -> int", []() -> int64_t { return exp_fallbacks.load(); });
  m.def("cpu_exp_backward_fallbacks() -> int",
        []() -> int64_t { return exp_backward_fallbacks.load(); });
  m.def("cpu_viterbi_workspace_bytes() -> int",
        []() -> int64_t { return viterbi_workspace_bytes.exchange(0); });
}

}  // namespace flashsemicrf
