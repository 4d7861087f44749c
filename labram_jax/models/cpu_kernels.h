// What the CPU kernels (cpu_adamw.cc, cpu_attention.cc, cpu_cross_entropy.cc, cpu_layer_norm.cc, cpu_matmul.cc) share;
// built by cpu_kernels.py.
#pragma once

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace labram_cpu {

// exp for 8 floats (range reduction by ln 2, degree-6 polynomial; ~1 ulp on [-87, 88]).
// The clamps keep a NaN (min and max return their second operand when either is NaN).
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.3f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// 2^x for x <= 0 (a softmax's exponents in base 2 less their row max, GELU's -x^2 log2(e) / 2; -inf
// included): 2^n 2^f with n = round(x), taken from the low mantissa bits of x + 1.5 * 2^23, and f = x - n
// in [-0.5, 0.5] by a degree-6 polynomial (relative error 2.6e-9 before float32 rounding; ~1 ulp after).
// Below -126, 2^-126 (Exp8's clamp at -87.3 in base e). A NaN stays NaN (max returns its second operand).
// Five fewer operations than Exp8, the exponent's log2(e) folded into what came before. One body for both
// widths (mm: the intrinsics' prefix, bits: the vector's), so that the 8- and 16-lane forms do the same
// operations lane by lane: the same bits.
#define LABRAM_EXP2_NEG(Vector, IntVector, mm, bits)                                                   \
  x = mm##_max_ps(mm##_set1_ps(-126.0f), x);                                                          \
  const Vector magic = mm##_set1_ps(12582912.0f);                                                      \
  const Vector t = mm##_add_ps(x, magic);                                                              \
  const Vector f = mm##_sub_ps(x, mm##_sub_ps(t, magic));                                              \
  Vector p = mm##_set1_ps(1.5345790598075837e-4f);                                                     \
  p = mm##_fmadd_ps(p, f, mm##_set1_ps(1.3399929739534855e-3f));                                       \
  p = mm##_fmadd_ps(p, f, mm##_set1_ps(9.618489071726799e-3f));                                        \
  p = mm##_fmadd_ps(p, f, mm##_set1_ps(5.550328642129898e-2f));                                        \
  p = mm##_fmadd_ps(p, f, mm##_set1_ps(0.24022646248340607f));                                         \
  p = mm##_fmadd_ps(p, f, mm##_set1_ps(0.6931471824645996f));                                          \
  p = mm##_fmadd_ps(p, f, mm##_set1_ps(1.0f));                                                         \
  const IntVector e = mm##_slli_epi32(mm##_add_epi32(mm##_castps_si##bits(t), mm##_set1_epi32(127)), 23); \
  return mm##_mul_ps(p, mm##_castsi##bits##_ps(e));

// 2^x for 8 floats x <= 0.
inline __m256 Exp2Neg8(__m256 x) { LABRAM_EXP2_NEG(__m256, __m256i, _mm256, 256) }

// 2^x for 16 floats x <= 0 (AVX-512). Only for CPUs with avx512f (the caller checks).
__attribute__((target("avx512f"))) inline __m512 Exp2Neg16(__m512 x) { LABRAM_EXP2_NEG(__m512, __m512i, _mm512, 512) }

#undef LABRAM_EXP2_NEG

// erf's rational interpolant, x P(x^2) / Q(x^2): XLA:CPU's too (Eigen's). One body for both widths (mm:
// the intrinsics' prefix), as LABRAM_EXP2_NEG: the same operations lane by lane, the same bits.
#define LABRAM_ERF_RATIO(Vector, mm)                                                                                   \
  const Vector x2 = mm##_mul_ps(x, x);                                                                                 \
  Vector p = mm##_fmadd_ps(x2, mm##_set1_ps(0.00022905065861350646f), mm##_set1_ps(0.0034082910107109506f));           \
  p = mm##_fmadd_ps(x2, p, mm##_set1_ps(0.050955695062380861f));                                                      \
  p = mm##_fmadd_ps(x2, p, mm##_set1_ps(0.18520832239976145f));                                                       \
  p = mm##_fmadd_ps(x2, p, mm##_set1_ps(1.128379143519084f));                                                         \
  p = mm##_mul_ps(x, p);                                                                                               \
  Vector q = mm##_fmadd_ps(x2, mm##_set1_ps(-1.1791602954361697e-7f), mm##_set1_ps(0.000023547966471313185f));         \
  q = mm##_fmadd_ps(x2, q, mm##_set1_ps(0.0010179625278914885f));                                                     \
  q = mm##_fmadd_ps(x2, q, mm##_set1_ps(0.014070470171167667f));                                                      \
  q = mm##_fmadd_ps(x2, q, mm##_set1_ps(0.11098505178285362f));                                                       \
  q = mm##_fmadd_ps(x2, q, mm##_set1_ps(0.49746925110067538f));                                                       \
  q = mm##_fmadd_ps(x2, q, mm##_set1_ps(1.0f));                                                                       \
  const Vector ratio = mm##_div_ps(p, q);

// erf for 8 floats: the rational interpolant, and +-1 from |x| >= 3.8325 (where erf rounds to 1 in float32).
inline __m256 Erf8(__m256 x) {
  LABRAM_ERF_RATIO(__m256, _mm256)
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 saturated = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), _mm256_set1_ps(3.832506856900711f),
                                         _CMP_GE_OQ);
  return _mm256_blendv_ps(ratio, _mm256_or_ps(sign, _mm256_set1_ps(1.0f)), saturated);
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2 of 8 floats, the normal CDF GELU multiplies by.
inline __m256 NormalCdf8(__m256 x) {
  const __m256 erf = Erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_set1_ps(0.5f), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

// Exact GELU of 8 floats, x Phi(x) = x/2 (1 + erf(x / sqrt 2)), and its derivative
// Phi(x) + x phi(x) = (1 + erf(x / sqrt 2)) / 2 + x exp(-x^2 / 2) / sqrt(2 pi) into *derivative
// (null: not wanted, and not computed; the GELU is the same to the bit).
inline __m256 Gelu8(__m256 x, __m256* derivative) {
  const __m256 cdf = NormalCdf8(x);
  if (derivative == nullptr) return _mm256_mul_ps(x, cdf);
  const __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f),  // exp(-x^2 / 2) = 2^(-x^2 log2(e) / 2)
                                   Exp2Neg8(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.72134752044448170f))));
  *derivative = _mm256_fmadd_ps(x, pdf, cdf);
  return _mm256_mul_ps(x, cdf);
}

