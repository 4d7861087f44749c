// Matrix products for x86 CPUs with AVX2 and FMA, as an XLA FFI handler.
//
// c = op(a) op(b) (+ bias), where op(a) is [M, K] (a stored [M, K], or [K, M] when transposed)
// and op(b) is [K, N] (b stored [K, N], or [N, K] when transposed), then optionally multiplied
// element by element by a factor [M, N], or put through exact GELU (the sums before it written too where
// wanted: an MLP's first layer forward), or multiplied by GELU'(u) for a factor u of pre-activations
// (GELU(u) written too where wanted: that layer's gradient backward), or added to a residual [M, N]
// (a transformer branch's last layer writing the residual stream itself); optionally also the column
// sums of op(b) (the bias gradient, when op(b) is a linear layer's output gradient). The layout
// is BLIS's: op(b) is packed in blocks of up to kKc rows into panels Nr columns wide, op(a) in
// blocks of up to kMc rows into panels 6 rows high, and a 6 x Nr register tile (12 accumulators)
// runs down each pair of panels: Nr = 16 with AVX2 vectors, or Nr = 32 with AVX-512 ones (the
// attribute `wide`, for CPUs whose AVX-512 units are full width and so do twice AVX2's FMA work per
// cycle); with AVX2 a last panel of at most 8 columns (N = 200) takes 12 x 8 tiles. The work is split
// into parts run on XLA's intra-op thread pool (Run says how). Built and loaded by cpu_kernels.py.
//
// Shapes: a [M, K] or [K, M]; b [K, N] or [N, K]; bias [N] or [0] (none); factor [M, N] or [0];
// residual [M, N] or [0]; c [M, N]; b_sums [N] or [0] (not wanted); side [M, N] with the attribute gelu or
// gelu_gradient, or [0] (not wanted). All float32, row-major.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMr = 6;  // the register tile's rows; its columns, Nr, are 16 (AVX2) or 32 (AVX-512)
constexpr int kMc = 168, kKc = 256;  // block sizes (BLIS's for Haswell-class cores)
template <int Nr>
constexpr int kNc = 4080 / Nr * Nr;  // op(b)'s columns packed at once

// op(a)'s and op(b)'s stored rows are asked for this far ahead of their packing: rows of 200-800 floats
// (a few cache lines each, too short for the hardware's prefetchers to follow) of activations that are
// rarely still in cache when a product starts. Asked ahead (op(a)'s rows a panel of kMr rows at a time),
// the block's products with operands from memory took 0.96-0.98x the time, a tokenizer step 0.989x
// (BENCHMARKS.md, "Session 45").
constexpr int kAheadRows = 8, kAheadPanels = 2;

struct Operand {
  const float* p;
  int64_t ld;  // floats between consecutive stored rows
  bool t;      // stored transposed
};

