// Softmax attention for x86 CPUs with AVX2 and FMA, forward and backward, as XLA FFI handlers.
//
// Forward, per (batch, head): S = scale q k^T + bias, E = exp(S - rowmax), out = E v / rowsum;
// rowmax and rowsum are returned for the backward pass, which recomputes
// P = exp(S - rowmax) / rowsum and gives dV = P^T dO, dP = dO v^T, dS = P * (dP - rowsum(P * dP)),
// dQ = scale dS k, dK = dS^T (scale q). (rowsum(P * dP) is rowsum(dO * out), taken from the [L, L]
// rows in cache rather than from out, which the backward pass would read cold from memory.) One
// (batch, head) is computed at a time in a per-thread workspace, so the [L, L] matrices stay in the
// core's cache instead of going to memory between XLA's operations. The scores are kept in base 2
// (q's scale and the bias times log2 e, so exp(S - rowmax) = 2^(S2 - rowmax2), the cheaper function:
// labram_cpu::Exp2Neg8); rowmax is returned in those units. The forward pass computes S transposed
// (S^T = k q^T, a row per key): the softmax's reductions run down its columns, lane by lane, and out =
// E v / rowsum is the transposed product whose vectors run along the queries (full vectors, where rows
// of K = 20 values fill 20 of 24 lanes); the backward pass keeps S by rows, where two of its three
// [L, K] products are the transposed ones. With the attribute `wide` (CPUs whose
// AVX-512 units are full width) the products run AVX-512 forms, each element the same chain of FMAs,
// and the softmax's passes 16-lane vectors (the same bits). Built and loaded by cpu_kernels.py.
//
// Shapes: q, k, v, out, dO, dq, dk, dv [..., H, L, K] float32 with K <= 32, or [..., L, H, K] with
// the attribute token_major (the layout of a [..., L, H * K] projection: no transposes around the
// kernel); bias [..., L] float32 (the leading dims of q without H, L, K); rowmax (of S log2 e), rowsum [..., H, L].
//
// The Qkv handlers take q, k and v inside the fused projection's output qkv [..., L, 3, H, K] and
// apply each slot's transform first (q and k: LaBraM's LayerNorm over K), or none (gamma and beta
// empty: the tokenizer, its q and v biases added by the projection): no slices of qkv, no normalised
// copies, and the backward pass writes the gradient with respect to qkv itself (and the transforms'
// parameter gradients per (batch, head), summed by the caller).

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float SumOf(__m256 v) {
  alignas(32) float b[8];
  _mm256_store_ps(b, v);
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += b[i];
  return s;
}

constexpr float kLog2e = 1.44269504088896341f;  // the scores are kept in base 2: exp(s) = 2^(s log2 e)
// Rows of q, k, v (or dO) asked for this far ahead of their packing: a head's rows lie z.ld floats
// apart in the projection's output, often in memory rather than cache; read as they were needed,
// the packing waited on each (~22 % of the forward kernel's samples in a step-sized call). Asked
// ahead: the backward kernel 1.05-1.07x as fast, the forward the same (session 34).
constexpr int kPrefetchRows = 16;

// An output's rows (dq, dk, dv, out; the gradient with respect to qkv) lie z.ld or more floats apart in
// XLA's buffer and are rarely in cache: each store to a row waited for its lines. Asked for ahead of
// the stores (reads, as Prefetch's), and stored as vectors rather than by std::memcpy's call per
// 80-byte row, the fused projection's forward + backward took 0.92-0.95x the time; steps 0.97-0.99x
// (session 38).
inline void PrefetchRows(const float* x, int64_t ld, int r0, int r1, int n) {
  for (int r = r0; r < r1; ++r) labram_cpu::Prefetch(x + (size_t)r * ld, n);
}

// dst[0:K] = src[0:K], src 32-byte aligned: 8 at a time, then 4, then one by one, so nothing past K is
// written (the next head's values: another thread's). (No AVX2 masked store: on AMD cores one takes
// several cycles.)
inline void StoreRow(float* dst, const float* src, int K) {
  int i = 0;
  for (; i + 8 <= K; i += 8) _mm256_storeu_ps(dst + i, _mm256_load_ps(src + i));
  if (i + 4 <= K) _mm_storeu_ps(dst + i, _mm_load_ps(src + i)), i += 4;
  for (; i < K; ++i) dst[i] = src[i];
}

constexpr int kRowTile = 6;  // rows per register tile of an [L, L] product (6 x 16 floats: 12 registers)

struct Sizes {
  int L, K;
  int64_t ld;  // floats between a head's consecutive rows in q, k, v, out (K heads-major, H * K token-major)
  int Lp;  // L padded to 16: columns of the [L, L] buffers
  int Lr;  // L padded to 12: rows (a multiple of every row tile)
  int Kp;  // K padded to 8
  bool wide = false;  // the products' AVX-512 forms (the attribute wide: full-width AVX-512 units)
  size_t Square() const { return (size_t)Lr * Lp + 16; }  // an [Lr, Lp] buffer (+ slack for reads past a row)
  size_t Narrow() const { return (size_t)Lr * Kp; }       // an [Lr, Kp] buffer
  size_t Wide() const { return (size_t)K * Lp; }          // a transposed [K, Lp] buffer
  size_t Bias() const { return (size_t)Lp + 16; }         // the bias, by column of [L, Lp] or row of [Lr, Lp]
  size_t Columns() const { return (size_t)Lp + 32; }      // a value per column of [L, Lp] (read in vectors past Lp)
};

// scale * x [L, K] (rows ld apart) -> dst [Lr, Kp], zero padded.
void PackRows(const Sizes& z, const float* x, int64_t ld, float* dst, float scale = 1.0f) {
  std::memset(dst, 0, sizeof(float) * z.Narrow());
  for (int l = 0; l < z.L; ++l) {
    if (l + kPrefetchRows < z.L) labram_cpu::Prefetch(x + (size_t)(l + kPrefetchRows) * ld, z.K);
    for (int c = 0; c < z.K; ++c) dst[(size_t)l * z.Kp + c] = scale * x[(size_t)l * ld + c];
  }
}

// x [L, K] (rows ld apart: z.ld for a buffer of the call, z.Kp for one packed by PackRows) -> dst
// [K, Lp] (transposed), zero padded.
void PackColumns(const Sizes& z, const float* x, float* dst, int64_t ld) {
  for (int c = 0; c < z.K; ++c) {
    for (int m = 0; m < z.L; ++m) dst[(size_t)c * z.Lp + m] = x[(size_t)m * ld + c];
    for (int m = z.L; m < z.Lp; ++m) dst[(size_t)c * z.Lp + m] = 0.f;
  }
}

