// Host-side checks and Params filling, shared by the CPU and CUDA entry
// points: the ops are checked here once, with messages naming the tensor.
// (The public Python functions validate user input first; these checks guard
// direct calls of the ops.)
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>

#include "semicrf.h"

namespace flashsemicrf {

#define FLASHSEMICRF_CHECK_SHAPE(x, ...)                                               \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "flashsemicrf: " #x \
              " must have shape (" #__VA_ARGS__ ") = ",                               \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

// Δ = floor(sqrt(T·K)): (T/Δ)·K·C checkpoint numbers against a Δ·C span
// buffer. The same integer formula as flashsemicrf.reference; interval 0 in
// an op call means this default.
inline int64_t default_interval(int64_t T, int64_t K) {
  const int64_t n = std::max<int64_t>(1, T * K);
  int64_t r = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (r * r > n) --r;
  while ((r + 1) * (r + 1) <= n) ++r;
  return std::max<int64_t>(1, r);
}

// Which algorithm an environment variable selects for a kernel:
// FLASHSEMICRF_CPU_ALGORITHM (the C++ CPU forward and backward; unset means
// exp) and FLASHSEMICRF_CUDA_ALGORITHM (the CUDA forward; unset means log).
// "exp" runs the scaled exp-domain recurrences with the log-domain kernels
// as their per-sequence fallbacks; "log" runs the log domain everywhere.
// Read on every call; unset or empty gives `unset`.
inline bool env_switch(const char* variable, const char* on, const char* off, bool unset) {
  const char* v = std::getenv(variable);
  if (v == nullptr || *v == '\0') return unset;
  if (std::strcmp(v, on) == 0) return true;
  TORCH_CHECK(std::strcmp(v, off) == 0, variable, " must be '", on, "' or '", off,
              "' (or unset), got '", v, "'");
  return false;
}
inline bool uses_exp_domain(const char* variable, bool unset) {
  return env_switch(variable, "exp", "log", unset);
}

// A pass's parameters with the output tensors they point into.
template <typename P, typename Outputs>
struct Pass {
  P params;
  Outputs outputs;
};
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ViterbiOutputs = std::tuple<at::Tensor, at::Tensor>;
using FilterOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// One call of an op: checks its arguments (messages name the tensor), keeps
// contiguous copies of the small ones alive for the call, and fills the
// parameters of the pass with them and with freshly allocated outputs.
class OpCall {
 public:
  OpCall(const at::Tensor& scores, const at::Tensor& transition, const at::Tensor& duration,
         const at::Tensor& lengths, const at::Tensor& start_transition,
         const at::Tensor& end_transition, const std::optional<at::Tensor>& start_scores,
         const std::optional<at::Tensor>& end_scores)
      : scores_(scores) {
    TORCH_CHECK(scores.dim() == 3, "flashsemicrf: scores must be (B, T, C), got ", scores.sizes());
    TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                "flashsemicrf: the kernels take float32 or float64 scores, got ",
                scores.scalar_type());
    const int64_t B = scores.size(0), T = scores.size(1), C = scores.size(2);
    TORCH_CHECK(duration.dim() == 2, "flashsemicrf: duration must be (K, C), got ",
                duration.sizes());
    const int64_t K = duration.size(0);
    TORCH_CHECK(T >= 1 && C >= 1 && K >= 1, "flashsemicrf: need T, C, K >= 1");
    FLASHSEMICRF_CHECK_SHAPE(duration, K, C);
    const bool dd = transition.dim() == 3;
    if (dd) {
      FLASHSEMICRF_CHECK_SHAPE(transition, K, C, C);
    } else {
      FLASHSEMICRF_CHECK_SHAPE(transition, C, C);
    }
    FLASHSEMICRF_CHECK_SHAPE(lengths, B);
    FLASHSEMICRF_CHECK_SHAPE(start_transition, C);
    FLASHSEMICRF_CHECK_SHAPE(end_transition, C);
    TORCH_CHECK(lengths.scalar_type() == at::kLong, "flashsemicrf: lengths must be int64, got ",
                lengths.scalar_type());
    check_like(transition, "transition");
    check_like(duration, "duration");
    check_like(start_transition, "start_transition");
    check_like(end_transition, "end_transition");
    TORCH_CHECK(lengths.device() == scores.device(), "flashsemicrf: lengths is on ",
                lengths.device(), " but scores is on ", scores.device());

