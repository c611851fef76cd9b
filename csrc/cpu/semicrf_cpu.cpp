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
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

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
  double offset = 0.0;                 // O_t

  ForwardScan(const SequenceInputs<scalar_t>& in_, int64_t K_, int64_t C_, int64_t L_)
      : in(in_), K(K_), C(C_), L(L_),
        ring((DD ? 2 : 1) * K_ * C_, neg_inf<scalar_t>()), alpha(C_), sigma(C_),
        terms(K_ * C_), pairs(C_ * C_), scratch(std::max(K_, C_) * C_), entered(C_), top(C_),
        emit(C_), term_prev(K_ * C_) {}

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
      for (int64_t c = 0; c < C; ++c) {
        scalar_t v;
        const int best = argmax<scalar_t>(
            static_cast<int>(dmax), [&](int i) { return terms[i * C + c]; }, &v);
        alpha[c] = in.end(t - 1, c) + v;
        if (bp_duration) bp_duration[c] = best + 1;
        if (DD && bp_previous) bp_previous[c] = term_prev[best * C + c];
      }
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
    for (int64_t cp = 0; cp < C; ++cp) {
      scalar_t* row = pairs.data() + cp * C;
      for (int64_t c = 0; c < C; ++c) row[c] = prev[cp] + trans[cp * C + c];
    }
    if (MAX) {
      for (int64_t c = 0; c < C; ++c) {
        const int a = argmax<scalar_t>(
            static_cast<int>(C), [&](int cp) { return pairs[cp * C + c]; }, &entered[c]);
        if (best) best[c] = a;
      }
    } else {
      lse_columns(pairs.data(), C, C, entered.data(), top.data(), scratch.data());
    }
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
// rounding errors; what underflow loses ("ghost" mass) is bounded, in
// absolute log units, all along the scan, and log Z is accepted only if
// Z ≥ rho · ghost(Z). Otherwise the caller recomputes the sequence with the
// log-domain scan above, so the result is exact either way and the decision
// is a deterministic function of the inputs. docs/design.md has the
// derivation.

// log(exp(a) + exp(b)) for bounds: -inf is neutral.
inline double log_add(double a, double b) {
  if (a < b) std::swap(a, b);
  if (b == -std::numeric_limits<double>::infinity()) return a;
  return a + std::log1p(std::exp(b - a));
}

constexpr double kLn2 = 0.69314718055994530942;
// Bounds are computed in float64 with their own rounding: every comparison
// that accepts an exp-domain value keeps this much (1%) in reserve.
constexpr double kBoundSlack = 0.01;

// A lower bound of log(v), v > 0, to within ln 2: cheap, and conservative
// wherever a bound is compared against a value.
template <typename scalar_t>
inline double log_lower(scalar_t v) {
  return std::ilogb(v) * kLn2;
}

// The hot loop of the exp-domain forward, one ring row (the entries of one
// age): the duration-weighted sum, the largest entry that stays alive and the
// smallest positive entry, along c. A function of its own so that the
// restrict qualifiers let the compiler vectorise it.
template <typename scalar_t>
inline void ring_row_pass(const scalar_t* __restrict r, const scalar_t* __restrict w,
                          const scalar_t* __restrict kp, scalar_t* __restrict acc,
                          scalar_t* __restrict livemax, scalar_t* __restrict rmin, int64_t C) {
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t x = r[c];
    acc[c] += x * w[c];
    const scalar_t live = x * kp[c], lm = livemax[c];
    livemax[c] = live > lm ? live : lm;
    const scalar_t pos = x > 0 ? x : inf, mn = rmin[c];
    rmin[c] = pos < mn ? pos : mn;
  }
}

template <typename scalar_t>
struct ExpForward {
  using Limits = std::numeric_limits<scalar_t>;
  static constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const SequenceInputs<scalar_t>& in;
  const int64_t K, C, L;
  const scalar_t tiny = Limits::min();  // a value below it may have lost up to tiny
  const double log_rho = (sizeof(scalar_t) < sizeof(double) ? 24 : 53) * kLn2;
  double log_rho_abs;  // the per-quantity absorption threshold: log(4 rho L)