// Columns k, k + 1, ..., k + 7 of eight rows -> rows of v (an 8 x 8 transpose in registers).
inline void Transpose8x8(__m256* v) {
  __m256 t[8], u[8];
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_ps(v[j], v[j + 1]);
    t[j + 1] = _mm256_unpackhi_ps(v[j], v[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    u[j] = _mm256_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    v[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

// A whole panel's columns 8 at a time: row[0..5][k] -> d[k][0..5] for k < kc rounded down to 8 (returned).
// Each column is stored as 8 floats, its last 2 overwritten by the next column's; the panel's last
// column is stored masked where nothing of the panel follows it (the scalar columns after it, if any,
// overwrite the spill). Loading 8 floats of 6 rows and transposing them in registers replaced 6 scalar
// loads and stores per column (PackA was 4 % of a pretraining step's samples, mostly those).
inline int PackPanel8(const float* const* row, int kc, float* d) {
  const int full = kc / 8 * 8;
  const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  for (int k = 0; k < full; k += 8) {
    __m256 v[8];
    for (int r = 0; r < kMr; ++r) v[r] = _mm256_loadu_ps(row[r] + k);
    v[6] = v[7] = _mm256_setzero_ps();
    Transpose8x8(v);
    float* out = d + (size_t)k * kMr;
    for (int c = 0; c < 7; ++c) _mm256_storeu_ps(out + c * kMr, v[c]);
    if (k + 8 < kc) {
      _mm256_storeu_ps(out + 7 * kMr, v[7]);
    } else {
      _mm256_maskstore_ps(out + 7 * kMr, six, v[7]);
    }
  }
  return full;
}

// op(a)[i0 : i0 + rows, k0 : k0 + kc] -> dst as panels of kMr rows: dst[panel][k][r], zero rows past `rows`.
void PackA(const Operand& a, int64_t i0, int rows, int64_t k0, int kc, float* dst) {
  if (a.t) {
    // Stored transposed (a weight gradient's x^T): row by row of the stored a, each read once from
    // start to end and dealt into the panels (a panel at a time walked kc rows for 6 floats of each).
    for (int k = 0; k < kc; ++k) {
      const float* s = a.p + (k0 + k) * a.ld + i0;
      if (k + kAheadRows < kc) labram_cpu::Prefetch(s + kAheadRows * a.ld, rows);
      float* d = dst + (size_t)k * kMr;
      int i = 0;
      for (; i + kMr <= rows; i += kMr, d += (size_t)kc * kMr) std::memcpy(d, s + i, kMr * sizeof(float));
      for (int r = 0; i < rows && r < kMr; ++r) d[r] = i + r < rows ? s[i + r] : 0.f;
    }
    return;
  }
  for (int r = 0; r < std::min(rows, kAheadPanels * kMr); ++r) labram_cpu::Prefetch(a.p + (i0 + r) * a.ld + k0, kc);
  for (int i = 0; i < rows; i += kMr) {
    const int h = std::min(kMr, rows - i);
    for (int r = i + kAheadPanels * kMr; r < std::min(rows, i + (kAheadPanels + 1) * kMr); ++r)
      labram_cpu::Prefetch(a.p + (i0 + r) * a.ld + k0, kc);
    float* d = dst + (size_t)(i / kMr) * kc * kMr;
    const float* row[kMr];
    for (int r = 0; r < kMr; ++r) row[r] = a.p + (i0 + i + std::min(r, h - 1)) * a.ld + k0;
    int k = 0;
    if (h == kMr) k = PackPanel8(row, kc, d);
    for (d += (size_t)k * kMr; k < kc; ++k, d += kMr) {
      for (int r = 0; r < kMr; ++r) d[r] = r < h ? row[r][k] : 0.f;
    }
  }
}

// op(b)[k0 : k0 + kc, j0 : j0 + cols] -> dst as panels of Nr columns: dst[panel][k][c], zero
// columns past `cols`. With sums, adds each column's sum over these kc rows to sums[j0 + c].
template <int Nr>
void PackB(const Operand& b, int64_t k0, int kc, int64_t j0, int cols, float* dst, float* sums) {
  if (b.t) {
    for (int j = 0; j < cols; j += Nr) {
      const int w = std::min(Nr, cols - j);
      float* d = dst + (size_t)(j / Nr) * kc * Nr;
      int c0 = 0;
      for (; c0 + 8 <= w; c0 += 8) {  // 8 stored rows at a time, transposed 8 x 8 in registers
        const float* s[8];
        for (int r = 0; r < 8; ++r) s[r] = b.p + (j0 + j + c0 + r) * b.ld + k0;
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
          __m256 v[8];
          for (int r = 0; r < 8; ++r) v[r] = _mm256_loadu_ps(s[r] + k);
          Transpose8x8(v);
          for (int i = 0; i < 8; ++i) _mm256_storeu_ps(d + (size_t)(k + i) * Nr + c0, v[i]);
        }
        for (; k < kc; ++k)
          for (int r = 0; r < 8; ++r) d[(size_t)k * Nr + c0 + r] = s[r][k];
      }
      for (int c = c0; c < Nr; ++c) {
        const float* s = b.p + (j0 + j + std::min(c, w - 1)) * b.ld + k0;
        for (int k = 0; k < kc; ++k) d[(size_t)k * Nr + c] = c < w ? s[k] : 0.f;
      }
    }
  } else {  // row by row, each read once from start to end (a panel at a time crawled: 1.8 GB/s)
    for (int k = 0; k < kc; ++k) {
      const float* s = b.p + (k0 + k) * b.ld + j0;
      if (k + kAheadRows < kc) labram_cpu::Prefetch(s + kAheadRows * b.ld, cols);
      float* d = dst + (size_t)k * Nr;
      int j = 0;
      for (; j + Nr <= cols; j += Nr, d += (size_t)kc * Nr) {
        for (int h = 0; h < Nr; h += 8) _mm256_storeu_ps(d + h, _mm256_loadu_ps(s + j + h));
      }
      if (j < cols) {
        for (int c = 0; c < Nr; ++c) d[c] = j + c < cols ? s[j + c] : 0.f;
      }
    }
  }
  for (int j = 0; sums != nullptr && j < cols; j += Nr) {
    const int w = std::min(Nr, cols - j);
    const float* d = dst + (size_t)(j / Nr) * kc * Nr;
    __m256 s[Nr / 8];
    for (auto& v : s) v = _mm256_setzero_ps();
    for (int k = 0; k < kc; ++k) {
      for (int h = 0; h < Nr / 8; ++h) s[h] = _mm256_add_ps(s[h], _mm256_loadu_ps(d + (size_t)k * Nr + 8 * h));
    }
    alignas(32) float t[Nr];
    for (int h = 0; h < Nr / 8; ++h) _mm256_store_ps(t + 8 * h, s[h]);
    for (int c = 0; c < w; ++c) sums[j0 + j + c] += t[c];
  }
}

// c[0:rows, 0:cols] (row stride ldc) = t[0:rows, 0:cols] (rows `stride` floats apart: a finished
// tile's sums) + (accumulate ? c : bias or 0), in 8-float vectors where the tile is whole (rows = kMr,
// cols = whole, a multiple of 8), else float by float.
inline void Write(const float* t, int stride, int whole, float* c, int64_t ldc, int rows, int cols, bool accumulate,
                  const float* bias) {
  if (rows == kMr && cols == whole) {
    for (int r = 0; r < kMr; ++r) {
      float* row = c + r * ldc;
      for (int j = 0; j < whole; j += 8) {
        const __m256 add = accumulate ? _mm256_loadu_ps(row + j) : bias ? _mm256_loadu_ps(bias + j) : _mm256_setzero_ps();
        _mm256_storeu_ps(row + j, _mm256_add_ps(_mm256_loadu_ps(t + r * stride + j), add));
      }
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    for (int j = 0; j < cols; ++j) row[j] = t[r * stride + j] + (accumulate ? row[j] : (bias ? bias[j] : 0.f));
  }
}

// t [kMr, 16] (32-byte aligned) = a_panel . b_panel over kc, a 16-column panel in V = 2 AVX2 vectors
// of 8 columns, or V = 1 for a last panel of at most 8 columns (N = 200: 12 panels and a half one,
// whose zero half would otherwise cost as much as a full panel; t's columns 8-15 are then 0).
template <int V>
inline void Sums(int kc, const float* a, const float* b, float* t) {
  // Twelve named accumulators: with arrays of them GCC kept a copy on the stack, stored at every
  // step of the loop (3-5x slower).
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  auto step = [&](const float* ak, const float* bk) __attribute__((always_inline)) {
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = V == 2 ? _mm256_loadu_ps(bk + 8) : b0;
    __m256 x = _mm256_broadcast_ss(ak);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    if constexpr (V == 2) c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(ak + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    if constexpr (V == 2) c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(ak + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    if constexpr (V == 2) c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(ak + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    if constexpr (V == 2) c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(ak + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    if constexpr (V == 2) c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(ak + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    if constexpr (V == 2) c51 = _mm256_fmadd_ps(x, b1, c51);
  };
  // Four steps per trip: the loop's counter, pointer updates and branch once per 48 FMAs rather than 12
  // (the products 1.001-1.010x as fast in 11 of 12 shapes, a tokenizer step 1.004x; session 43).
  int k = 0;
  for (; k + 4 <= kc; k += 4, a += 4 * kMr, b += 64) {
    step(a, b), step(a + kMr, b + 16), step(a + 2 * kMr, b + 32), step(a + 3 * kMr, b + 48);
  }
  for (; k < kc; ++k, a += kMr, b += 16) step(a, b);
  _mm256_store_ps(t, c00), _mm256_store_ps(t + 8, c01), _mm256_store_ps(t + 16, c10);
  _mm256_store_ps(t + 24, c11), _mm256_store_ps(t + 32, c20), _mm256_store_ps(t + 40, c21);
  _mm256_store_ps(t + 48, c30), _mm256_store_ps(t + 56, c31), _mm256_store_ps(t + 64, c40);
  _mm256_store_ps(t + 72, c41), _mm256_store_ps(t + 80, c50), _mm256_store_ps(t + 88, c51);
}

// t [12, 8] (32-byte aligned) = two consecutive a panels (12 rows) . the first 8 columns of a b panel
// over kc: a last panel of at most 8 columns (N = 200) with 12 accumulators, as Sums<2> has, rather
// than Sums<1>'s 6 (one FMA chain per accumulator: 6 chains left the FMA units idle for their latency).
// Each element the same chain of FMAs over k as Sums<1>'s (the same bits).
inline void TallSums(int kc, const float* a0, const float* a1, const float* b, float* t) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
         c9 = c0, c10 = c0, c11 = c0;
  // one panel's 6 rows against b's 8 columns at one step of k
  auto six = [](const float* ak, __m256 b0, __m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5)
      __attribute__((always_inline)) {
    r0 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak), b0, r0);
    r1 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 1), b0, r1);
    r2 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 2), b0, r2);
    r3 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 3), b0, r3);
    r4 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 4), b0, r4);
    r5 = _mm256_fmadd_ps(_mm256_broadcast_ss(ak + 5), b0, r5);
  };
  auto step = [&](const float* ak, const float* bk, const float* ck) __attribute__((always_inline)) {
    const __m256 b0 = _mm256_loadu_ps(bk);
    six(ak, b0, c0, c1, c2, c3, c4, c5);
    six(ck, b0, c6, c7, c8, c9, c10, c11);
  };
  int k = 0;
  for (; k + 4 <= kc; k += 4, a0 += 4 * kMr, a1 += 4 * kMr, b += 64) {
    step(a0, b, a1), step(a0 + kMr, b + 16, a1 + kMr), step(a0 + 2 * kMr, b + 32, a1 + 2 * kMr);
    step(a0 + 3 * kMr, b + 48, a1 + 3 * kMr);
  }
  for (; k < kc; ++k, a0 += kMr, a1 += kMr, b += 16) step(a0, b, a1);
  const __m256 rows[2 * kMr] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  for (int r = 0; r < 2 * kMr; ++r) _mm256_store_ps(t + 8 * r, rows[r]);
}

