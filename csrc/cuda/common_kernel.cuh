// Device building blocks shared by the CUDA kernels: the CTA shape, warp
// reductions in the log semiring, and the placement of a CTA's working arrays
// (shared memory when they fit, else a global workspace slice).
//
// Every warp-level helper here must be called by all 32 lanes of a warp
// (warp-uniform control flow): they shuffle with the full mask.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>

#include "semicrf.h"

namespace flashsemicrf {
namespace cuda {

// One CTA per sequence. The kernels are written for exactly this many threads.
constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarpSize - 1); }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarpSize; }

// The CTA's dynamic shared memory (the host sizes it per launch).
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char flashsemicrf_smem[];
  return reinterpret_cast<T*>(flashsemicrf_smem);
}

// Row stride of the rings in working memory: odd, so that the 32 lanes of a
// warp reading one label across 32 consecutive slots hit 32 different banks.
HOST_DEVICE int padded_row(int C) { return C | 1; }

// A 1 ≤ L ≤ T that keeps every address in range even for lengths a direct op
// call did not validate (the public functions reject such lengths).
__device__ __forceinline__ int64_t sequence_length(const Params& p, int64_t b) {
  const int64_t L = p.lengths[b];
  return L < 1 ? 1 : (L > p.T ? p.T : L);
}

// Max over the warp, NaN winning; the result is lane 0's, so every lane (and
// every warp reducing the same values the same way) holds identical bits.
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  return __shfl_sync(kFullMask, v, 0);
}

// Butterfly sum: partners add the same two numbers (a + b == b + a bit for
// bit), so all lanes end with identical bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Inclusive prefix sum over the lanes (lane 0 first).
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = lane_id();
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const T y = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// The order of the CPU kernel's argmax: the first NaN if there is one, else
// the largest value, ties to the smallest index. A total order on (value,
// index) pairs with distinct indices, so any reduction tree agrees with it.
template <typename T>
__device__ __forceinline__ bool beats(T v, int i, T best_v, int best_i) {
  const bool v_nan = v != v, best_nan = best_v != best_v;
  if (v_nan || best_nan) return v_nan && (!best_nan || i < best_i);
  return v > best_v || (v == best_v && i < best_i);
}

// Lanes start from (-inf, INT_MAX) for "nothing", which every real entry beats.
template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int& i) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const T v2 = __shfl_xor_sync(kFullMask, v, o);
    const int i2 = __shfl_xor_sync(kFullMask, i, o);
    if (beats(v2, i2, v, i)) {
      v = v2;
      i = i2;
    }
  }
}

// LSE of f(0 … n-1) over one warp, two passes (max, then the sum of exps),
// like the CPU kernel's lse: one exp per term, f evaluated twice.
template <typename T, typename F>
__device__ __forceinline__ T warp_lse(int n, F f) {
  const int lane = lane_id();
  T m = neg_inf<T>();
  for (int i = lane; i < n; i += kWarpSize) m = nan_max(m, f(i));
  m = warp_max(m);
  T s = 0;
  for (int i = lane; i < n; i += kWarpSize) s += exp_from(f(i), m);
  s = warp_sum(s);
  return lse_finish(m, s);
}

// LSE of f(0 … n-1) over one warp, f evaluated once (for expensive terms):
// each lane keeps a running (max, sum), rescaled to the warp max at the end.
template <typename T, typename F>
__device__ __forceinline__ T warp_lse_online(int n, F f) {
  const int lane = lane_id();
  T m = neg_inf<T>(), s = 0;
  for (int i = lane; i < n; i += kWarpSize) {
    const T x = f(i);
    const T mn = nan_max(m, x);
    s = s * exp_from(m, mn) + exp_from(x, mn);
    m = mn;
  }
  const T mw = warp_max(m);
  s = warp_sum(s * exp_from(m, mw));
  return lse_finish(mw, s);
}