  // Per-call tables.
  std::vector<double> dur_max;      // (C) finite max over d of duration[d-1, c] (0 if none)
  std::vector<scalar_t> weight;     // (K, C) exp(duration - dur_max), flushed below tiny
  std::vector<scalar_t> keep;       // (K, C) 1 where an entry of age d+1 can still matter
  std::vector<double> weight_lost;  // (C) log of 2 · the true weights that flushed
  std::vector<scalar_t> weight_minpos;  // (C) smallest positive weight
  std::vector<int> last_duration;   // (C) largest duration of label c that can reach the end
  std::vector<double> col_max;      // (C) finite max over c' of transition[c', c]
  std::vector<scalar_t> A;          // (C, C) exp(transition - col_max[c])
  std::vector<double> A_bound;      // (C, C) the same in float64, for the ghost mat-vec
  std::vector<double> A_lost;       // (C) log of the column's true entries that flushed
  std::vector<scalar_t> A_minpos;   // (C) smallest positive entry of the column

  // State: ring, offset, ghosts.
  std::vector<scalar_t> ring;  // (K, C)
  double O = 0.0;
  // Per-label ghost of the ring's entries, absolute log units, in two
  // generations by the time of the charge; an entry leaves the ring at most
  // K steps after it is charged, so generation 0 expires every K steps.
  std::vector<double> ghost_old, ghost_new;
  std::vector<scalar_t> acc, alpha, sigma, u, emit, fo, fn, livemax, rmin;
  std::vector<double> ga, gs, work, lemit;
  double scale_alpha = 0.0, scale_sigma = 0.0;
  bool rejected = false;  // a bound could not be kept: the caller falls back

  ExpForward(const SequenceInputs<scalar_t>& in_, int64_t K_, int64_t C_, int64_t L_)
      : in(in_), K(K_), C(C_), L(L_), dur_max(C_, 0.0), weight(K_ * C_), keep(K_ * C_),
        weight_lost(C_, kNegInf), weight_minpos(C_), last_duration(C_, 0), col_max(C_, 0.0),
        A(C_ * C_), A_bound(C_ * C_), A_lost(C_, kNegInf), A_minpos(C_), ring(K_ * C_, 0),
        ghost_old(C_, kNegInf), ghost_new(C_, kNegInf), acc(C_), alpha(C_), sigma(C_), u(C_),
        emit(C_), fo(C_), fn(C_), livemax(C_, 0), rmin(C_, Limits::infinity()), ga(C_, kNegInf),
        gs(C_, kNegInf), work(C_), lemit(C_) {
    log_rho_abs = std::log(4.0) + log_rho + std::log(static_cast<double>(std::max<int64_t>(L, 1)));
    rejected = bad_parameters();
    tables();
  }

