// Device building blocks shared by the CUDA kernels: the CTA shape, warp
// reductions in the orders semicrf.h defines, and the placement of a CTA's
// working arrays (shared memory when they fit, else a global workspace slice).
//
// Every warp-level helper here must be called by all 32 lanes of a warp
// (warp-uniform control flow): they shuffle with the full mask.
#pragma once

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

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

// The warp's argmax in the order of `beats` (semicrf.h): lanes start from
// (-inf, INT_MAX) for "nothing", which every real entry beats.
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

// The log-sum-exp of semicrf.h over one warp: the max, then the sum of
// fexp(x - lse_shift(max)), lanes taking i ≡ lane (mod 32) and the warp
// adding their sums by butterfly. f evaluated twice, one exp per term.
template <typename T, typename F>
__device__ __forceinline__ T warp_lse(int n, F f) {
  const int lane = lane_id();
  T m = neg_inf<T>();
  for (int i = lane; i < n; i += kWarpSize) m = nan_max(m, f(i));
  m = warp_max(m);
  const T shift = lse_shift(m);
  T s = 0;
  for (int i = lane; i < n; i += kWarpSize) s += fexp(f(i) - shift);
  s = warp_sum(s);
  return lse_finish(m, s);
}

// warp_lse's value, bit for bit (the same terms in the same orders), with
// each term evaluated once: a lane keeps its terms (i = lane, lane + 32, …
// < n <= 32·kCached) in registers between the max and the sum.
template <int kCached, typename T, typename F>
__device__ __forceinline__ T warp_lse_cached(int n, F f) {
  const int lane = lane_id();
  T x[kCached];
  T m = neg_inf<T>();
#pragma unroll
  for (int r = 0; r < kCached; ++r) {
    const int i = lane + r * kWarpSize;
    x[r] = i < n ? f(i) : neg_inf<T>();
    m = nan_max(m, x[r]);
  }
  m = warp_max(m);
  const T shift = lse_shift(m);
  // Slots past n hold -inf: their exp adds exactly +0 (no branch per term).
  T s = 0;
#pragma unroll
  for (int r = 0; r < kCached; ++r) s += fexp(x[r] - shift);
  s = warp_sum(s);
  return lse_finish(m, s);
}

// Terms a lane keeps in registers for warp_lse_once: n <= 256.
constexpr int kCachedTerms = 8;

// warp_lse's value, evaluating each term once when n <= 32·kCachedTerms (one
// register per term and lane; a single one when n <= 32), else twice. Float
// only: with doubles the forward's workspace instantiation spilled (ptxas -v)
// even with two cached terms.
template <typename T, typename F>
__device__ __forceinline__ T warp_lse_once(int n, F f) {
  if (sizeof(T) == 4 && n <= kWarpSize) return warp_lse_cached<1, T>(n, f);
  if (sizeof(T) == 4 && n <= kCachedTerms * kWarpSize) return warp_lse_cached<kCachedTerms, T>(n, f);
  return warp_lse<T>(n, f);
}

// The same value with f evaluated once (for expensive terms): each lane keeps
// a running (max, sum), rescaled to the warp max at the end.
template <typename T, typename F>
__device__ __forceinline__ T warp_lse_online(int n, F f) {
  const int lane = lane_id();
  T m = neg_inf<T>(), s = 0;
  for (int i = lane; i < n; i += kWarpSize) {
    const T x = f(i);
    const T mn = nan_max(m, x), shift = lse_shift(mn);
    s = s * fexp(m - shift) + fexp(x - shift);
    m = mn;
  }
  const T mw = warp_max(m);
  s = warp_sum(s * fexp(m - lse_shift(mw)));
  return lse_finish(mw, s);
}

// The CTA's sum of one double per thread: warps add by butterfly, lane 0
// stores its warp's sum in red[warp], and after a barrier every thread adds
// the kWarps sums in order, so that all hold the same bits. Every thread must
// call it; red must not be written again before another barrier.
__device__ __forceinline__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  if (lane_id() == 0) red[warp_id()] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
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

// Where the working arrays of a CTA live. Array k starts offset[k] bytes
// into either the dynamic shared memory (shared[k]) or the CTA's slice of a
// global workspace of workspace_stride bytes per CTA. The arrays a plan may
// evict all stay in shared memory in the common case (evictables_shared):
// the kernels then take a kShared = true instantiation whose get<T, true>
// derives those pointers from the __shared__ array itself, so the compiler
// reads them with LDS; the fallback (kShared = false) reaches both places
// through generic pointers, and __syncthreads orders a CTA's global stores
// and loads as it does shared ones. workspace() is for the arrays that
// always live in the workspace (global loads).
struct Arena {
  static constexpr int kMaxArrays = 12;
  int64_t offset[kMaxArrays] = {};
  bool shared[kMaxArrays] = {};
  bool evictables_shared = false;
  int64_t smem_bytes = 0;
  int64_t workspace_stride = 0;
  unsigned char* workspace = nullptr;

  template <typename T, bool kShared = false>
  __device__ __forceinline__ T* get(int k, int64_t b) const {
    if (kShared) return reinterpret_cast<T*>(dynamic_smem<unsigned char>() + offset[k]);
    unsigned char* base =
        shared[k] ? dynamic_smem<unsigned char>() : workspace + b * workspace_stride;
    return reinterpret_cast<T*>(base + offset[k]);
  }
  template <typename T>
  __device__ __forceinline__ T* in_workspace(int k, int64_t b) const {
    return reinterpret_cast<T*>(workspace + b * workspace_stride + offset[k]);
  }
};

// The kernel for a launch: kernel_for(zero, dd, std::bool_constant<kShared>)
// where the kernel has a placement parameter (kShared when the plan keeps
// every evictable array in shared memory), else kernel_for(zero, dd).
template <typename KernelFor, typename Zero, typename DD>
auto pick_kernel(KernelFor kernel_for, Zero zero, DD dd, const Arena& arena) {
  if constexpr (std::is_invocable_v<KernelFor, Zero, DD, std::true_type>) {
    return arena.evictables_shared ? kernel_for(zero, dd, std::true_type{})
                                   : kernel_for(zero, dd, std::false_type{});
  } else {
    return kernel_for(zero, dd);
  }
}

// Places n arrays of bytes[k] bytes each, every one 16-byte aligned. The
// arrays listed in `evict` (n_evict of them) go to shared memory when they
// fit in smem_limit bytes, else they move to the global workspace in the
// order listed until the rest fits; the others always live in the workspace.
inline Arena plan_arena(const int64_t* bytes, int n, const int* evict, int n_evict,
                        size_t smem_limit) {
  auto aligned = [](int64_t x) { return (x + 15) / 16 * 16; };
  Arena a;
  bool in_smem[Arena::kMaxArrays] = {};
  int64_t total = 0;
  for (int e = 0; e < n_evict; ++e) {
    in_smem[evict[e]] = true;
    total += aligned(bytes[evict[e]]);
  }
  for (int e = 0; e < n_evict && static_cast<size_t>(total) > smem_limit; ++e) {
    in_smem[evict[e]] = false;
    total -= aligned(bytes[evict[e]]);
  }
  a.evictables_shared = true;
  for (int e = 0; e < n_evict; ++e) a.evictables_shared &= in_smem[evict[e]];
  for (int k = 0; k < n; ++k) {
    a.shared[k] = in_smem[k];
    int64_t& end = in_smem[k] ? a.smem_bytes : a.workspace_stride;
    a.offset[k] = end;
    end += aligned(bytes[k]);
  }
  return a;
}

}  // namespace cuda
}  // namespace flashsemicrf
