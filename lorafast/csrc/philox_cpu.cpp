// lorafast CPU Philox redraw: the values of lorafast/philox.py (read its docstring), in C++.
//
// Built on first use by torch.utils.cpp_extension.load (ninja) from lorafast/_cpu_ext.py and
// called through ctypes: a plain C ABI over raw pointers, so that the build includes no torch
// header (2-5 s to build, against 8 s for an empty op with <torch/library.h> and 44 s for an
// empty module with <torch/extension.h>). Linux and macOS (POSIX getpid, GCC/Clang attributes).
// Threads: the caller plus helper threads (see Job and Pool), dynamic scheduling over blocks of
// groups of 4 elements; each element's value depends only on (key, stream id, global index), so
// the output does not depend on the thread count, the schedule or the block size.
//
// Bit-exactness with the numpy path and the Triton kernel: integer Philox is exact; the floats
// use only fp32 add/sub/mul, correctly rounded fp32 division and square root, integer bit
// manipulation and conversions of integers below 2^24, each written as one C++ operation on
// floats in the same order as lorafast.philox.box_muller_numpy. The build passes
// -ffp-contract=off (no fused multiply-add), no -ffast-math (no reciprocal approximations or
// reassociation); vector code from auto-vectorisation uses the same IEEE operations lane by lane.
// fp16/bf16 results are rounded to nearest even as torch's Tensor.to does (fp16: overflow to
// inf, subnormals; bf16: torch's rounding), by integer arithmetic and one exact-by-construction
// fp32 addition (fp16 subnormals).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
// One build serves every x86-64 CPU: the hot functions are compiled for AVX-512, AVX2 and the
// x86-64 baseline, and the loader picks the best for the running CPU (GCC target_clones, ifunc).
// All three give the same bits (IEEE operations lane by lane; checked on 2^20-element draws of
// every law and dtype). CPU time of 2^20 fp32 draws on 1 thread (AMD EPYC with AVX-512): uniform 1.1 /
// 2.5 / 3.0 ms, normal 1.5 / 3.2 / 5.0 ms.
#define LF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LF_CLONES
#endif
#define LF_INLINE static inline __attribute__((always_inline))

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kMaxBlockG = 1024;                           // groups per block, upper bound
constexpr int kMetaW = 8;                                  // int64 columns per tensor (see below)

// Box-Muller constants: the exact fp32 values of lorafast.philox (hex float literals).
constexpr float kLn2Hi = 0x1.62e4p-1f, kLn2Lo = 0x1.7f7d1cp-20f;
constexpr float kA0 = 0x1.555556p-1f, kA1 = 0x1.99999ap-2f, kA2 = 0x1.24924ap-2f,
                kA3 = 0x1.c71c72p-3f, kA4 = 0x1.745d18p-3f;
constexpr float kS0 = 0x1.921fb6p+0f, kS1 = -0x1.4abbcep-1f, kS2 = 0x1.466bc6p-4f,
                kS3 = -0x1.32d2ccp-8f, kS4 = 0x1.507834p-13f;
constexpr float kC0 = -0x1.3bd3ccp+0f, kC1 = 0x1.03c1f0p-2f, kC2 = -0x1.55d3c8p-6f,
                kC3 = 0x1.e1f506p-11f;