// Two 6-row tiles of a last panel of at most 8 columns, c[0:12, 0:cols], by TallSums (a panels a, a + 6 kc).
inline void TallTile(int kc, const float* a, const float* b, float* c, int64_t ldc, int cols, bool accumulate,
                     const float* bias) {
  alignas(32) float t[2 * kMr][8];
  TallSums(kc, a, a + (size_t)kMr * kc, b, t[0]);
  Write(t[0], 8, 8, c, ldc, kMr, cols, accumulate, bias);
  Write(t[kMr], 8, 8, c + kMr * ldc, ldc, kMr, cols, accumulate, bias);
}

// c[0:rows, 0:cols] (row stride ldc) = (accumulate ? c : bias or 0) + a_panel . b_panel over kc (Sums).
template <int V>
inline void Tile(int kc, const float* a, const float* b, float* c, int64_t ldc, int rows, int cols,
                 bool accumulate, const float* bias) {
  alignas(32) float t[kMr][16];
  Sums<V>(kc, a, b, t[0]);
  Write(t[0], 16, 8 * V, c, ldc, rows, cols, accumulate, bias);
}

// Sums' AVX-512 twin for 32-column panels, t [kMr, 32] (64-byte aligned): V = 2 vectors of 16 columns,
// or V = 1 for a last panel of at most 16 columns. Only for CPUs with avx512f (the handler checks).
template <int V>
__attribute__((target("avx512f"))) inline void WideSums(int kc, const float* a, const float* b, float* t) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
         c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  auto step = [&](const float* ak, const float* bk) __attribute__((always_inline, target("avx512f"))) {
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = V == 2 ? _mm512_loadu_ps(bk + 16) : b0;
    __m512 x = _mm512_set1_ps(ak[0]);
    c00 = _mm512_fmadd_ps(x, b0, c00);
    if constexpr (V == 2) c01 = _mm512_fmadd_ps(x, b1, c01);
    x = _mm512_set1_ps(ak[1]);
    c10 = _mm512_fmadd_ps(x, b0, c10);
    if constexpr (V == 2) c11 = _mm512_fmadd_ps(x, b1, c11);
    x = _mm512_set1_ps(ak[2]);
    c20 = _mm512_fmadd_ps(x, b0, c20);
    if constexpr (V == 2) c21 = _mm512_fmadd_ps(x, b1, c21);
    x = _mm512_set1_ps(ak[3]);
    c30 = _mm512_fmadd_ps(x, b0, c30);
    if constexpr (V == 2) c31 = _mm512_fmadd_ps(x, b1, c31);
    x = _mm512_set1_ps(ak[4]);
    c40 = _mm512_fmadd_ps(x, b0, c40);
    if constexpr (V == 2) c41 = _mm512_fmadd_ps(x, b1, c41);
    x = _mm512_set1_ps(ak[5]);
    c50 = _mm512_fmadd_ps(x, b0, c50);
    if constexpr (V == 2) c51 = _mm512_fmadd_ps(x, b1, c51);
  };
  int k = 0;  // four steps per trip, as Sums (the AVX-512 products 0.996-1.024x as fast, 9 of 12 faster)
  for (; k + 4 <= kc; k += 4, a += 4 * kMr, b += 128) {
    step(a, b), step(a + kMr, b + 32), step(a + 2 * kMr, b + 64), step(a + 3 * kMr, b + 96);
  }
  for (; k < kc; ++k, a += kMr, b += 32) step(a, b);
  _mm512_store_ps(t, c00), _mm512_store_ps(t + 16, c01), _mm512_store_ps(t + 32, c10);
  _mm512_store_ps(t + 48, c11), _mm512_store_ps(t + 64, c20), _mm512_store_ps(t + 80, c21);
  _mm512_store_ps(t + 96, c30), _mm512_store_ps(t + 112, c31), _mm512_store_ps(t + 128, c40);
  _mm512_store_ps(t + 144, c41), _mm512_store_ps(t + 160, c50), _mm512_store_ps(t + 176, c51);
}

