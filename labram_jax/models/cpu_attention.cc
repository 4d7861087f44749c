// Softmax attention for x86 CPUs with AVX2 and FMA, forward and backward, as XLA FFI handlers.
//
// Forward, per (batch, head): S = scale q k^T + bias, E = exp(S - rowmax), out = E v / rowsum;
// rowmax and rowsum are returned for the backward pass, which recomputes
// P = exp(S - rowmax) / rowsum and gives dV = P^T dO, dP = dO v^T, dS = P * (dP - rowsum(P * dP)),
// dQ = scale dS k, dK = dS^T (scale q). (rowsum(P * dP) is rowsum(dO * out), taken from the [L, L]
// rows in cache rather than from out, which the backward pass would read cold from memory.) One
// (batch, head) is computed at a time in a per-thread workspace, so the [L, L] matrices stay in the
// core's cache instead of going to memory between XLA's operations. Built and loaded by cpu_kernels.py.
//
// Shapes: q, k, v, out, dO, dq, dk, dv [..., H, L, K] float32 with K <= 32, or [..., L, H, K] with
// the attribute token_major (the layout of a [..., L, H * K] projection: no transposes around the
// kernel); bias [..., L] float32 (the leading dims of q without H, L, K); rowmax, rowsum [..., H, L].

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

inline float MaxOf(__m256 v) {
  alignas(32) float b[8];
  _mm256_store_ps(b, v);
  float m = b[0];
  for (int i = 1; i < 8; ++i) m = b[i] > m ? b[i] : m;
  return m;
}

inline float SumOf(__m256 v) {
  alignas(32) float b[8];
  _mm256_store_ps(b, v);
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += b[i];
  return s;
}

constexpr int kRowTile = 6;  // rows per register tile of an [L, L] product (6 x 16 floats: 12 registers)

struct Sizes {
  int L, K;
  int64_t ld;  // floats between a head's consecutive rows in q, k, v, out (K heads-major, H * K token-major)
  int Lp;  // L padded to 16: columns of the [L, L] buffers
  int Lr;  // L padded to 12: rows (a multiple of every row tile)
  int Kp;  // K padded to 8
  size_t Square() const { return (size_t)Lr * Lp + 16; }  // an [Lr, Lp] buffer (+ slack for reads past a row)
  size_t Narrow() const { return (size_t)Lr * Kp; }       // an [Lr, Kp] buffer
  size_t Wide() const { return (size_t)K * Lp; }          // a transposed [K, Lp] buffer
};

// scale * x [L, K] (rows z.ld apart) -> dst [Lr, Kp], zero padded.
void PackRows(const Sizes& z, const float* x, float* dst, float scale = 1.0f) {
  std::memset(dst, 0, sizeof(float) * z.Narrow());
  for (int l = 0; l < z.L; ++l)
    for (int c = 0; c < z.K; ++c) dst[(size_t)l * z.Kp + c] = scale * x[(size_t)l * z.ld + c];
}

// x [L, K] (rows ld apart: z.ld for a buffer of the call, z.Kp for one packed by PackRows) -> dst
// [K, Lp] (transposed), zero padded.
void PackColumns(const Sizes& z, const float* x, float* dst, int64_t ld) {
  for (int c = 0; c < z.K; ++c) {
    for (int m = 0; m < z.L; ++m) dst[(size_t)c * z.Lp + m] = x[(size_t)m * ld + c];
    for (int m = z.L; m < z.Lp; ++m) dst[(size_t)c * z.Lp + m] = 0.f;
  }
}