LF_INLINE uint32_t f2u(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
LF_INLINE float u2f(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

// Philox4x32-R of counters (g mod 2^32, g >> 32, stream, 0), g = g0 + i for i in [0, n): the four
// output words in the four rows of w (structure of arrays, so that the loop over i vectorises).
// The words live in 64-bit lanes holding values below 2^32, so that each product is one
// 32 x 32 -> 64-bit multiply of the low halves (x86: vpmuludq; 30% faster than 32-bit lanes,
// which GCC widened with permutes and 64 x 64-bit multiplies).
template <int R>
LF_INLINE void philox_rows(uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2,
                           uint32_t* __restrict w3, uint64_t g0, int n, uint32_t stream, uint32_t k0,
                           uint32_t k1, int rounds) {
  constexpr uint64_t kLo = 0xFFFFFFFFu;
  for (int i = 0; i < n; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    uint64_t c0 = g & kLo, c1 = g >> 32, c2 = stream, c3 = 0;
    uint64_t ka = k0, kb = k1;
    const int nr = R > 0 ? R : rounds;
    for (int r = 0; r < nr; ++r) {
      if (r) { ka = (ka + kW0) & kLo; kb = (kb + kW1) & kLo; }
      const uint64_t p0 = (c0 & kLo) * kM0;   // hi0 * 2^32 + lo0 (exact)
      const uint64_t p1 = (c2 & kLo) * kM1;   // hi1 * 2^32 + lo1
      c0 = (p1 >> 32) ^ c1 ^ ka;
      c2 = (p0 >> 32) ^ c3 ^ kb;
      c1 = p1 & kLo;
      c3 = p0 & kLo;
    }
    w0[i] = static_cast<uint32_t>(c0);
    w1[i] = static_cast<uint32_t>(c1);
    w2[i] = static_cast<uint32_t>(c2);
    w3[i] = static_cast<uint32_t>(c3);
  }
}

// lorafast.philox.box_muller_numpy on one word pair: (r cos t, r sin t). Every line is one fp32
// operation (or an exact integer step) in the numpy order.
LF_INLINE void box_muller(uint32_t wa, uint32_t wb, float& x, float& y) {
  const float u1 = 1.0f - static_cast<float>(static_cast<int32_t>(wa >> 8)) * 0x1p-24f;  // [2^-24, 1]
  const int32_t bits = static_cast<int32_t>(f2u(u1));                                    // log_f32
  const int32_t e = (bits >> 23) - 127;
  int32_t mb = (bits & 0x7FFFFF) | 0x3F800000;
  const bool big = mb > 0x3FB504F3;
  mb = big ? mb - 0x800000 : mb;
  const float ef = static_cast<float>(big ? e + 1 : e);
  const float m = u2f(static_cast<uint32_t>(mb));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float z = s * s;
  float p = z * kA4 + kA3;
  p = p * z + kA2;
  p = p * z + kA1;
  p = p * z + kA0;
  const float log_m = s * 2.0f + (s * z) * p;
  const float log_u1 = ef * kLn2Hi + (ef * kLn2Lo + log_m);
  const float r = std::sqrt(log_u1 * -2.0f);
  const int32_t kk = static_cast<int32_t>(wb >> 8) + 0x200000;                             // sincos_2pi_f32
  const int32_t q = (kk >> 22) & 3;
  const float f = static_cast<float>((kk & 0x3FFFFF) - 0x200000) * 0x1p-22f;
  const float f2 = f * f;
  float ps = f2 * kS4 + kS3;
  ps = ps * f2 + kS2;
  ps = ps * f2 + kS1;
  ps = ps * f2 + kS0;
  const float sn = ps * f;
  float pc = f2 * kC3 + kC2;
  pc = pc * f2 + kC1;
  pc = pc * f2 + kC0;
  const float cs = pc * f2 + 1.0f;
  const bool swap = (q & 1) == 1;
  const float cx = swap ? sn : cs, sx = swap ? cs : sn;
  const float c = ((q + 1) & 2) != 0 ? -cx : cx;               // q = 1 or 2
  const float sv = q >= 2 ? -sx : sx;
  x = r * c;
  y = r * sv;
}

// fp32 -> fp16 bits, round to nearest even, as torch's Tensor.to(torch.float16): overflow to
// +-inf, fp16 subnormals, NaN -> 0x7E00 with the sign. Branch-free (vectorises).
LF_INLINE uint16_t f32_to_f16(float v) {
  const uint32_t x = f2u(v);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7FFFFFFFu;
  // |v| >= 2^-14: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits; a
  // carry out of the mantissa bumps the exponent, up to 0x7C00 (inf) from 65520 on.
  uint32_t nrm = a - 0x38000000u;
  nrm = (nrm + 0x0FFFu + ((nrm >> 13) & 1u)) >> 13;
  // |v| < 2^-14: 0.5 + |v| rounds |v| to a multiple of 2^-24 (the ulp of [0.5, 1)) to nearest
  // even, exactly the fp16 subnormal grid; its low bits are the fp16 bits (2^-14 -> 0x0400).
  const uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
  uint32_t h = a < 0x38800000u ? sub : nrm;
  h = a >= 0x477FF000u ? 0x7C00u : h;
  h = a > 0x7F800000u ? 0x7E00u : h;
  return static_cast<uint16_t>(sign | h);
}

// fp32 -> bf16 bits, round to nearest even (c10::BFloat16's round_to_nearest_even; NaN -> 0x7FC0).
LF_INLINE uint16_t f32_to_bf16(float v) {
  const uint32_t x = f2u(v);
  const uint32_t r = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r);
}

struct Tensor {  // one row of the table built by lorafast/_cpu_ext.py (the Triton kernel's layout)
  char* addr;
  int64_t numel, offset;
  uint32_t stream;
  int code, dtype;  // law: 0 zeros, 1 uniform, 2 normal; dtype: 0 fp32, 1 fp16, 2 bf16
  float shift, scale;
};

// A block: groups [g0, g0 + n) of one tensor, clipped to its elements [e_lo, e_hi).
struct Block {
  const Tensor* t;
  uint64_t g0;
  int n;
  int64_t e_lo, e_hi;
};

// The fp32 values of the block's groups: v[4 i + j] = element 4 (g0 + i) + j.
template <int R>
LF_INLINE void compute_r(const Block& b, uint32_t k0, uint32_t k1, int rounds, float* __restrict v) {
  const Tensor& t = *b.t;
  const int n = b.n;
  alignas(64) uint32_t w[4][kMaxBlockG];
  alignas(64) float x[4][kMaxBlockG];
  philox_rows<R>(w[0], w[1], w[2], w[3], b.g0, n, t.stream, k0, k1, rounds);
  if (t.code == 2) {
    for (int i = 0; i < n; ++i) box_muller(w[0][i], w[1][i], x[0][i], x[1][i]);  // elements 4g, 4g+1
    for (int i = 0; i < n; ++i) box_muller(w[2][i], w[3][i], x[2][i], x[3][i]);  // elements 4g+2, 4g+3
  } else {
    for (int j = 0; j < 4; ++j)
      for (int i = 0; i < n; ++i) x[j][i] = static_cast<float>(static_cast<int32_t>(w[j][i] >> 8)) * 0x1p-24f;
  }
  const float scale = t.scale, shift = t.shift;
  for (int i = 0; i < n; ++i) {  // element 4g + j takes row j; value = fp32(fp32(scale * base) + shift)
    for (int j = 0; j < 4; ++j) {
      const float a = x[j][i] * scale;
      v[4 * i + j] = a + shift;
    }
  }
}

// Rounds other than 10 and 7 (runtime loop): compiled once, for the baseline ISA.
__attribute__((noinline)) void compute_any_rounds(const Block& b, uint32_t k0, uint32_t k1, int rounds, float* v) {
  compute_r<0>(b, k0, k1, rounds, v);
}

LF_CLONES void compute(const Block& b, uint32_t k0, uint32_t k1, int rounds, float* v) {
  if (b.t->code == 0) return;                       // zeros: nothing to draw
  if (rounds == 10) compute_r<10>(b, k0, k1, rounds, v);
  else if (rounds == 7) compute_r<7>(b, k0, k1, rounds, v);
  else compute_any_rounds(b, k0, k1, rounds, v);
}

// Write the block's elements into the tensor, rounded to its dtype (zeros for law 0).
LF_CLONES void store(const Block& b, const float* v) {
  const Tensor& t = *b.t;
  const int64_t local = b.e_lo - t.offset;
  const int count = static_cast<int>(b.e_hi - b.e_lo);
  v += b.e_lo - static_cast<int64_t>(4 * b.g0);
  if (t.code == 0) {
    const size_t size = t.dtype == 0 ? 4 : 2;
    std::memset(t.addr + local * static_cast<int64_t>(size), 0, size * static_cast<size_t>(count));
  } else if (t.dtype == 0) {
    std::memcpy(reinterpret_cast<float*>(t.addr) + local, v, sizeof(float) * static_cast<size_t>(count));
  } else if (t.dtype == 1) {
    uint16_t* d = reinterpret_cast<uint16_t*>(t.addr) + local;
    for (int i = 0; i < count; ++i) d[i] = f32_to_f16(v[i]);
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(t.addr) + local;
    for (int i = 0; i < count; ++i) d[i] = f32_to_bf16(v[i]);
  }
}

// ---------------------------------------------------------------------------------------- threads
// A job: the tensors, their first block indices, a claim counter and one state per block.
// Blocks are claimed one at a time (dynamic schedule) by the caller and by helper threads. A
// helper computes a block into its own buffer and writes it to the tensor only if it wins the
// block's state (FREE -> WRITING); once every block is claimed, the caller takes every block still
// FREE (its helper is computing it, or was descheduled before it could) and computes it itself.
// So the caller waits only for blocks that a helper is writing (a copy of at most 4 KiB), never
// for a helper that has not run, and no helper writes after the caller has returned.
enum : uint8_t { kFree = 0, kWriting = 1, kTaken = 2, kDone = 3 };

struct Job {
  std::vector<Tensor> ts;
  std::vector<int64_t> start;  // first block of each tensor, then the total
  int64_t total = 0;
  uint32_t k0 = 0, k1 = 0;
  int rounds = 10, block_g = 256;
  std::atomic<int64_t> next{0};
  std::unique_ptr<std::atomic<uint8_t>[]> state;
  std::atomic<int> seats{0};   // helpers that may still join (num_threads - 1)

  Block block(int64_t b) const {
    const size_t i = static_cast<size_t>(std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1);
    const Tensor& t = ts[i];
    const int64_t g_end = (t.offset + t.numel + 3) / 4;
    const int64_t g0 = t.offset / 4 + (b - start[i]) * block_g;
    const int n = static_cast<int>(std::min<int64_t>(block_g, g_end - g0));
    return Block{&t, static_cast<uint64_t>(g0), n, std::max<int64_t>(4 * g0, t.offset),
                 std::min<int64_t>(4 * (g0 + n), t.offset + t.numel)};
  }
};

void run_blocks(Job& j, bool caller) {
  alignas(64) float v[4 * kMaxBlockG];
  for (;;) {
    const int64_t b = j.next.fetch_add(1, std::memory_order_relaxed);
    if (b >= j.total) break;
    const Block blk = j.block(b);
    compute(blk, j.k0, j.k1, j.rounds, v);
    uint8_t expected = kFree;
    if (!caller && !j.state[b].compare_exchange_strong(expected, kWriting, std::memory_order_acq_rel)) continue;
    store(blk, v);   // the caller's own blocks: FREE -> DONE (no helper ever competes for them)
    j.state[b].store(kDone, std::memory_order_release);
  }
  if (!caller) return;
  for (int64_t b = 0; b < j.total; ++b) {          // blocks that helpers claimed but have not written
    uint8_t expected = kFree;
    if (j.state[b].load(std::memory_order_acquire) == kFree &&
        j.state[b].compare_exchange_strong(expected, kTaken, std::memory_order_acq_rel)) {
      const Block blk = j.block(b);
      compute(blk, j.k0, j.k1, j.rounds, v);
      store(blk, v);
      j.state[b].store(kDone, std::memory_order_release);
    }
  }
  for (int64_t b = 0; b < j.total; ++b) {          // blocks that a helper is writing now
    for (int spin = 0; j.state[b].load(std::memory_order_acquire) != kDone; ++spin) {
      if (spin > 64) std::this_thread::yield();
    }
  }
}

// Helper threads that sleep on a condition variable between jobs. Not OpenMP: an OpenMP parallel
// region ends in a barrier that waits for every thread of the team to have been scheduled, which
// on a shared, oversubscribed machine cost a scheduler time slice per call (8-13 ms instead of
// 1.3 ms for 2^20 uniforms with torch's libgomp and its default spin-wait policy). A job is
// shared (shared_ptr), so a helper that wakes up late finds no block left and lets go.
struct Pool {
  std::mutex mu;
  std::condition_variable cv;
  std::shared_ptr<Job> job;
  uint64_t gen = 0;
  int threads = 0;
  long pid = 0;

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> j;
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return gen != seen; });
        seen = gen;
        j = job;
      }
      if (j && j->seats.fetch_sub(1, std::memory_order_relaxed) > 0) run_blocks(*j, false);
    }
  }
  void post(const std::shared_ptr<Job>& j, int helpers) {
    {
      std::lock_guard<std::mutex> lk(mu);
      try {
        for (; threads < helpers; ++threads) std::thread([this] { worker(); }).detach();
      } catch (...) {  // no more threads: the helpers there are (or the caller alone) do the job
      }
      job = j;
      ++gen;
    }
    cv.notify_all();
  }
};

