// A CPU emulator of the CUDA subset the flashsemicrf kernels use: every CUDA
// thread is a fiber (ucontext); __syncthreads and the warp shuffles are
// scheduling points. Between them, fibers run in a chosen order (in order,
// reversed, random) so that a missing barrier changes results. Divergent
// barriers/shuffles and deadlocks are reported as errors.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x)
#define __shared__

namespace emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
enum class St { Ready, Barrier, Shfl, Done };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Dim3 tid;
  St st = St::Ready;
  int kind = 0, param = 0, size = 0;
  unsigned char val[8], out[8];
};
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* cur = nullptr;
  Dim3 bid;
  std::function<void()> body;
  std::mt19937 rng{1234};
  int mode = 2;  // 0 in order, 1 reversed, 2 random
  long long barriers = 0, shuffles = 0;
};
inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline void yield() { swapcontext(&block()->cur->ctx, &block()->sched); }
inline void trampoline() {
  Block* B = block();
  B->body();
  B->cur->st = St::Done;
  swapcontext(&B->cur->ctx, &B->sched);
}
}  // namespace emu

#define threadIdx (::emu::block()->cur->tid)
#define blockIdx (::emu::block()->bid)

inline void __syncthreads() {
  emu::block()->cur->st = emu::St::Barrier;
  emu::yield();
}

template <typename T>
T emu_shfl(int kind, T v, int param) {
  static_assert(sizeof(T) <= 8, "shfl size");
  auto* f = emu::block()->cur;
  f->kind = kind;
  f->param = param;
  f->size = sizeof(T);
  std::memcpy(f->val, &v, sizeof(T));
  f->st = emu::St::Shfl;
  emu::yield();
  T r;
  std::memcpy(&r, f->out, sizeof(T));
  return r;
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int = 32) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(0, v, src);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int m, int = 32) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(1, v, m);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int = 32) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(2, v, static_cast<int>(d));
}

// __syncwarp: every lane of the warp meets here (a scheduling point, as a
// shuffle is), so that a missing one changes results as a missing
// __syncthreads does.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  (void)emu_shfl(1, 0, 0);
}

// The warp-wide reductions and votes (sm_80's REDUX, VOTE): every lane meets
// here as at a shuffle and gets the same result. Kinds 3 … 6.
inline int __reduce_max_sync(unsigned mask, int v) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(3, v, 0);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(4, v, 0);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(5, v, 0);
}
inline int __any_sync(unsigned mask, int predicate) {
  if (mask != 0xffffffffu) throw std::runtime_error("partial mask");
  return emu_shfl(6, predicate != 0 ? 1 : 0, 0);
}

// The kernels' `extern __shared__ unsigned char flashsemicrf_smem[]` (a
// block-scope declaration in dynamic_smem()) names this array: one CTA runs at
// a time, so one buffer serves them all.
namespace flashsemicrf {
namespace cuda {
constexpr size_t kEmulatedSmemBytes = 256 * 1024;
alignas(16) inline unsigned char flashsemicrf_smem[kEmulatedSmemBytes];
}  // namespace cuda
}  // namespace flashsemicrf

