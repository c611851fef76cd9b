// Shared by the CPU kernel (C++ compiler) and the CUDA kernels (nvcc): the
// parameters of each pass, filled once at each host entry; views of one
// sequence's inputs and gradients; and the per-element math every kernel
// uses — the log-sum-exp order, the argmax order with its tie rule, the ring
// slots, the boundary terms. The CPU kernel's tests exercise all of it on
// every commit, so the less the CUDA files own, the better.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

namespace flashsemicrf {

// The problem every pass reads: sizes and inputs. Float pointers are in the
// compute dtype (float or double). Big (B, T, C) inputs are read through
// strides; the small parameters are contiguous.
struct Params {
  int64_t B = 0, T = 0, K = 0, C = 0;
  bool duration_dependent = false;  // transition is (K, C, C)
  int64_t ring_width = 0;           // rows of the forward ring: K (static) or 2K

  // (B, T, C) and their strides in elements along B, T, C.
  const void* scores = nullptr;
  int64_t scores_stride[3] = {0, 0, 0};
  const void* start_scores = nullptr;  // null: none
  int64_t start_stride[3] = {0, 0, 0};
  const void* end_scores = nullptr;  // null: none
  int64_t end_stride[3] = {0, 0, 0};
  const void* transition = nullptr;        // (C, C) or (K, C, C), contiguous
  const void* duration = nullptr;          // (K, C), contiguous
  // The duration table as (C, K) and the (K, C, C) transition as (C, C, K)
  // ([c][c'][d-1]; null for the static one), contiguous: for code whose
  // neighbouring threads take neighbouring durations of one label (CUDA).
  const void* duration_by_label = nullptr;
  const void* transition_by_label = nullptr;
  const void* start_transition = nullptr;  // (C,)
  const void* end_transition = nullptr;    // (C,)
  const int64_t* lengths = nullptr;        // (B,)
};

// The forward: log Z and the checkpoints (outputs here, inputs of the backward).
struct ForwardParams : Params {
  int64_t interval = 1;  // checkpoint every `interval` steps
  int64_t n_ckpt = 0;    // ceil(T / interval)
  // The problem is the mirror image of another one (CUDA's span-parallel
  // backward): checkpoint i is saved before step L + 1 - (last_span(L) - i)
  // · interval, where the mirror's forward ring is the original's backward
  // ring at the last position of span last_span(L) - 1 - i
  // (SequenceCheckpoints::first_saved).
  bool mirrored = false;
  void* log_z = nullptr;          // (B,)
  void* ckpt_ring = nullptr;      // (B, n_ckpt, ring_width, C)
  double* ckpt_offset = nullptr;  // (B, n_ckpt)
  // The mirror image's checkpoints (B, n_ckpt, K, C) and offsets (B,
  // n_ckpt), or null: rows B … 2B-1 of the checkpoint tensors, where a
  // forward for CUDA's span-parallel backward saves them beside its own
  // (its Backend::saves_mirror) and where that backward reads them.
  void* mirror_ring = nullptr;
  double* mirror_offset = nullptr;
  // The chunked forward (CUDA, static transition): `chunks` > 1 CTAs a
  // sequence, CTA b·chunks + j scanning the spans of checkpoints n·j …
  // n·j + n - 1 (n = chunk_spans), from position step_of(n·j) (0 for j = 0)
  // to step_of(n·j + n), the last one to L. Chunk j > 0 starts `warmup`
  // positions early from a guessed state (the start of a sequence there);
  // where the scan has forgotten the guess, its state is the true one times
  // a constant, which junction_kernel measures against the ring that chunk
  // j - 1 ended with (junction_ring (B·chunks, K, C) and junction_offset,
  // checkpoint layout) and adds to chunk j's checkpoint offsets and to log
  // Z (the last chunk's, in float64 in chunk_log_z (B,)).
  int64_t chunks = 1;
  int64_t chunk_spans = 1;
  int64_t warmup = 0;
  void* junction_ring = nullptr;
  double* junction_offset = nullptr;
  double* chunk_log_z = nullptr;
};

// The backward: what the forward had, read back, plus the upstream gradient
// and the gradient outputs, zero-filled by the host.
struct BackwardParams : ForwardParams {
  const void* grad_log_z = nullptr;       // (B,)
  bool boundary_mass = false;             // write start/end score gradients
  void* grad_scores = nullptr;            // (B, T, C)
  void* grad_transition = nullptr;        // (B, C, C) or (B, K, C, C)
  void* grad_duration = nullptr;          // (B, K, C)
  void* grad_start_transition = nullptr;  // (B, C)
  void* grad_end_transition = nullptr;    // (B, C)
  void* grad_start_scores = nullptr;      // (B, T, C) or null
  void* grad_end_scores = nullptr;        // (B, T, C) or null
  // Span-parallel sweeps (CUDA, static transition), or null: the backward
  // ring at the last position of every span but the last, as the mirrored
  // problem's forward checkpoints (B, n_ckpt, K, C) and offsets (B, n_ckpt);
  // then one CTA sweeps each span, and writes its duration and transition
  // sums to span_sums (B, n_ckpt, K·C + C·C) and the coverage of the K - 1
  // positions after its last one (by the segments it starts) to span_spill
  // (B, n_ckpt, K, C), both float64, for the host to add up.
  const void* span_top_ring = nullptr;
  const double* span_top_offset = nullptr;
  double* span_sums = nullptr;
  double* span_spill = nullptr;
};

// Viterbi: the max semiring, checkpointed like the forward so that the
// traceback recomputes the backpointers of one span at a time (the kernels
// place the checkpoints and the span's backpointers in their own working
// memory: O(sqrt(T·K)·C) per sequence, never (T+1, C)).
struct ViterbiParams : Params {
  int64_t interval = 1;              // span length: default_interval(T, K)
  int64_t n_ckpt = 0;                // ceil(T / interval)
  void* best = nullptr;              // (B,)
  int64_t* segment_label = nullptr;  // (B, T): label of the segment starting at t, else -1
};

// The filter: the forward messages at every boundary, for sampling.
struct FilterParams : Params {
  void* history_alpha = nullptr;     // (B, T+1, C) alpha_hat[t]
  void* history_sigma = nullptr;     // (B, T+1, C) sigma_hat[t]
  double* history_offset = nullptr;  // (B, T+1) O_t
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

#if !defined(__CUDA_ARCH__)
// exp written so that the compiler vectorises loops calling it (std::exp
// does not vectorise without -ffast-math, which would break -inf and NaN).
// Cody–Waite range reduction and a degree-6 polynomial (≈ 1 ulp);
// exp(-inf) = 0, NaN stays NaN, results below ~1e-38 flush to 0.
inline float host_exp(float x) {
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
#endif

// The exp of every kernel: the CUDA library's on the device, host_exp on the
// CPU (float).
HOST_DEVICE float fexp(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return host_exp(x);
#endif
}
HOST_DEVICE double fexp(double x) { return ::exp(x); }

// log in the argument's precision (a bare log(float) on the host would be
// the double one).
HOST_DEVICE float flog(float x) { return ::logf(x); }
HOST_DEVICE double flog(double x) { return ::log(x); }

// Log-sum-exp, in one order everywhere: the max m of the terms (nan_max),
// then the sum of fexp(x - lse_shift(m)), then lse_finish(m, sum) =
// m + flog(sum). An all -inf set has m = -inf and shift 0, so its terms are
// exp(-inf) = 0 (never exp(NaN)) and the result is -inf; a NaN term makes it
// NaN.
template <typename T>
HOST_DEVICE T lse_shift(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

template <typename T>
HOST_DEVICE T lse_finish(T m, T sum) {
  return m == neg_inf<T>() ? m : m + flog(sum);
}

// One thread's log-sum-exp of term(0 … n-1), term evaluated twice.
template <typename T, typename F>
HOST_DEVICE T lse(int n, F term) {
  T m = neg_inf<T>();
  for (int i = 0; i < n; ++i) m = nan_max(m, term(i));
  const T shift = lse_shift(m);
  T sum = 0;
  for (int i = 0; i < n; ++i) sum += fexp(term(i) - shift);
  return lse_finish(m, sum);
}

// The argmax order of every kernel: a NaN beats any number, else the larger
// value wins; ties (and two NaNs) go to the smaller index. beats_later(v, w):
// v, at a larger index than w, beats it. beats(v, i, w, j) for any indices: a
// total order on (value, index) pairs with distinct indices, so any reduction
// tree agrees with a left-to-right scan. Nothing is (-inf, INT_MAX), beaten
// by any entry.
template <typename T>
HOST_DEVICE bool beats_later(T v, T w) {
  return v > w || (v != v && w == w);
}

template <typename T>
HOST_DEVICE bool beats(T v, int i, T w, int j) {
  return i > j ? beats_later(v, w) : !beats_later(w, v);
}

// One thread's argmax of term(0 … n-1), n ≥ 1, in that order; *best
// receives the winning value.
template <typename T, typename F>
HOST_DEVICE int argmax(int n, F term, T* best) {
  int a = 0;
  T v = term(0);
  for (int i = 1; i < n; ++i) {
    const T x = term(i);
    if (beats_later(x, v)) {
      a = i;
      v = x;
    }
  }
  *best = v;
  return a;
}

// The length of sequence b: lengths[b] clamped to 1 ≤ L ≤ T, so that every
// address stays in range even for lengths a direct op call did not validate
// (the public functions reject such lengths).
HOST_DEVICE int64_t sequence_length(const Params& p, int64_t b) {
  const int64_t L = p.lengths[b];
  return L < 1 ? 1 : (L > p.T ? p.T : L);
}

// Rings are circular over K slots: the entry of the segment that started
// (forward) or ends (backward) at position s lives in slot s mod K, so no
// entry ever moves. With tK = t mod K:
HOST_DEVICE int slot_before(int tK, int d, int K) {  // slot of t - d, 0 ≤ d ≤ K
  const int s = tK - d;
  return s < 0 ? s + K : s;
}
HOST_DEVICE int slot_after(int tK, int d, int K) {  // slot of t + d, 0 ≤ d ≤ K
  const int s = tK + d;
  return s >= K ? s - K : s;
}

// Checkpoints hold the forward ring in duration order, the layout every
// backend shares: checkpoint row part·K + d-1 is the ring row of the segment
// that started at t - d (part 1: the gain rows of the (K, C, C) form).
HOST_DEVICE int ring_row_of_checkpoint_row(int row, int tK, int K) {
  const int part = row >= K ? 1 : 0, d = row - part * K + 1;
  return part * K + slot_before(tK, d, K);
}

// Float32 drift control. Besides re-anchoring at every checkpoint, the
// float32 backward re-normalises its offset Q by two masses that are exactly
// 1 (times grad_log_z), so that the rounding of forward and backward cannot
// pile up over a span (a drift that cost the shared-parameter gradients 2e-5
// and the per-position ones 6e-5 at T = 10^6, K = 200):
// - every K steps, by the mass that covers one position: the steps
//   t = mK … mK+K-1 add up the coverage of position u = mK+K-1
//   (coverage_position), complete once step mK has added the segments
//   starting there; Q is corrected then (coverage_checked_at), when all those
//   steps lie in the span being swept, after the last re-anchor, and u < L.
//   O(C) work a step.
// - at t = 0, by the mass of the first segment (first_segment_mass).
// Float64 rounds 1e-16 a step, far below its targets: its kernels leave both
// out and follow the reference's arithmetic step for step.
template <typename scalar_t>
HOST_DEVICE constexpr bool renormalises_within_spans() {
  return sizeof(scalar_t) < sizeof(double);
}
HOST_DEVICE int64_t coverage_position(int64_t t, int64_t K) { return t - t % K + K - 1; }
template <typename scalar_t>
HOST_DEVICE bool coverage_checked_at(int64_t t, int64_t K, int64_t last, int64_t L) {
  const int64_t u = coverage_position(t, K);
  return renormalises_within_spans<scalar_t>() && t > 0 && t % K == 0 && u <= last && u < L;
}

// The posterior mass of the label-c segments that start at 0, from
// sigma_hat[0, c], tau = LSE_d of their backward terms and off + Q - log Z
// (in float64: it re-normalises); summed over c it is exactly 1.
template <typename T>
HOST_DEVICE double first_segment_mass(T sigma, T tau, double shift) {
  return exp(static_cast<double>(sigma) + static_cast<double>(tau) + shift);
}

// The offset after a re-normalisation that measured `total` for a mass that
// must be 1; a total that is 0 or not finite (a dead or NaN sequence) leaves
// the offset alone.
HOST_DEVICE double renormalised(double offset, double total) {
  return (total > 0.0 && total <= std::numeric_limits<double>::max()) ? offset - log(total)
                                                                       : offset;
}

// Read-only views of one sequence's inputs, and the boundary terms.
template <typename scalar_t>
struct SequenceInputs {
  const scalar_t* scores;
  const scalar_t* start_scores;  // null: none
  const scalar_t* end_scores;    // null: none
  int64_t s_t, s_c, ss_t, ss_c, es_t, es_c;
  const scalar_t* transition;
  const scalar_t* duration;
  const scalar_t* duration_by_label;    // (C, K)
  const scalar_t* transition_by_label;  // (C, C, K), or null: static transition
  const scalar_t* start_transition;
  const scalar_t* end_transition;
  int64_t C, K;

  // first: the position that is row 0 of these views (a chunk of the
  // sequence that a CTA scans as if it started there).
  HOST_DEVICE SequenceInputs(const Params& p, int64_t b, int64_t first = 0)
      : scores(static_cast<const scalar_t*>(p.scores) + b * p.scores_stride[0] +
               first * p.scores_stride[1]),
        start_scores(p.start_scores ? static_cast<const scalar_t*>(p.start_scores) +
                                          b * p.start_stride[0] + first * p.start_stride[1]
                                    : nullptr),
        end_scores(p.end_scores ? static_cast<const scalar_t*>(p.end_scores) +
                                      b * p.end_stride[0] + first * p.end_stride[1]
                                : nullptr),
        s_t(p.scores_stride[1]), s_c(p.scores_stride[2]), ss_t(p.start_stride[1]),
        ss_c(p.start_stride[2]), es_t(p.end_stride[1]), es_c(p.end_stride[2]),
        transition(static_cast<const scalar_t*>(p.transition)),
        duration(static_cast<const scalar_t*>(p.duration)),
        duration_by_label(static_cast<const scalar_t*>(p.duration_by_label)),
        transition_by_label(static_cast<const scalar_t*>(p.transition_by_label)),
        start_transition(static_cast<const scalar_t*>(p.start_transition)),
        end_transition(static_cast<const scalar_t*>(p.end_transition)),
        C(p.C),
        K(p.K) {}

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
  // The same entries from the transposed tables: consecutive d, consecutive
  // addresses.
  HOST_DEVICE scalar_t dur_by_label(int64_t d, int64_t c) const {
    return duration_by_label[c * K + (d - 1)];
  }
  HOST_DEVICE scalar_t trans_by_label(int64_t d, int64_t c_prev, int64_t c) const {
    return transition_by_label[(c * C + c_prev) * K + (d - 1)];
  }
  // The first segment of label c opens at 0 (sigma[0, c] before normalising).
  HOST_DEVICE scalar_t first(int64_t c) const { return start_transition[c] + start(0, c); }
  // The last segment, of label c, closes at L with forward score a.
  HOST_DEVICE scalar_t last(scalar_t a, int64_t c) const { return a + end_transition[c]; }
};

// One sequence's gradient outputs.
template <typename scalar_t>
struct SequenceGradients {
  scalar_t* scores;            // (T, C)
  scalar_t* transition;        // (C, C) or (K, C, C)
  scalar_t* duration;          // (K, C)
  scalar_t* start_transition;  // (C)
  scalar_t* end_transition;    // (C)
  scalar_t* start_scores;      // (T, C) or null
  scalar_t* end_scores;        // (T, C) or null

  HOST_DEVICE SequenceGradients(const BackwardParams& p, int64_t b)
      : scores(static_cast<scalar_t*>(p.grad_scores) + b * p.T * p.C),
        transition(static_cast<scalar_t*>(p.grad_transition) +
                   b * (p.duration_dependent ? p.K : 1) * p.C * p.C),
        duration(static_cast<scalar_t*>(p.grad_duration) + b * p.K * p.C),
        start_transition(static_cast<scalar_t*>(p.grad_start_transition) + b * p.C),
        end_transition(static_cast<scalar_t*>(p.grad_end_transition) + b * p.C),
        start_scores(p.grad_start_scores
                         ? static_cast<scalar_t*>(p.grad_start_scores) + b * p.T * p.C
                         : nullptr),
        end_scores(p.grad_end_scores ? static_cast<scalar_t*>(p.grad_end_scores) + b * p.T * p.C
                                     : nullptr) {}
};

// One sequence's checkpoints and their schedule. The forward saves its ring
// (ring_width, C), in the checkpoint layout, before the steps t = j·interval
// < T: checkpoint j at at(j), its offset at offset[j]. The backward walks the
// spans j = last_span(L) … 0, recomputing steps [first(j), last(j, L)] from
// checkpoint j; checkpoints from first_unused(L) on are never read. A
// mirrored problem's forward (ForwardParams::mirrored) saves them before the
// steps first_saved(L) + i·interval instead, the first saved(L) of them.
template <typename scalar_t>
struct SequenceCheckpoints {
  scalar_t* ring;
  double* offset;
  int64_t stride, interval, count, T;
  bool mirrored = false;

  HOST_DEVICE SequenceCheckpoints(scalar_t* ring_, double* offset_, const Params& p,
                                  int64_t interval_, int64_t count_)
      : ring(ring_), offset(offset_), stride(p.ring_width * p.C), interval(interval_),
        count(count_), T(p.T) {}
  HOST_DEVICE SequenceCheckpoints(const ForwardParams& p, int64_t b)
      : SequenceCheckpoints(static_cast<scalar_t*>(p.ckpt_ring) + b * p.n_ckpt * p.ring_width * p.C,
                            p.ckpt_offset + b * p.n_ckpt, p, p.interval, p.n_ckpt) {
    mirrored = p.mirrored;
  }
  // The step before which the forward saves checkpoint 0, and how many it
  // saves (one every interval steps from there, at most count). Mirrored:
  // position t' of the mirror image is position L - 1 - t' of the original,
  // so its ring before step t' holds the original's backward ring at
  // position L - t'; the original's span j ends at (j + 1)·interval - 1.
  HOST_DEVICE int64_t first_saved(int64_t L) const {
    return mirrored ? L + 1 - last_span(L) * interval : 0;
  }
  HOST_DEVICE int64_t saved(int64_t L) const {
    return mirrored ? last_span(L) : (first_unused(L) < count ? first_unused(L) : count);
  }
  // The step before which checkpoint j is saved, or L + 1 (never reached)
  // once all are.
  HOST_DEVICE int64_t step_of(int64_t j, int64_t L) const {
    return j < saved(L) ? first_saved(L) + j * interval : L + 1;
  }
  HOST_DEVICE scalar_t* at(int64_t j) const { return ring + j * stride; }
  HOST_DEVICE bool due(int64_t t) const { return t < T && t % interval == 0; }
  HOST_DEVICE int64_t last_span(int64_t L) const {
    return L / interval < count - 1 ? L / interval : count - 1;
  }
  HOST_DEVICE int64_t first(int64_t j) const { return j * interval; }
  HOST_DEVICE int64_t last(int64_t j, int64_t L) const {
    return j == last_span(L) ? L : (j + 1) * interval - 1;
  }
  HOST_DEVICE int64_t first_unused(int64_t L) const { return L / interval + 1; }
  // The span whose recompute writes row t's backpointers (0 ≤ t ≤ L).
  HOST_DEVICE int64_t span_of(int64_t t, int64_t L) const {
    const int64_t j = t / interval, jl = last_span(L);
    return j < jl ? j : jl;
  }
};

// SequenceCheckpoints::step_of from the parameters themselves, for a loop
// that should not keep the schedule in registers (the kernels read p from
// constant memory).
template <typename scalar_t>
HOST_DEVICE int64_t checkpoint_step(const ForwardParams& p, int64_t j, int64_t L) {
  return SequenceCheckpoints<scalar_t>(p, 0).step_of(j, L);
}

// The Viterbi backpointers of one span, rows first … last (at most
// interval + 1 of them: the last span also holds row L), in a buffer of
// 2·span_rows(interval)·C int32: best_duration[(t - first)·C + c], the
// duration of the best label-c segment ending at t; best_previous after it,
// the label before that segment, at its end row t for the (K, C, C)
// transition (it depends on the duration) and at its start row s for the
// static one (chosen when sigma_hat[s] was formed).
HOST_DEVICE int64_t span_rows(int64_t interval) { return interval + 1; }

struct SpanBackpointers {
  int32_t* best_duration;
  int32_t* best_previous;
  int64_t first = 0;  // the row at index 0

  HOST_DEVICE SpanBackpointers(int32_t* buffer, int64_t interval, int64_t C)
      : best_duration(buffer), best_previous(buffer + span_rows(interval) * C) {}
  // Row t's slices, for the step that writes them.
  HOST_DEVICE int32_t* duration_row(int64_t t, int64_t C) const {
    return best_duration + (t - first) * C;
  }
  HOST_DEVICE int32_t* previous_row(int64_t t, int64_t C) const {
    return best_previous + (t - first) * C;
  }
};

// The traceback of one sequence, a span at a time from the last: the best
// path's rows are read in decreasing order (the end row t for the duration,
// then for the static transition the start row s for the previous label), so
// each span's rows are needed once, after those of the spans above it.
// Writes each segment's label at its start (label is -1-filled before).
// Stops at a pointer out of range, unreachable for a finite best, so that a
// corrupted buffer cannot send an address out of range. Every field is a
// function of the buffer's contents alone: the CUDA kernel's threads all
// walk and stay in agreement without a broadcast.
struct PathWalk {
  int64_t row;            // the next row to read
  int c;                  // the label being followed
  bool at_start = false;  // static: row starts a label-c segment, its previous label pending
  bool done;

  HOST_DEVICE PathWalk(int64_t L, int last_label, bool has_path)
      : row(L), c(last_label), done(!has_path) {}

  // Follows the path while the pending row lies in the span; label null:
  // walk without writing.
  template <bool DD>
  HOST_DEVICE void follow(const SpanBackpointers& span, int64_t C, int64_t* label) {
    while (!done && row >= span.first) {
      const int64_t i = (row - span.first) * C + c;
      if (!DD && at_start) {
        c = span.best_previous[i];
        at_start = false;
        done = c < 0 || c >= C;
        continue;
      }
      const int64_t d = span.best_duration[i];
      if (d < 1 || d > row) {
        done = true;
        return;
      }
      const int64_t s = row - d;
      if (label) label[s] = c;
      if (DD && s > 0) {
        c = span.best_previous[i];
        done = c < 0 || c >= C;
      }
      at_start = !DD;
      row = s;
      done = done || s == 0;
    }
  }
};

// One sequence's filter outputs: the messages at every boundary.
template <typename scalar_t>
struct SequenceHistory {
  scalar_t* alpha;  // (T+1, C)
  scalar_t* sigma;  // (T+1, C)
  double* offset;   // (T+1)

  HOST_DEVICE SequenceHistory(const FilterParams& p, int64_t b)
      : alpha(static_cast<scalar_t*>(p.history_alpha) + b * (p.T + 1) * p.C),
        sigma(static_cast<scalar_t*>(p.history_sigma) + b * (p.T + 1) * p.C),
        offset(p.history_offset + b * (p.T + 1)) {}
  // Which rows the filter writes: alpha_hat after every step t > 0;
  // sigma_hat at t < L where the scan forms it (the (K, C, C) transition
  // folds it into each duration's term, so only t = 0 has one).
  HOST_DEVICE static bool has_alpha(int64_t t) { return t > 0; }
  HOST_DEVICE static bool has_sigma(int64_t t, int64_t L, bool dd) {
    return t < L && (t == 0 || !dd);
  }
};

}  // namespace flashsemicrf
