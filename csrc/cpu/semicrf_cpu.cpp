// The C++ CPU kernels: the streaming scan of flashsemicrf/reference.py, one
// sequence per task (at::parallel_for over the batch), rings stored
// circularly (the entry of a segment starting or ending at position s lives in
// slot s % K) so nothing is shifted. Deterministic: every output element is
// written by one task in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "semicrf.h"
#include "semicrf_host.h"

namespace flashsemicrf {
namespace {

// exp written so that the compiler vectorises loops calling it (std::exp
// does not vectorise without -ffast-math, which would break -inf and NaN).
// float: Cody–Waite range reduction and a degree-6 polynomial (≈ 1 ulp);
// exp(-inf) = 0, NaN stays NaN, results below ~1e-38 flush to 0.
inline float vexp(float x) {
  const float lo = -87.3f, hi = 88.7f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  // Round to nearest by the 1.5·2^23 trick (vectorises without SSE4.1's floor).
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float g = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * g + 1.3981999507e-3f;
  y = y * g + 8.3334519073e-3f;
  y = y * g + 4.1665795894e-2f;
  y = y * g + 1.6666665459e-1f;
  y = y * g + 5.0000001201e-1f;
  y = y * g * g + g + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float r = y * scale;
  r = x < lo ? 0.0f : r;
  r = x > hi ? std::numeric_limits<float>::infinity() : r;
  return x != x ? x : r;
}
inline double vexp(double x) { return std::exp(x); }

template <typename scalar_t>
scalar_t lse(const scalar_t* x, int64_t n) {
  scalar_t m = neg_inf<scalar_t>();
  for (int64_t i = 0; i < n; ++i) m = nan_max(m, x[i]);
  if (m == neg_inf<scalar_t>()) return m;
  scalar_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += vexp(x[i] - m);
  return m + std::log(sum);
}

// First index of the max (ties go to the smallest index); NaN wins.
template <typename scalar_t>
int64_t argmax(const scalar_t* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best] || (x[i] != x[i] && x[best] == x[best])) best = i;
  return best;
}

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
  // What each column subtracts: 0 for an all -inf one, whose terms are then
  // exp(-inf) = 0 rather than exp(NaN).
  for (int64_t c = 0; c < C; ++c) out[c] = top[c] == neg_inf<scalar_t>() ? scalar_t(0) : top[c];
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = 0; c < C; ++c) scaled[r * C + c] = vexp(rows[r * C + c] - out[c]);
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  for (int64_t r = 0; r < n_rows; ++r)
    for (int64_t c = 0; c < C; ++c) out[c] += scaled[r * C + c];
  for (int64_t c = 0; c < C; ++c)
    out[c] = top[c] == neg_inf<scalar_t>() ? top[c] : top[c] + std::log(out[c]);
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
        terms(K_ * C_), pairs(C_ * C_), scratch(std::max(K_, C_) * C_), entered(C_), top(C_), emit(C_), term_prev(K_ * C_) {}

  scalar_t reduce(const scalar_t* x, int64_t n) const {
    if (MAX) return x[argmax(x, n)];
    return lse(x, n);
  }

  // Step t: alpha_hat[t] (t > 0) and sigma_hat[t] (t < L), both relative to
  // O_t. Returns the max m_t subtracted. bp_*: this step's backpointer rows.
  scalar_t step(int64_t t, int32_t* bp_duration = nullptr, int32_t* bp_previous = nullptr) {
    scalar_t m = neg_inf<scalar_t>();
    if (t == 0) {
      for (int64_t c = 0; c < C; ++c) {
        sigma[c] = in.start_transition[c] + in.start(0, c);
        m = nan_max(m, sigma[c]);
      }
      m = finite_or_zero(m);
      for (int64_t c = 0; c < C; ++c) sigma[c] -= m;
      offset += m;
      return m;
    }
    const int64_t dmax = std::min(K, t);
    // terms[d-1][c]: the open segment [t-d, t) with its duration score.
    for (int64_t d = 1; d <= dmax; ++d) {
      const int64_t s = t - d, slot = s % K;
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
        int64_t best = 0;
        for (int64_t d = 1; d < dmax; ++d) {
          const scalar_t v = terms[d * C + c], w = terms[best * C + c];
          if (v > w || (v != v && w == w)) best = d;
        }
        alpha[c] = in.end(t - 1, c) + terms[best * C + c];
        if (bp_duration) bp_duration[c] = static_cast<int32_t>(best + 1);
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
        int64_t a = 0;
        for (int64_t cp = 1; cp < C; ++cp) {
          const scalar_t v = pairs[cp * C + c], w = pairs[a * C + c];
          if (v > w || (v != v && w == w)) a = cp;
        }
        entered[c] = pairs[a * C + c];
        if (best) best[c] = static_cast<int32_t>(a);
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

  // Checkpoints hold the ring in duration order (row d-1: the segment that
  // started at t-d), the layout every backend shares.
  void save(int64_t t, scalar_t* out, double* out_offset) const {
    const int64_t parts = DD ? 2 : 1;
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t d = 1; d <= K; ++d) {
        const int64_t slot = ((t - d) % K + K) % K;
        std::copy_n(ring.data() + (part * K + slot) * C, C, out + (part * K + d - 1) * C);
      }
    *out_offset = offset;
  }

  void load(int64_t t, const scalar_t* src, double src_offset) {
    const int64_t parts = DD ? 2 : 1;
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t d = 1; d <= K; ++d) {
        const int64_t slot = ((t - d) % K + K) % K;
        std::copy_n(src + (part * K + d - 1) * C, C, ring.data() + (part * K + slot) * C);
      }
    offset = src_offset;
  }

  scalar_t end_value() const {
    std::vector<scalar_t> v(C);
    for (int64_t c = 0; c < C; ++c) v[c] = alpha[c] + in.end_transition[c];
    return reduce(v.data(), C);
  }
};