namespace emu {
inline void fail(const std::string& s) { throw std::runtime_error("emulator: " + s); }

inline void run_block(Block& B, int nthreads) {
  const size_t kStack = 256 * 1024;
  B.fibers.resize(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = B.fibers[i];
    if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
    f.tid.x = i;
    f.st = St::Ready;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  std::vector<int> ready;
  for (;;) {
    ready.clear();
    for (int i = 0; i < nthreads; ++i)
      if (B.fibers[i].st == St::Ready) ready.push_back(i);
    if (!ready.empty()) {
      if (B.mode == 1) std::reverse(ready.begin(), ready.end());
      if (B.mode == 2) std::shuffle(ready.begin(), ready.end(), B.rng);
      for (int i : ready) {
        B.cur = &B.fibers[i];
        swapcontext(&B.sched, &B.fibers[i].ctx);
      }
      continue;
    }
    bool progress = false;
    for (int w = 0; w * 32 < nthreads; ++w) {
      int at = 0;
      for (int l = 0; l < 32; ++l) at += B.fibers[w * 32 + l].st == St::Shfl;
      if (at == 0) continue;
      if (at != 32) fail("divergent shuffle in warp " + std::to_string(w));
      Fiber* lanes = &B.fibers[w * 32];
      for (int l = 0; l < 32; ++l) {
        if (lanes[l].kind != lanes[0].kind || lanes[l].size != lanes[0].size)
          fail("mismatched shuffles in warp " + std::to_string(w));
        if (lanes[0].kind != 0 && lanes[l].param != lanes[0].param)
          fail("mismatched shuffle params");
      }
      if (lanes[0].kind >= 3) {  // a reduction of 32-bit values: every lane gets it
        uint32_t r;
        std::memcpy(&r, lanes[0].val, 4);
        for (int l = 1; l < 32; ++l) {
          uint32_t u;
          std::memcpy(&u, lanes[l].val, 4);
          switch (lanes[0].kind) {
            case 3: r = static_cast<int32_t>(u) > static_cast<int32_t>(r) ? u : r; break;
            case 4: r = std::max(r, u); break;
            case 5: r = std::min(r, u); break;
            default: r |= u; break;
          }
        }
        for (int l = 0; l < 32; ++l) {
          std::memset(lanes[l].out, 0, 8);
          std::memcpy(lanes[l].out, &r, 4);
          lanes[l].st = St::Ready;
        }
        ++B.shuffles;
        progress = true;
        continue;
      }
      for (int l = 0; l < 32; ++l) {
        int src;
        switch (lanes[l].kind) {
          case 0: src = lanes[l].param & 31; break;
          case 1: src = l ^ lanes[l].param; break;
          default: src = l - lanes[l].param >= 0 ? l - lanes[l].param : l; break;
        }
        std::memcpy(lanes[l].out, lanes[src].val, 8);
      }
      for (int l = 0; l < 32; ++l) lanes[l].st = St::Ready;
      ++B.shuffles;
      progress = true;
    }
    if (progress) continue;
    int at_barrier = 0, done = 0;
    for (auto& f : B.fibers) {
      at_barrier += f.st == St::Barrier;
      done += f.st == St::Done;
    }
    if (done == nthreads) break;
    if (at_barrier + done == nthreads) {
      if (done > 0) fail("__syncthreads with exited threads");
      for (auto& f : B.fibers) f.st = St::Ready;
      ++B.barriers;
      continue;
    }
    fail("deadlock");
  }
}

// The launch-time limits of a compute capability 9.0 GPU (H100, H200), which
// a CPU run would not otherwise see. Every emulated launch is held to them.
struct DeviceLimits {
  static constexpr int kMaxThreadsPerBlock = 1024;
  static constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
  static constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic, without the attribute
  static constexpr size_t kOptinSmem = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin
};
struct LaunchRecord {
  int64_t grid;
  int threads;
  size_t smem, smem_attribute;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}
// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel, as set by cudaFuncSetAttribute.
inline std::map<const void*, size_t>& smem_attribute() {
  static std::map<const void*, size_t> attr;
  return attr;
}
template <typename Kernel>
const void* kernel_id(Kernel kernel) {
  return reinterpret_cast<const void*>(kernel);
}
inline void check_launch(const void* kernel, int64_t grid, int nthreads, size_t smem) {
  const std::string at = "launch <<<" + std::to_string(grid) + ", " + std::to_string(nthreads) +
                         ", " + std::to_string(smem) + ">>>: ";
  if (nthreads < 1 || nthreads > DeviceLimits::kMaxThreadsPerBlock)
    fail(at + "threads per block must be in [1, 1024]");
  if (grid < 1 || grid > DeviceLimits::kMaxGridX) fail(at + "grid.x must be in [1, 2^31 - 1]");
  const auto it = smem_attribute().find(kernel);
  const size_t allowed = it == smem_attribute().end() ? DeviceLimits::kDefaultSmem : it->second;
  if (smem > allowed)
    fail(at + "dynamic shared memory over " + std::to_string(allowed) +
         " bytes: above 48 KB it needs cudaFuncSetAttribute(kernel, "
         "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first");
  launch_log().push_back({grid, nthreads, smem, allowed});
}

// kernel<<<grid, nthreads, smem>>>(args...), one block after another.
template <typename Kernel, typename... Args>
void launch(int mode, unsigned seed, int64_t grid, int nthreads, size_t smem, Kernel kernel,
            Args... args) {
  check_launch(kernel_id(kernel), grid, nthreads, smem);
  if (smem > flashsemicrf::cuda::kEmulatedSmemBytes) fail("more shared memory than emulated");
  Block B;
  B.mode = mode;
  B.rng.seed(seed);
  block() = &B;
  B.body = [&]() { kernel(args...); };
  for (int64_t b = 0; b < grid; ++b) {
    B.bid.x = static_cast<unsigned>(b);
    // NaN for float and double: uninitialised reads show.
    std::memset(flashsemicrf::cuda::flashsemicrf_smem, 0xff, smem);
    run_block(B, nthreads);
  }
  block() = nullptr;
}
}  // namespace emu

// cudaFuncSetAttribute for the one attribute the kernels use; like the
// runtime, it refuses more than the opt-in limit (the kernels have no static
// shared memory: the ptxas table says so).
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > emu::DeviceLimits::kOptinSmem)
    return cudaErrorInvalidValue;
  emu::smem_attribute()[emu::kernel_id(kernel)] = static_cast<size_t>(bytes);
  return cudaSuccess;
}