    transition_ = transition.contiguous();
    duration_ = duration.contiguous();
    lengths_ = lengths.contiguous();
    start_transition_ = start_transition.contiguous();
    end_transition_ = end_transition.contiguous();

    Params& p = inputs_;
    p.B = B;
    p.T = T;
    p.K = K;
    p.C = C;
    p.duration_dependent = dd;
    p.ring_width = dd ? 2 * K : K;
    p.scores = scores.data_ptr();
    for (int i = 0; i < 3; ++i) p.scores_stride[i] = scores.stride(i);
    p.start_scores = boundary_scores(start_scores, "start_scores", p.start_stride);
    p.end_scores = boundary_scores(end_scores, "end_scores", p.end_stride);
    p.transition = transition_.data_ptr();
    p.duration = duration_.data_ptr();
    p.start_transition = start_transition_.data_ptr();
    p.end_transition = end_transition_.data_ptr();
    p.lengths = lengths_.data_ptr<int64_t>();
    if (scores.is_cuda()) label_major_tables();
  }

  // The label-major copies of the duration table and the (K, C, C)
  // transition that the CUDA kernels read (Params::duration_by_label): made
  // for CUDA tensors only (the CPU kernel does not read them; a (K, C, C)
  // copy is as large as the transition), and by the CUDA emulator's tests.
  void label_major_tables() {
    duration_by_label_ = duration_.t().contiguous();
    inputs_.duration_by_label = duration_by_label_.data_ptr();
    if (inputs_.duration_dependent) {
      transition_by_label_ = transition_.permute({2, 1, 0}).contiguous();
      inputs_.transition_by_label = transition_by_label_.data_ptr();
    }
  }

  at::ScalarType dtype() const { return scores_.scalar_type(); }

  // (log_z (B,), checkpoint_ring (B, N, S, C), checkpoint_offset (B, N) float64).
  // with_mirror(p) (the backend's saves_mirror): twice the rows, B … 2B-1
  // for the mirror image's checkpoints (ForwardParams::mirror_ring), zeros
  // until the backend writes them.
  template <typename WithMirror>
  Pass<ForwardParams, ForwardOutputs> forward(int64_t interval, WithMirror with_mirror) {
    ForwardParams p = checkpointed(interval);
    const bool mirror = with_mirror(static_cast<const ForwardParams&>(p));
    const int64_t rows = mirror ? 2 * p.B : p.B;
    auto opts = scores_.options();
    at::Tensor log_z = at::empty({p.B}, opts);
    at::Tensor ring = at::empty({rows, p.n_ckpt, p.ring_width, p.C}, opts);
    at::Tensor offset = at::empty({rows, p.n_ckpt}, opts.dtype(at::kDouble));
    p.log_z = log_z.data_ptr();
    p.ckpt_ring = ring.data_ptr();
    p.ckpt_offset = offset.data_ptr<double>();
    if (mirror) {
      at::Tensor mirror_ring = ring.narrow(0, p.B, p.B), mirror_offset = offset.narrow(0, p.B, p.B);
      mirror_ring.zero_();
      mirror_offset.zero_();
      p.mirror_ring = mirror_ring.data_ptr();
      p.mirror_offset = mirror_offset.data_ptr<double>();
    }
    return {p, {log_z, ring, offset}};
  }
  Pass<ForwardParams, ForwardOutputs> forward(int64_t interval) {
    return forward(interval, [](const ForwardParams&) { return false; });
  }