// ProductNT's AVX-512 form: 6 rows by V vectors of 16 columns (the last 16 of Lp alone where Lp is
// not a multiple of 32), each element the same chain of FMAs over k (the same bits). init: the tile's
// first row's value (ByRow) or its first column's.
template <int V, bool ByRow>
__attribute__((target("avx512f"))) inline void WideTileNT(const Sizes& z, const float* ar, const float* bc,
                                                          const float* init, float* c) {
  __m512 c0[kRowTile], c1[kRowTile];
  if constexpr (ByRow) {
    for (int r = 0; r < kRowTile; ++r) c0[r] = c1[r] = _mm512_set1_ps(init[r]);
  } else {
    const __m512 i0 = _mm512_loadu_ps(init), i1 = V == 2 ? _mm512_loadu_ps(init + 16) : i0;
    for (int r = 0; r < kRowTile; ++r) c0[r] = i0, c1[r] = i1;
  }
  for (int k = 0; k < z.K; ++k, bc += z.Lp) {
    const __m512 b0 = _mm512_loadu_ps(bc), b1 = V == 2 ? _mm512_loadu_ps(bc + 16) : b0;
    for (int r = 0; r < kRowTile; ++r) {
      const __m512 x = _mm512_set1_ps(ar[(size_t)r * z.Kp + k]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      if constexpr (V == 2) c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
  }
  for (int r = 0; r < kRowTile; ++r) {
    _mm512_storeu_ps(c + (size_t)r * z.Lp, c0[r]);
    if constexpr (V == 2) _mm512_storeu_ps(c + (size_t)r * z.Lp + 16, c1[r]);
  }
}

template <bool ByRow>
__attribute__((target("avx512f"))) void WideProductNT(const Sizes& z, const float* a, const float* bt,
                                                      const float* init, float* c) {
  for (int l0 = 0; l0 < z.Lr; l0 += kRowTile) {
    for (int m0 = 0; m0 < z.Lp; m0 += 32) {
      const float* ar = a + (size_t)l0 * z.Kp;
      const float* i = init + (ByRow ? l0 : m0);
      float* out = c + (size_t)l0 * z.Lp + m0;
      if (z.Lp - m0 >= 32) {
        WideTileNT<2, ByRow>(z, ar, bt + m0, i, out);
      } else {
        WideTileNT<1, ByRow>(z, ar, bt + m0, i, out);
      }
    }
  }
}

// c [Lr, Lp] = a [Lr, Kp] . bt [K, Lp] + init: init [Lr] added to every column (ByRow), or init [Lp]
// to every row.
template <bool ByRow>
void ProductNT(const Sizes& z, const float* a, const float* bt, const float* init, float* c) {
  if (z.wide) return WideProductNT<ByRow>(z, a, bt, init, c);
  const int K = z.K, Lp = z.Lp, Kp = z.Kp;
  for (int l0 = 0; l0 < z.Lr; l0 += kRowTile) {
    const float* ar = a + (size_t)l0 * Kp;
    for (int m0 = 0; m0 < Lp; m0 += 16) {
      __m256 c0[kRowTile], c1[kRowTile];
      if constexpr (ByRow) {
        for (int r = 0; r < kRowTile; ++r) c0[r] = c1[r] = _mm256_set1_ps(init[l0 + r]);
      } else {
        const __m256 i0 = _mm256_loadu_ps(init + m0), i1 = _mm256_loadu_ps(init + m0 + 8);
        for (int r = 0; r < kRowTile; ++r) c0[r] = i0, c1[r] = i1;
      }
      const float* bc = bt + m0;
      for (int k = 0; k < K; ++k, bc += Lp) {
        const __m256 b0 = _mm256_loadu_ps(bc), b1 = _mm256_loadu_ps(bc + 8);
        for (int r = 0; r < kRowTile; ++r) {
          const __m256 x = _mm256_broadcast_ss(ar + (size_t)r * Kp + k);
          c0[r] = _mm256_fmadd_ps(x, b0, c0[r]);
          c1[r] = _mm256_fmadd_ps(x, b1, c1[r]);
        }
      }
      for (int r = 0; r < kRowTile; ++r) {
        _mm256_storeu_ps(c + (size_t)(l0 + r) * Lp + m0, c0[r]);
        _mm256_storeu_ps(c + (size_t)(l0 + r) * Lp + m0 + 8, c1[r]);
      }
    }
  }
}

// ProductNN's AVX-512 form for NV >= 2: a row of b's NV * 8 lanes as NV / 2 AVX-512 vectors and, for odd
// NV, the last 8 lanes in the low half of one more (K = 20: 16 + 8 lanes), by MR rows of a (MR divides Lr's
// 12), 12 accumulators: 1.5x the lanes per instruction of ProductNN's tiles at NV = 3. Each element the
// same chain of FMAs over m (the same bits). (The last 8 lanes as AVX2 vectors, which avx512f alone keeps
// to the 16 registers ymm0-15, left too few: GCC kept b's tail on the stack and read a's values twice.)
template <int NV>
__attribute__((target("avx512f"))) void WideProductNN(const Sizes& z, const float* a, const float* b,
                                                      float scale, float* out, int64_t ld) {
  constexpr int Z = NV / 2, Y = NV % 2, MR = 12 / (Z + Y);
  const int Lp = z.Lp, Kp = NV * 8;
  for (int l0 = 0; l0 < z.Lr; l0 += MR) {
    PrefetchRows(out, ld, std::min(l0 + MR, z.L), std::min(l0 + 2 * MR, z.L), z.K);
    __m512 acc[MR][Z];
    __m512 tail[MR];  // lanes 0-7: the last 8 of b's row; 8-15: zero
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < Z; ++j) acc[r][j] = _mm512_setzero_ps();
      tail[r] = _mm512_setzero_ps();
    }
    const float* ar = a + (size_t)l0 * Lp;
    for (int m = 0; m < z.L; ++m) {
      __m512 bm[Z];
      for (int j = 0; j < Z; ++j) bm[j] = _mm512_loadu_ps(b + (size_t)m * Kp + 16 * j);
      const __m512 bt = Y ? _mm512_maskz_loadu_ps(0xFF, b + (size_t)m * Kp + 16 * Z) : _mm512_setzero_ps();
      for (int r = 0; r < MR; ++r) {
        const __m512 x = _mm512_set1_ps(ar[(size_t)r * Lp + m]);
        for (int j = 0; j < Z; ++j) acc[r][j] = _mm512_fmadd_ps(x, bm[j], acc[r][j]);
        if constexpr (Y == 1) tail[r] = _mm512_fmadd_ps(x, bt, tail[r]);
      }
    }
    alignas(64) float tile[MR][NV * 8];
    for (int r = 0; r < MR; ++r) {
      for (int j = 0; j < Z; ++j) _mm512_store_ps(tile[r] + 16 * j, _mm512_mul_ps(acc[r][j], _mm512_set1_ps(scale)));
      if constexpr (Y == 1)
        _mm256_store_ps(tile[r] + 16 * Z, _mm512_castps512_ps256(_mm512_mul_ps(tail[r], _mm512_set1_ps(scale))));
    }
    for (int r = 0; r < MR && l0 + r < z.L; ++r) StoreRow(out + (size_t)(l0 + r) * ld, tile[r], z.K);
  }
}

// out [L, K] (rows ld apart) = scale * sum_{m < L} a[l, m] b[m, :], a [Lr, Lp], b [Lr, NV * 8].
template <int NV>
void ProductNN(const Sizes& z, const float* a, const float* b, float scale, float* out, int64_t ld) {
  if constexpr (NV >= 2) {
    if (z.wide) return WideProductNN<NV>(z, a, b, scale, out, ld);
  }
  constexpr int MR = 12 / NV;
  const int Lp = z.Lp, Kp = NV * 8;
  for (int l0 = 0; l0 < z.Lr; l0 += MR) {
    PrefetchRows(out, ld, std::min(l0 + MR, z.L), std::min(l0 + 2 * MR, z.L), z.K);
    __m256 acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
    const float* ar = a + (size_t)l0 * Lp;
    for (int m = 0; m < z.L; ++m) {
      __m256 bm[NV];
      for (int j = 0; j < NV; ++j) bm[j] = _mm256_loadu_ps(b + (size_t)m * Kp + 8 * j);
      for (int r = 0; r < MR; ++r) {
        const __m256 x = _mm256_broadcast_ss(ar + (size_t)r * Lp + m);
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_fmadd_ps(x, bm[j], acc[r][j]);
      }
    }
    alignas(32) float tile[MR][NV * 8];
    for (int r = 0; r < MR; ++r) {
      const __m256 by = _mm256_set1_ps(scale);
      for (int j = 0; j < NV; ++j) _mm256_store_ps(tile[r] + 8 * j, _mm256_mul_ps(acc[r][j], by));
    }
    for (int r = 0; r < MR && l0 + r < z.L; ++r) StoreRow(out + (size_t)(l0 + r) * ld, tile[r], z.K);
  }
}

// out[i * ld + r] = tile[r * stride + i] for r < rows, i < cols: a finished tile of out^T written back.
inline void WriteTransposed(const float* tile, int stride, int rows, int cols, float* out, int64_t ld) {
  for (int i = 0; i < cols; ++i)
    for (int r = 0; r < rows; ++r) out[(size_t)i * ld + r] = tile[r * stride + i];
}

// Four rows r0..r3 of a 4 x 8 matrix -> its 8 columns, each 4 floats stored at out + i * ld (i < 8): 4 x 4
// transposes within each 128-bit half, 8 stores of 16 bytes in place of 32 of one float.
inline void StoreTransposed4x8(__m256 r0, __m256 r1, __m256 r2, __m256 r3, float* out, int64_t ld) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);  // columns 0 1 | 4 5, 2 3 | 6 7
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 c0 = _mm256_shuffle_ps(t0, t2, 0x44), c1 = _mm256_shuffle_ps(t0, t2, 0xEE);  // columns 0 | 4, 1 | 5
  const __m256 c2 = _mm256_shuffle_ps(t1, t3, 0x44), c3 = _mm256_shuffle_ps(t1, t3, 0xEE);  // columns 2 | 6, 3 | 7
  _mm_storeu_ps(out, _mm256_castps256_ps128(c0));
  _mm_storeu_ps(out + ld, _mm256_castps256_ps128(c1));
  _mm_storeu_ps(out + 2 * ld, _mm256_castps256_ps128(c2));
  _mm_storeu_ps(out + 3 * ld, _mm256_castps256_ps128(c3));
  _mm_storeu_ps(out + 4 * ld, _mm256_extractf128_ps(c0, 1));
  _mm_storeu_ps(out + 5 * ld, _mm256_extractf128_ps(c1, 1));
  _mm_storeu_ps(out + 6 * ld, _mm256_extractf128_ps(c2, 1));
  _mm_storeu_ps(out + 7 * ld, _mm256_extractf128_ps(c3, 1));
}