template <typename scalar_t, bool DD>
void forward_sequence(const Params& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = p.lengths[b], S = p.ring_width, C = p.C;
  ForwardScan<scalar_t, DD, false> scan(in, p.K, C, L);
  scalar_t* ckpt = static_cast<scalar_t*>(p.ckpt_ring) + b * p.n_ckpt * S * C;
  double* ckpt_off = p.ckpt_offset + b * p.n_ckpt;
  for (int64_t t = 0; t <= L; ++t) {
    if (t < p.T && t % p.interval == 0) {
      const int64_t j = t / p.interval;
      scan.save(t, ckpt + j * S * C, ckpt_off + j);
    }
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
  for (int64_t j = L / p.interval + 1; j < p.n_ckpt; ++j) {
    std::fill_n(ckpt + j * S * C, S * C, neg_inf<scalar_t>());
    ckpt_off[j] = 0.0;
  }
}

template <typename scalar_t, bool DD>
void backward_sequence(const Params& p, int64_t b) {
  const int64_t K = p.K, C = p.C, L = p.lengths[b], S = p.ring_width, T = p.T;
  // The forward's log Z only says whether the sequence is dead (-inf): in
  // float32 it holds |log Z|·6e-8 of rounding, too coarse to normalise the
  // posteriors of a long sequence; the backward recomputes it in float64 at
  // t = L, its first step.
  double log_z = static_cast<double>(static_cast<const scalar_t*>(p.log_z)[b]);
  const scalar_t g = static_cast<const scalar_t*>(p.grad_log_z)[b];
  if (log_z == -std::numeric_limits<double>::infinity()) return;  // outputs stay 0

  const SequenceInputs<scalar_t> in(p, b);
  scalar_t* g_scores = static_cast<scalar_t*>(p.grad_scores) + b * T * C;
  scalar_t* g_trans = static_cast<scalar_t*>(p.grad_transition) + b * (DD ? K : 1) * C * C;
  scalar_t* g_dur = static_cast<scalar_t*>(p.grad_duration) + b * K * C;
  scalar_t* g_start_t = static_cast<scalar_t*>(p.grad_start_transition) + b * C;
  scalar_t* g_end_t = static_cast<scalar_t*>(p.grad_end_transition) + b * C;
  scalar_t* g_start_s =
      p.grad_start_scores ? static_cast<scalar_t*>(p.grad_start_scores) + b * T * C : nullptr;
  scalar_t* g_end_s =
      p.grad_end_scores ? static_cast<scalar_t*>(p.grad_end_scores) + b * T * C : nullptr;

  const scalar_t* ckpt = static_cast<const scalar_t*>(p.ckpt_ring) + b * p.n_ckpt * S * C;
  const double* ckpt_off = p.ckpt_offset + b * p.n_ckpt;
  ForwardScan<scalar_t, DD, false> scan(in, K, C, L);
  const int64_t span = p.interval + 1;
  std::vector<scalar_t> alpha_buf(span * C), sigma_buf(span * C);
  std::vector<double> off_buf(span);

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

  const int64_t last_span = std::min(L / p.interval, p.n_ckpt - 1);
  for (int64_t j = last_span; j >= 0; --j) {
    const int64_t first = j * p.interval;
    const int64_t last = j == last_span ? L : (j + 1) * p.interval - 1;
    scan.load(first, ckpt + j * S * C, ckpt_off[j]);
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

      if (t == L) {
        for (int64_t c = 0; c < C; ++c) u[c] = alpha[c] + in.end_transition[c];
        log_z = off + static_cast<double>(lse(u.data(), C));
        scalar_t q = neg_inf<scalar_t>();
        for (int64_t c = 0; c < C; ++c) q = nan_max(q, beta[c] = in.end_transition[c]);
        q = finite_or_zero(q);
        Q = q;
        const scalar_t shift = static_cast<scalar_t>(off + Q - log_z);
        for (int64_t c = 0; c < C; ++c) {
          beta[c] -= q;
          const scalar_t mass = exp(alpha[c] + beta[c] + shift) * g;
          g_end_t[c] = mass;
          if (g_end_s) g_end_s[(L - 1) * C + c] = mass;
        }
        std::fill(ring.begin(), ring.end(), neg_inf<scalar_t>());
        Q += emissions(L - 1, emit);
        for (int64_t c = 0; c < C; ++c) ring[(L % K) * C + c] = beta[c] + in.end(L - 1, c) + emit[c];
        continue;
      }

      // Segments [t, t+d): x[d-1][c] = backward ring + duration score, and
      // scaled = exp(x - top[c]); tau[c] = LSE_d x shares those exps with the
      // posteriors exp(enter + x + shift).
      const scalar_t shift = static_cast<scalar_t>(off + Q - log_z);
      const int64_t dmax = std::min(K, L - t);
      for (int64_t d = 1; d <= dmax; ++d) {
        const scalar_t* r = ring.data() + ((t + d) % K) * C;
        const scalar_t* dur = in.duration + (d - 1) * C;
        scalar_t* row = x.data() + (d - 1) * C;
        for (int64_t c = 0; c < C; ++c) row[c] = r[c] + dur[c];
      }
      lse_columns(x.data(), dmax, C, tau.data(), top.data(), scaled.data());
      if (DD && t > 0) {
        // The start term depends on d through transition[d-1], so the
        // posterior takes its own exp: splitting it as scaled · exp(enter_d +
        // top + shift) could overflow where scaled underflows.
        for (int64_t d = 1; d <= dmax; ++d) {
          scan.into(alpha, in.transition + (d - 1) * C * C, nullptr);
          scalar_t* row = post.data() + (d - 1) * C;
          const scalar_t* xd = x.data() + (d - 1) * C;
          for (int64_t c = 0; c < C; ++c)
            row[c] = vexp(scan.entered[c] + in.start(t, c) + xd[c] + shift) * g;
        }
      } else {
        // exp(sigma + x + shift) = scaled · exp(sigma + top + shift): the
        // second factor is the posterior of the best-scoring duration, ≤ 1.
        for (int64_t c = 0; c < C; ++c) weight[c] = vexp(sigma[c] + top[c] + shift) * g;
        for (int64_t d = 1; d <= dmax; ++d) {
          scalar_t* row = post.data() + (d - 1) * C;
          const scalar_t* sc = scaled.data() + (d - 1) * C;
          for (int64_t c = 0; c < C; ++c) row[c] = sc[c] * weight[c];
        }
      }
      // Position t+d-1 lies in every segment [t, t+d') with d' >= d.
      for (int64_t c = 0; c < C; ++c) covered[c] = 0;
      for (int64_t d = dmax; d >= 1; --d) {
        const scalar_t* row = post.data() + (d - 1) * C;
        scalar_t* gd = g_dur + (d - 1) * C;
        scalar_t* gs = g_scores + (t + d - 1) * C;
        for (int64_t c = 0; c < C; ++c) {
          gd[c] += row[c];
          covered[c] += row[c];
          gs[c] += covered[c];
        }
      }
      if (g_start_s) std::copy_n(covered.data(), C, g_start_s + t * C);
      if (t == 0) {
        std::copy_n(covered.data(), C, g_start_t);
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
          const scalar_t w = vexp(alpha[cp] + mx + shift) * g;
          scalar_t sum = 0;
          scalar_t* gt = g_trans + cp * C;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t e = vexp(row[c] - mx);
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
          const scalar_t w = vexp(alpha[cp] + mx + shift) * g;
          scalar_t sum = 0;
          for (int64_t d = 1; d <= dmax; ++d) {
            const scalar_t* row = inner.data() + (d - 1) * C;
            scalar_t* gt = g_trans + ((d - 1) * C + cp) * C;
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t e = vexp(row[c] - mx);
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
        if (g_end_s) g_end_s[(t - 1) * C + c] = vexp(alpha[c] + beta[c] + shift_beta) * g;
      }
      if (t == first) {
        // Re-anchor Q at every checkpoint: a segment boundary at t, or one
        // segment across t, has probability 1, so the rounding that forward
        // and backward gather over (t, L] cannot pile up over the sequence.
        double total = 0.0;
        for (int64_t c = 0; c < C; ++c)
          total += static_cast<double>(vexp(alpha[c] + beta[c] + shift_beta));
        const scalar_t* fwd = ckpt + j * S * C;  // open segments [t-d1, t)
        const scalar_t shift_x = static_cast<scalar_t>(ckpt_off[j] + (Q - q) - log_z);
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
            const scalar_t* back = ring.data() + ((t + d2) % K) * C;  // [t, t+d2)
            const scalar_t* dur = in.duration + (d - 1) * C;
            scalar_t part = 0;
            for (int64_t c = 0; c < C; ++c) part += vexp(opened[c] + back[c] + dur[c] + shift_x);
            total += static_cast<double>(part);
          }
        }
        if (total > 0 && std::isfinite(total)) Q -= std::log(total);
      }

      // Move the ring to step t-1: re-base, open the segments ending at t,
      // add position t-1's emissions (their max moves into Q, as forward).
      Q += emissions(t - 1, emit);
      const int64_t fresh = t % K;
      for (int64_t slot = 0; slot < K; ++slot) {
        scalar_t* r = ring.data() + slot * C;
        if (slot == fresh) {
          for (int64_t c = 0; c < C; ++c) r[c] = beta[c] + in.end(t - 1, c) + emit[c];
        } else {
          for (int64_t c = 0; c < C; ++c) r[c] = (r[c] - q) + emit[c];
        }
      }
    }
  }
}