// Tile's AVX-512 twin for 32-column panels (WideSums). Only for CPUs with avx512f (the handler checks).
template <int V>
__attribute__((target("avx512f"))) void WideTile(int kc, const float* a, const float* b, float* c, int64_t ldc,
                                                 int rows, int cols, bool accumulate, const float* bias) {
  alignas(64) float t[kMr][32];
  WideSums<V>(kc, a, b, t[0]);
  Write(t[0], 32, 16 * V, c, ldc, rows, cols, accumulate, bias);
}

// What is done to the finished sums (bias included), element by element: multiplied by a factor, or
// put through exact GELU (the sums before it kept where wanted: an MLP's first layer forward), or, with
// `gelu_gradient`, multiplied by GELU'(u) for a factor u of pre-activations (GELU(u) kept where wanted: that
// layer's gradient backward, which so needs neither GELU's derivative nor its output saved), or added to a
// residual stream (a transformer branch's last layer: c = residual + sums, the sum XLA's add would give).
// None: nothing.
struct Epilogue {
  const float* factor = nullptr;    // [m, n] as c, or null
  bool gelu = false;                // c = GELU(sums)
  bool gelu_gradient = false;       // with a factor u: c = sums * GELU'(u)
  float* side = nullptr;            // [m, n] as c, or null: with gelu the sums, with gelu_gradient GELU(u)
  const float* residual = nullptr;  // [m, n] as c, or null: c = residual + sums
  bool any() const { return factor || gelu || residual; }
};

// The epilogue over a row's columns [j, j1) 16 at a time, while 16 are left (AVX-512: the same operations
// lane by lane as the 8-float form, so the same bits); j is left at the first column not done. (The
// product with GELU and its derivative, as the forward pass then wrote both, 0.94-0.96x the time at
// [1848, 200] x [200, 800]; session 38.)
__attribute__((target("avx512f"))) void WideFinishRow(const Epilogue& e, float* row, const float* factor,
                                                      float* side, int64_t& j, int64_t j1) {
  for (; j + 16 <= j1; j += 16) {
    __m512 v = _mm512_loadu_ps(row + j);
    if (e.gelu) {
      if (side) _mm512_storeu_ps(side + j, v);
      v = labram_cpu::Gelu16(v, nullptr);
    } else if (e.gelu_gradient) {
      __m512 g;
      const __m512 h = labram_cpu::Gelu16(_mm512_loadu_ps(factor + j), &g);
      if (side) _mm512_storeu_ps(side + j, h);
      v = _mm512_mul_ps(v, g);
    } else {
      v = _mm512_mul_ps(v, _mm512_loadu_ps(factor + j));
    }
    _mm512_storeu_ps(row + j, v);
  }
}