// Rows v[0..16) of a 16 x 16 matrix -> its columns, in registers: 64 shuffles (32-bit and 64-bit
// interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles).
__attribute__((target("avx512f"))) inline void Transpose16x16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // v[i + c], 128-bit lane q: column 4 q + c of rows i..i+3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    v[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    v[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    v[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    v[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 even01 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x88), odd01 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xDD);
    const __m512 even23 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);       // lane 0 of each group: column c
    t[8 + c] = _mm512_shuffle_f32x4(even01, even23, 0xDD);   // lane 2: column 8 + c
    t[4 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);     // lane 1: column 4 + c
    t[12 + c] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);    // lane 3: column 12 + c
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// ProductTN's AVX-512 form: tiles of 10 of b's columns by 32 of a's (2 vectors along m), so a's strip
// is read twice for K = 20 (five times in 4-column tiles: this product was bound by those reads, not
// by its FMAs). Lanes past Lp are masked off (never read); b's rows are read to k0 + 10, within Kp
// where WideTN says so. Each element the same chain of FMAs over l as ProductTN's (the same bits). The
// finished tile is transposed in registers and written as rows of out (stored and copied float by float:
// fused forward + backward 1.012x as long, session 38). (The tile as a function templated on its width
// kept its accumulators on the stack: 0.92x.)
__attribute__((target("avx512f"))) void WideProductTN(const Sizes& z, const float* a, const float* b, float scale,
                                                      const float* row_scale, float* out, int64_t ld) {
  constexpr int KR = 10, MV = 2;  // MV = 2: the tile's two vectors are lo and hi below
  for (int m0 = 0; m0 < z.L; m0 += 16 * MV) {
    PrefetchRows(out, ld, std::min(m0 + 16 * MV, z.L), std::min(m0 + 32 * MV, z.L), z.K);
    __mmask16 mask[MV];
    __m512 by[MV];  // scale times row_scale of out's rows m0.. (lanes)
    for (int j = 0; j < MV; ++j) {
      mask[j] = (__mmask16)((1u << std::clamp(z.Lp - (m0 + 16 * j), 0, 16)) - 1);
      by[j] = _mm512_set1_ps(scale);
      if (row_scale) by[j] = _mm512_mul_ps(by[j], _mm512_loadu_ps(row_scale + m0 + 16 * j));
    }
    for (int k0 = 0; k0 < z.K; k0 += KR) {
      // out^T's tile: rows k0 + r, columns m0.. (lo) and m0 + 16.. (hi). (As one array acc[KR][MV], GCC
      // stored all 20 accumulators to the stack at every step of the loop over l: 20 stores for 20 FMAs.)
      __m512 lo[KR], hi[KR];
      for (int r = 0; r < KR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
      const float* al = a + m0;
      const float* bl = b + k0;
      for (int l = 0; l < z.L; ++l, al += z.Lp, bl += z.Kp) {
        const __m512 a0 = _mm512_maskz_loadu_ps(mask[0], al), a1 = _mm512_maskz_loadu_ps(mask[1], al + 16);
        for (int r = 0; r < KR; ++r) {
          const __m512 x = _mm512_set1_ps(bl[r]);
          lo[r] = _mm512_fmadd_ps(x, a0, lo[r]);
          hi[r] = _mm512_fmadd_ps(x, a1, hi[r]);
        }
      }
      // out^T's tile [KR, 32] -> out's rows m0.. (KR floats each): per 16 rows, a 16 x 16 transpose in registers
      // of the KR rows (zeros below), each row of the result stored masked to the tile's columns.
      const __mmask16 columns = (__mmask16)((1u << std::min(KR, z.K - k0)) - 1);
      for (int j = 0; j < MV; ++j) {
        __m512 v[16];
        for (int r = 0; r < 16; ++r) v[r] = r < KR ? _mm512_mul_ps(j ? hi[r] : lo[r], by[j]) : _mm512_setzero_ps();
        Transpose16x16(v);
        const int rows = std::min(16, z.L - (m0 + 16 * j));
        float* o = out + (size_t)(m0 + 16 * j) * ld + k0;
        for (int i = 0; i < rows; ++i) _mm512_mask_storeu_ps(o + (size_t)i * ld, columns, v[i]);
      }
    }
  }
}

// Whether WideProductTN reads b's rows only within Kp: K rounded up to 10 fits (K = 20 in 24; 25 in 32).
bool WideTN(const Sizes& z) { return (z.K + 9) / 10 * 10 <= z.Kp; }

// out [L, K] (rows ld apart) = scale * row_scale[m] * sum_{l < L} a[l, m] b[l, :] for each m < L, a [Lr,
// Lp], b [Lr, Kp] (zero past K); row_scale [Lp + 32] (read in vectors past L), or none (1). Computed as
// its transpose, out^T [K, L]: a tile of 4 of b's columns by 24 of a's runs
// down l, each step one row of a (3 vectors, along m) and 4 values of b's row, so the vectors' lanes
// are m (L of every 24 used) rather than K (20 of 24); the tile is written transposed (a whole tile from
// registers, 4 floats per row of out: the product 1.02-1.09x as fast as through one float at a time, the
// attention's call 1.007-1.017x, paired; session 41). A row of a is read up to 16 floats past Lp: the
// next row, or the last row's slack.
void ProductTN(const Sizes& z, const float* a, const float* b, float scale, const float* row_scale, float* out,
               int64_t ld) {
  if (z.wide && WideTN(z)) return WideProductTN(z, a, b, scale, row_scale, out, ld);
  constexpr int KR = 4, MV = 3;
  const int Lp = z.Lp, Kp = z.Kp;
  for (int m0 = 0; m0 < z.L; m0 += 8 * MV) {
    PrefetchRows(out, ld, std::min(m0 + 8 * MV, z.L), std::min(m0 + 16 * MV, z.L), z.K);
    __m256 by[MV];
    for (int j = 0; j < MV; ++j) {
      by[j] = _mm256_set1_ps(scale);
      if (row_scale) by[j] = _mm256_mul_ps(by[j], _mm256_loadu_ps(row_scale + m0 + 8 * j));
    }
    for (int k0 = 0; k0 < z.K; k0 += KR) {
      __m256 acc[KR][MV];
      for (int r = 0; r < KR; ++r)
        for (int j = 0; j < MV; ++j) acc[r][j] = _mm256_setzero_ps();
      const float* al = a + m0;
      const float* bl = b + k0;
      for (int l = 0; l < z.L; ++l, al += Lp, bl += Kp) {
        __m256 av[MV];
        for (int j = 0; j < MV; ++j) av[j] = _mm256_loadu_ps(al + 8 * j);
        for (int r = 0; r < KR; ++r) {
          const __m256 x = _mm256_broadcast_ss(bl + r);
          for (int j = 0; j < MV; ++j) acc[r][j] = _mm256_fmadd_ps(x, av[j], acc[r][j]);
        }
      }
      for (int r = 0; r < KR; ++r)
        for (int j = 0; j < MV; ++j) acc[r][j] = _mm256_mul_ps(acc[r][j], by[j]);
      float* o = out + (size_t)m0 * ld + k0;
      if (k0 + KR <= z.K && m0 + 8 * MV <= z.L) {  // a whole tile: its columns stored 4 floats at a time
        for (int j = 0; j < MV; ++j)
          StoreTransposed4x8(acc[0][j], acc[1][j], acc[2][j], acc[3][j], o + (size_t)8 * j * ld, ld);
        continue;
      }
      alignas(32) float tile[KR][8 * MV];
      for (int r = 0; r < KR; ++r)
        for (int j = 0; j < MV; ++j) _mm256_store_ps(tile[r] + 8 * j, acc[r][j]);
      WriteTransposed(tile[0], 8 * MV, std::min(KR, z.K - k0), std::min(8 * MV, z.L - m0), o, ld);
    }
  }
}

// The softmax's element-wise passes over the [L, Lp] buffers (base 2; Lp a multiple of 16), each with an
// AVX-512 form for z.wide, the same operations lane by lane; the backward pass's row sums are kept in
// two 8-lane chains (the even and the odd 8 columns of every 16), which are the low and high halves of
// the AVX-512 form's 16 lanes: the same bits in both.
__attribute__((target("avx512f"))) inline __m256 Low(__m512 v) { return _mm512_castps512_ps256(v); }
__attribute__((target("avx512f"))) inline __m256 High(__m512 v) {
  return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

constexpr int kSumBlock = 16;  // rows summed on their own before their sum joins the column's total

// The forward pass's softmax on transposed scores s [Lr, Lp] (row m: key m against every query l, base
// 2), N vectors of columns at a time: each column over the rows m < L -> 2^(s - max) in place, and the
// columns' max, sum and inv = 1 / sum into col_max, col_sum and inv (N vectors each). Every reduction
// runs down a column, lane by lane: no sums across lanes, each lane's sum over m in order, kSumBlock rows
// at a time (one chain of 231 additions was 9.5e-6 off float64 in the kernel's test, blocked 7.5e-6), so the
// 16- and 8-lane forms give the same bits; N chains side by side hide the adds' latency.
// One body for both widths (mm: the intrinsics' prefix; W: floats per vector; Exp: the matching 2^x), as
// labram_cpu's LABRAM_EXP2_NEG: the same operations lane by lane.
#define LABRAM_COLUMNS(Vector, mm, W, Exp)                                                                    \
  Vector mx[N], sum[N];                                                                                       \
  for (int j = 0; j < N; ++j) mx[j] = mm##_loadu_ps(s + W * j), sum[j] = mm##_setzero_ps();                   \
  for (int m = 1; m < z.L; ++m)                                                                               \
    for (int j = 0; j < N; ++j) mx[j] = mm##_max_ps(mm##_loadu_ps(s + (size_t)m * z.Lp + W * j), mx[j]);     \
  for (int m0 = 0; m0 < z.L; m0 += kSumBlock) {                                                               \
    Vector block[N];                                                                                          \
    for (int j = 0; j < N; ++j) block[j] = mm##_setzero_ps();                                                 \
    for (int m = m0; m < std::min(m0 + kSumBlock, z.L); ++m) {                                                \
      for (int j = 0; j < N; ++j) {                                                                           \
        float* at = s + (size_t)m * z.Lp + W * j;                                                             \
        const Vector e = labram_cpu::Exp(mm##_sub_ps(mm##_loadu_ps(at), mx[j]));                              \
        mm##_storeu_ps(at, e);                                                                                \
        block[j] = mm##_add_ps(block[j], e);                                                                  \
      }                                                                                                       \
    }                                                                                                         \
    for (int j = 0; j < N; ++j) sum[j] = mm##_add_ps(sum[j], block[j]);                                       \
  }                                                                                                           \
  for (int j = 0; j < N; ++j) {                                                                               \
    mm##_storeu_ps(col_max + W * j, mx[j]);                                                                   \
    mm##_storeu_ps(col_sum + W * j, sum[j]);                                                                  \
    mm##_storeu_ps(inv + W * j, mm##_div_ps(mm##_set1_ps(1.0f), sum[j]));                                     \
  }

template <int N>
__attribute__((target("avx512f"))) void WideColumns(const Sizes& z, float* s, float* col_max, float* col_sum,
                                                    float* inv) {
  LABRAM_COLUMNS(__m512, _mm512, 16, Exp2Neg16)
}

template <int N>
void Columns(const Sizes& z, float* s, float* col_max, float* col_sum, float* inv) {
  LABRAM_COLUMNS(__m256, _mm256, 8, Exp2Neg8)
}

#undef LABRAM_COLUMNS

// Transposed scores s [Lr, Lp] -> 2^(s - colmax) in place over rows m < L; col_max, col_sum and inv =
// 1 / col_sum [Lp], per query l: 64 columns at a time, then the last 16, 32 or 48 (AVX2: 32, then 16).
void ExponentiateColumns(const Sizes& z, float* s, float* col_max, float* col_sum, float* inv) {
  int c = 0;
  auto at = [&](auto group) { group(z, s + c, col_max + c, col_sum + c, inv + c); };
  if (z.wide) {
    for (; c + 64 <= z.Lp; c += 64) at(WideColumns<4>);
    if (z.Lp - c == 48) at(WideColumns<3>);
    if (z.Lp - c == 32) at(WideColumns<2>);
    if (z.Lp - c == 16) at(WideColumns<1>);
  } else {
    for (; c + 32 <= z.Lp; c += 32) at(Columns<4>);
    if (z.Lp - c == 16) at(Columns<2>);
  }
}

__attribute__((target("avx512f"))) void WideProbabilities(const Sizes& z, const float* row_max, const float* row_sum,
                                                          float* s) {
  for (int l = 0; l < z.L; ++l) {
    float* row = s + (size_t)l * z.Lp;
    const __m512 top = _mm512_set1_ps(row_max[l]), inv = _mm512_set1_ps(1.0f / row_sum[l]);
    for (int m = 0; m < z.Lp; m += 16)
      _mm512_storeu_ps(row + m, _mm512_mul_ps(labram_cpu::Exp2Neg16(_mm512_sub_ps(_mm512_loadu_ps(row + m), top)), inv));
  }
}

// Scores s [L, Lp] -> P = 2^(s - rowmax) / rowsum in place, from the forward pass's row_max, row_sum [L].
void Probabilities(const Sizes& z, const float* row_max, const float* row_sum, float* s) {
  if (z.wide) return WideProbabilities(z, row_max, row_sum, s);
  for (int l = 0; l < z.L; ++l) {
    float* row = s + (size_t)l * z.Lp;
    const __m256 top = _mm256_set1_ps(row_max[l]), inv = _mm256_set1_ps(1.0f / row_sum[l]);
    for (int m = 0; m < z.Lp; m += 8)
      _mm256_storeu_ps(row + m, _mm256_mul_ps(labram_cpu::Exp2Neg8(_mm256_sub_ps(_mm256_loadu_ps(row + m), top)), inv));
  }
}

__attribute__((target("avx512f"))) void WideScoreGradients(const Sizes& z, const float* p, float* g) {
  for (int l = 0; l < z.L; ++l) {
    float* gr = g + (size_t)l * z.Lp;
    const float* pr = p + (size_t)l * z.Lp;
    __m512 dot = _mm512_setzero_ps();
    for (int m = 0; m < z.Lp; m += 16) dot = _mm512_fmadd_ps(_mm512_loadu_ps(pr + m), _mm512_loadu_ps(gr + m), dot);
    const __m512 d = _mm512_set1_ps(SumOf(_mm256_add_ps(Low(dot), High(dot))));
    for (int m = 0; m < z.Lp; m += 16)
      _mm512_storeu_ps(gr + m, _mm512_mul_ps(_mm512_loadu_ps(pr + m), _mm512_sub_ps(_mm512_loadu_ps(gr + m), d)));
  }
}

// dP [L, Lp] -> dS = P * (dP - rowsum(P * dP)) in place, P [L, Lp] (both 0 past L).
void ScoreGradients(const Sizes& z, const float* p, float* g) {
  if (z.wide) return WideScoreGradients(z, p, g);
  for (int l = 0; l < z.L; ++l) {
    float* gr = g + (size_t)l * z.Lp;
    const float* pr = p + (size_t)l * z.Lp;
    __m256 d0 = _mm256_setzero_ps(), d1 = d0;  // two chains: FMA latency, not one per vector
    for (int m = 0; m < z.Lp; m += 16) {
      d0 = _mm256_fmadd_ps(_mm256_loadu_ps(pr + m), _mm256_loadu_ps(gr + m), d0);
      d1 = _mm256_fmadd_ps(_mm256_loadu_ps(pr + m + 8), _mm256_loadu_ps(gr + m + 8), d1);
    }
    const __m256 d = _mm256_set1_ps(SumOf(_mm256_add_ps(d0, d1)));
    for (int m = 0; m < z.Lp; m += 8)
      _mm256_storeu_ps(gr + m, _mm256_mul_ps(_mm256_loadu_ps(pr + m), _mm256_sub_ps(_mm256_loadu_ps(gr + m), d)));
  }
}

// bias [L] -> dst [Lp + 16] in base 2 (times log2 e), -inf past L (padding keys get no weight).
void PackBias(const Sizes& z, const float* bias, float* dst) {
  for (int m = 0; m < z.L; ++m) dst[m] = kLog2e * bias[m];
  for (int m = z.L; m < (int)z.Bias(); ++m) dst[m] = -INFINITY;
}

// How a head's q, k and v rows of the fused projection become the attention's operands: per slot
// s (0 q, 1 k, 2 v), y = gamma[s] * t(x) + beta[s] over the K values of a row, with t the
// normalisation (x - mean) / sqrt(var + eps) (a LayerNorm's) where normalize[s], else x.
struct Transform {
  const float* gamma[3];  // [K] each
  const float* beta[3];   // [K] each
  bool normalize[3];
  float eps;
};

// A row's first K of NV * 8 lanes: the mask of maskload, and 1.0 / 0.0 to multiply by.
template <int NV>
struct Lanes {
  int K;
  __m256i load[NV];
  __m256 ones[NV];
  explicit Lanes(int K) : K(K) {
    for (int j = 0; j < NV; ++j) {
      const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(8 * j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      load[j] = _mm256_cmpgt_epi32(_mm256_set1_epi32(K), lane);
      ones[j] = _mm256_and_ps(_mm256_castsi256_ps(load[j]), _mm256_set1_ps(1.0f));
    }
  }
  // Vector j of a row x, zero past K, never reading past x[K - 1]. A whole vector, or 4 floats (K = 20's
  // last), by plain loads: a masked load of a row in XLA's buffer (K = 20's last, half of it the next
  // head's floats) took ~30 % of PackTransformed's samples (session 38).
  __m256 Load(const float* x, int j) const {
    if (K - 8 * j >= 8) return _mm256_loadu_ps(x);
    if (K - 8 * j == 4) return _mm256_zextps128_ps256(_mm_loadu_ps(x));
    return _mm256_maskload_ps(x, load[j]);
  }
};

// out lane r = the sum of v[r]'s 8 lanes, for 8 vectors v[0..7].
inline __m256 Sum8x8(const __m256* v) {
  const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // v0-3: low | high halves
  const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // v4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// scale * (gamma * t(x) + beta) of slot s for x [L, K] (rows z.ld apart) -> dst [Lr, Kp], zero padded;
// t(x) [L, Kp] (zero past K) into x_hat and each row's 1 / sqrt(var + eps) into rstd [L] (1 where not
// normalised). Normalised rows go 8 at a time, their sums reduced together (a row's reductions one
// after the other are a chain of latencies: ~100 cycles a row).
template <int NV>
void PackTransformed(const Sizes& z, const Transform& t, int s, const float* x, float scale, float* dst,
                     float* x_hat, float* rstd) {
  const Lanes<NV> m(z.K);
  __m256 g[NV], b[NV];
  for (int j = 0; j < NV; ++j) {
    g[j] = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_maskload_ps(t.gamma[s] + 8 * j, m.load[j]));
    b[j] = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_maskload_ps(t.beta[s] + 8 * j, m.load[j]));
  }
  auto row = [&](int l) { return x_hat + (size_t)l * z.Kp; };
  auto finish = [&](int l, __m256 r) {  // x_hat row l *= r; dst row l
    for (int j = 0; j < NV; ++j) {
      const __m256 h = _mm256_mul_ps(_mm256_loadu_ps(row(l) + 8 * j), r);
      _mm256_storeu_ps(row(l) + 8 * j, h);
      _mm256_storeu_ps(dst + (size_t)l * z.Kp + 8 * j, _mm256_fmadd_ps(g[j], h, b[j]));
    }
  };
  const __m256 inv_k = _mm256_set1_ps(1.0f / z.K);
  for (int l0 = 0; l0 < z.L; l0 += 8) {
    const int n = std::min(8, z.L - l0);
    __m256 sums[8];
    for (int r = 0; r < 8; ++r) {
      if (l0 + r + kPrefetchRows < z.L) labram_cpu::Prefetch(x + (size_t)(l0 + r + kPrefetchRows) * z.ld, z.K);
      sums[r] = _mm256_setzero_ps();
      for (int j = 0; r < n && j < NV; ++j) {
        const __m256 v = m.Load(x + (size_t)(l0 + r) * z.ld + 8 * j, j);
        _mm256_storeu_ps(row(l0 + r) + 8 * j, v);
        sums[r] = _mm256_add_ps(sums[r], v);
      }
    }
    if (!t.normalize[s]) {
      for (int r = 0; r < n; ++r) finish(l0 + r, _mm256_set1_ps(1.0f)), rstd[l0 + r] = 1.0f;
      continue;
    }
    alignas(32) float mean[8], rs[8];
    _mm256_store_ps(mean, _mm256_mul_ps(Sum8x8(sums), inv_k));
    for (int r = 0; r < 8; ++r) {  // two passes, as the LayerNorm kernel
      sums[r] = _mm256_setzero_ps();
      for (int j = 0; r < n && j < NV; ++j) {
        const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row(l0 + r) + 8 * j), _mm256_set1_ps(mean[r])),
                                       m.ones[j]);
        _mm256_storeu_ps(row(l0 + r) + 8 * j, d);
        sums[r] = _mm256_fmadd_ps(d, d, sums[r]);
      }
    }
    const __m256 var = _mm256_fmadd_ps(Sum8x8(sums), inv_k, _mm256_set1_ps(t.eps));
    _mm256_store_ps(rs, _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_sqrt_ps(var)));
    for (int r = 0; r < n; ++r) finish(l0 + r, _mm256_set1_ps(rs[r])), rstd[l0 + r] = rs[r];
  }
  std::memset(dst + (size_t)z.L * z.Kp, 0, sizeof(float) * (z.Lr - z.L) * z.Kp);
}