  // Per-sequence gradients, zero-filled (kernels accumulate into them).
  // start/end score gradients are (B, T, C) when asked for (boundary_mass) or
  // when the problem has those inputs, else empty (0,).
  Pass<BackwardParams, BackwardOutputs> backward(const at::Tensor& grad_log_z,
                                                 const at::Tensor& log_z,
                                                 const at::Tensor& ckpt_ring,
                                                 const at::Tensor& ckpt_offset, int64_t interval,
                                                 bool boundary_mass) {
    BackwardParams p;
    static_cast<ForwardParams&>(p) = checkpointed(interval);
    FLASHSEMICRF_CHECK_SHAPE(grad_log_z, p.B);
    FLASHSEMICRF_CHECK_SHAPE(log_z, p.B);
    // The static transition's checkpoints can hold the mirror image's too
    // (rows B … 2B-1: a forward for CUDA's span-parallel backward).
    const bool mirror = !p.duration_dependent && p.B > 0 && ckpt_ring.dim() == 4 &&
                        ckpt_ring.size(0) == 2 * p.B;
    const int64_t rows = mirror ? 2 * p.B : p.B;
    FLASHSEMICRF_CHECK_SHAPE(ckpt_ring, rows, p.n_ckpt, p.ring_width, p.C);
    FLASHSEMICRF_CHECK_SHAPE(ckpt_offset, rows, p.n_ckpt);
    check_like(grad_log_z, "grad_log_z");
    check_like(log_z, "log_z");
    check_like(ckpt_ring, "checkpoint_ring");
    TORCH_CHECK(ckpt_offset.scalar_type() == at::kDouble,
                "flashsemicrf: checkpoint_offset must be float64");
    grad_log_z_ = grad_log_z.contiguous();
    log_z_ = log_z.contiguous();
    ckpt_ring_ = ckpt_ring.contiguous();
    ckpt_offset_ = ckpt_offset.contiguous();
    p.grad_log_z = grad_log_z_.data_ptr();
    p.log_z = log_z_.data_ptr();
    p.ckpt_ring = ckpt_ring_.data_ptr();
    p.ckpt_offset = ckpt_offset_.data_ptr<double>();
    if (mirror) {
      p.mirror_ring = ckpt_ring_.narrow(0, p.B, p.B).data_ptr();
      p.mirror_offset = ckpt_offset_.narrow(0, p.B, p.B).data_ptr<double>();
    }
    p.boundary_mass = boundary_mass;

    auto opts = scores_.options();
    const int64_t B = p.B, T = p.T, K = p.K, C = p.C;
    at::Tensor g_scores = at::zeros({B, T, C}, opts);
    at::Tensor g_trans = p.duration_dependent ? at::zeros({B, K, C, C}, opts)
                                              : at::zeros({B, C, C}, opts);
    at::Tensor g_dur = at::zeros({B, K, C}, opts);
    at::Tensor g_start_t = at::zeros({B, C}, opts);
    at::Tensor g_end_t = at::zeros({B, C}, opts);
    const bool want_start = boundary_mass || p.start_scores != nullptr;
    const bool want_end = boundary_mass || p.end_scores != nullptr;
    at::Tensor g_start_s = want_start ? at::zeros({B, T, C}, opts) : at::empty({0}, opts);
    at::Tensor g_end_s = want_end ? at::zeros({B, T, C}, opts) : at::empty({0}, opts);
    p.grad_scores = g_scores.data_ptr();
    p.grad_transition = g_trans.data_ptr();
    p.grad_duration = g_dur.data_ptr();
    p.grad_start_transition = g_start_t.data_ptr();
    p.grad_end_transition = g_end_t.data_ptr();
    p.grad_start_scores = want_start ? g_start_s.data_ptr() : nullptr;
    p.grad_end_scores = want_end ? g_end_s.data_ptr() : nullptr;
    return {p, {g_scores, g_trans, g_dur, g_start_t, g_end_t, g_start_s, g_end_s}};
  }