// The epilogue over c[i0:i1, j0:j1] (row stride ld, the epilogue's arrays too): row by row, each
// read from start to end, while the block is still in cache; 16 floats at a time where `wide`. (Applied
// to each 6 x 16 tile as it was written, one dependent chain of erf and exp at a time, it cost more than
// XLA's own pass.)
void Finish(const Epilogue& e, float* c, int64_t ld, int64_t i0, int64_t i1, int64_t j0, int64_t j1, bool wide) {
  if (e.residual) {  // one addition per element: the same in any vector width
    for (int64_t i = i0; i < i1; ++i) {
      float* row = c + i * ld;
      const float* add = e.residual + i * ld;
      int64_t j = j0;
      for (; j + 8 <= j1; j += 8)
        _mm256_storeu_ps(row + j, _mm256_add_ps(_mm256_loadu_ps(add + j), _mm256_loadu_ps(row + j)));
      for (; j < j1; ++j) row[j] = add[j] + row[j];
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    float* row = c + i * ld;
    const float* factor = e.factor ? e.factor + i * ld : nullptr;
    float* side = e.side ? e.side + i * ld : nullptr;
    int64_t j = j0;
    if (wide) WideFinishRow(e, row, factor, side, j, j1);
    auto eight = [&](const float* in, const float* f, float* out, float* s) {
      __m256 v = _mm256_loadu_ps(in);
      if (e.gelu) {
        if (s) _mm256_storeu_ps(s, v);
        v = labram_cpu::Gelu8(v, nullptr);
      } else if (e.gelu_gradient) {
        __m256 g;
        const __m256 h = labram_cpu::Gelu8(_mm256_loadu_ps(f), &g);
        if (s) _mm256_storeu_ps(s, h);
        v = _mm256_mul_ps(v, g);
      } else {
        v = _mm256_mul_ps(v, _mm256_loadu_ps(f));
      }
      _mm256_storeu_ps(out, v);
    };
    for (; j + 8 <= j1; j += 8) eight(row + j, factor ? factor + j : nullptr, row + j, side ? side + j : nullptr);
    if (j < j1) {  // the last few columns through zero-padded copies, so they round as the rest
      const int w = (int)(j1 - j);
      alignas(32) float in[8] = {}, f[8] = {}, out[8], d[8];
      std::copy(row + j, row + j1, in);
      if (factor) std::copy(factor + j, factor + j1, f);
      eight(in, f, out, side ? d : nullptr);
      std::copy(out, out + w, row + j);
      if (side) std::copy(d, d + w, side + j);
    }
  }
}

struct Problem {
  Operand a, b;
  int64_t m, n, k;
  const float* bias;  // [n] or null
  Epilogue epilogue;
  float* c;           // [m, n]
  float* b_sums;      // [n] or null
};

// The contraction k0:k1 in blocks of even size, at most kKc: the size of all but maybe the last.
int BlockSize(int64_t k0, int64_t k1) {
  const int64_t blocks = (k1 - k0 + kKc - 1) / kKc;
  return (int)((k1 - k0 + blocks - 1) / blocks);
}

int64_t RoundUp(int64_t x, int64_t unit) { return (x + unit - 1) / unit * unit; }

// An operand packed once for all parts (null: each part packs what it reads), over the whole
// contraction: a as [K block][M / kMr panels][kc][kMr], b as [K block][N / Nr panels][kc][Nr].
struct Shared {
  const float* a = nullptr;
  const float* b = nullptr;
};

// The part c[m0:m1, n0:n1] of the product over the contraction's k0:k1 (and b_sums[n0:n1] when
// `sums`), in a workspace of WorkFloats<Nr>() floats, with 6 x Nr tiles. With a `shared` operand,
// k0:k1 is 0:K and m0 (a shared) or n0 (b shared) is a multiple of the panel size.
template <int Nr>
void Part(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t k0, int64_t k1, bool sums,
          float* work, const Shared& shared = {}) {
  const int kc_max = BlockSize(k0, k1);
  float* a_pack = work;
  float* b_pack = work + (size_t)kMc * kKc;
  for (int64_t jc = n0; jc < n1; jc += kNc<Nr>) {
    const int nc = (int)std::min<int64_t>(kNc<Nr>, n1 - jc);
    for (int64_t pc = k0; pc < k1; pc += kc_max) {
      const int kc = (int)std::min<int64_t>(kc_max, k1 - pc);
      const float* b_panels = b_pack;
      if (shared.b) {
        b_panels = shared.b + (pc - k0) * RoundUp(p.n, Nr) + jc * kc;
      } else {
        PackB<Nr>(p.b, pc, kc, jc, nc, b_pack, sums ? p.b_sums : nullptr);
      }
      for (int64_t ic = m0; ic < m1; ic += kMc) {
        const int mc = (int)std::min<int64_t>(kMc, m1 - ic);
        const float* a_panels = a_pack;
        if (shared.a) {
          a_panels = shared.a + (pc - k0) * RoundUp(p.m, kMr) + ic * kc;
        } else {
          PackA(p.a, ic, mc, pc, kc, a_pack);
        }
        for (int jr = 0; jr < nc; jr += Nr) {
          const float* bias = (p.bias && pc == k0) ? p.bias + jc + jr : nullptr;
          const bool half = nc - jr <= Nr / 2;  // a last panel's columns fit in one vector
          const auto tile = Nr == 32 ? (half ? WideTile<1> : WideTile<2>) : (half ? Tile<1> : Tile<2>);
          int ir = 0;
          if (Nr == 16 && half) {  // AVX2: 12 rows of the last few columns at a time
            for (; ir + 2 * kMr <= mc; ir += 2 * kMr)
              TallTile(kc, a_panels + (size_t)ir * kc, b_panels + (size_t)jr * kc, p.c + (ic + ir) * p.n + jc + jr,
                       p.n, nc - jr, pc > k0, bias);
          }
          for (; ir < mc; ir += kMr) {
            tile(kc, a_panels + (size_t)ir * kc, b_panels + (size_t)jr * kc, p.c + (ic + ir) * p.n + jc + jr, p.n,
                 std::min(kMr, mc - ir), std::min(Nr, nc - jr), pc > k0, bias);
          }
        }
        if (pc + kc >= k1 && p.epilogue.any()) Finish(p.epilogue, p.c, p.n, ic, ic + mc, jc, jc + nc, Nr == 32);
      }
    }
  }
}

template <int Nr>
constexpr size_t WorkFloats() { return (size_t)kMc * kKc + (size_t)kKc * kNc<Nr>; }

// Splits the work into parts (one for small products) run on the pool: the output along its longer
// side in chunks of panels (labram_cpu::ForEachChunk: large first, small last), the operand every
// chunk reads in full (b when splitting rows, a when splitting columns) packed once beforehand, in
// chunks too; or, when the contraction is the longest side (a weight gradient: K = tokens), the
// contraction, each part packing its own slices of both and summing into its own [M, N] buffer, the
// buffers added at the end (by all threads, a chunk of rows each).
template <int Nr>
void Run(const Problem& p, ffi::ThreadPool& pool) {
  if (p.b_sums) std::fill(p.b_sums, p.b_sums + p.n, 0.f);
  if (p.k == 0) {  // sums of nothing: the bias, then the epilogue
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < p.n; ++j) p.c[i * p.n + j] = p.bias ? p.bias[j] : 0.f;
    if (p.epilogue.any()) Finish(p.epilogue, p.c, p.n, 0, p.m, 0, p.n, Nr == 32);
    return;
  }
  const double flops = 2.0 * p.m * p.n * p.k;
  const int64_t most = flops < 4e6 ? 1 : 2 * labram_cpu::UsableCpus();
  // Split along the contraction (not with an epilogue: it needs whole sums).
  if (p.k >= 2 * std::max(p.m, p.n) && most > 1 && !p.epilogue.any()) {
    const int64_t parts = std::min<int64_t>(most, (p.k + kKc - 1) / kKc);
    const size_t size = (size_t)p.m * p.n + p.n;  // a part's [M, N] sums and its b_sums
    thread_local std::vector<float> partial;  // the caller's, kept between calls
    if (partial.size() < (parts - 1) * size) partial.resize((parts - 1) * size);
    float* const scratch = partial.data();
    labram_cpu::ForEachPart(pool, parts, WorkFloats<Nr>(), /*zeroed=*/false, [&](int64_t t, float* work) {
      Problem q = p;
      if (t > 0) {
        q.c = scratch + (t - 1) * size, q.bias = nullptr;
        q.b_sums = p.b_sums ? q.c + (size_t)p.m * p.n : nullptr;
        if (q.b_sums) std::fill(q.b_sums, q.b_sums + p.n, 0.f);
      }
      Part<Nr>(q, 0, p.m, 0, p.n, p.k * t / parts, p.k * (t + 1) / parts, q.b_sums != nullptr, work);
    });
    // The parts' sums added to c on all threads, by chunks of rows, each element in the order of the parts
    // (the same bits as one thread adding them; weight gradients 0.98-0.99x the time, session 40).
    labram_cpu::ForEachChunk(pool, p.m, 8, 0, /*zeroed=*/false, [&](int64_t i0, int64_t i1, float*) {
      for (int64_t t = 1; t < parts; ++t) {
        const float* part = scratch + (t - 1) * size;
        for (size_t i = (size_t)i0 * p.n; i < (size_t)i1 * p.n; ++i) p.c[i] += part[i];
      }
    });
    if (p.b_sums)
      for (int64_t t = 1; t < parts; ++t)
        for (int64_t j = 0; j < p.n; ++j) p.b_sums[j] += scratch[(t - 1) * size + (size_t)p.m * p.n + j];
    return;
  }
  const bool by_rows = p.m >= p.n;
  const int64_t unit = by_rows ? kMr : Nr, units = ((by_rows ? p.m : p.n) + unit - 1) / unit;
  if (most == 1 || units == 1) {
    Part<Nr>(p, 0, p.m, 0, p.n, 0, p.k, true, labram_cpu::ThreadWorkspace(WorkFloats<Nr>()));
    return;
  }
  // The other operand's panels, packed once: in chunks of its panels, every K block of each.
  const int kc_max = BlockSize(0, p.k);
  const int64_t other = by_rows ? Nr : kMr, length = by_rows ? p.n : p.m;
  const int64_t panels = (length + other - 1) / other;
  thread_local std::vector<float> packed_storage;  // the caller's, kept between calls
  float* const packed = labram_cpu::CacheLineAligned(packed_storage, (size_t)p.k * panels * other);
  labram_cpu::ForEachChunk(pool, panels, 1, 0, /*zeroed=*/false, [&](int64_t p0, int64_t p1, float*) {
    const int64_t first = p0 * other, last = std::min(length, p1 * other);
    for (int64_t pc = 0; pc < p.k; pc += kc_max) {
      const int kc = (int)std::min<int64_t>(kc_max, p.k - pc);
      float* dst = packed + pc * panels * other + first * kc;
      if (by_rows) {
        PackB<Nr>(p.b, pc, kc, first, (int)(last - first), dst, p.b_sums);
      } else {
        PackA(p.a, first, (int)(last - first), pc, kc, dst);
      }
    }
  });
  Shared shared;
  (by_rows ? shared.b : shared.a) = packed;
  labram_cpu::ForEachChunk(pool, units, 2, WorkFloats<Nr>(), /*zeroed=*/false, [&](int64_t u0, int64_t u1, float* work) {
    if (by_rows) {
      Part<Nr>(p, u0 * unit, std::min(p.m, u1 * unit), 0, p.n, 0, p.k, false, work, shared);
    } else {
      Part<Nr>(p, 0, p.m, u0 * unit, std::min(p.n, u1 * unit), 0, p.k, true, work, shared);
    }
  });
}