// The gradient of slot s's transform: dy [L, Kp] (rows Kp apart, zero past K) with respect to its
// output, x_hat and rstd from PackTransformed -> dx [L, K] (rows z.ld apart); d_gamma [K] =
// sum(dy * x_hat) and d_beta [K] = sum(dy) over the rows. Rows 8 at a time, as PackTransformed.
template <int NV>
void Untransform(const Sizes& z, const Transform& t, int s, const float* dy, const float* x_hat, const float* rstd,
                 float* dx, float* d_gamma, float* d_beta) {
  const Lanes<NV> m(z.K);
  __m256 g[NV], dg[NV], db[NV];
  for (int j = 0; j < NV; ++j) {
    g[j] = _mm256_maskload_ps(t.gamma[s] + 8 * j, m.load[j]);
    dg[j] = db[j] = _mm256_setzero_ps();
  }
  alignas(32) float gd[8][NV * 8];  // dy * gamma of 8 rows, then dx
  const __m256 inv_k = _mm256_set1_ps(1.0f / z.K);
  for (int l0 = 0; l0 < z.L; l0 += 8) {
    const int n = std::min(8, z.L - l0);
    __m256 s1[8], s2[8];  // per row: sum(gd), sum(gd * x_hat)
    for (int r = 0; r < 8; ++r) {
      s1[r] = s2[r] = _mm256_setzero_ps();
      for (int j = 0; r < n && j < NV; ++j) {
        const __m256 d = _mm256_loadu_ps(dy + (size_t)(l0 + r) * z.Kp + 8 * j);
        const __m256 h = _mm256_loadu_ps(x_hat + (size_t)(l0 + r) * z.Kp + 8 * j);
        dg[j] = _mm256_fmadd_ps(d, h, dg[j]);
        db[j] = _mm256_add_ps(db[j], d);
        const __m256 e = _mm256_mul_ps(d, g[j]);
        _mm256_store_ps(gd[r] + 8 * j, e);
        s1[r] = _mm256_add_ps(s1[r], e);
        s2[r] = _mm256_fmadd_ps(e, h, s2[r]);
      }
    }
    if (t.normalize[s]) {  // dx = rstd (gd - mean(gd) - x_hat mean(gd x_hat))
      alignas(32) float m1[8], m2[8];
      _mm256_store_ps(m1, _mm256_mul_ps(Sum8x8(s1), inv_k));
      _mm256_store_ps(m2, _mm256_mul_ps(Sum8x8(s2), inv_k));
      for (int r = 0; r < n; ++r) {
        const __m256 a = _mm256_set1_ps(m1[r]), c = _mm256_set1_ps(m2[r]), rs = _mm256_set1_ps(rstd[l0 + r]);
        for (int j = 0; j < NV; ++j) {
          const __m256 h = _mm256_loadu_ps(x_hat + (size_t)(l0 + r) * z.Kp + 8 * j);
          const __m256 e = _mm256_sub_ps(_mm256_load_ps(gd[r] + 8 * j), a);
          _mm256_store_ps(gd[r] + 8 * j, _mm256_mul_ps(rs, _mm256_fnmadd_ps(h, c, e)));
        }
      }
    }
    PrefetchRows(dx, z.ld, std::min(l0 + kPrefetchRows, z.L), std::min(l0 + kPrefetchRows + 8, z.L), z.K);
    for (int r = 0; r < n; ++r) StoreRow(dx + (size_t)(l0 + r) * z.ld, gd[r], z.K);
  }
  alignas(32) float sums[NV * 8];
  for (int j = 0; j < NV; ++j) _mm256_store_ps(sums + 8 * j, dg[j]);
  std::memcpy(d_gamma, sums, z.K * sizeof(float));
  for (int j = 0; j < NV; ++j) _mm256_store_ps(sums + 8 * j, db[j]);
  std::memcpy(d_beta, sums, z.K * sizeof(float));
}

