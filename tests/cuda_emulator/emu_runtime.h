// A CPU emulator of the CUDA subset the flashsemicrf kernels use: every CUDA
// thread is a fiber; __syncthreads and the warp shuffles are scheduling
// points. Between them, fibers run in a chosen order (in order, reversed,
// random) so that a missing barrier changes results. Divergent
// barriers/shuffles and deadlocks are reported as errors.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
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
// Switching fibers. A test run switches hundreds of millions of times, and
// glibc's swapcontext makes a sigprocmask system call at each, which took a
// third of the emulator tests' time. On x86-64 the switch is a few lines of
// assembly instead: it saves the callee-saved registers and the SSE/x87
// control words on the old stack, swaps stack pointers and restores them
// from the new one (what the System V ABI asks a call to preserve; the
// signal mask never changes here). Elsewhere, or built with -DEMU_UCONTEXT,
// it stays ucontext.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
// emu_switch(&save_sp, new_sp): suspend here, resume the context new_sp holds.
extern "C" void emu_switch(void** save_sp, void* new_sp);
__asm__(
    ".pushsection .text\n"
    ".weak emu_switch\n"
    ".type emu_switch, @function\n"
    "emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size emu_switch, .-emu_switch\n"
    ".popsection\n");
#else
#define EMU_ASM_SWITCH 0
#endif

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
enum class St { Ready, Barrier, Shfl, Done };
struct Context {
#if EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
};
// Fiber stacks live for the whole process and serve every launch: making
// 256 fresh ones of 256 KB a launch cost more in page faults than running
// small kernels did.
constexpr size_t kStackBytes = 256 * 1024;
inline char* stack_pool(int i) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (static_cast<int>(pool.size()) <= i) pool.emplace_back(new char[kStackBytes]);
  return pool[i].get();
}
struct Fiber {
  Context ctx;
  char* stack = nullptr;  // kStackBytes, from stack_pool()
  Dim3 tid;
  St st = St::Ready;
  int kind = 0, param = 0, size = 0;
  unsigned char val[8], out[8];
};
struct Block {
  std::vector<Fiber> fibers;
  Context sched;
  Fiber* cur = nullptr;
  Dim3 bid;
  std::function<void()> body;
  std::mt19937 rng{1234};
  int mode = 2;  // 0 in order, 1 reversed, 2 random
  long long barriers = 0, shuffles = 0;
  // What a fiber threw (a partial shuffle mask, say): the scheduler rethrows
  // it on the caller's stack, where it can unwind to Python.
  std::exception_ptr error;
};
inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline void switch_to(Context& from, Context& to) {
#if EMU_ASM_SWITCH
  emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.ctx, &to.ctx);
#endif
}
inline void yield() { switch_to(block()->cur->ctx, block()->sched); }
// Every fiber starts here; it never returns: once Done, it is not resumed.
inline void trampoline() {
  Block* B = block();
  try {
    B->body();
  } catch (...) {
    B->error = std::current_exception();
  }
  B->cur->st = St::Done;
  yield();
  __builtin_unreachable();
}
inline void start_fiber(Fiber& f) {
#if EMU_ASM_SWITCH
  // The stack emu_switch pops for a fiber that has not run: the control
  // words, six zero registers, and trampoline as the return address, placed
  // so that trampoline starts with the stack aligned as after a call.
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top - 16);
  *sp = reinterpret_cast<uint64_t>(&trampoline);
  for (int r = 0; r < 6; ++r) *--sp = 0;
  --sp;
  uint32_t mxcsr;
  uint16_t fpucw;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.ctx);
  f.ctx.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.ctx.uc_link = nullptr;
  makecontext(&f.ctx.ctx, trampoline, 0);
#endif
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
  B.fibers.resize(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = B.fibers[i];
    f.stack = stack_pool(i);
    f.tid.x = i;
    f.st = St::Ready;
    start_fiber(f);
  }
  B.error = nullptr;
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
        switch_to(B.sched, B.fibers[i].ctx);
        if (B.error) std::rethrow_exception(B.error);
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