ffi::Error Matmul(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> bias,
                  ffi::Buffer<ffi::F32> factor, ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> c,
                  ffi::ResultBuffer<ffi::F32> b_sums, ffi::ResultBuffer<ffi::F32> side, bool transpose_a,
                  bool transpose_b, bool gelu, bool gelu_gradient, bool wide, ffi::ThreadPool pool) {
  if (const std::string bad = labram_cpu::WideRefusal(wide, "matmul"); !bad.empty())
    return ffi::Error::InvalidArgument(bad);
  const auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("matmul: a, b and c must be matrices");
  Problem p;
  p.m = transpose_a ? da[1] : da[0];
  p.k = transpose_a ? da[0] : da[1];
  p.n = transpose_b ? db[0] : db[1];
  const int64_t kb = transpose_b ? db[1] : db[0];
  if (kb != p.k || dc[0] != p.m || dc[1] != p.n)
    return ffi::Error::InvalidArgument("matmul: shapes of a, b and c do not agree");
  if (bias.element_count() != 0 && bias.element_count() != (size_t)p.n)
    return ffi::Error::InvalidArgument("matmul: bias must have N or no elements");
  if (b_sums->element_count() != 0 && b_sums->element_count() != (size_t)p.n)
    return ffi::Error::InvalidArgument("matmul: b_sums must have N or no elements");
  const size_t mn = (size_t)p.m * p.n;
  if ((factor.element_count() != 0 && factor.element_count() != mn) ||
      (side->element_count() != 0 && side->element_count() != mn))
    return ffi::Error::InvalidArgument(
        "matmul: factor and the side result must have M x N or no elements (cpu_matmul.matmul sizes them: "
        "pass factor or gelu_gradient_of of the product's shape)");
  if (mn != 0 && side->element_count() != 0 && !gelu && !gelu_gradient)
    return ffi::Error::InvalidArgument(
        "matmul: a side result needs the attribute gelu or gelu_gradient (cpu_matmul.matmul(..., gelu=True, "
        "pre_activation=True) or gelu_gradient_of=u sets both)");
  if (mn != 0 && factor.element_count() != 0 && gelu)
    return ffi::Error::InvalidArgument("matmul: a factor or GELU, not both");
  if (residual.element_count() != 0 && residual.element_count() != mn)
    return ffi::Error::InvalidArgument(
        "matmul: the residual must have M x N or no elements (pass cpu_matmul.matmul(..., residual=) of the "
        "product's shape)");
  if (mn != 0 && residual.element_count() != 0 && (factor.element_count() != 0 || gelu || gelu_gradient))
    return ffi::Error::InvalidArgument(
        "matmul: a residual alone, not with a factor, gelu or gelu_gradient (add it after such a product: "
        "residual + cpu_matmul.matmul(...))");
  if (mn != 0 && gelu_gradient && factor.element_count() == 0)
    return ffi::Error::InvalidArgument(
        "matmul: gelu_gradient needs a factor, the pre-activations u (cpu_matmul.matmul(..., gelu_gradient_of=u) "
        "passes it)");
  p.a = {a.typed_data(), da[1], transpose_a};
  p.b = {b.typed_data(), db[1], transpose_b};
  p.bias = bias.element_count() ? bias.typed_data() : nullptr;
  p.epilogue.factor = factor.element_count() ? factor.typed_data() : nullptr;
  p.epilogue.gelu = gelu && mn != 0;
  p.epilogue.gelu_gradient = gelu_gradient && mn != 0;
  p.epilogue.side = side->element_count() ? side->typed_data() : nullptr;
  p.epilogue.residual = mn != 0 && residual.element_count() ? residual.typed_data() : nullptr;
  p.c = c->typed_data();
  p.b_sums = b_sums->element_count() ? b_sums->typed_data() : nullptr;
  if (p.m == 0 || p.n == 0) {  // no product; op(b) may still have rows to sum
    if (p.b_sums) std::fill(p.b_sums, p.b_sums + p.n, 0.f);
    for (int64_t k = 0; p.b_sums && k < p.k; ++k)
      for (int64_t j = 0; j < p.n; ++j) p.b_sums[j] += p.b.t ? p.b.p[j * p.b.ld + k] : p.b.p[k * p.b.ld + j];
    return ffi::Error::Success();
  }
  if (wide) {
    Run<32>(p, pool);
  } else {
    Run<16>(p, pool);
  }
  return ffi::Error::Success();
}