template <typename scalar_t, bool DD>
void viterbi_sequence(const Params& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = p.lengths[b], C = p.C, T = p.T;
  ForwardScan<scalar_t, DD, true> scan(in, p.K, C, L);
  int32_t* bp_d = p.best_duration + b * (T + 1) * C;
  int32_t* bp_c = p.best_previous + b * (T + 1) * C;
  int64_t* label = p.segment_label + b * T;
  std::fill_n(label, T, int64_t(-1));
  int64_t c = 0;
  scalar_t* best = static_cast<scalar_t*>(p.best) + b;
  for (int64_t t = 0; t <= L; ++t) {
    const scalar_t m = scan.step(t, bp_d + t * C, bp_c + t * C);
    if (t == L) {
      std::vector<scalar_t> v(C);
      for (int64_t k = 0; k < C; ++k) v[k] = scan.alpha[k] + in.end_transition[k];
      c = argmax(v.data(), C);
      *best = static_cast<scalar_t>(scan.offset + static_cast<double>(v[c]));
    } else {
      scan.advance(t, m);
    }
  }
  if (!(*best > neg_inf<scalar_t>())) return;  // -inf or NaN: no path
  for (int64_t t = L; t > 0;) {
    const int64_t s = t - bp_d[t * C + c];
    label[s] = c;
    if (s > 0) c = DD ? bp_c[t * C + c] : bp_c[s * C + c];
    t = s;
  }
}