  // (best (B,), segment_label (B, T) int64: label of the segment starting at
  // t, -1 elsewhere). The spans of the traceback are those of the default
  // checkpoint interval; the backend places their checkpoints and
  // backpointers in its own working memory.
  Pass<ViterbiParams, ViterbiOutputs> viterbi() {
    ViterbiParams p;
    static_cast<Params&>(p) = inputs_;
    p.interval = default_interval(p.T, p.K);
    p.n_ckpt = (p.T + p.interval - 1) / p.interval;
    auto opts = scores_.options();
    at::Tensor best = at::empty({p.B}, opts);
    at::Tensor label = at::empty({p.B, p.T}, opts.dtype(at::kLong));
    p.best = best.data_ptr();
    p.segment_label = label.data_ptr<int64_t>();
    return {p, {best, label}};
  }

  // (alpha_hat (B, T+1, C), sigma_hat (B, T+1, C), offset (B, T+1) float64):
  // the forward messages at every boundary, -inf where undefined.
  Pass<FilterParams, FilterOutputs> filter() {
    FilterParams p;
    static_cast<Params&>(p) = inputs_;
    auto opts = scores_.options();
    at::Tensor alpha = at::empty({p.B, p.T + 1, p.C}, opts);
    at::Tensor sigma = at::empty({p.B, p.T + 1, p.C}, opts);
    at::Tensor offset = at::empty({p.B, p.T + 1}, opts.dtype(at::kDouble));
    p.history_alpha = alpha.data_ptr();
    p.history_sigma = sigma.data_ptr();
    p.history_offset = offset.data_ptr<double>();
    return {p, {alpha, sigma, offset}};
  }

 private:
  void check_like(const at::Tensor& x, const char* name) const {
    TORCH_CHECK(x.scalar_type() == scores_.scalar_type(), "flashsemicrf: ", name, " has dtype ",
                x.scalar_type(), " but scores has ", scores_.scalar_type());
    TORCH_CHECK(x.device() == scores_.device(), "flashsemicrf: ", name, " is on ", x.device(),
                " but scores is on ", scores_.device());
  }

  // An optional (B, T, C) input: its data (null when absent); its strides go
  // into strides[3].
  const void* boundary_scores(const std::optional<at::Tensor>& x, const char* name,
                              int64_t* strides) const {
    if (!x.has_value()) return nullptr;
    const int64_t B = scores_.size(0), T = scores_.size(1), C = scores_.size(2);
    TORCH_CHECK(x->sizes() == at::IntArrayRef({B, T, C}), "flashsemicrf: ", name,
                " must have shape (B, T, C) = ", at::IntArrayRef({B, T, C}), ", got ",
                x->sizes());
    check_like(*x, name);
    for (int i = 0; i < 3; ++i) strides[i] = x->stride(i);
    return x->data_ptr();
  }

  // The inputs with the checkpoint interval (0: the default) filled in.
  ForwardParams checkpointed(int64_t interval) const {
    TORCH_CHECK(interval >= 0, "flashsemicrf: interval must be >= 0, got ", interval);
    ForwardParams p;
    static_cast<Params&>(p) = inputs_;
    p.interval = interval == 0 ? default_interval(p.T, p.K) : interval;
    p.n_ckpt = (p.T + p.interval - 1) / p.interval;
    return p;
  }

  Params inputs_;
  at::Tensor scores_, transition_, duration_, duration_by_label_, transition_by_label_, lengths_,
      start_transition_, end_transition_;
  at::Tensor grad_log_z_, log_z_, ckpt_ring_, ckpt_offset_;
};

// The span-parallel backward's host side (CUDA, and its emulator's tests):
// the sweeps of a sequence's spans run side by side, each from the backward
// ring at its span's last position. Those rings are the forward checkpoints
// of the problem's mirror image: position t' of the mirror is position
// L - 1 - t' of the original (per sequence), its transition is the
// transpose, and start and end swap (transitions and scores); with the
// static transition the mirror's forward messages are the original's
// backward ones, and its ring before step t' is the original's backward
// ring at position L - t' (ForwardParams::mirrored places the checkpoints).
// Usage: mirror(p) gives the mirror's forward pass to run with the
// backend's forward (in the forward pass itself where p.mirror_ring is set:
// its checkpoints then go there; in the backward where the forward did not
// save them); attach(p) points p at its checkpoints (or at the saved ones)
// and at the spans' partial sums; after the sweeps, finish(p) adds those up
// into the gradient outputs, in a fixed order.
class SpanParallelSweeps {
 public:
  // The static transition, and more than one span (else a sweep is serial anyway).
  static bool applies(const ForwardParams& p) { return !p.duration_dependent && p.n_ckpt > 1; }

