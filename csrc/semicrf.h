// Shared by the CPU kernel (C++ compiler) and the CUDA kernels (nvcc): the
// Params struct filled once at each host entry, the indexing of the inputs,
// and the per-element log-space math. The CPU kernel's tests exercise all of
// it on every commit, so the less the CUDA files own, the better.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace flashsemicrf {

// Sizes, pointers and strides of one call. Float pointers are in the compute
// dtype (float or double): the host entry casts the inputs. Big (B, T, C)
// inputs are read through strides; the small parameters are contiguous.
struct Params {
  int64_t B = 0, T = 0, K = 0, C = 0;
  int64_t interval = 1;    // checkpoint every `interval` steps
  int64_t n_ckpt = 0;      // ceil(T / interval)
  int64_t ring_width = 0;  // rows of one checkpoint: K (static) or 2K
  bool duration_dependent = false;  // transition is (K, C, C)
  bool boundary_mass = false;       // backward writes start/end score gradients

  const void* scores = nullptr;
  int64_t scores_sb = 0, scores_st = 0, scores_sc = 0;
  const void* start_scores = nullptr;  // null: none
  int64_t start_sb = 0, start_st = 0, start_sc = 0;
  const void* end_scores = nullptr;  // null: none
  int64_t end_sb = 0, end_st = 0, end_sc = 0;
  const void* transition = nullptr;        // (C, C) or (K, C, C), contiguous
  const void* duration = nullptr;          // (K, C), contiguous
  const void* start_transition = nullptr;  // (C,)
  const void* end_transition = nullptr;    // (C,)
  const int64_t* lengths = nullptr;        // (B,)

  // Forward outputs, backward inputs.
  void* log_z = nullptr;                // (B,)
  void* ckpt_ring = nullptr;            // (B, n_ckpt, ring_width, C)
  double* ckpt_offset = nullptr;        // (B, n_ckpt)

  // Backward.
  const void* grad_log_z = nullptr;     // (B,)
  void* grad_scores = nullptr;          // (B, T, C), zero-filled by the host
  void* grad_transition = nullptr;      // (B, C, C) or (B, K, C, C)
  void* grad_duration = nullptr;        // (B, K, C)
  void* grad_start_transition = nullptr;  // (B, C)
  void* grad_end_transition = nullptr;    // (B, C)
  void* grad_start_scores = nullptr;    // (B, T, C) or null
  void* grad_end_scores = nullptr;      // (B, T, C) or null

  // Viterbi.
  void* best = nullptr;                 // (B,)
  int64_t* segment_label = nullptr;     // (B, T): label of the segment starting at t, else -1
  int32_t* best_duration = nullptr;     // workspace (B, T+1, C)
  int32_t* best_previous = nullptr;     // workspace (B, T+1, C)

  // Filter (the forward messages at every boundary, for sampling).
  void* history_alpha = nullptr;        // (B, T+1, C) alpha_hat[t]
  void* history_sigma = nullptr;        // (B, T+1, C) sigma_hat[t]
  double* history_offset = nullptr;     // (B, T+1) O_t
};

template <typename T>
HOST_DEVICE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// What a renormalisation subtracts: the max, or 0 when the max is ±inf/NaN,
// so that an all -inf row stays -inf and never becomes NaN.
template <typename T>
HOST_DEVICE T finite_or_zero(T m) {
  return (m - m == T(0)) ? m : T(0);
}

// max that lets NaN through, so NaN inputs give NaN results.
template <typename T>
HOST_DEVICE T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// exp(x - m) for an LSE with running max m; an all -inf LSE has m = -inf.
template <typename T>
HOST_DEVICE T exp_from(T x, T m) {
  return m == neg_inf<T>() ? T(0) : exp(x - m);
}

// m + log(sum) of an LSE, -inf when every term was -inf.
template <typename T>
HOST_DEVICE T lse_finish(T m, T sum) {
  return m == neg_inf<T>() ? m : m + log(sum);
}

// Read-only views of one sequence's inputs.
template <typename scalar_t>
struct SequenceInputs {
  const scalar_t* scores;
  const scalar_t* start_scores;  // null: none
  const scalar_t* end_scores;    // null: none
  int64_t s_t, s_c, ss_t, ss_c, es_t, es_c;
  const scalar_t* transition;
  const scalar_t* duration;
  const scalar_t* start_transition;
  const scalar_t* end_transition;
  int64_t C;

  HOST_DEVICE SequenceInputs(const Params& p, int64_t b)
      : scores(static_cast<const scalar_t*>(p.scores) + b * p.scores_sb),
        start_scores(p.start_scores ? static_cast<const scalar_t*>(p.start_scores) + b * p.start_sb
                                    : nullptr),
        end_scores(p.end_scores ? static_cast<const scalar_t*>(p.end_scores) + b * p.end_sb
                                : nullptr),
        s_t(p.scores_st), s_c(p.scores_sc), ss_t(p.start_st), ss_c(p.start_sc),
        es_t(p.end_st), es_c(p.end_sc),
        transition(static_cast<const scalar_t*>(p.transition)),
        duration(static_cast<const scalar_t*>(p.duration)),
        start_transition(static_cast<const scalar_t*>(p.start_transition)),
        end_transition(static_cast<const scalar_t*>(p.end_transition)),
        C(p.C) {}

  HOST_DEVICE scalar_t score(int64_t t, int64_t c) const { return scores[t * s_t + c * s_c]; }
  HOST_DEVICE scalar_t start(int64_t t, int64_t c) const {
    return start_scores ? start_scores[t * ss_t + c * ss_c] : scalar_t(0);
  }
  HOST_DEVICE scalar_t end(int64_t t, int64_t c) const {
    return end_scores ? end_scores[t * es_t + c * es_c] : scalar_t(0);
  }
  // transition[c_prev, c] (static) or transition[d-1, c_prev, c].
  HOST_DEVICE scalar_t trans(int64_t d, int64_t c_prev, int64_t c) const {
    return transition[((d - 1) * C + c_prev) * C + c];
  }
  HOST_DEVICE scalar_t trans(int64_t c_prev, int64_t c) const { return transition[c_prev * C + c]; }
  HOST_DEVICE scalar_t dur(int64_t d, int64_t c) const { return duration[(d - 1) * C + c]; }
};

}  // namespace flashsemicrf