// c [Lr, Lp] = a [Lr, Kp] . bt [K, Lp] + init [Lp] (added to every row).
void ProductNT(const Sizes& z, const float* a, const float* bt, const float* init, float* c) {
  const int K = z.K, Lp = z.Lp, Kp = z.Kp;
  for (int l0 = 0; l0 < z.Lr; l0 += kRowTile) {
    const float* ar = a + (size_t)l0 * Kp;
    for (int m0 = 0; m0 < Lp; m0 += 16) {
      __m256 c0[kRowTile], c1[kRowTile];
      const __m256 i0 = _mm256_loadu_ps(init + m0), i1 = _mm256_loadu_ps(init + m0 + 8);
      for (int r = 0; r < kRowTile; ++r) c0[r] = i0, c1[r] = i1;
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

// out [L, K] (rows z.ld apart) = scale * row_scale[l] * sum_{m < L} a[l, m] b[m, :], a [Lr, Lp],
// b [Lr, NV * 8] (row_scale: none = 1).
template <int NV>
void ProductNN(const Sizes& z, const float* a, const float* b, const float* row_scale, float scale, float* out) {
  constexpr int MR = 12 / NV;
  const int Lp = z.Lp, Kp = NV * 8;
  for (int l0 = 0; l0 < z.Lr; l0 += MR) {
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
      const __m256 by = _mm256_set1_ps(scale * (row_scale && l0 + r < z.L ? row_scale[l0 + r] : 1.0f));
      for (int j = 0; j < NV; ++j) _mm256_store_ps(tile[r] + 8 * j, _mm256_mul_ps(acc[r][j], by));
    }
    for (int r = 0; r < MR && l0 + r < z.L; ++r) std::memcpy(out + (size_t)(l0 + r) * z.ld, tile[r], z.K * sizeof(float));
  }
}

// out [L, K] (rows z.ld apart) = sum_{l < L} a[l, m] b[l, :] for each m < L, a [Lr, Lp], b [Lr, NV * 8].
template <int NV>
void ProductTN(const Sizes& z, const float* a, const float* b, float* out) {
  constexpr int MR = 12 / NV;
  const int Lp = z.Lp, Kp = NV * 8;
  for (int m0 = 0; m0 < z.Lr; m0 += MR) {
    __m256 acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int l = 0; l < z.L; ++l) {
      __m256 bl[NV];
      for (int j = 0; j < NV; ++j) bl[j] = _mm256_loadu_ps(b + (size_t)l * Kp + 8 * j);
      const float* al = a + (size_t)l * Lp + m0;  // columns m0.. of row l (past Lp: the next row or the slack)
      for (int r = 0; r < MR; ++r) {
        const __m256 x = _mm256_broadcast_ss(al + r);
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_fmadd_ps(x, bl[j], acc[r][j]);
      }
    }
    alignas(32) float tile[MR][NV * 8];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) _mm256_store_ps(tile[r] + 8 * j, acc[r][j]);
    for (int r = 0; r < MR && m0 + r < z.L; ++r) std::memcpy(out + (size_t)(m0 + r) * z.ld, tile[r], z.K * sizeof(float));
  }
}

// bias [L] -> dst [Lp], -inf past L (padding columns get no weight).
void PackBias(const Sizes& z, const float* bias, float* dst) {
  for (int m = 0; m < z.L; ++m) dst[m] = bias[m];
  for (int m = z.L; m < z.Lp; ++m) dst[m] = -INFINITY;
}

struct Forward {
  static size_t WorkFloats(const Sizes& z) { return z.Wide() + 2 * z.Narrow() + z.Square() + 2 * (size_t)z.Lp; }

  // One (batch, head). q, k, v [L, K] (rows z.ld apart), bias [L] -> out [L, K] (the same), row_max,
  // row_sum [L] of the scores scale * q k^T + bias.
  template <int NV>
  static void Head(const Sizes& z, float scale, const float* q, const float* k, const float* v, const float* bias,
                   float* out, float* row_max, float* row_sum, float* work) {
    float* kt = work;             // k^T [K, Lp]
    float* vp = kt + z.Wide();    // v [Lr, Kp]
    float* qp = vp + z.Narrow();  // q [Lr, Kp]
    float* s = qp + z.Narrow();   // scores, then exp [Lr, Lp]
    float* bp = s + z.Square();   // bias [Lp]
    float* inv = bp + z.Lp;       // 1 / row sum [Lr <= Lp + 12]
    PackColumns(z, k, kt, z.ld);
    PackRows(z, v, vp);
    PackRows(z, q, qp, scale);
    PackBias(z, bias, bp);
    ProductNT(z, qp, kt, bp, s);
    for (int l = 0; l < z.L; ++l) {
      float* row = s + (size_t)l * z.Lp;
      __m256 mx = _mm256_loadu_ps(row);
      for (int m = 8; m < z.Lp; m += 8) mx = _mm256_max_ps(_mm256_loadu_ps(row + m), mx);
      const float top = MaxOf(mx);
      const __m256 vm = _mm256_set1_ps(top);
      __m256 sum = _mm256_setzero_ps();
      for (int m = 0; m < z.Lp; m += 8) {
        const __m256 e = labram_cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + m), vm));
        _mm256_storeu_ps(row + m, e);
        sum = _mm256_add_ps(sum, e);
      }
      row_max[l] = top;
      row_sum[l] = SumOf(sum);
      inv[l] = 1.0f / row_sum[l];
    }
    ProductNN<NV>(z, s, vp, inv, 1.0f, out);
  }
};

struct Backward {
  static size_t WorkFloats(const Sizes& z) { return 2 * z.Wide() + 3 * z.Narrow() + 2 * z.Square() + 2 * (size_t)z.Lp; }