struct Forward {
  static size_t WorkFloats(const Sizes& z) {
    return z.Wide() + 4 * z.Narrow() + z.Square() + z.Bias() + 3 * z.Columns();
  }

  struct Work {
    float *qt, *vp, *qp, *kp, *hat, *s, *bp, *mx, *sum, *inv;
  };
  static Work Split(const Sizes& z, float* work) {
    Work w;
    w.qt = work;               // q^T [K, Lp]
    w.vp = w.qt + z.Wide();    // v [Lr, Kp]
    w.qp = w.vp + z.Narrow();  // q [Lr, Kp]
    w.kp = w.qp + z.Narrow();  // k [Lr, Kp]
    w.hat = w.kp + z.Narrow(); // t(x) [Lr, Kp] (the fused projection's; only the backward pass keeps it)
    w.s = w.hat + z.Narrow();  // transposed scores, then exp [Lr, Lp]
    w.bp = w.s + z.Square();   // bias [Lp + 16]
    w.mx = w.bp + z.Bias();    // the max, sum and 1 / sum of each query's scores [Lp + 32]
    w.sum = w.mx + z.Columns();
    w.inv = w.sum + z.Columns();
    return w;
  }

  // From the packed operands in w (qp scaled by scale log2 e, bp by log2 e) -> out [L, K] (rows ld apart),
  // row_max (base 2), row_sum [L].
  template <int NV>
  static void Attend(const Sizes& z, const Work& w, float* out, int64_t ld, float* row_max, float* row_sum) {
    PackColumns(z, w.qp, w.qt, z.Kp);
    ProductNT<true>(z, w.kp, w.qt, w.bp, w.s);  // S^T
    ExponentiateColumns(z, w.s, w.mx, w.sum, w.inv);
    ProductTN(z, w.s, w.vp, 1.0f, w.inv, out, ld);  // out = diag(1 / sum) E v
    std::memcpy(row_max, w.mx, sizeof(float) * z.L);
    std::memcpy(row_sum, w.sum, sizeof(float) * z.L);
  }