// The nearest code of each row: codes[i] = argmin_j (|z_i|^2 + |w_j|^2) - 2 z_i . w_j (the first j
// on ties, the first NaN if any, as jnp.argmin) and that value, z [M, d], codebook w [N, d]. The
// [M, N] distances are never written out: each part takes a range of rows (packed once) and walks the
// codebook in blocks of kNearestBlock codes (packed in turn), each 6 x Nr tile of products (Sums, as
// Matmul's: 32 columns with the attribute `wide`) turned into distances and offered to its rows' running
// minima as soon as it is summed. (Written to memory and read back by XLA, the distances took ~5x the
// product's time; scanned from a block-sized scratch after the block's products, one row's dependent
// chain of compares and blends at a time, the scan was 37 % of the kernel's samples.)
constexpr int kNearestBlock = 256;

// Lane-wise: whether (v, at j) beats (best, at its index), NaNs winning, earlier indices on ties.
inline __m256 Beats(__m256 v, __m256 best) {
  const __m256 v_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q), best_nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
  return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_LT_OQ), _mm256_andnot_ps(best_nan, v_nan));
}

// Codes j .. j + cols - 1 (cols <= Nr) against a panel of kMr rows: their products over d (a packed panel
// of each), then the distances (zz[r] + ww[c]) - 2 dot offered to each row's running minimum, 8 lanes of
// codes at a time (lane l of row r: best[r] and its code at[r] over the codes l mod 8 seen so far, in
// order). zz and ww are read for all kMr rows and 8-lane groups (padded by the caller).
template <int Nr>
inline void NearestTile(int d, const float* a, const float* b, const float* zz, const float* ww, int64_t j, int cols,
                        __m256* best, __m256i* at) {
  alignas(64) float t[kMr][Nr];
  if constexpr (Nr == 32) {
    cols > 16 ? WideSums<2>(d, a, b, t[0]) : WideSums<1>(d, a, b, t[0]);
  } else {
    cols > 8 ? Sums<2>(d, a, b, t[0]) : Sums<1>(d, a, b, t[0]);
  }
  const __m256 two = _mm256_set1_ps(2.0f), inf = _mm256_set1_ps(INFINITY);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int h = 0; h < cols; h += 8) {
    const __m256 w_norm = _mm256_loadu_ps(ww + h);
    const __m256i index = _mm256_add_epi32(_mm256_set1_epi32((int32_t)(j + h)), lane);
    // the lanes past the last code at +inf (never taken)
    const __m256 real = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cols - h), lane));
    for (int r = 0; r < kMr; ++r) {
      __m256 v = _mm256_fnmadd_ps(two, _mm256_load_ps(t[r] + h), _mm256_add_ps(_mm256_set1_ps(zz[r]), w_norm));
      if (cols - h < 8) v = _mm256_blendv_ps(inf, v, real);
      const __m256 take = Beats(v, best[r]);
      best[r] = _mm256_blendv_ps(best[r], v, take);
      at[r] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at[r]), _mm256_castsi256_ps(index), take));
    }
  }
}

// Floats of workspace NearestRows needs for `rows` rows of d values.
size_t NearestWorkFloats(int64_t rows, int64_t d) { return (size_t)(RoundUp(rows, kMr) + kNearestBlock) * d; }