  // One (batch, head): the forward's inputs, d_out [L, K], row_max, row_sum [L] -> dq, dk, dv [L, K] (all
  // [L, K] rows z.ld apart; dq with respect to the unscaled q).
  template <int NV>
  static void Head(const Sizes& z, float scale, const float* q, const float* k, const float* v, const float* bias,
                   const float* d_out, const float* row_max, const float* row_sum, float* dq, float* dk, float* dv,
                   float* work) {
    float* kt = work;              // k^T [K, Lp]
    float* vt = kt + z.Wide();     // v^T [K, Lp]
    float* qp = vt + z.Wide();     // q [Lr, Kp]
    float* kp = qp + z.Narrow();   // k [Lr, Kp]
    float* gp = kp + z.Narrow();   // dO [Lr, Kp]
    float* p = gp + z.Narrow();    // P [Lr, Lp]
    float* ds = p + z.Square();    // dP, then dS [Lr, Lp]
    float* bp = ds + z.Square();   // bias [Lp]
    float* zero = bp + z.Lp;       // [Lp]
    PackRows(z, k, kp);
    PackColumns(z, kp, kt, z.Kp);  // from the rows just packed, in cache
    PackColumns(z, v, vt, z.ld);
    PackRows(z, q, qp, scale);
    PackRows(z, d_out, gp);
    PackBias(z, bias, bp);
    std::memset(zero, 0, sizeof(float) * z.Lp);
    ProductNT(z, qp, kt, bp, p);  // S
    for (int l = 0; l < z.L; ++l) {  // P = exp(S - max) / sum
      float* row = p + (size_t)l * z.Lp;
      const __m256 top = _mm256_set1_ps(row_max[l]), inv = _mm256_set1_ps(1.0f / row_sum[l]);
      for (int m = 0; m < z.Lp; m += 8)
        _mm256_storeu_ps(row + m, _mm256_mul_ps(labram_cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + m), top)), inv));
    }
    ProductTN<NV>(z, p, gp, dv);    // dV = P^T dO
    ProductNT(z, gp, vt, zero, ds);  // dP = dO v^T
    for (int l = 0; l < z.L; ++l) {  // dS = P * (dP - rowsum(P * dP)); P and dP are 0 past L
      float* g = ds + (size_t)l * z.Lp;
      const float* pr = p + (size_t)l * z.Lp;
      __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();  // two chains: FMA latency, not one per vector
      for (int m = 0; m < z.Lp; m += 16) {
        d0 = _mm256_fmadd_ps(_mm256_loadu_ps(pr + m), _mm256_loadu_ps(g + m), d0);
        d1 = _mm256_fmadd_ps(_mm256_loadu_ps(pr + m + 8), _mm256_loadu_ps(g + m + 8), d1);
      }
      const __m256 d = _mm256_set1_ps(SumOf(_mm256_add_ps(d0, d1)));
      for (int m = 0; m < z.Lp; m += 8)
        _mm256_storeu_ps(g + m, _mm256_mul_ps(_mm256_loadu_ps(pr + m), _mm256_sub_ps(_mm256_loadu_ps(g + m), d)));
    }
    ProductNN<NV>(z, ds, kp, nullptr, scale, dq);  // dQ = scale dS k
    ProductTN<NV>(z, ds, qp, dk);                  // dK = dS^T (scale q)
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

ffi::Error AttentionForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> row_max, ffi::ResultBuffer<ffi::F32> row_sum,
                            bool token_major, float scale, ffi::ThreadPool pool) {
  Sizes z;
  int64_t pairs, heads;
  const std::string bad = CheckShapes(q.dimensions(), {k.dimensions(), v.dimensions(), out->dimensions()},
                                      bias.element_count(), token_major, &z, &pairs, &heads);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  if (pairs == 0 || z.L == 0) return ffi::Error::Success();
  const auto head = ByVectors<ForwardHead>(z.Kp);
  labram_cpu::ForEachPart(pool, pairs, Forward::WorkFloats(z), /*zeroed=*/true, [&](int64_t i, float* work) {
    const int64_t at = PairOffset(z, i, heads, token_major);
    head(z, scale, q.typed_data() + at, k.typed_data() + at, v.typed_data() + at,
         bias.typed_data() + (i / heads) * z.L, out->typed_data() + at, row_max->typed_data() + i * z.L,
         row_sum->typed_data() + i * z.L, work);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> d_out,
                             ffi::Buffer<ffi::F32> row_max, ffi::Buffer<ffi::F32> row_sum,
                             ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv, bool token_major, float scale, ffi::ThreadPool pool) {
  Sizes z;
  int64_t pairs, heads;
  const std::string bad = CheckShapes(q.dimensions(), {k.dimensions(), v.dimensions(), d_out.dimensions(),
                                                       dq->dimensions(), dk->dimensions(), dv->dimensions()},
                                      bias.element_count(), token_major, &z, &pairs, &heads);
  if (!bad.empty()) return ffi::Error::InvalidArgument(bad);
  if (pairs == 0 || z.L == 0) return ffi::Error::Success();
  const auto head = ByVectors<BackwardHead>(z.Kp);
  labram_cpu::ForEachPart(pool, pairs, Backward::WorkFloats(z), /*zeroed=*/true, [&](int64_t i, float* work) {
    const int64_t at = PairOffset(z, i, heads, token_major);
    head(z, scale, q.typed_data() + at, k.typed_data() + at, v.typed_data() + at,
         bias.typed_data() + (i / heads) * z.L, d_out.typed_data() + at,
         row_max.typed_data() + i * z.L, row_sum.typed_data() + i * z.L, dq->typed_data() + at,
         dk->typed_data() + at, dv->typed_data() + at, work);
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
                                  .Ctx<ffi::ThreadPool>());