  // One (batch, head). q, k, v [L, K] (rows z.ld apart), bias [L] -> out [L, K] (rows out_ld apart),
  // row_max, row_sum [L] of the scores scale * q k^T + bias.
  template <int NV>
  static void Head(const Sizes& z, float scale, const float* q, const float* k, const float* v, const float* bias,
                   float* out, int64_t out_ld, float* row_max, float* row_sum, float* work) {
    const Work w = Split(z, work);
    PackRows(z, k, z.ld, w.kp);
    PackRows(z, v, z.ld, w.vp);
    PackRows(z, q, z.ld, w.qp, scale * kLog2e);
    PackBias(z, bias, w.bp);
    Attend<NV>(z, w, out, out_ld, row_max, row_sum);
  }

  // One (batch, head) of the fused projection: x[s] its q, k, v rows [L, K] (z.ld apart) before the
  // transform t, bias [L] -> out [L, K] (rows out_ld apart), row_max, row_sum [L].
  template <int NV>
  static void QkvHead(const Sizes& z, const Transform& t, float scale, const float* const* x, const float* bias,
                      float* out, int64_t out_ld, float* row_max, float* row_sum, float* work) {
    const Work w = Split(z, work);
    // t(x) and 1 / std, which only the backward pass keeps, into scratch (1 / std: 1 / row sum's buffer)
    PackTransformed<NV>(z, t, 0, x[0], scale * kLog2e, w.qp, w.hat, w.inv);
    PackTransformed<NV>(z, t, 1, x[1], 1.0f, w.kp, w.hat, w.inv);
    PackTransformed<NV>(z, t, 2, x[2], 1.0f, w.vp, w.hat, w.inv);
    PackBias(z, bias, w.bp);
    Attend<NV>(z, w, out, out_ld, row_max, row_sum);
  }
};

struct Backward {
  static size_t WorkFloats(const Sizes& z) {
    return 2 * z.Wide() + 10 * z.Narrow() + 2 * z.Square() + z.Bias() + 4 * (size_t)z.Lp;
  }

  struct Work {
    float *kt, *vt, *qp, *kp, *gp, *p, *ds, *bp, *zero;
    float *vp, *hat[3], *rstd[3], *grad[3];  // the fused projection's: v rows, t(x), 1 / std, d of the transforms' outputs
  };
  static Work Split(const Sizes& z, float* work) {
    Work w;
    w.kt = work;                // k^T [K, Lp]
    w.vt = w.kt + z.Wide();     // v^T [K, Lp]
    w.qp = w.vt + z.Wide();     // q [Lr, Kp]
    w.kp = w.qp + z.Narrow();   // k [Lr, Kp]
    w.gp = w.kp + z.Narrow();   // dO [Lr, Kp]
    w.p = w.gp + z.Narrow();    // P [Lr, Lp]
    w.ds = w.p + z.Square();    // dP, then dS [Lr, Lp]
    w.bp = w.ds + z.Square();   // bias [Lp]
    w.zero = w.bp + z.Bias();   // [Lp]
    w.vp = w.zero + z.Lp;       // v [Lr, Kp]
    float* next = w.vp + z.Narrow();
    for (int s = 0; s < 3; ++s, next += z.Lp) w.rstd[s] = next;  // [L <= Lp]
    for (int s = 0; s < 3; ++s, next += z.Narrow()) w.hat[s] = next;  // [Lr, Kp]
    for (int s = 0; s < 3; ++s, next += z.Narrow()) w.grad[s] = next;  // [Lr, Kp]
    return w;
  }

  // From the packed operands in w (qp scaled by scale log2 e, bp by log2 e; kp, kt, vt, gp, zero) and the
  // forward's row_max, row_sum [L] -> dq, dk, dv [L, K] (rows ld apart; dq with respect to the unscaled q).
  template <int NV>
  static void Gradients(const Sizes& z, float scale, const Work& w, const float* row_max, const float* row_sum,
                        float* dq, float* dk, float* dv, int64_t ld) {
    ProductNT<false>(z, w.qp, w.kt, w.bp, w.p);  // S
    Probabilities(z, row_max, row_sum, w.p);  // P = exp(S - max) / sum
    ProductTN(z, w.p, w.gp, 1.0f, nullptr, dv, ld);  // dV = P^T dO
    ProductNT<false>(z, w.gp, w.vt, w.zero, w.ds);  // dP = dO v^T
    ScoreGradients(z, w.p, w.ds);  // dS = P * (dP - rowsum(P * dP))
    ProductNN<NV>(z, w.ds, w.kp, scale, dq, ld);  // dQ = scale dS k
    ProductTN(z, w.ds, w.qp, 1.0f / kLog2e, nullptr, dk, ld);  // dK = dS^T (scale q)
  }

  // One (batch, head): the forward's inputs, d_out [L, K] (rows out_ld apart), row_max, row_sum [L] ->
  // dq, dk, dv [L, K] (rows z.ld apart, as q, k, v; dq with respect to the unscaled q).
  template <int NV>
  static void Head(const Sizes& z, float scale, const float* q, const float* k, const float* v, const float* bias,
                   const float* d_out, int64_t out_ld, const float* row_max, const float* row_sum, float* dq,
                   float* dk, float* dv, float* work) {
    const Work w = Split(z, work);
    PackRows(z, k, z.ld, w.kp);
    PackColumns(z, w.kp, w.kt, z.Kp);  // from the rows just packed, in cache
    PackColumns(z, v, w.vt, z.ld);
    PackRows(z, q, z.ld, w.qp, scale * kLog2e);
    PackRows(z, d_out, out_ld, w.gp);
    PackBias(z, bias, w.bp);
    std::memset(w.zero, 0, sizeof(float) * z.Lp);
    Gradients<NV>(z, scale, w, row_max, row_sum, dq, dk, dv, z.ld);
  }