  Pass<ForwardParams, ForwardOutputs>& mirror(const ForwardParams& p, const at::Tensor& scores) {
    const auto opts = scores.options();
    const int64_t B = p.B, T = p.T, K = p.K, C = p.C;
    auto view = [&](const void* data, at::IntArrayRef sizes) {
      return at::from_blob(const_cast<void*>(data), sizes, opts);
    };
    const at::Tensor lengths =
        at::from_blob(const_cast<int64_t*>(p.lengths), {B}, opts.dtype(at::kLong));
    const at::Tensor t = at::arange(T, opts.dtype(at::kLong)).unsqueeze(0);
    const at::Tensor L = lengths.unsqueeze(1);
    // Padding positions (t >= L) map to themselves.
    const at::Tensor index = at::where(t < L, L - 1 - t, t).unsqueeze(2).expand({B, T, C});
    auto mirrored = [&](const void* data, const int64_t* stride) -> std::optional<at::Tensor> {
      if (data == nullptr) return std::nullopt;
      const at::Tensor x = at::from_blob(const_cast<void*>(data), {B, T, C},
                                         {stride[0], stride[1], stride[2]}, opts);
      return x.gather(1, index);
    };
    // OpCall points into these; they live as long as this object.
    scores_ = *mirrored(p.scores, p.scores_stride);
    start_scores_ = mirrored(p.end_scores, p.end_stride);
    end_scores_ = mirrored(p.start_scores, p.start_stride);
    call_ = std::make_unique<OpCall>(
        scores_, view(p.transition, {C, C}).t(), view(p.duration, {K, C}), lengths,
        view(p.end_transition, {C}), view(p.start_transition, {C}), start_scores_, end_scores_);
    if (!scores.is_cuda()) call_->label_major_tables();  // the CUDA emulator's tests
    pass_ = std::make_unique<Pass<ForwardParams, ForwardOutputs>>(call_->forward(p.interval));
    pass_->params.mirrored = true;
    if (p.mirror_ring != nullptr) {  // the forward pass saves them for the backward
      pass_->params.ckpt_ring = p.mirror_ring;
      pass_->params.ckpt_offset = p.mirror_offset;
      std::get<1>(pass_->outputs) = at::Tensor();
      std::get<2>(pass_->outputs) = at::Tensor();
    }
    return *pass_;
  }
  const at::Tensor& mirrored_scores() const { return scores_; }

  // The spans' starting rings: the mirror's checkpoints, from mirror() or
  // saved by the forward (p.mirror_ring).
  void attach(BackwardParams& p, const at::Tensor& scores) {
    TORCH_CHECK(pass_ != nullptr || p.mirror_ring != nullptr,
                "flashsemicrf: the span-parallel sweeps need the mirror image's checkpoints");
    opts_ = scores.options();
    const auto opts = opts_.dtype(at::kDouble);
    sums_ = at::zeros({p.B, p.n_ckpt, p.K * p.C + p.C * p.C}, opts);
    spill_ = at::zeros({p.B, p.n_ckpt, p.K, p.C}, opts);
    p.span_top_ring = p.mirror_ring ? p.mirror_ring : std::get<1>(pass_->outputs).data_ptr();
    p.span_top_offset =
        p.mirror_offset ? p.mirror_offset : std::get<2>(pass_->outputs).data_ptr<double>();
    p.span_sums = sums_.data_ptr<double>();
    p.span_spill = spill_.data_ptr<double>();
  }