template <typename scalar_t, bool DD>
void filter_sequence(const Params& p, int64_t b) {
  const SequenceInputs<scalar_t> in(p, b);
  const int64_t L = p.lengths[b], C = p.C, T = p.T;
  ForwardScan<scalar_t, DD, false> scan(in, p.K, C, L);
  scalar_t* alpha = static_cast<scalar_t*>(p.history_alpha) + b * (T + 1) * C;
  scalar_t* sigma = static_cast<scalar_t*>(p.history_sigma) + b * (T + 1) * C;
  double* offset = p.history_offset + b * (T + 1);
  std::fill_n(alpha, (T + 1) * C, neg_inf<scalar_t>());
  std::fill_n(sigma, (T + 1) * C, neg_inf<scalar_t>());
  std::fill_n(offset, T + 1, 0.0);
  for (int64_t t = 0; t <= L; ++t) {
    const scalar_t m = scan.step(t);
    if (t > 0) std::copy_n(scan.alpha.data(), C, alpha + t * C);
    if (t < L && (t == 0 || !DD)) std::copy_n(scan.sigma.data(), C, sigma + t * C);
    offset[t] = scan.offset;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& scores, const at::Tensor& transition, const at::Tensor& duration,
    const at::Tensor& lengths, const at::Tensor& start_transition,
    const at::Tensor& end_transition, const std::optional<at::Tensor>& start_scores,
    const std::optional<at::Tensor>& end_scores, int64_t interval) {
  Problem prob(scores, transition, duration, lengths, start_transition, end_transition,
               start_scores, end_scores, interval);
  auto out = prob.forward_outputs();
  Params& p = prob.params;
  for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
    forward_sequence<decltype(zero), decltype(dd)::value>(p, b);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cpu(const at::Tensor& grad_log_z, const at::Tensor& scores, const at::Tensor& transition,
             const at::Tensor& duration, const at::Tensor& lengths,
             const at::Tensor& start_transition, const at::Tensor& end_transition,
             const std::optional<at::Tensor>& start_scores,
             const std::optional<at::Tensor>& end_scores, const at::Tensor& log_z,
             const at::Tensor& ckpt_ring, const at::Tensor& ckpt_offset, int64_t interval,
             bool boundary_mass) {
  Problem prob(scores, transition, duration, lengths, start_transition, end_transition,
               start_scores, end_scores, interval);
  auto out = prob.backward_outputs(grad_log_z, log_z, ckpt_ring, ckpt_offset, boundary_mass);
  Params& p = prob.params;
  for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
    backward_sequence<decltype(zero), decltype(dd)::value>(p, b);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> viterbi_cpu(
    const at::Tensor& scores, const at::Tensor& transition, const at::Tensor& duration,
    const at::Tensor& lengths, const at::Tensor& start_transition,
    const at::Tensor& end_transition, const std::optional<at::Tensor>& start_scores,
    const std::optional<at::Tensor>& end_scores) {
  Problem prob(scores, transition, duration, lengths, start_transition, end_transition,
               start_scores, end_scores, /*interval=*/1);
  auto out = prob.viterbi_outputs();
  Params& p = prob.params;
  for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
    viterbi_sequence<decltype(zero), decltype(dd)::value>(p, b);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filter_cpu(
    const at::Tensor& scores, const at::Tensor& transition, const at::Tensor& duration,
    const at::Tensor& lengths, const at::Tensor& start_transition,
    const at::Tensor& end_transition, const std::optional<at::Tensor>& start_scores,
    const std::optional<at::Tensor>& end_scores) {
  Problem prob(scores, transition, duration, lengths, start_transition, end_transition,
               start_scores, end_scores, /*interval=*/1);
  auto out = prob.filter_outputs();
  Params& p = prob.params;
  for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
    filter_sequence<decltype(zero), decltype(dd)::value>(p, b);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(flashsemicrf, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
  m.impl("viterbi", &viterbi_cpu);
  m.impl("filter", &filter_cpu);
}

}  // namespace flashsemicrf