  void tables() {
    // Durations: per-label max, normalised weights, what flushes.
    std::vector<int> raw_last(C, 0);
    for (int64_t c = 0; c < C; ++c) {
      double mx = kNegInf;
      for (int64_t d = 1; d <= K; ++d) {
        const double v = in.dur(d, c);
        if (v > kNegInf) raw_last[c] = static_cast<int>(d);
        if (v > mx && std::isfinite(v)) mx = v;
      }
      dur_max[c] = mx == kNegInf ? 0.0 : mx;
      weight_minpos[c] = Limits::infinity();
      double lost = 0.0;
      for (int64_t d = 1; d <= K; ++d) {
        const double x = static_cast<double>(in.dur(d, c)) - dur_max[c];
        scalar_t w = fexp(static_cast<scalar_t>(x));
        if (w < tiny) {
          lost += std::exp(x);
          w = 0;
        }
        weight[(d - 1) * C + c] = w;
        if (w > 0) weight_minpos[c] = std::min(weight_minpos[c], w);
      }
      weight_lost[c] = lost > 0 ? std::log(2.0 * lost) : kNegInf;
    }
    // Transition, normalised per column.
    for (int64_t c = 0; c < C; ++c) {
      double mx = kNegInf;
      for (int64_t cp = 0; cp < C; ++cp) {
        const double v = in.trans(cp, c);
        if (v > mx && std::isfinite(v)) mx = v;
      }
      col_max[c] = mx == kNegInf ? 0.0 : mx;
      A_minpos[c] = Limits::infinity();
      double lost = 0.0;
      for (int64_t cp = 0; cp < C; ++cp) {
        const double x = static_cast<double>(in.trans(cp, c)) - col_max[c];
        const double xb = std::exp(x);
        scalar_t a = fexp(static_cast<scalar_t>(x));
        if (a < tiny) {
          lost += xb;
          a = 0;
        }
        A[cp * C + c] = a;
        A_bound[cp * C + c] = xb;
        if (a > 0) A_minpos[c] = std::min(A_minpos[c], a);
      }
      A_lost[c] = lost > 0 ? std::log(lost) : kNegInf;
    }
    // Labels that can reach an end: a fixed point over the finite
    // transitions. An entry of another label, or one older than its label's
    // longest duration, can never contribute to Z: it is kept at exactly 0,
    // so that it can neither set the normaliser nor flush the live mass.
    std::vector<char> reach(C, 0);
    for (int64_t c = 0; c < C; ++c) reach[c] = raw_last[c] > 0 && in.end_transition[c] > neg_inf<scalar_t>();
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
    for (int64_t c = 0; c < C; ++c) {
      last_duration[c] = reach[c] ? raw_last[c] : 0;
      for (int64_t d = 1; d <= K; ++d) keep[(d - 1) * C + c] = d + 1 <= last_duration[c] ? 1 : 0;
    }
  }

  bool any_ring_ghost() const {
    for (int64_t c = 0; c < C; ++c)
      if (ghost_old[c] > kNegInf || ghost_new[c] > kNegInf) return true;
    return false;
  }