// Erf8, NormalCdf8 and Gelu8 for 16 floats (AVX-512; the caller checks avx512f): the same operations lane
// by lane, so the same bits.
__attribute__((target("avx512f"))) inline __m512 Erf16(__m512 x) {
  LABRAM_ERF_RATIO(__m512, _mm512)
  const __m512 sign = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_set1_epi32(INT32_MIN), _mm512_castps_si512(x)));
  const __mmask16 saturated = _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(3.832506856900711f), _CMP_GE_OQ);
  const __m512 one = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(sign), _mm512_castps_si512(_mm512_set1_ps(1.0f))));
  return _mm512_mask_blend_ps(saturated, ratio, one);
}

#undef LABRAM_ERF_RATIO

__attribute__((target("avx512f"))) inline __m512 NormalCdf16(__m512 x) {
  const __m512 erf = Erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

__attribute__((target("avx512f"))) inline __m512 Gelu16(__m512 x, __m512* derivative) {
  const __m512 cdf = NormalCdf16(x);
  if (derivative == nullptr) return _mm512_mul_ps(x, cdf);
  const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(0.39894228040143268f),
                                   Exp2Neg16(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.72134752044448170f))));
  *derivative = _mm512_fmadd_ps(x, pdf, cdf);
  return _mm512_mul_ps(x, cdf);
}