template <int Nr>
void NearestRows(const float* z, const float* w, const float* zz, const float* ww, int64_t m0, int64_t m1, int64_t n,
                 int64_t d, int32_t* codes, float* values, float* work) {
  const int rows = (int)(m1 - m0);
  float* const a_pack = work;  // the rows' panels [RoundUp(rows, kMr) / kMr][d][kMr]
  float* const b_pack = work + RoundUp(rows, kMr) * d;  // a block's panels [kNearestBlock / Nr][d][Nr]
  std::vector<__m256> best(RoundUp(rows, kMr), _mm256_set1_ps(INFINITY));
  std::vector<__m256i> at(RoundUp(rows, kMr), _mm256_set1_epi32((int32_t)n));
  PackA({z, d, false}, m0, rows, 0, (int)d, a_pack);
  for (int64_t j0 = 0; j0 < n; j0 += kNearestBlock) {
    const int cols = (int)std::min<int64_t>(kNearestBlock, n - j0);
    PackB<Nr>({w, d, true}, 0, (int)d, j0, cols, b_pack, nullptr);
    for (int i = 0; i < rows; i += kMr) {
      for (int jr = 0; jr < cols; jr += Nr) {
        NearestTile<Nr>((int)d, a_pack + (size_t)i * d, b_pack + (size_t)jr * d, zz + m0 + i, ww + j0 + jr, j0 + jr,
                        std::min(Nr, cols - jr), &best[i], &at[i]);
      }
    }
  }
  alignas(32) float best_value[8];
  alignas(32) int32_t best_index[8];
  for (int r = 0; r < rows; ++r) {  // the lanes' winners: the smallest value, then the smallest index
    _mm256_store_ps(best_value, best[r]);
    _mm256_store_si256((__m256i*)best_index, at[r]);
    float v = best_value[0];
    int32_t code = best_index[0];
    for (int l = 1; l < 8; ++l) {
      const float u = best_value[l];
      const bool u_nan = u != u, v_nan = v != v;
      if ((u_nan && !v_nan) || (u < v) || (u_nan == v_nan && !(v < u) && !(u < v) && best_index[l] < code))
        v = u, code = best_index[l];
    }
    codes[m0 + r] = code, values[m0 + r] = v;
  }
}

// NearestRows over all m rows of z, in parts (ranges of whole 6-row panels) run on the pool, with 6 x Nr tiles.
template <int Nr>
void NearestParts(const float* z, const float* w, const float* zz, const float* ww, int64_t m, int64_t n, int64_t d,
                  int32_t* codes, float* values, ffi::ThreadPool& pool) {
  const int64_t units = (m + kMr - 1) / kMr;
  const int64_t parts = std::min<int64_t>(2 * labram_cpu::UsableCpus(), units);
  const size_t work_floats = NearestWorkFloats((units + parts - 1) / parts * kMr, d);
  labram_cpu::ForEachPart(pool, parts, work_floats, /*zeroed=*/false, [&](int64_t t, float* work) {
    const int64_t m0 = std::min(m, units * t / parts * kMr), m1 = std::min(m, units * (t + 1) / parts * kMr);
    if (m1 > m0) NearestRows<Nr>(z, w, zz, ww, m0, m1, n, d, codes, values, work);
  });
}

ffi::Error Nearest(ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> codebook, ffi::ResultBuffer<ffi::S32> codes,
                   ffi::ResultBuffer<ffi::F32> values, bool wide, ffi::ThreadPool pool) {
  if (const std::string bad = labram_cpu::WideRefusal(wide, "nearest"); !bad.empty())
    return ffi::Error::InvalidArgument(bad);
  const auto dz = z.dimensions(), dw = codebook.dimensions();
  if (dz.size() != 2 || dw.size() != 2 || dz[1] != dw[1])
    return ffi::Error::InvalidArgument("nearest: z [M, d] and codebook [N, d] must share d");
  const int64_t m = dz[0], n = dw[0], d = dz[1];
  if (n == 0 && m > 0) return ffi::Error::InvalidArgument("nearest: the codebook is empty");
  if (m == 0) return ffi::Error::Success();
  if (d == 0) {  // every distance 0: the first code
    std::fill(codes->typed_data(), codes->typed_data() + m, 0);
    std::fill(values->typed_data(), values->typed_data() + m, 0.f);
    return ffi::Error::Success();
  }
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("nearest: more codes than int32 indexes");
  // squared norms, zero past m and n (NearestTile reads whole panels of rows and 8-lane groups of codes)
  std::vector<float> zz(RoundUp(m, kMr)), ww(RoundUp(n, 32));
  for (int64_t i = 0; i < m; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += z.typed_data()[i * d + k] * z.typed_data()[i * d + k];
    zz[i] = s;
  }
  for (int64_t j = 0; j < n; ++j) {
    float s = 0.f;
    for (int64_t k = 0; k < d; ++k) s += codebook.typed_data()[j * d + k] * codebook.typed_data()[j * d + k];
    ww[j] = s;
  }
  const auto nearest = wide ? NearestParts<32> : NearestParts<16>;
  nearest(z.typed_data(), codebook.typed_data(), zz.data(), ww.data(), m, n, d, codes->typed_data(),
          values->typed_data(), pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // a
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [N] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // factor [M, N] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N] or [0]: c = residual + sums
                                  .Ret<ffi::Buffer<ffi::F32>>()  // c
                                  .Ret<ffi::Buffer<ffi::F32>>()  // column sums of op(b) [N] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // side result [M, N] or [0] (not wanted)
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<bool>("gelu")            // c through exact GELU
                                  .Attr<bool>("gelu_gradient")   // c times GELU'(factor)
                                  .Attr<bool>("wide")            // 32-column tiles of AVX-512 vectors
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramNearest, Nearest,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // z [M, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // codebook [N, d]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // codes [M]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // their squared distances [M]
                                  .Attr<bool>("wide")            // the products in 32-column tiles of AVX-512 vectors
                                  .Ctx<ffi::ThreadPool>());