  // Step 0: sigma_hat[0] and its ghost.
  void first() {
    double m = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const double x = in.first(c);
      if (x > m && std::isfinite(x)) m = x;
    }
    if (m == kNegInf) m = 0.0;
    scale_sigma = m;
    for (int64_t c = 0; c < C; ++c) {
      const double x = in.first(c);
      sigma[c] = fexp(static_cast<scalar_t>(x - m));
      gs[c] = (x > kNegInf && sigma[c] < tiny) ? x + kBoundSlack : kNegInf;
    }
  }

  // Step t ≥ 1: alpha_hat[t] from the ring, with its ghost ga (absolute).
  void ends(int64_t t) {
    if (t % K == 0) {
      ghost_old.swap(ghost_new);
      std::fill(ghost_new.begin(), ghost_new.end(), kNegInf);
    }
    const int64_t n = std::min(t, K);
    const int tK = static_cast<int>(t % K);
    std::fill(acc.begin(), acc.end(), scalar_t(0));
    std::fill(livemax.begin(), livemax.end(), scalar_t(0));
    std::fill(rmin.begin(), rmin.end(), Limits::infinity());
    for (int64_t d = 1; d <= n; ++d)
      ring_row_pass(ring.data() + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * C,
                    weight.data() + (d - 1) * C, keep.data() + (d - 1) * C, acc.data(),
                    livemax.data(), rmin.data(), C);
    // End factor, normalised against the mass it multiplies.
    double mes = kNegInf, ya_max = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const double ya = static_cast<double>(in.end(t - 1, c)) + dur_max[c];
      if (std::isfinite(ya)) {
        ya_max = std::max(ya_max, ya);
        if (acc[c] > 0) mes = std::max(mes, ya + log_lower(acc[c]));
      }
    }
    if (mes == kNegInf) mes = ya_max == kNegInf ? 0.0 : ya_max;
    scale_alpha = O + mes;
    const bool ring_ghost = any_ring_ghost();
    for (int64_t c = 0; c < C; ++c) {
      const double ya = static_cast<double>(in.end(t - 1, c)) + dur_max[c];
      const scalar_t endf = fexp(static_cast<scalar_t>(ya - mes));
      alpha[c] = acc[c] * endf;
      // Ghost of acc (absolute): the ring's ghosts, weights that flushed,
      // products that fell below tiny.
      double g = ring_ghost ? log_add(ghost_old[c], ghost_new[c]) + dur_max[c] : kNegInf;
      if (rmin[c] < Limits::infinity()) {
        const double base = O + dur_max[c];
        if (rmin[c] * weight_minpos[c] < tiny)
          g = log_add(g, std::log(static_cast<double>(n) * tiny) + base);
        if (weight_lost[c] > kNegInf) g = log_add(g, weight_lost[c] + base);
      }
      g += static_cast<double>(in.end(t - 1, c));
      if (acc[c] > 0 && (alpha[c] < tiny || endf < tiny))
        g = log_add(g, std::log(static_cast<double>(acc[c])) + O + ya + kBoundSlack);
      if (g > kNegInf && alpha[c] > 0 &&
          g + log_rho_abs + kBoundSlack <= log_lower(alpha[c]) + scale_alpha)
        g = kNegInf;  // absorbed: at most 1/rho_abs relative
      ga[c] = g;
    }
  }

  // t = L: log Z, or false if the bound cannot certify it.
  bool finish(double* log_z) {
    double mz = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const double et = in.end_transition[c];
      if (alpha[c] > 0 && std::isfinite(et)) mz = std::max(mz, et + log_lower(alpha[c]));
    }
    if (mz == kNegInf) mz = 0.0;
    double z = 0.0, gz = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const double et = in.end_transition[c];
      const scalar_t zf = fexp(static_cast<scalar_t>(et - mz));
      const scalar_t term = alpha[c] * zf;
      z += static_cast<double>(term);
      gz = log_add(gz, ga[c] + et);
      if (alpha[c] > 0 && (term < tiny || zf < tiny))
        gz = log_add(gz, std::log(static_cast<double>(alpha[c])) + scale_alpha + et + kBoundSlack);
    }
    if (rejected || z != z || gz != gz) return false;
    if (z == 0.0) {
      *log_z = kNegInf;
      return gz == kNegInf;
    }
    *log_z = scale_alpha + mz + std::log(z);
    return std::isfinite(*log_z) && *log_z >= log_rho + gz + kBoundSlack;
  }

  // t < L, t ≥ 1: sigma_hat[t] and its ghost gs (absolute).
  void starts(int64_t t) {
    std::fill(u.begin(), u.end(), scalar_t(0));
    scalar_t amax = 0, amin = Limits::infinity();
    double gmax = kNegInf;
    for (int64_t cp = 0; cp < C; ++cp) {
      const scalar_t a = alpha[cp];
      amax = std::max(amax, a);
      if (a > 0) amin = std::min(amin, a);
      gmax = std::max(gmax, ga[cp]);
      const scalar_t* __restrict row = A.data() + cp * C;
      scalar_t* __restrict uu = u.data();
      for (int64_t c = 0; c < C; ++c) uu[c] += a * row[c];
    }
    // The ghost mat-vec, exact (a cheaper bound would spread one label's
    // ghost into every column, and compound).
    if (gmax > kNegInf) {
      std::fill(work.begin(), work.end(), 0.0);
      for (int64_t cp = 0; cp < C; ++cp) {
        if (ga[cp] == kNegInf) continue;
        const double wgt = std::exp(ga[cp] - gmax);
        const double* row = A_bound.data() + cp * C;
        for (int64_t c = 0; c < C; ++c) work[c] += wgt * row[c];
      }
    }
    double mss = kNegInf, ys_max = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const double ys = static_cast<double>(in.start(t, c)) + col_max[c];
      if (std::isfinite(ys)) {
        ys_max = std::max(ys_max, ys);
        if (u[c] > 0) mss = std::max(mss, ys + log_lower(u[c]));
      }
    }
    if (mss == kNegInf) mss = ys_max == kNegInf ? 0.0 : ys_max;
    scale_sigma = scale_alpha + mss;
    for (int64_t c = 0; c < C; ++c) {
      const double ys = static_cast<double>(in.start(t, c)) + col_max[c];
      const scalar_t h = fexp(static_cast<scalar_t>(ys - mss));
      sigma[c] = u[c] * h;
      double g = (gmax > kNegInf && work[c] > 0) ? std::log(work[c]) + gmax + col_max[c] : kNegInf;
      if (amax > 0) {
        const double base = scale_alpha + col_max[c];
        if (A_lost[c] > kNegInf) g = log_add(g, std::log(static_cast<double>(amax)) + A_lost[c] + base);
        if (amin * A_minpos[c] < tiny) g = log_add(g, std::log(static_cast<double>(C) * tiny) + base);
      }
      g += static_cast<double>(in.start(t, c));
      if (u[c] > 0 && (sigma[c] < tiny || h < tiny))
        g = log_add(g, std::log(static_cast<double>(u[c])) + scale_alpha + ys + kBoundSlack);
      if (g > kNegInf && sigma[c] > 0 &&
          g + log_rho_abs + kBoundSlack <= log_lower(sigma[c]) + scale_sigma)
        g = kNegInf;
      gs[c] = g;
    }
  }

  // Move the ring to step t+1 (t < L): apply position t's emissions, open
  // the segments starting at t, re-normalise by the largest entry that can
  // still matter.
  void advance(int64_t t) {
    double m = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const double s = in.score(t, c);
      if (s > m && std::isfinite(s)) m = s;
    }
    if (m == kNegInf) m = 0.0;
    // The emission factor in the dtype (C vectorised exps); a label whose
    // factor flushed takes its factors from float64 below, so that what a
    // flush loses is never more than the final factor's own underflow.
    for (int64_t c = 0; c < C; ++c) {
      lemit[c] = static_cast<double>(in.score(t, c)) - m;
      emit[c] = fexp(static_cast<scalar_t>(lemit[c]));
    }
    double old = 0.0, fresh = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const double e = emit_flushed(c) ? std::exp(lemit[c]) : static_cast<double>(emit[c]);
      old = std::max(old, static_cast<double>(livemax[c]) * e);
      if (last_duration[c] >= 1) fresh = std::max(fresh, static_cast<double>(sigma[c]) * e);
    }
    double top = std::max(old > 0 ? O + std::log(old) : kNegInf,
                          fresh > 0 ? scale_sigma + std::log(fresh) : kNegInf);
    if (top == kNegInf) top = O;
    const double so = std::exp(O - top), sn = std::exp(scale_sigma - top);
    const double new_offset = top + m;
    const double big = static_cast<double>(Limits::max());
    for (int64_t c = 0; c < C; ++c) {
      const double e = static_cast<double>(emit[c]);
      double old_f = e * so, new_f = e * sn;
      if (emit_flushed(c)) {
        old_f = std::exp(lemit[c] + (O - top));
        new_f = std::exp(lemit[c] + (scale_sigma - top));
      } else if (e == 0) {
        old_f = new_f = 0.0;  // an exact zero (a -inf score): exact
      }
      // A factor past the dtype's range has no bound: reject where it
      // multiplies something; elsewhere it multiplies exact zeros.
      if ((rmin[c] < Limits::infinity() && old_f > big) || (sigma[c] > 0 && new_f > big))
        rejected = true;
      fo[c] = static_cast<scalar_t>(std::min(old_f, big));
      fn[c] = static_cast<scalar_t>(std::min(new_f, big));
    }
    // Ghosts: the new entries', then every generation grows by the
    // emissions (exactly as the entries they stand for), then the old
    // entries that this step's factor takes below tiny.
    const double lost_old = std::log(2.0 * static_cast<double>(K) * tiny) + new_offset;
    for (int64_t c = 0; c < C; ++c) {
      if (last_duration[c] == 0) {
        ghost_old[c] = ghost_new[c] = kNegInf;
        continue;
      }
      double g = gs[c];
      const scalar_t v = sigma[c] * fn[c];
      if (sigma[c] > 0 && lemit[c] > kNegInf && (v < tiny || fn[c] < tiny))
        g = log_add(g, std::log(static_cast<double>(sigma[c])) + scale_sigma + kBoundSlack);
      ghost_new[c] = log_add(ghost_new[c], g);
      const double s = in.score(t, c);
      ghost_old[c] += s;
      ghost_new[c] += s;
      if (ghost_old[c] != ghost_old[c]) ghost_old[c] = kNegInf;  // -inf + -inf is fine; NaN only from NaN input
      if (ghost_new[c] != ghost_new[c]) ghost_new[c] = kNegInf;
      if (rmin[c] < Limits::infinity() && lemit[c] > kNegInf &&
          (fo[c] < tiny || rmin[c] * fo[c] < tiny))
        ghost_new[c] = log_add(ghost_new[c], lost_old);
    }
    if (bad_position(t)) rejected = true;
    const int tK = static_cast<int>(t % K);
    const int64_t n = std::min(t, K - 1);
    const scalar_t* __restrict f = fo.data();
    for (int64_t d = 1; d <= n; ++d) {
      scalar_t* __restrict r = ring.data() + slot_before(tK, static_cast<int>(d), static_cast<int>(K)) * C;
      const scalar_t* __restrict kp = keep.data() + (d - 1) * C;
      for (int64_t c = 0; c < C; ++c) r[c] = r[c] * f[c] * kp[c];
    }
    scalar_t* __restrict r = ring.data() + tK * C;
    for (int64_t c = 0; c < C; ++c) r[c] = last_duration[c] >= 1 ? sigma[c] * fn[c] : scalar_t(0);
    O = new_offset;
  }

  bool emit_flushed(int64_t c) const { return emit[c] < tiny && lemit[c] > kNegInf; }

  // NaN or +inf makes the bounds meaningless: such sequences go to the log
  // scan, which gives the NaN.
  static bool bad(scalar_t x) { return !(x < Limits::infinity()); }
  bool bad_position(int64_t t) const {
    bool any = false;
    for (int64_t c = 0; c < C; ++c)
      any |= bad(in.score(t, c)) | bad(in.start(t, c)) | bad(in.end(t, c));
    return any;
  }
  bool bad_parameters() const {
    bool any = false;
    for (int64_t i = 0; i < C * C; ++i) any |= bad(in.transition[i]);
    for (int64_t i = 0; i < K * C; ++i) any |= bad(in.duration[i]);
    for (int64_t c = 0; c < C; ++c) any |= bad(in.start_transition[c]) | bad(in.end_transition[c]);
    return any;
  }

  // The ring in the checkpoint layout: logs relative to O, -inf for 0.
  void save(int64_t t, scalar_t* out, double* out_offset) const {
    const int tK = static_cast<int>(t % K);
    for (int row = 0; row < K; ++row) {
      const scalar_t* r = ring.data() + ring_row_of_checkpoint_row(row, tK, static_cast<int>(K)) * C;
      for (int64_t c = 0; c < C; ++c) out[row * C + c] = r[c] > 0 ? flog(r[c]) : neg_inf<scalar_t>();
    }
    *out_offset = O;
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

// The exp-domain forward of sequence b; false (outputs partly written) when
// its bounds cannot certify log Z, and the caller reruns the log scan.
template <typename scalar_t>
bool forward_sequence_exp(const ForwardParams& p, int64_t b) {
  const FlushSubnormals flush_subnormals;
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = sequence_length(p, b);
  ExpForward<scalar_t> scan(in, p.K, p.C, L);
  if (scan.rejected) return false;
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  double log_z = 0.0;
  for (int64_t t = 0; t <= L; ++t) {
    if (ckpt.due(t)) scan.save(t, ckpt.at(t / p.interval), ckpt.offset + t / p.interval);
    if (t == 0) scan.first();
    else scan.ends(t);
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

// FLASHSEMICRF_CPU_ALGORITHM: "exp" runs the scaled exp-domain
// forward where it exists (static transition) with the log scan as its
// per-sequence fallback; "log" (default) runs the log scan everywhere.
bool cpu_uses_exp_domain() {
  const char* v = std::getenv("FLASHSEMICRF_CPU_ALGORITHM");
  if (v != nullptr && std::strcmp(v, "exp") == 0) return true;
  TORCH_CHECK(v == nullptr || *v == '\0' || std::strcmp(v, "log") == 0,
              "FLASHSEMICRF_CPU_ALGORITHM must be 'exp' or 'log' (or unset), got '", v, "'");
  return false;
}

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

  for (int64_t j = ckpt.last_span(L); j >= 0; --j) {
    const int64_t first = ckpt.first(j), last = ckpt.last(j, L);
    scan.load(first, ckpt.at(j), ckpt.offset[j]);
    for (int64_t t = first; t <= last; ++t) {
      const scalar_t m = scan.step(t);
      std::copy_n(scan.alpha.data(), C, alpha_buf.data() + (t - first) * C);
      std::copy_n(scan.sigma.data(), C, sigma_buf.data() + (t - first) * C);
      off_buf[t - first] = scan.offset;
      if (t < last) scan.advance(t, m);
    }

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
        double total = 0.0;
        for (int64_t c = 0; c < C; ++c)
          total += static_cast<double>(fexp(alpha[c] + beta[c] + shift_beta));
        const scalar_t* fwd = ckpt.at(j);  // open segments [t-d1, t)
        const scalar_t shift_x = static_cast<scalar_t>(ckpt.offset[j] + (Q - q) - log_z);
        for (int64_t d1 = 1; d1 <= std::min(K - 1, t); ++d1) {
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
            const scalar_t* back = ring.data() + slot_after(tK, d2, K) * C;  // [t, t+d2)
            const scalar_t* dur = in.duration + (d - 1) * C;
            scalar_t part = 0;
            for (int64_t c = 0; c < C; ++c) part += fexp(opened[c] + back[c] + dur[c] + shift_x);
            total += static_cast<double>(part);
          }
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

template <typename scalar_t, bool DD>
void viterbi_sequence(const ViterbiParams& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = sequence_length(p, b), C = p.C;
  ForwardScan<scalar_t, DD, true> scan(in, p.K, C, L);
  const SequencePath path(p, b);
  std::fill_n(path.label, p.T, int64_t(-1));
  int c = 0;
  scalar_t* best = static_cast<scalar_t*>(p.best) + b;
  for (int64_t t = 0; t <= L; ++t) {
    const scalar_t m = scan.step(t, path.best_duration + t * C, path.best_previous + t * C);
    if (t == L) {
      const scalar_t v = scan.end_value(&c);
      *best = static_cast<scalar_t>(scan.offset + static_cast<double>(v));
    } else {
      scan.advance(t, m);
    }
  }
  if (*best > neg_inf<scalar_t>()) path.trace_back<DD>(L, c);  // not -inf or NaN: a path
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
  static void run(const ForwardParams& p, const at::Tensor& scores) {
    const bool exp_domain = cpu_uses_exp_domain();
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      using scalar_t = decltype(zero);
      if (exp_domain && !decltype(dd)::value) {
        if (forward_sequence_exp<scalar_t>(p, b)) return;
        exp_fallbacks.fetch_add(1, std::memory_order_relaxed);
      }
      forward_sequence<scalar_t, decltype(dd)::value>(p, b);
    });
  }
  static void run(const BackwardParams& p, const at::Tensor& scores) {
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      backward_sequence<decltype(zero), decltype(dd)::value>(p, b);
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
// sequences the exp-domain forward has handed to the log scan so far.
TORCH_LIBRARY(flashsemicrf_testing, m) {
  m.def("cpu_exp_fallbacks() -> int", []() -> int64_t { return exp_fallbacks.load(); });
}

}  // namespace flashsemicrf