Pool& pool() {
  // Never destroyed (detached helpers may sleep on it at exit). After fork() the child has none
  // of the parent's helpers: it starts a new pool.
  static Pool* p = nullptr;
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  if (p == nullptr || p->pid != static_cast<long>(getpid())) {
    p = new Pool();
    p->pid = static_cast<long>(getpid());
  }
  return *p;
}

// The job of one call: the table's non-empty tensors, their first blocks, every block FREE.
std::shared_ptr<Job> make_job(const int64_t* meta, int64_t n_tensors, uint32_t k0, uint32_t k1, int rounds,
                              int block_g) {
  auto j = std::make_shared<Job>();
  j->k0 = k0;
  j->k1 = k1;
  j->rounds = rounds;
  j->block_g = block_g;
  j->ts.reserve(static_cast<size_t>(n_tensors));
  j->start.reserve(static_cast<size_t>(n_tensors) + 1);
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t* row = meta + kMetaW * i;
    Tensor t;
    t.addr = reinterpret_cast<char*>(static_cast<intptr_t>(row[0]));
    t.numel = row[1];
    t.offset = row[2];
    t.stream = static_cast<uint32_t>(row[3]);
    t.code = static_cast<int>(row[4]);
    t.dtype = static_cast<int>(row[5]);
    t.shift = u2f(static_cast<uint32_t>(row[6]));
    t.scale = u2f(static_cast<uint32_t>(row[7]));
    if (t.numel <= 0) continue;
    const int64_t groups = (t.offset + t.numel + 3) / 4 - t.offset / 4;
    j->ts.push_back(t);
    j->start.push_back(j->total);
    j->total += (groups + block_g - 1) / block_g;
  }
  j->start.push_back(j->total);
  j->state.reset(new std::atomic<uint8_t>[static_cast<size_t>(j->total)]);
  for (int64_t b = 0; b < j->total; ++b) j->state[b].store(kFree, std::memory_order_relaxed);
  return j;
}

}  // namespace