  // One (batch, head) of the fused projection: Forward::QkvHead's inputs, d_out [L, K] (rows out_ld
  // apart), row_max, row_sum [L] -> dx[s] [L, K] (rows z.ld apart: the head's slots of the gradient
  // with respect to qkv); d_affine [2, 3, K] = the gradients of gamma, then beta, of each slot.
  template <int NV>
  static void QkvHead(const Sizes& z, const Transform& t, float scale, const float* const* x, const float* bias,
                      const float* d_out, int64_t out_ld, const float* row_max, const float* row_sum,
                      float* const* dx, float* d_affine, float* work) {
    const Work w = Split(z, work);
    PackTransformed<NV>(z, t, 0, x[0], scale * kLog2e, w.qp, w.hat[0], w.rstd[0]);
    PackTransformed<NV>(z, t, 1, x[1], 1.0f, w.kp, w.hat[1], w.rstd[1]);
    PackColumns(z, w.kp, w.kt, z.Kp);
    PackTransformed<NV>(z, t, 2, x[2], 1.0f, w.vp, w.hat[2], w.rstd[2]);
    PackColumns(z, w.vp, w.vt, z.Kp);
    PackRows(z, d_out, out_ld, w.gp);
    PackBias(z, bias, w.bp);
    std::memset(w.zero, 0, sizeof(float) * z.Lp);
    Gradients<NV>(z, scale, w, row_max, row_sum, w.grad[0], w.grad[1], w.grad[2], z.Kp);
    std::memset(d_affine, 0, sizeof(float) * 6 * z.K);
    for (int s = 0; s < 3; ++s)
      Untransform<NV>(z, t, s, w.grad[s], w.hat[s], w.rstd[s], dx[s], d_affine + s * z.K, d_affine + (3 + s) * z.K);
  }
};

// Checks q's shape ([..., H, L, K], or [..., L, H, K] token-major) against the other such buffers and bias
// [..., L]; fills sizes, the number of (batch, head) pairs and H. An empty string when they fit.
std::string CheckShapes(ffi::Span<const int64_t> d, std::initializer_list<ffi::Span<const int64_t>> same,
                        size_t bias_elements, bool token_major, Sizes* z, int64_t* pairs, int64_t* heads) {
  const char* layout = token_major ? "[..., L, H, K]" : "[..., H, L, K]";
  if (d.size() < 3) return std::string("q must have shape ") + layout;
  for (const auto& other : same) {
    bool equal = other.size() == d.size();
    for (size_t i = 0; equal && i < d.size(); ++i) equal = other[i] == d[i];
    if (!equal)
      return std::string("q, k, v and out (forward), or q, k, v, d_out, dq, dk and dv (backward), must share ") +
             "one shape " + layout;
  }
  const int r = (int)d.size();
  const int64_t L = token_major ? d[r - 3] : d[r - 2], K = d[r - 1];
  *heads = token_major ? d[r - 2] : d[r - 3];
  if (K < 1 || K > 32) return "head size must be 1..32, got " + std::to_string(K);
  int64_t batch = 1;
  for (int i = 0; i < r - 3; ++i) batch *= d[i];
  *pairs = batch * *heads;
  if ((int64_t)bias_elements != batch * L) return "bias must have shape [..., L] (q's leading dims without H)";
  *z = Sizes{(int)L, (int)K, token_major ? *heads * K : K, (int)((L + 15) / 16 * 16), (int)((L + 11) / 12 * 12),
             (int)((K + 7) / 8 * 8)};
  return "";
}

// Runs fn(i, work) for the (batch, head) pairs i in [0, pairs) on XLA's thread pool, in contiguous chunks
// (labram_cpu::ForEachChunk: large first, small last), so a thread's consecutive pairs are neighbouring
// heads of one sample. In the token-major buffers those share cache lines (a head's K = 20 floats are 80
// bytes of a row, so most lines hold two heads' floats): pairs claimed one at a time sent neighbouring
// heads to both cores, each fetching the lines they share and both writing the lines of out (or d_qkv)
// they share. In chunks, fine-tuning steps 1.013x as fast, tokenizer steps 1.004x (session 46).
template <typename Fn>
void ForEachPair(ffi::ThreadPool& pool, int64_t pairs, size_t work_floats, Fn fn) {
  labram_cpu::ForEachChunk(pool, pairs, 1, work_floats, /*zeroed=*/true, [&](int64_t i0, int64_t i1, float* work) {
    for (int64_t i = i0; i < i1; ++i) fn(i, work);
  });
}

// Where (batch, head) pair i starts in q, k, v, out and their gradients.
int64_t PairOffset(const Sizes& z, int64_t i, int64_t heads, bool token_major) {
  return token_major ? (i / heads) * z.L * z.ld + (i % heads) * z.K : i * z.L * z.K;
}

template <template <int> class Pick>
auto ByVectors(int kp) {
  switch (kp / 8) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    default: return Pick<4>::fn;
  }
}

template <int NV> struct ForwardHead { static constexpr auto fn = &Forward::Head<NV>; };
template <int NV> struct BackwardHead { static constexpr auto fn = &Backward::Head<NV>; };
template <int NV> struct QkvForwardHead { static constexpr auto fn = &Forward::QkvHead<NV>; };
template <int NV> struct QkvBackwardHead { static constexpr auto fn = &Backward::QkvHead<NV>; };