// Why a kernel cannot take its attribute `wide` (AVX-512 code) on this CPU: an empty string where it can
// (not asked, or the CPU has avx512f).
inline std::string WideRefusal(bool wide, const char* what) {
  if (!wide || __builtin_cpu_supports("avx512f")) return "";
  return std::string(what) + ": wide=true needs a CPU with AVX-512 (avx512f); this one has none (wide=False runs "
         "the AVX2 code)";
}

// The cores this process may run on (its affinity mask), at least 1.
inline int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// `floats` floats of `storage` (grown as needed) from its first 64-byte boundary: a cache line's, so that
// a 16-float (AVX-512) load of a buffer laid out in multiples of 16 floats from there never spans two
// lines. (At 32 bytes, every such load of the product kernel's packed panels did: aligned, the steps
// took 0.93x the time on an Intel host with full-width units; BENCHMARKS.md, session 37.)
inline float* CacheLineAligned(std::vector<float>& storage, size_t floats) {
  if (storage.size() < floats + 16) storage.resize(floats + 16);
  return (float*)(((uintptr_t)storage.data() + 63) & ~(uintptr_t)63);
}

// Asks for the cache lines of floats [p, p + n) ahead of their use (n >= 1).
inline void Prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + n - 1), _MM_HINT_T0);
}

// A 64-byte aligned workspace of `floats` floats owned by the calling thread, kept between calls.
inline float* ThreadWorkspace(size_t floats) {
  thread_local std::vector<float> workspace;  // XLA's pool threads persist: allocated once each
  return CacheLineAligned(workspace, floats);
}

// Runs fn(i, work) for i in [0, parts) on the calling thread and on XLA's intra-op thread pool,
// `work` a 64-byte aligned workspace of work_floats floats per thread (kept between calls; set to
// zero at the start of each call with `zeroed`). Parts are claimed from a
// counter, so a helper that starts late (its core busy with another of XLA's operations) finds
// less or nothing to do and the cores are never oversubscribed (threads of our own were: a step
// ran slower with them); the caller returns when every claimed part is done.
template <typename Fn>
void ForEachPart(xla::ffi::ThreadPool& pool, int64_t parts, size_t work_floats, bool zeroed, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, parts, work_floats, zeroed, &fn]() {
    float* work = ThreadWorkspace(work_floats);
    if (zeroed) std::fill(work, work + work_floats, 0.f);
    for (int64_t i; (i = state->next.fetch_add(1)) < parts;) {
      fn(i, work);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(std::min<int64_t>(pool.num_threads(), UsableCpus() - 1), parts - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    // A late helper only reads the counter (kept alive by its own copy of `state`): `fn` and the
    // caller's frame are touched only for claimed parts, which the caller waits for.
    pool.Schedule([state, parts, drain]() {
      if (state->next.load() < parts) drain();
    });
  }
  drain();
  // Waiting for parts a helper claimed: spin briefly, then give the core away (another process, or
  // more threads than cores, may need it to finish that very part).
  for (int spins = 0; state->done.load(std::memory_order_acquire) < parts; ++spins) {
    if (spins < 1024) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// Runs fn(u0, u1, work) over units [0, units) with ForEachPart, in chunks claimed in order, each
// 1 / (2 cores) of the units left (at least min_chunk units): large chunks first, small ones
// last, so the threads end within a small chunk of each other even where one starts late or its
// core is slower for a while (fixed equal parts left the caller waiting ~45 us per product).
template <typename Fn>
void ForEachChunk(xla::ffi::ThreadPool& pool, int64_t units, int64_t min_chunk, size_t work_floats, bool zeroed,
                  Fn fn) {
  const int64_t shares = 2 * UsableCpus();
  std::vector<int64_t> bounds{0};
  while (bounds.back() < units) {
    const int64_t left = units - bounds.back();
    bounds.push_back(bounds.back() + std::min(left, std::max(min_chunk, (left + shares - 1) / shares)));
  }
  ForEachPart(pool, (int64_t)bounds.size() - 1, work_floats, zeroed,
              [&](int64_t t, float* work) { fn(bounds[t], bounds[t + 1], work); });
}

}  // namespace labram_cpu