  // The duration and transition gradients are the spans' float64 sums
  // added up; the scores gradient of the K - 1 positions after a span's
  // last also takes the coverage that span's segments gave them.
  void finish(const BackwardParams& p) const {
    const auto opts = opts_;
    const int64_t B = p.B, T = p.T, K = p.K, C = p.C;
    const at::Tensor total = sums_.sum(1);
    at::from_blob(p.grad_duration, {B, K, C}, opts)
        .copy_(total.narrow(1, 0, K * C).view({B, K, C}));
    at::from_blob(p.grad_transition, {B, C, C}, opts)
        .copy_(total.narrow(1, K * C, C * C).view({B, C, C}));
    at::Tensor g_scores = at::from_blob(p.grad_scores, {B, T, C}, opts);
    for (int64_t j = 0; j + 1 < p.n_ckpt; ++j) {
      const int64_t next = (j + 1) * p.interval, n = std::min(K - 1, T - next);
      if (n > 0)
        g_scores.narrow(1, next, n).add_(spill_.select(1, j).narrow(1, 0, n).to(opts.dtype()));
    }
  }

 private:
  at::Tensor scores_, sums_, spill_;
  at::TensorOptions opts_;
  std::optional<at::Tensor> start_scores_, end_scores_;
  std::unique_ptr<OpCall> call_;
  std::unique_ptr<Pass<ForwardParams, ForwardOutputs>> pass_;
};

// The four ops' entry points, written once: check the call, set up the
// pass, run it, return its outputs. Backend::run(params, scores) is
// overloaded on the pass's parameter type.
template <typename Backend>
struct OpEntries {
  static ForwardOutputs forward(const at::Tensor& scores, const at::Tensor& transition,
                                const at::Tensor& duration, const at::Tensor& lengths,
                                const at::Tensor& start_transition,
                                const at::Tensor& end_transition,
                                const std::optional<at::Tensor>& start_scores,
                                const std::optional<at::Tensor>& end_scores, int64_t interval) {
    OpCall call(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores);
    auto pass = call.forward(interval, Backend::saves_mirror);
    Backend::run(pass.params, scores);
    return pass.outputs;
  }

  static BackwardOutputs backward(const at::Tensor& grad_log_z, const at::Tensor& scores,
                                  const at::Tensor& transition, const at::Tensor& duration,
                                  const at::Tensor& lengths, const at::Tensor& start_transition,
                                  const at::Tensor& end_transition,
                                  const std::optional<at::Tensor>& start_scores,
                                  const std::optional<at::Tensor>& end_scores,
                                  const at::Tensor& log_z, const at::Tensor& ckpt_ring,
                                  const at::Tensor& ckpt_offset, int64_t interval,
                                  bool boundary_mass) {
    OpCall call(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores);
    auto pass = call.backward(grad_log_z, log_z, ckpt_ring, ckpt_offset, interval, boundary_mass);
    Backend::run(pass.params, scores);
    return pass.outputs;
  }

  static ViterbiOutputs viterbi(const at::Tensor& scores, const at::Tensor& transition,
                                const at::Tensor& duration, const at::Tensor& lengths,
                                const at::Tensor& start_transition,
                                const at::Tensor& end_transition,
                                const std::optional<at::Tensor>& start_scores,
                                const std::optional<at::Tensor>& end_scores) {
    OpCall call(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores);
    auto pass = call.viterbi();
    Backend::run(pass.params, scores);
    return pass.outputs;
  }

  static FilterOutputs filter(const at::Tensor& scores, const at::Tensor& transition,
                              const at::Tensor& duration, const at::Tensor& lengths,
                              const at::Tensor& start_transition, const at::Tensor& end_transition,
                              const std::optional<at::Tensor>& start_scores,
                              const std::optional<at::Tensor>& end_scores) {
    OpCall call(scores, transition, duration, lengths, start_transition, end_transition,
                start_scores, end_scores);
    auto pass = call.filter();
    Backend::run(pass.params, scores);
    return pass.outputs;
  }

  // TORCH_LIBRARY_IMPL(flashsemicrf, <dispatch key>, m) { OpEntries<...>::register_all(m); }
  static void register_all(torch::Library& m) {
    m.impl("forward", &forward);
    m.impl("backward", &backward);
    m.impl("viterbi", &viterbi);
    m.impl("filter", &filter);
  }
};

}  // namespace flashsemicrf