ffi::Error AttentionForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> row_sum,
                            bool token_major, float scale, bool wide, ffi::ThreadPool pool) {
  Sizes z;
  int64_t pairs, heads;
  std::string bad = CheckShapes(q.dimensions(), {k.dimensions(), v.dimensions(), out->dimensions()},
                                bias.element_count(), token_major, &z, &pairs, &heads);
  if (bad.empty()) bad = labram_cpu::WideRefusal(wide, "attention");
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  z.wide = wide;
  if (pairs == 0 || z.L == 0) return ffi::Error::Success();
  const auto head = ByVectors<ForwardHead>(z.Kp);
  ForEachPair(pool, pairs, Forward::WorkFloats(z), [&](int64_t i, float* work) {
    const int64_t at = PairOffset(z, i, heads, token_major);
    head(z, scale, q.typed_data() + at, k.typed_data() + at, v.typed_data() + at,
         bias.typed_data() + (i / heads) * z.L, out->typed_data() + at, z.ld, row_max->typed_data() + i * z.L,
         row_sum->typed_data() + i * z.L, work);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> d_out,
                             ffi::Buffer<ffi::F32> row_max, ffi::Buffer<ffi::F32> row_sum,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, bool token_major, float scale, bool wide,
                             ffi::ThreadPool pool) {
  Sizes z;
  int64_t pairs, heads;
  std::string bad = CheckShapes(q.dimensions(), {k.dimensions(), v.dimensions(), d_out.dimensions(),
                                                 dq->dimensions(), dk->dimensions(), dv->dimensions()},
                                bias.element_count(), token_major, &z, &pairs, &heads);
  if (bad.empty()) bad = labram_cpu::WideRefusal(wide, "attention");
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  z.wide = wide;
  if (pairs == 0 || z.L == 0) return ffi::Error::Success();
  const auto head = ByVectors<BackwardHead>(z.Kp);
  ForEachPair(pool, pairs, Backward::WorkFloats(z), [&](int64_t i, float* work) {
    const int64_t at = PairOffset(z, i, heads, token_major);
    head(z, scale, q.typed_data() + at, k.typed_data() + at, v.typed_data() + at,
         bias.typed_data() + (i / heads) * z.L, d_out.typed_data() + at, z.ld,
         row_max.typed_data() + i * z.L, row_sum.typed_data() + i * z.L, dq->typed_data() + at,
         dk->typed_data() + at, dv->typed_data() + at, work);
  });
  return ffi::Error::Success();
}


// Checks the fused projection's qkv [..., L, 3, H, K] against out (or d_out) [..., L, H, K], bias
// [..., L] and gamma, beta [3, H, K] (or both empty: no transform, which normalising q or k needs);
// fills sizes (rows 3 H K apart), the number of (batch, head) pairs and H. An empty string when they fit.
std::string CheckQkvShapes(ffi::Span<const int64_t> d, ffi::Span<const int64_t> out, size_t bias_elements,
                           size_t gamma_elements, size_t beta_elements, bool normalize, Sizes* z, int64_t* pairs,
                           int64_t* heads) {
  const int r = (int)d.size();
  if (r < 4 || d[r - 3] != 3) return "qkv must have shape [..., L, 3, H, K]";
  bool equal = (int)out.size() == r - 1;
  for (int i = 0; equal && i < r - 1; ++i) equal = out[i] == (i < r - 3 ? d[i] : d[i + 1]);
  if (!equal) return "out (or d_out) must have shape [..., L, H, K] for qkv [..., L, 3, H, K]";
  const int64_t L = d[r - 4], K = d[r - 1];
  *heads = d[r - 2];
  if (K < 1 || K > 32) return "head size must be 1..32, got " + std::to_string(K);
  const bool affine = gamma_elements != 0 || beta_elements != 0;
  if (affine && ((int64_t)gamma_elements != 3 * *heads * K || (int64_t)beta_elements != 3 * *heads * K))
    return "gamma and beta must have shape [3, H, K], or both no elements (no transform)";
  if (!affine && normalize) return "normalize_q or normalize_k needs gamma and beta of shape [3, H, K]";
  int64_t batch = 1;
  for (int i = 0; i < r - 4; ++i) batch *= d[i];
  *pairs = batch * *heads;
  if ((int64_t)bias_elements != batch * L) return "bias must have shape [..., L] (qkv's leading dims)";
  *z = Sizes{(int)L, (int)K, 3 * *heads * K, (int)((L + 15) / 16 * 16), (int)((L + 11) / 12 * 12),
             (int)((K + 7) / 8 * 8)};
  return "";
}

// Pair i's transform (its head's gamma and beta rows; null without them) and where its q, k, v rows
// start in qkv (or its gradient) and in out (or d_out).
struct QkvPair {
  Transform t;
  int64_t slot[3], out;
  QkvPair(const Sizes& z, int64_t i, int64_t heads, const float* gamma, const float* beta, bool normalize_q,
          bool normalize_k, float eps) {
    const int64_t b = i / heads, h = i % heads;
    for (int s = 0; s < 3; ++s) {
      t.gamma[s] = gamma ? gamma + (s * heads + h) * z.K : nullptr;
      t.beta[s] = beta ? beta + (s * heads + h) * z.K : nullptr;
      slot[s] = b * z.L * z.ld + s * heads * z.K + h * z.K;
    }
    t.normalize[0] = normalize_q, t.normalize[1] = normalize_k, t.normalize[2] = false;
    t.eps = eps;
    out = b * z.L * heads * z.K + h * z.K;
  }
};

ffi::Error QkvAttentionForward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> gamma,
                               ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> out,
                               ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> row_sum,
                               bool normalize_q, bool normalize_k, float eps, float scale, bool wide,
                               ffi::ThreadPool pool) {
  Sizes z;
  int64_t pairs, heads;
  std::string bad = CheckQkvShapes(qkv.dimensions(), out->dimensions(), bias.element_count(), gamma.element_count(),
                                   beta.element_count(), normalize_q || normalize_k, &z, &pairs, &heads);
  if (bad.empty()) bad = labram_cpu::WideRefusal(wide, "attention");
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  z.wide = wide;
  if (pairs == 0 || z.L == 0) return ffi::Error::Success();
  const bool affine = gamma.element_count() != 0;
  const auto head = ByVectors<QkvForwardHead>(z.Kp);
  const auto plain = ByVectors<ForwardHead>(z.Kp);  // no transform: q, k, v packed as they are
  const int64_t out_ld = heads * z.K;
  ForEachPair(pool, pairs, Forward::WorkFloats(z), [&](int64_t i, float* work) {
    const QkvPair at(z, i, heads, affine ? gamma.typed_data() : nullptr, affine ? beta.typed_data() : nullptr,
                     normalize_q, normalize_k, eps);
    const float* x[3] = {qkv.typed_data() + at.slot[0], qkv.typed_data() + at.slot[1], qkv.typed_data() + at.slot[2]};
    float* const o = out->typed_data() + at.out;
    const float* const b = bias.typed_data() + (i / heads) * z.L;
    if (affine) {
      head(z, at.t, scale, x, b, o, out_ld, row_max->typed_data() + i * z.L, row_sum->typed_data() + i * z.L, work);
    } else {
      plain(z, scale, x[0], x[1], x[2], b, o, out_ld, row_max->typed_data() + i * z.L, row_sum->typed_data() + i * z.L,
            work);
    }
  });
  return ffi::Error::Success();
}

ffi::Error QkvAttentionBackward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> gamma,
                                ffi::Buffer<ffi::F32> beta, ffi::Buffer<ffi::F32> d_out,
                                ffi::Buffer<ffi::F32> row_max, ffi::Buffer<ffi::F32> row_sum,
                                ffi::ResultBuffer<ffi::F32> d_qkv, ffi::ResultBuffer<ffi::F32> d_affine,
                                bool normalize_q, bool normalize_k, float eps, float scale, bool wide,
                                ffi::ThreadPool pool) {
  Sizes z;
  int64_t pairs, heads;
  std::string bad = CheckQkvShapes(qkv.dimensions(), d_out.dimensions(), bias.element_count(), gamma.element_count(),
                                   beta.element_count(), normalize_q || normalize_k, &z, &pairs, &heads);
  const bool affine = gamma.element_count() != 0;
  if (bad.empty() && d_qkv->element_count() != qkv.element_count()) bad = "d_qkv must have qkv's shape";
  if (bad.empty() && (int64_t)d_affine->element_count() != (affine ? pairs * 6 * z.K : 0))
    bad = affine ? "d_affine must have shape [..., H, 2, 3, K]" : "d_affine must have no elements (no gamma, beta)";
  if (bad.empty()) bad = labram_cpu::WideRefusal(wide, "attention");
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  z.wide = wide;
  if (pairs == 0 || z.L == 0) return ffi::Error::Success();
  const auto head = ByVectors<QkvBackwardHead>(z.Kp);
  const auto plain = ByVectors<BackwardHead>(z.Kp);  // no transform: the gradients written straight into d_qkv
  const int64_t out_ld = heads * z.K;
  ForEachPair(pool, pairs, Backward::WorkFloats(z), [&](int64_t i, float* work) {
    const QkvPair at(z, i, heads, affine ? gamma.typed_data() : nullptr, affine ? beta.typed_data() : nullptr,
                     normalize_q, normalize_k, eps);
    const float* x[3] = {qkv.typed_data() + at.slot[0], qkv.typed_data() + at.slot[1], qkv.typed_data() + at.slot[2]};
    float* dx[3] = {d_qkv->typed_data() + at.slot[0], d_qkv->typed_data() + at.slot[1],
                    d_qkv->typed_data() + at.slot[2]};
    const float* const b = bias.typed_data() + (i / heads) * z.L;
    const float* const d_o = d_out.typed_data() + at.out;
    if (affine) {
      head(z, at.t, scale, x, b, d_o, out_ld, row_max.typed_data() + i * z.L, row_sum.typed_data() + i * z.L, dx,
           d_affine->typed_data() + i * 6 * z.K, work);
    } else {
      plain(z, scale, x[0], x[1], x[2], b, d_o, out_ld, row_max.typed_data() + i * z.L, row_sum.typed_data() + i * z.L,
            dx[0], dx[1], dx[2], work);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row max of the scores
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row sum of exp(scores - row max)
                                  .Attr<bool>("token_major")     // [..., L, H, K] instead of [..., H, L, K]
                                  .Attr<float>("scale")          // of q in the scores
                                  .Attr<bool>("wide")            // the products' AVX-512 forms
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row max
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Attr<bool>("token_major")
                                  .Attr<float>("scale")
                                  .Attr<bool>("wide")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramQkvAttentionForward, QkvAttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv [..., L, 3, H, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [..., L]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma [3, H, K], or [0]: no transform
                                  .Arg<ffi::Buffer<ffi::F32>>()  // beta [3, H, K], or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [..., L, H, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row max of the scores
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row sum of exp(scores - row max)
                                  .Attr<bool>("normalize_q")     // q's rows normalised over K before gamma, beta
                                  .Attr<bool>("normalize_k")
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")          // of the transformed q in the scores
                                  .Attr<bool>("wide")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramQkvAttentionBackward, QkvAttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gamma
                                  .Arg<ffi::Buffer<ffi::F32>>()  // beta
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row max
                                  .Arg<ffi::Buffer<ffi::F32>>()  // row sum
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_qkv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_affine [..., H, 2, 3, K] (d gamma, d beta), or [0]
                                  .Attr<bool>("normalize_q")
                                  .Attr<bool>("normalize_k")
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<bool>("wide")
                                  .Ctx<ffi::ThreadPool>());
