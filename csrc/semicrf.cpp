// Op schemas (one contract for the CPU, CUDA and Triton implementations) and
// the Python module stub. Kernels live in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

// `import flashsemicrf._C` only has to load this library so that the static
// TORCH_LIBRARY registrations run; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "flashsemicrf._C", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(flashsemicrf, m) {
  // log Z (B,) and the checkpoints of the streaming forward: the ring state
  // (B, ceil(T/interval), K or 2K, C) and its float64 offsets (B, N); 2B
  // rows where the CUDA forward also saves the mirror image's for its
  // span-parallel backward (FLASHSEMICRF_CUDA_SWEEP=parallel, static
  // transition), which every backward takes, reading rows 0 … B-1.
  // interval 0 means the default floor(sqrt(T·K)) (the backward must be given
  // the same interval as the forward).
  m.def(
      "forward(Tensor scores, Tensor transition, Tensor duration, Tensor lengths, "
      "Tensor start_transition, Tensor end_transition, Tensor? start_scores, "
      "Tensor? end_scores, SymInt interval) -> (Tensor log_z, Tensor checkpoint_ring, "
      "Tensor checkpoint_offset)");
  // Per-sequence gradients of log Z times grad_log_z: scores (B, T, C),
  // transition (B, C, C) or (B, K, C, C), duration (B, K, C), start and end
  // transition (B, C), start and end scores (B, T, C) when boundary_mass or
  // the input is present, else (0,).
  m.def(
      "backward(Tensor grad_log_z, Tensor scores, Tensor transition, Tensor duration, "
      "Tensor lengths, Tensor start_transition, Tensor end_transition, Tensor? start_scores, "
      "Tensor? end_scores, Tensor log_z, Tensor checkpoint_ring, Tensor checkpoint_offset, "
      "SymInt interval, bool boundary_mass) -> (Tensor grad_scores, Tensor grad_transition, "
      "Tensor grad_duration, Tensor grad_start_transition, Tensor grad_end_transition, "
      "Tensor grad_start_scores, Tensor grad_end_scores)");
  // The max semiring: best score (B,) and, per position, the label of the
  // best path's segment starting there (B, T) int64, -1 elsewhere.
  m.def(
      "viterbi(Tensor scores, Tensor transition, Tensor duration, Tensor lengths, "
      "Tensor start_transition, Tensor end_transition, Tensor? start_scores, "
      "Tensor? end_scores) -> (Tensor best, Tensor segment_label)");
  // Forward filtering for sampling: the messages at every boundary,
  // alpha_hat and sigma_hat (B, T+1, C) and their offsets (B, T+1) float64
  // (O(T·C) memory, like Viterbi's backpointers), -inf where undefined.
  m.def(
      "filter(Tensor scores, Tensor transition, Tensor duration, Tensor lengths, "
      "Tensor start_transition, Tensor end_transition, Tensor? start_scores, "
      "Tensor? end_scores) -> (Tensor alpha, Tensor sigma, Tensor offset)");
}