extern "C" {

// Version of this C ABI (checked by the loader).
int64_t lorafast_philox_abi(void) { return 1; }

// Refill n_tensors tensors described by meta, an int64 [n_tensors, 8] table with rows
// [address, numel, offset, stream id, law code, dtype code, shift fp32 bits, scale fp32 bits],
// with the Philox4x32-rounds draw of key (k0, k1). block_g: groups of 4 elements per block (the
// unit of work of a thread, 1..1024); num_threads: threads including the caller (>= 1).
// Inputs are validated by the caller (lorafast.ops._rerandomize._validate); this returns 0, or
// -1 for a bad block_g, rounds or num_threads, -2 when out of memory (nothing written). No C++
// exception crosses this C boundary.
int lorafast_philox_fill(const int64_t* meta, int64_t n_tensors, uint32_t k0, uint32_t k1, int rounds,
                         int num_threads, int block_g) {
  if (block_g < 1 || block_g > kMaxBlockG || rounds < 1 || num_threads < 1) return -1;
  std::shared_ptr<Job> j;
  try {
    j = make_job(meta, n_tensors, k0, k1, rounds, block_g);
  } catch (...) {
    return -2;
  }
  const int helpers = static_cast<int>(std::min<int64_t>(num_threads, j->total) - 1);
  if (helpers > 0) {
    j->seats.store(helpers, std::memory_order_relaxed);
    try {
      pool().post(j, helpers);   // the mutex in post() publishes the job's contents to the helpers
    } catch (...) {              // no pool: the caller does the job alone
    }
  }
  run_blocks(*j, true);
  return 0;
}

// fp32 -> fp16 / bf16 bits of n values (the rounding of the fill; exposed for the tests).
void lorafast_round_f16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
void lorafast_round_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

}  // extern "C"
