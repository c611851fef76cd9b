// The streaming forward scan of one sequence by one CTA (CtaScan), and the
// kernels built on it: forward (log Z + checkpoints), Viterbi (max semiring,
// checkpoints, traceback span by span) and filter (the messages at every boundary).
// CtaScan is the CPU kernel's ForwardScan with the loops over labels and
// durations spread over the CTA; see semicrf_cuda.cu for the thread mapping
// and the barrier discipline.
#pragma once

#include "common_kernel.cuh"

namespace flashsemicrf {
namespace cuda {

// Working arrays of a CtaScan: the ring (S·ld scalars, S = K or 2K,
// ld = padded_row(C)) and kScanRows rows of C scalars.
constexpr int kScanRows = 5;

template <typename scalar_t, bool DD, bool MAX>
struct CtaScan {
  const SequenceInputs<scalar_t> in;
  const int K, C, ld;
  const int64_t L;
  // Static: K slots of sigma_hat[s] + gain. DD: K alpha slots, then K gain
  // slots. Slot s % K holds the segment that started at s; row stride ld.
  scalar_t* const ring;
  scalar_t* const raw;        // (C) alpha[t] (or sigma[0]) before normalisation
  scalar_t* const alpha;      // (C) alpha_hat[t]
  scalar_t* const sigma;      // (C) sigma_hat[t]
  scalar_t* const score_row;  // (C) scores[t], staged for advance()
  scalar_t* const start_row;  // (C) start_scores[t]
  double offset = 0.0;        // O_t, the same in every thread
  int tK = 0;                 // t % K for the step t the scan is at, kept by a counter
  int32_t* bp_duration = nullptr;  // MAX: the next step's backpointer rows (C), or null
  int32_t* bp_previous = nullptr;

  // first: the position the scan calls 0 (a chunk's; see forward_kernel).
  __device__ CtaScan(const Params& p, int64_t b, int64_t L_, scalar_t* ring_, scalar_t* rows,
                     int64_t first = 0)
      : in(p, b, first), K(static_cast<int>(p.K)), C(static_cast<int>(p.C)),
        ld(padded_row(static_cast<int>(p.C))), L(L_), ring(ring_), raw(rows),
        alpha(rows + p.C), sigma(rows + 2 * p.C), score_row(rows + 3 * p.C),
        start_row(rows + 4 * p.C) {}

  // The empty state (every segment impossible). Barrier before use.
  __device__ void reset() {
    fill(ring, static_cast<int64_t>(DD ? 2 : 1) * K * ld, neg_inf<scalar_t>());
    fill(raw, static_cast<int64_t>(kScanRows) * C, neg_inf<scalar_t>());
    offset = 0.0;
    tK = 0;
  }

  // The open label-c segment [t-d, t) before end_scores: the CPU kernel's
  // terms[d-1]. tK = t % K. *prev (DD && MAX): the best previous label, -1
  // for the segment starting at 0.
  __device__ scalar_t term(int tK, int64_t t, int d, int c, int* prev) const {
    const int slot = slot_before(tK, d, K);
    scalar_t e;
    if (!DD) {
      e = ring[slot * ld + c];
    } else {
      const scalar_t* a = ring + slot * ld;
      if (t == d) {
        e = a[c];  // start_transition - O_0: no previous label
        if (prev) *prev = -1;
      } else if (MAX) {
        auto entered = [&](int cp) { return a[cp] + in.trans_by_label(d, cp, c); };
        const int best = argmax<scalar_t>(C, entered, &e);
        if (prev) *prev = best;
      } else {
        e = lse<scalar_t>(C, [&](int cp) { return a[cp] + in.trans_by_label(d, cp, c); });
      }
      e += ring[(K + slot) * ld + c];
    }
    return e + in.dur_by_label(d, c);  // lanes take consecutive d: consecutive addresses
  }

