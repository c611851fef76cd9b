// The bounds arithmetic of the exp-domain forward, shared by the C++ CPU
// kernel and the CUDA kernel (csrc/cuda/exp_forward_kernel.cuh), so that both
// charge, carry and accept the same ghosts. docs/design.md, "The CPU kernel's
// exp-domain forward and backward", has the derivation.
//
// The exp-domain forward keeps bounds on what underflow lost as "ghosts":
// float64 numbers in units of the dtype's smallest normal (tiny), relative
// to the scale of the quantity they belong to, so that every bound is a
// multiply-add and the per-step overhead is O(C) flops without logs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "semicrf.h"

namespace flashsemicrf {

constexpr double kLn2 = 0.69314718055994530942;
// A dtype factor from fexp is within a few ulp of the true one: bounds
// multiply by it times kUp.
constexpr double kUp = 1.0 + 1e-6;
// Every comparison that accepts an exp-domain value keeps 1% in reserve for
// the bounds' own rounding.
constexpr double kSlack = 1.01;

// floor(log2(v)) for v > 0 (a lower bound for subnormals), from the bits.
HOST_DEVICE int exponent_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  const int e = static_cast<int>((b >> 23) & 0xffu);
  return e == 0 ? -150 : e - 127;
}
HOST_DEVICE int exponent_of(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  const int e = static_cast<int>((b >> 52) & 0x7ffu);
  return e == 0 ? -1075 : e - 1023;
}

// The ghost (in units of the dtype's smallest normal) of a value computed as
// x · f, f = fexp(log_f) in the dtype: ghost g of x times the true factor,
// or, where f flushed, everything x and its ghost stood for (the true
// factor is below tiny). Positive bounds never round to 0: a product that
// underflows float64 is replaced by float64's smallest normal, above its
// true value.
template <typename scalar_t>
HOST_DEVICE double ghost_through_factor(double g, scalar_t x, scalar_t f, double log_f) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  constexpr double kFloor = std::numeric_limits<double>::min();
  const double tiny_d = static_cast<double>(std::numeric_limits<scalar_t>::min());
  if (f >= std::numeric_limits<scalar_t>::min())
    return g > 0 ? std::max(g * static_cast<double>(f) * kUp, kFloor) : 0.0;
  if (log_f == kNegInf || (g == 0.0 && x == 0)) return 0.0;  // exact zeros
  return std::max((g * tiny_d + static_cast<double>(x)) * kSlack, kFloor);
}

// A ghost carried through a float64 factor f: an upper bound even where f or
// the product underflowed float64; 0 for no ghost, or where f is an exact
// zero (a -inf score). (std::max spelled out, so that the CPU kernel's lanes
// vectorise it with the same NaN rule.)
HOST_DEVICE double scaled_ghost(double g, double f, bool exact_zero) {
  constexpr double kFloor = std::numeric_limits<double>::min();
  const double scaled = g * (f < kFloor ? kFloor : f) * kUp;
  return g == 0.0 || exact_zero ? 0.0 : (scaled < kFloor ? kFloor : scaled);
}

// log Z is accepted only if Z >= rho · ghost(Z), rho the dtype's precision.
template <typename scalar_t>
HOST_DEVICE constexpr double certify_ratio() {
  return sizeof(scalar_t) < sizeof(double) ? 0x1p24 : 0x1p53;
}

// A ghost below value / (4 rho L) is absorbed into relative error: at most 2L
// absorptions along any chain add 1/(2 rho) relative in all. Returns
// tiny · 4 rho L · kSlack: a ghost g with g · absorb_factor <= value is absorbed.
template <typename scalar_t>
HOST_DEVICE double absorb_factor_for(int64_t L) {
  return static_cast<double>(std::numeric_limits<scalar_t>::min()) * 4.0 *
         certify_ratio<scalar_t>() * static_cast<double>(L > 1 ? L : 1) * kSlack;
}

// NaN or +inf leaves nothing to bound: the exp-domain forwards hand such
// sequences to the log scan, which gives the NaN.
template <typename scalar_t>
HOST_DEVICE bool unboundable(scalar_t x) {
  return !(x < std::numeric_limits<scalar_t>::infinity());
}

// hi + lo += m in two-sum arithmetic: hi is the log scan's rounded offset,
// lo the rounding it carries.
HOST_DEVICE void two_sum_add(double& hi, double& lo, double m) {
  const double s = hi + m, bb = s - hi;
  lo += (hi - (s - bb)) + (m - bb);
  hi = s;
}

// The maximum the log scan's step subtracts (in its dtype), from alpha_hat's
// largest entry amax relative to that scan's offset + shift + mes; 0 where
// every label is 0. The exp-domain forwards add it to their record of the
// log scan's offset, so that checkpoints are written in that scan's terms.
// log_scan_step_from_log is the same from log(amax), for a caller that takes
// the logs apart from the sum.
template <typename scalar_t>
HOST_DEVICE double log_scan_step_from_log(double log_amax, double shift, double mes) {
  return static_cast<double>(static_cast<scalar_t>(log_amax + shift + mes));
}
template <typename scalar_t>
HOST_DEVICE double log_scan_step(scalar_t amax, double shift, double mes) {
  if (!(amax > 0)) return 0.0;
  return log_scan_step_from_log<scalar_t>(::log(static_cast<double>(amax)), shift, mes);
}

