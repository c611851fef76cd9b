// The C++ CPU kernels: the streaming scan of flashsemicrf/reference.py, one
// sequence per task (at::parallel_for over the batch), rings stored
// circularly (the entry of a segment starting or ending at position s lives in
// slot s % K) so nothing is shifted. Deterministic: every output element is
// written by one task in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

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
    for_each_sequence(p, scores.scalar_type(), [&](auto zero, auto dd, int64_t b) {
      forward_sequence<decltype(zero), decltype(dd)::value>(p, b);
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

}  // namespace flashsemicrf