  // Step t: alpha_hat[t] (t > 0) and sigma_hat[t] (t < L, static, or t = 0)
  // relative to O_t, readable by every thread on return. Returns the max m_t
  // that was subtracted. Ends with a barrier; the caller must put another one
  // between its last read of these rows (or advance()) and the next step().
  // t is the step after the last advance() (or reset() / load(t)).
  __device__ scalar_t step(int64_t t) {
    const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
    // This thread's first entries of scores[t] and start_scores[t], loaded
    // now so that the loads are in flight during phase A.
    const bool staged = t < L && tid < C;
    const scalar_t score_first = staged ? in.score(t, tid) : scalar_t(0);
    const scalar_t start_first = staged ? in.start(t, tid) : scalar_t(0);
    // Phase A: raw[c], a warp per label, lanes over durations.
    if (t == 0) {
      for (int c = tid; c < C; c += kThreads) raw[c] = in.first(c);
    } else {
      const int dmax = static_cast<int>(t < K ? t : K);
      for (int c = warp; c < C; c += kWarps) {
        if (!MAX) {
          auto f = [&](int i) { return term(tK, t, i + 1, c, nullptr); };
          const scalar_t v =
              DD ? warp_lse_online<scalar_t>(dmax, f) : warp_lse_once<scalar_t>(dmax, f);
          if (lane == 0) raw[c] = in.end(t - 1, c) + v;
        } else {
          scalar_t v = neg_inf<scalar_t>();
          int a = INT_MAX;
          for (int i = lane; i < dmax; i += kWarpSize) {
            const scalar_t x = term(tK, t, i + 1, c, nullptr);
            if (beats(x, i, v, a)) {
              v = x;
              a = i;
            }
          }
          warp_argmax(v, a);
          if (lane == 0) {
            raw[c] = in.end(t - 1, c) + v;
            if (bp_duration) bp_duration[c] = a + 1;
            if (DD && bp_previous) {
              int prev = -1;
              term(tK, t, a + 1, c, &prev);  // the same argmax over c' again
              bp_previous[c] = prev;
            }
          }
        }
      }
    }
    if (staged) {
      score_row[tid] = score_first;
      start_row[tid] = start_first;
      for (int c = tid + kThreads; c < C; c += kThreads) {
        score_row[c] = in.score(t, c);
        start_row[c] = in.start(t, c);
      }
    }
    __syncthreads();

    // Phase B: every warp reduces m itself; normalise; static sigma_hat[t].
    const scalar_t m = finite_or_zero(array_max(raw, C));
    offset += static_cast<double>(m);
    if (t == 0) {
      for (int c = tid; c < C; c += kThreads) sigma[c] = raw[c] - m;
    } else {
      for (int c = tid; c < C; c += kThreads) alpha[c] = raw[c] - m;
      if (!DD && t < L) {
        for (int c = warp; c < C; c += kWarps) {
          // alpha_hat[c'] recomputed from raw: the same bits as alpha[c'].
          auto f = [&](int cp) { return (raw[cp] - m) + in.trans(cp, c); };
          if (!MAX) {
            const scalar_t v = warp_lse_once<scalar_t>(C, f);
            if (lane == 0) sigma[c] = v + start_row[c];
          } else {
            scalar_t v = neg_inf<scalar_t>();
            int a = INT_MAX;
            for (int cp = lane; cp < C; cp += kWarpSize) {
              const scalar_t x = f(cp);
              if (beats(x, cp, v, a)) {
                v = x;
                a = cp;
              }
            }
            warp_argmax(v, a);
            if (lane == 0) {
              sigma[c] = v + start_row[c];
              if (bp_previous) bp_previous[c] = a;
            }
          }
        }
      }
    }
    __syncthreads();
    return m;
  }

  // Phase C: move the ring from step t to t+1 (t < L): re-base by m, open the
  // segments starting at t, add scores[t]. The largest emission of t moves
  // into the offset, so entries stay O(1) between steps. Each ring entry has
  // one writer, which is also its only reader here. Call from every thread;
  // barrier before the next step().
  __device__ void advance(int64_t t, scalar_t m) {
    const scalar_t emit_max = finite_or_zero(array_max(score_row, C));
    offset += static_cast<double>(emit_max);
    const int fresh = tK;
    scalar_t* gain = ring + (DD ? K * ld : 0);
    for_each_entry(K, C, threadIdx.x, kThreads, [&](int slot, int c) {
      scalar_t& g = gain[slot * ld + c];
      const scalar_t emit = score_row[c] - emit_max;
      g = (slot == fresh ? (DD ? start_row[c] : sigma[c]) : g - m) + emit;
    });
    if (DD) {
      for (int c = threadIdx.x; c < C; c += kThreads)
        ring[fresh * ld + c] = t == 0 ? in.start_transition[c] - m : alpha[c];
    }
    tK = tK + 1 == K ? 0 : tK + 1;
  }