// One thread's LSE of f(0 … n-1): the CPU kernel's lse, term for term.
template <typename T, typename F>
__device__ __forceinline__ T thread_lse(int n, F f) {
  T m = neg_inf<T>();
  for (int i = 0; i < n; ++i) m = nan_max(m, f(i));
  T s = 0;
  for (int i = 0; i < n; ++i) s += exp_from(f(i), m);
  return lse_finish(m, s);
}

// One thread's argmax of f(0 … n-1), n ≥ 1: the CPU kernel's argmax.
template <typename T, typename F>
__device__ __forceinline__ int thread_argmax(int n, F f, T& best) {
  int a = 0;
  best = f(0);
  for (int i = 1; i < n; ++i) {
    const T x = f(i);
    if (x > best || (x != x && best == best)) {
      a = i;
      best = x;
    }
  }
  return a;
}

// Max of x[0 … n-1] computed by each warp on its own (no barrier needed
// afterwards); every warp gets identical bits.
template <typename T>
__device__ __forceinline__ T array_max(const T* x, int n) {
  T m = neg_inf<T>();
  for (int i = lane_id(); i < n; i += kWarpSize) m = nan_max(m, x[i]);
  return warp_max(m);
}

// f(r, c) for the entries i = first, first + stride, … < rows·C of a (rows, C)
// array, i = r·C + c, without a division per entry (stride < C·2^31/rows).
template <typename F>
__device__ __forceinline__ void for_each_entry(int rows, int C, int first, int stride, F f) {
  const int step_r = stride / C, step_c = stride - step_r * C;
  int r = first / C, c = first - r * C;
  while (r < rows) {
    f(r, c);
    r += step_r;
    c += step_c;
    if (c >= C) {  // c + step_c < 2C: at most one carry
      c -= C;
      ++r;
    }
  }
}

template <typename T>
__device__ __forceinline__ void fill(T* x, int64_t n, T v) {
  for (int64_t i = threadIdx.x; i < n; i += kThreads) x[i] = v;
}

// Where the working arrays of a CTA live. Array k is at offset[k] scalars
// into either the dynamic shared memory (shared[k]) or the CTA's slice of a
// global workspace of stride workspace_stride scalars per CTA. Code reaches
// both through generic pointers, so one kernel serves every placement;
// __syncthreads orders a CTA's global stores and loads as it does shared ones.
struct Arena {
  static constexpr int kMaxArrays = 4;
  int64_t offset[kMaxArrays] = {0, 0, 0, 0};
  bool shared[kMaxArrays] = {false, false, false, false};
  int64_t smem_elems = 0;
  int64_t workspace_stride = 0;
  void* workspace = nullptr;

  template <typename T>
  __device__ __forceinline__ T* get(int k, T* smem, int64_t b) const {
    return shared[k] ? smem + offset[k] : static_cast<T*>(workspace) + b * workspace_stride + offset[k];
  }
};

// Places n arrays of the given sizes (in scalars of elem_bytes bytes): all in
// shared memory when they fit in smem_limit bytes, else arrays move to the
// global workspace in the order `evict` lists them until the rest fits.
inline Arena plan_arena(const int64_t* sizes, int n, const int* evict, size_t elem_bytes,
                        size_t smem_limit) {
  Arena a;
  bool in_smem[Arena::kMaxArrays];
  int64_t total = 0;
  for (int k = 0; k < n; ++k) {
    in_smem[k] = true;
    total += sizes[k];
  }
  for (int e = 0; e < n && static_cast<size_t>(total) * elem_bytes > smem_limit; ++e) {
    in_smem[evict[e]] = false;
    total -= sizes[evict[e]];
  }
  for (int k = 0; k < n; ++k) {
    a.shared[k] = in_smem[k];
    if (in_smem[k]) {
      a.offset[k] = a.smem_elems;
      a.smem_elems += sizes[k];
    } else {
      a.offset[k] = a.workspace_stride;
      a.workspace_stride += sizes[k];
    }
  }
  return a;
}

}  // namespace cuda
}  // namespace flashsemicrf