// The ghost of alpha_hat = acc · endf (endf = fexp(log_endf)) from acc's
// ghost g: through the factor, plus a smallest normal where the product fell
// below it; 0 where it is absorbed into relative error (g · absorb_factor ≤
// alpha_hat). *rejected where no bound is left.
template <typename scalar_t>
HOST_DEVICE double ghost_of_alpha(double g, scalar_t acc, scalar_t endf, double log_endf,
                                  scalar_t alpha, double absorb_factor, bool* rejected) {
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  g = ghost_through_factor(g, acc, endf, log_endf);
  if (acc > 0 && endf >= tiny && alpha < tiny) g += kSlack;
  if (g > 0 && alpha > 0 && g * absorb_factor <= static_cast<double>(alpha)) g = 0.0;
  if (!(g < 1e300)) *rejected = true;  // past any use (or NaN): fall back
  return g;
}

// The static forward's per-call tables, one label c at a time (the CPU
// kernel's and the CUDA kernel's). The duration weights: w = fexp(duration[d-1,
// c] - dur_max) in the dtype, 0 where that falls below tiny, handed to
// store(d, w) for d = 1 … K. Returns the flushed true weights' total, each
// rounded up and never to 0.
template <typename scalar_t, typename Store>
HOST_DEVICE double weight_column(const SequenceInputs<scalar_t>& in, int64_t K, int64_t c,
                                 double dur_max, Store store) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  constexpr double kFloor = std::numeric_limits<double>::min();
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  double lost = 0.0;
  for (int64_t d = 1; d <= K; ++d) {
    const double x = static_cast<double>(in.dur(d, c)) - dur_max;
    scalar_t w = fexp(static_cast<scalar_t>(x));
    if (w < tiny && x > kNegInf) {
      lost += std::max(::exp(x) * kUp, kFloor);
      w = 0;
    }
    store(d, w);
  }
  return lost;
}

// The transition's column c: a = fexp(transition[c', c] - col_max) in the
// dtype, 0 below tiny, and its float64 bound (rounded up, never to 0; 0 for
// a -inf entry), handed to store(c', a, bound) for c' = 0 … C-1. Returns the
// flushed entries' bounds' total.
template <typename scalar_t, typename Store>
HOST_DEVICE double transition_column(const SequenceInputs<scalar_t>& in, int64_t C, int64_t c,
                                     double col_max, Store store) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  constexpr double kFloor = std::numeric_limits<double>::min();
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  double lost = 0.0;
  for (int64_t cp = 0; cp < C; ++cp) {
    const double x = static_cast<double>(in.trans(cp, c)) - col_max;
    const double xb = x > kNegInf ? std::max(::exp(x) * kUp, kFloor) : 0.0;
    scalar_t a = fexp(static_cast<scalar_t>(x));
    if (a < tiny) {
      lost += xb;
      a = 0;
    }
    store(cp, a, xb);
  }
  return lost;
}

// t = L: log Z from alpha_hat (relative to O + mes) and its ghosts ga, or
// false where the ghost bound cannot certify it: Z ≥ rho · ghost(Z).
template <typename scalar_t>
HOST_DEVICE bool certified_log_z(const SequenceInputs<scalar_t>& in, int64_t C,
                                 const scalar_t* alpha, const double* ga, double O, double mes,
                                 double* log_z) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  const double tiny_d = static_cast<double>(tiny);
  const double rho = certify_ratio<scalar_t>();
  double top = kNegInf, et_max = kNegInf;
  for (int64_t c = 0; c < C; ++c) {
    const double et = in.end_transition[c];
    et_max = std::max(et_max, et);
    if (alpha[c] > 0) top = std::max(top, et + exponent_of(alpha[c]) * kLn2);
  }
  const double mz = top > kNegInf ? top : (et_max > kNegInf ? et_max : 0.0);
  double z = 0.0, gz = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double lz = static_cast<double>(in.end_transition[c]) - mz;
    const scalar_t zf = fexp(static_cast<scalar_t>(lz));
    const scalar_t term = alpha[c] > 0 ? alpha[c] * zf : scalar_t(0);
    z += static_cast<double>(term);
    gz += ghost_through_factor(ga[c], alpha[c], zf, lz);
    if (alpha[c] > 0 && zf >= tiny && term < tiny) gz += kSlack;
  }
  if (!(gz < std::numeric_limits<double>::infinity()) || z != z) return false;
  if (z == 0.0) {
    *log_z = kNegInf;
    return gz == 0.0;
  }
  *log_z = O + (mes + mz + ::log(z));
  return z >= rho * gz * tiny_d * kSlack;
}

}  // namespace flashsemicrf