  // f(ring index, checkpoint index) for the entries of the ring at the step
  // tK belongs to: the checkpoint layout (ring_row_of_checkpoint_row), dense (S, C).
  template <typename F>
  __device__ void for_each_checkpoint_entry(F f) const {
    for_each_entry((DD ? 2 : 1) * K, C, threadIdx.x, kThreads, [&](int row, int c) {
      f(ring_row_of_checkpoint_row(row, tK, K) * ld + c, row * C + c);
    });
  }

  // Reads the ring only, so it may run alongside step()'s phase A. t: the
  // step the scan is at.
  __device__ void save(int64_t, scalar_t* out, double* out_offset) const {
    for_each_checkpoint_entry([&](int r, int i) { out[i] = ring[r]; });
    if (threadIdx.x == 0) *out_offset = offset;
  }

  // The inverse of save(). Barrier before the next step().
  __device__ void load(int64_t t, const scalar_t* src, const double* src_offset) {
    tK = static_cast<int>(t % K);
    for_each_checkpoint_entry([&](int r, int i) { ring[r] = src[i]; });
    offset = *src_offset;
  }
};

// CTAs per SM the forward and the filter ask room for: four (64 registers a
// thread) in float32, where the compiler's own choice fits; two (128) in
// float64, where left to itself it capped some instantiations at 64 and
// spilled, and a cap of 80 (three CTAs) spilled more. Many CTAs per SM hide
// the latency of each sequence's serial scan when B is large.
template <typename scalar_t>
constexpr int forward_min_blocks() {
  return sizeof(scalar_t) == sizeof(double) ? 2 : 4;
}

// Viterbi asks room for two CTAs per SM (128 registers a thread): left to
// itself the compiler gave its (K, C, C) instantiations 64 and spilled.
constexpr int kViterbiMinBlocks = 2;

// Arrays of the forward-type kernels (forward, Viterbi, filter), in Arena order.
enum ForwardArray { kForwardRing = 0, kForwardRows = 1, kForwardArrays = 2 };

inline Arena plan_forward_arena(const Params& p, size_t elem_bytes, size_t smem_limit) {
  const int64_t e = static_cast<int64_t>(elem_bytes);
  const int64_t bytes[kForwardArrays] = {p.ring_width * padded_row(static_cast<int>(p.C)) * e,
                                         kScanRows * p.C * e};
  const int evict[] = {kForwardRing, kForwardRows};
  return plan_arena(bytes, kForwardArrays, evict, 2, smem_limit);
}

// kShared: the plan keeps the ring and rows in shared memory (Arena). cta:
// the workspace slice (the sequence's, or a chunk's); first: as CtaScan's.
template <typename scalar_t, bool DD, bool MAX, bool kShared = false>
__device__ __forceinline__ CtaScan<scalar_t, DD, MAX> make_scan(const Params& p, const Arena& arena,
                                                                 int64_t b, int64_t L,
                                                                 int64_t cta = -1,
                                                                 int64_t first = 0) {
  if (cta < 0) cta = b;
  return CtaScan<scalar_t, DD, MAX>(p, b, L, arena.get<scalar_t, kShared>(kForwardRing, cta),
                                    arena.get<scalar_t, kShared>(kForwardRows, cta), first);
}

// The chunked forward's warm-up and acceptance. A chunk starts `warmup`
// positions before its first checkpoint from a guess; the ring G it holds at
// that checkpoint is accepted against the ring R the chunk before ended with
// when one shift r puts every entry's log ratio within its own allowance:
// |log R_i - log G_i - r| <= a_i, a_i = chunk_slack + kChunkUlps units of
// rounding of the larger of the two stored logs (entries -inf in both
// excepted). The future of a ring (later rings, log Z) is a sum of its
// entries times positive weights, so the chunk's own future, moved by r, is
// then R's to within max a_i in log: the slack, or a few ulps of an entry
// far below the ring's largest (float32 stores an entry 500 nats down to
// 3e-5 anyway). Where the scan has forgotten its guess the two rings are the
// same up to rounding (often bit for bit), and r is the difference of their
// offsets; the warm-ups are what random problems need for that (a ring
// forgets nothing before K steps: its oldest entry is K steps old), and a
// chunk that has not is rejected, its sequence redone serially.
inline int64_t chunk_warmup(int64_t K, size_t elem_bytes) {
  return elem_bytes == sizeof(double) ? 6 * K + 256 : 3 * K + 128;
}
// A sequence whose junctions reject the first warm-up gets one more try,
// with a warm-up this many times as long (its chunks keep their spans; a
// warm-up that reaches position 0 starts there, from the true start), before
// the serial forward redoes it.
constexpr int64_t kChunkRetryWarmup = 4;
template <typename scalar_t>
HOST_DEVICE constexpr double chunk_slack() {
  return sizeof(scalar_t) == sizeof(double) ? 0x1p-36 : 0x1p-18;
}
constexpr double kChunkUlps = 8.0;
template <typename scalar_t>
HOST_DEVICE constexpr double chunk_unit_rounding() {
  return sizeof(scalar_t) == sizeof(double) ? 0x1p-53 : 0x1p-24;
}
// Spans a chunk: enough that its warm-up costs at most as many steps as
// its own positions (a user's short interval would otherwise buy a warm-up
// per span).
HOST_DEVICE int64_t chunk_spans(const ForwardParams& p, int64_t warmup) {
  return warmup <= p.interval ? 1 : (warmup + p.interval - 1) / p.interval;
}
// p with its chunks filled in for warm-up `warmup`; its `chunks` stays 1
// (the serial forward) where that leaves one chunk.
inline ForwardParams chunked(const ForwardParams& p, int64_t warmup) {
  ForwardParams q = p;
  q.warmup = warmup;
  q.chunk_spans = chunk_spans(p, warmup);
  const int64_t chunks = (p.n_ckpt + q.chunk_spans - 1) / q.chunk_spans;
  q.chunks = p.duration_dependent || chunks < 2 ? 1 : chunks;
  return q;
}
// The chunked forward's buffers, in scalars of the compute dtype (ring) and
// doubles: a junction ring and offset a CTA, and a float64 log Z a sequence.
inline int64_t chunk_ring_scalars(const ForwardParams& q) {
  return q.B * q.chunks * q.ring_width * q.C;
}
inline int64_t chunk_doubles(const ForwardParams& q) { return q.B * q.chunks + q.B; }
// The chunked forward's two tries, host side (semicrf_cuda.cu and the CUDA
// emulator run the same): q from chunked(), its buffers at `ring` and
// `doubles`; launch(q, redo) runs forward_kernel over B·q.chunks CTAs (redo
// null the first time, the marks the second), junctions(q, marks, retry)
// junction_kernel over B. The second try, for the sequences the first
// rejected, has a warm-up kChunkRetryWarmup times as long. The marks are
// the verdicts (1: the serial forward must redo the sequence).
template <typename Launch, typename Junctions>
void run_chunk_tries(ForwardParams q, void* ring, double* doubles, int32_t* marks,
                     Launch launch, Junctions junctions) {
  q.junction_ring = ring;
  q.junction_offset = doubles;
  q.chunk_log_z = doubles + q.B * q.chunks;
  const int64_t warmup = q.warmup;
  for (const bool retry : {false, true}) {
    q.warmup = retry ? warmup * kChunkRetryWarmup : warmup;
    launch(q, static_cast<const int32_t*>(retry ? marks : nullptr));
    junctions(q, marks, retry);
  }
}

// log Z (B,) and the checkpoints: one CTA per sequence. redo: null, or the
// exp-domain forward's (or the junctions') verdicts, and then only the
// sequences it marked (redo[b] != 0) are computed; the others keep its
// outputs. With p.chunks > 1 (static transition) CTA b·chunks + j scans
// chunk j of sequence b (ForwardParams): from `warmup` positions before its
// first checkpoint, from the state a sequence has at its start, saving its
// checkpoints and, where the next chunk begins, its ring as the junction;
// junction_kernel then puts the chunks' offsets on one scale.
template <typename scalar_t, bool DD, bool kShared>
__global__ void __launch_bounds__(kThreads, forward_min_blocks<scalar_t>())
    forward_kernel(const ForwardParams p, const Arena arena, const int32_t* redo) {
  const int64_t cta = blockIdx.x;
  const int64_t b = cta / p.chunks, chunk = cta - b * p.chunks;
  if (redo != nullptr && redo[b] == 0) return;
  const int64_t L = sequence_length(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  // The chunk: checkpoints j0 … from position tau, to `end` (its junction)
  // or, the last one, to L.
  const int64_t j0 = chunk * p.chunk_spans;
  const int64_t tau = chunk == 0 ? 0 : ckpt.step_of(j0, L);
  if (tau > L) return;  // past this sequence's last checkpoint: no chunk
  const int64_t next = ckpt.step_of(j0 + p.chunk_spans, L);
  const bool last = p.chunks == 1 || next > L;
  const int64_t end = last ? L : next;
  const int64_t first = tau > p.warmup ? tau - p.warmup : 0;
  auto scan = make_scan<scalar_t, DD, false, kShared>(p, arena, b, end - first, cta, first);
  scan.reset();
  __syncthreads();
  // The next checkpoint and the step before which it is saved.
  int64_t j = j0, next_ckpt = checkpoint_step<scalar_t>(p, j0, L);
  for (int64_t t = first; t <= end; ++t) {
    if (t == end && !last) {
      scan.save(t - first, static_cast<scalar_t*>(p.junction_ring) + cta * ckpt.stride,
                p.junction_offset + cta);
      break;
    }
    if (t == next_ckpt) {
      scan.save(t - first, ckpt.at(j), ckpt.offset + j);
      next_ckpt = checkpoint_step<scalar_t>(p, ++j, L);
    }
    const scalar_t m = scan.step(t - first);
    if (t == L) {
      if (warp_id() == 0) {
        const scalar_t v =
            warp_lse<scalar_t>(scan.C, [&](int c) { return scan.in.last(scan.alpha[c], c); });
        if (lane_id() == 0) {
          const double log_z = scan.offset + static_cast<double>(v);
          static_cast<scalar_t*>(p.log_z)[b] = static_cast<scalar_t>(log_z);
          if (p.chunks > 1) p.chunk_log_z[b] = log_z;
        }
      }
    } else {
      scan.advance(t - first, m);
    }
    __syncthreads();
  }
  // Checkpoints past the end of a short sequence are never read: the empty
  // state, so that outputs do not depend on memory contents.
  const int64_t unused = ckpt.saved(L);
  if (last && unused < p.n_ckpt) {
    fill(ckpt.at(unused), (p.n_ckpt - unused) * ckpt.stride, neg_inf<scalar_t>());
    for (int64_t j = unused + threadIdx.x; j < p.n_ckpt; j += kThreads) ckpt.offset[j] = 0.0;
  }
}

// The chunked forward's second launch, one CTA a sequence (static
// transition): walks its junctions in order, measuring each chunk's ring at
// its first checkpoint against the ring the chunk before ended with, in
// float64 logs (chunk_slack): an entry -inf, NaN or inf in one ring alone,
// or no shift that fits every entry's allowance, rejects the sequence
// (redo[b] = 1: the serial forward redoes it). Otherwise the middle of the
// shifts that fit, summed over the junctions so far, is added to the chunk's
// checkpoint offsets, and at the end to log Z (redo[b] = 0). retry: only
// the sequences redo marks are measured again (the chunks' second try), the
// others keep their verdict 0.
// Dynamic shared memory: junction_smem_bytes.
constexpr size_t junction_smem_bytes() { return kWarps * (2 * sizeof(double) + sizeof(int)); }
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    junction_kernel(const ForwardParams p, int32_t* redo, bool retry) {
  double* const low = dynamic_smem<double>();
  double* const high = low + kWarps;
  int* const bad = reinterpret_cast<int*>(high + kWarps);
  const int64_t b = blockIdx.x;
  if (retry && redo[b] == 0) return;
  const int64_t L = sequence_length(p, b);
  const SequenceCheckpoints<scalar_t> ckpt(p, b);
  const int64_t stride = ckpt.stride;
  const int64_t n = p.chunk_spans, saved = ckpt.saved(L);
  const int64_t chunks = (saved + n - 1) / n;  // those that start at or before L
  double shift = 0.0;
  bool accepted = true;
  for (int64_t chunk = 1; chunk < chunks && accepted; ++chunk) {
    const scalar_t* ended = static_cast<const scalar_t*>(p.junction_ring) +
                            (b * p.chunks + chunk - 1) * stride;
    const scalar_t* began = ckpt.at(chunk * n);
    const double base = p.junction_offset[b * p.chunks + chunk - 1] - ckpt.offset[chunk * n];
    // The shifts that fit every entry so far: [lo, hi].
    double lo = -INFINITY, hi = INFINITY;
    int mismatch = 0;
    for (int64_t i = threadIdx.x; i < stride; i += kThreads) {
      const scalar_t x = ended[i], y = began[i];
      if (x == neg_inf<scalar_t>() && y == neg_inf<scalar_t>()) continue;
      const double r = (static_cast<double>(x) - static_cast<double>(y)) + base;
      if (!(r > -INFINITY && r < INFINITY)) {
        mismatch = 1;  // -inf in one only, NaN, or inf
      } else {
        const double a = chunk_slack<scalar_t>() +
                         kChunkUlps * chunk_unit_rounding<scalar_t>() *
                             fmax(fabs(static_cast<double>(x)), fabs(static_cast<double>(y)));
        lo = fmax(lo, r - a);
        hi = fmin(hi, r + a);
      }
    }
    for (int o = kWarpSize / 2; o > 0; o /= 2) {
      lo = fmax(lo, __shfl_xor_sync(kFullMask, lo, o));
      hi = fmin(hi, __shfl_xor_sync(kFullMask, hi, o));
      mismatch |= __shfl_xor_sync(kFullMask, mismatch, o);
    }
    if (lane_id() == 0) {
      low[warp_id()] = lo;
      high[warp_id()] = hi;
      bad[warp_id()] = mismatch;
    }
    __syncthreads();
    lo = -INFINITY;
    hi = INFINITY;
    mismatch = 0;
    for (int w = 0; w < kWarps; ++w) {
      lo = fmax(lo, low[w]);
      hi = fmin(hi, high[w]);
      mismatch |= bad[w];
    }
    __syncthreads();  // the slots are written again at the next junction
    if (mismatch || !(lo <= hi)) {
      accepted = false;
    } else {
      if (hi < INFINITY) shift += 0.5 * (lo + hi);  // else both rings are empty
      const int64_t stop = chunk * n + n < saved ? chunk * n + n : saved;
      for (int64_t j = chunk * n + threadIdx.x; j < stop; j += kThreads) ckpt.offset[j] += shift;
    }
  }
  if (threadIdx.x == 0) {
    if (accepted)
      static_cast<scalar_t*>(p.log_z)[b] = static_cast<scalar_t>(p.chunk_log_z[b] + shift);
    redo[b] = accepted ? 0 : 1;
  }
}

// Arrays of the Viterbi kernel, in Arena order: the forward's, one span's
// backpointers (2·span_rows·C int32), and the checkpoints of the spans with
// their offsets, which only ever live in the workspace.
enum ViterbiArray {
  kViterbiSpan = kForwardArrays,
  kViterbiCheckpointRing,
  kViterbiCheckpointOffset,
  kViterbiArrays
};

// The span's backpointers leave shared memory first: the ring is read K·C
// times a step, the span written 2C times a step and read a few times per
// segment of the path, and freshly written it stays in L2.
inline Arena plan_viterbi_arena(const ViterbiParams& p, size_t elem_bytes, size_t smem_limit) {
  const int64_t e = static_cast<int64_t>(elem_bytes);
  const int64_t bytes[kViterbiArrays] = {
      p.ring_width * padded_row(static_cast<int>(p.C)) * e,
      kScanRows * p.C * e,
      2 * span_rows(p.interval) * p.C * static_cast<int64_t>(sizeof(int32_t)),
      p.n_ckpt * p.ring_width * p.C * e,
      p.n_ckpt * static_cast<int64_t>(sizeof(double))};
  const int evict[] = {kViterbiSpan, kForwardRing, kForwardRows};
  return plan_arena(bytes, kViterbiArrays, evict, 3, smem_limit);
}

// The max semiring: best (B,) and segment_label (B, T). A first pass keeps
// the ring at the start of every span but the last and writes the last
// span's backpointers; then the traceback (PathWalk) follows the path down,
// and the CTA recomputes from its checkpoint each span the path enters. Every
// thread walks (reads of one address, broadcast), so that all agree on the
// next span without a broadcast; thread 0 writes the labels.
template <typename scalar_t, bool DD>
__global__ void __launch_bounds__(kThreads, kViterbiMinBlocks)
    viterbi_kernel(const ViterbiParams p, const Arena arena) {
  const int64_t b = blockIdx.x;
  const int64_t L = sequence_length(p, b), C = p.C, I = p.interval;
  auto scan = make_scan<scalar_t, DD, true>(p, arena, b, L);
  const SequenceCheckpoints<scalar_t> ckpt(arena.get<scalar_t>(kViterbiCheckpointRing, b),
                                           arena.get<double>(kViterbiCheckpointOffset, b), p, I,
                                           p.n_ckpt);
  SpanBackpointers span(arena.get<int32_t>(kViterbiSpan, b), I, C);
  int64_t* const label = p.segment_label + b * p.T;
  fill(label, p.T, int64_t(-1));
  scan.reset();
  const int64_t last = ckpt.last_span(L);
  span.first = ckpt.first(last);
  __syncthreads();
  PathWalk walk(L, 0, false);  // the first pass's last step starts it
  // One loop for the first pass (steps 0 … L, the only one that reaches L)
  // and each recompute (steps first(j) … last(j, L) < L), so that step() is
  // inlined once. The first pass saves checkpoint j before step j·I (counted,
  // not divided).
  int64_t saved = 0;
  for (int64_t from = 0, to = L;;) {
    for (int64_t t = from; t <= to; ++t) {
      if (to == L && t == saved * I && t < span.first) {
        scan.save(t, ckpt.at(saved), ckpt.offset + saved);
        ++saved;
      }
      const bool kept = t >= span.first;
      scan.bp_duration = kept ? span.duration_row(t, C) : nullptr;
      scan.bp_previous = kept ? span.previous_row(t, C) : nullptr;
      const scalar_t m = scan.step(t);
      if (t == L) {
        // Every warp takes the argmax itself, so every thread holds the result.
        scalar_t v = neg_inf<scalar_t>();
        int a = INT_MAX;
        for (int c = lane_id(); c < C; c += kWarpSize) {
          const scalar_t x = scan.in.last(scan.alpha[c], c);
          if (beats(x, c, v, a)) {
            v = x;
            a = c;
          }
        }
        warp_argmax(v, a);
        const scalar_t best = static_cast<scalar_t>(scan.offset + static_cast<double>(v));
        if (threadIdx.x == 0) static_cast<scalar_t*>(p.best)[b] = best;
        walk = PathWalk(L, a, best > neg_inf<scalar_t>());  // not -inf or NaN: a path
      } else if (t < to) {
        scan.advance(t, m);
      }
      __syncthreads();  // also publishes the backpointers and the -1 fill
    }
    walk.follow<DD>(span, C, threadIdx.x == 0 ? label : nullptr);
    if (walk.done) break;
    const int64_t j = ckpt.span_of(walk.row, L);  // below the span just walked
    __syncthreads();  // every thread's walk has read the span before it is rewritten
    span.first = from = ckpt.first(j);
    to = ckpt.last(j, L);
    scan.load(from, ckpt.at(j), ckpt.offset + j);
    __syncthreads();
  }
}

// Forward filtering: alpha_hat, sigma_hat (B, T+1, C) and O (B, T+1) at every
// boundary, -inf / 0 where undefined.
template <typename scalar_t, bool DD, bool kShared>
__global__ void __launch_bounds__(kThreads, forward_min_blocks<scalar_t>())
    filter_kernel(const FilterParams p, const Arena arena) {
  const int64_t b = blockIdx.x;
  const int64_t L = sequence_length(p, b), T = p.T, C = p.C;
  auto scan = make_scan<scalar_t, DD, false, kShared>(p, arena, b, L);
  using History = SequenceHistory<scalar_t>;
  const History out(p, b);
  fill(out.alpha, (T + 1) * C, neg_inf<scalar_t>());
  fill(out.sigma, (T + 1) * C, neg_inf<scalar_t>());
  fill(out.offset, T + 1, 0.0);
  scan.reset();
  __syncthreads();  // the fills above are overwritten below by other threads
  for (int64_t t = 0; t <= L; ++t) {
    const scalar_t m = scan.step(t);
    for (int c = threadIdx.x; c < C; c += kThreads) {
      if (History::has_alpha(t)) out.alpha[t * C + c] = scan.alpha[c];
      if (History::has_sigma(t, L, DD)) out.sigma[t * C + c] = scan.sigma[c];
    }
    if (threadIdx.x == 0) out.offset[t] = scan.offset;
    if (t < L) scan.advance(t, m);
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace flashsemicrf
