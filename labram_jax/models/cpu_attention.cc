// Softmax attention's forward pass for x86 CPUs with AVX2 and FMA, as an XLA FFI handler.
//
// For each (batch, head): S = q k^T + bias (q pre-scaled), E = exp(S - rowmax), out = E v / rowsum;
// rowmax and rowsum are returned too (the backward pass recomputes P = exp(S - rowmax) / rowsum).
// One (batch, head) is computed at a time in a per-thread workspace, so the [L, L] scores stay in
// the core's cache instead of going to memory between XLA's three operations (product, softmax,
// product). Built and loaded by cpu_attention.py.
//
// Shapes: q, k, v [..., H, L, K] float32 with K <= 32; bias [..., L] float32 (the leading dims of
// q without H, L, K); out [..., H, L, K]; rowmax, rowsum [..., H, L].

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

constexpr int kScoreRows = 6;  // rows of q per register tile of S (6 x 16 floats: 12 registers)

struct Sizes {
  int L, K;
  int Lp;  // L padded to 16 (score columns)
  int Lr;  // L padded to 12 (rows: a multiple of both row tiles)
  int Kp;  // K padded to 8 (NV vectors)
  size_t WorkFloats() const { return (size_t)K * Lp + 2 * (size_t)Lr * Kp + (size_t)Lr * Lp + Lp; }
};

// One (batch, head). q [L, K] (pre-scaled), k, v [L, K], bias [L] -> out [L, K], row_max, row_sum [L].
// NV: K padded to NV * 8; MR = 12 / NV output rows per register tile of E v.
template <int NV>
void HeadForward(const Sizes& z, const float* q, const float* k, const float* v, const float* bias, float* out,
                 float* row_maxes, float* row_sums, float* work) {
  constexpr int MR = 12 / NV;
  const int L = z.L, K = z.K, Lp = z.Lp, Lr = z.Lr, Kp = NV * 8;
  float* kt = work;                      // k^T [K, Lp], zero columns past L
  float* vp = kt + (size_t)K * Lp;       // v [Lr, Kp], zero padded
  float* qp = vp + (size_t)Lr * Kp;      // q [Lr, Kp], zero padded
  float* s = qp + (size_t)Lr * Kp;       // scores, then exp [Lr, Lp]
  float* bp = s + (size_t)Lr * Lp;       // bias [Lp], -inf past L
  for (int c = 0; c < K; ++c) {
    for (int m = 0; m < L; ++m) kt[(size_t)c * Lp + m] = k[(size_t)m * K + c];
    for (int m = L; m < Lp; ++m) kt[(size_t)c * Lp + m] = 0.f;
  }
  std::memset(vp, 0, sizeof(float) * 2 * (size_t)Lr * Kp);
  for (int m = 0; m < L; ++m) {
    std::memcpy(vp + (size_t)m * Kp, v + (size_t)m * K, K * sizeof(float));
    std::memcpy(qp + (size_t)m * Kp, q + (size_t)m * K, K * sizeof(float));
  }
  for (int m = 0; m < L; ++m) bp[m] = bias[m];
  for (int m = L; m < Lp; ++m) bp[m] = -INFINITY;

  // S = q k^T + bias, kScoreRows x 16 a tile.
  for (int l0 = 0; l0 < Lr; l0 += kScoreRows) {
    const float* qr = qp + (size_t)l0 * Kp;
    for (int m0 = 0; m0 < Lp; m0 += 16) {
      __m256 a0[kScoreRows], a1[kScoreRows];
      const __m256 c0 = _mm256_loadu_ps(bp + m0), c1 = _mm256_loadu_ps(bp + m0 + 8);
      for (int r = 0; r < kScoreRows; ++r) a0[r] = c0, a1[r] = c1;
      const float* kc = kt + m0;
      for (int c = 0; c < K; ++c, kc += Lp) {
        const __m256 b0 = _mm256_loadu_ps(kc), b1 = _mm256_loadu_ps(kc + 8);
        for (int r = 0; r < kScoreRows; ++r) {
          const __m256 a = _mm256_broadcast_ss(qr + (size_t)r * Kp + c);
          a0[r] = _mm256_fmadd_ps(a, b0, a0[r]);
          a1[r] = _mm256_fmadd_ps(a, b1, a1[r]);
        }
      }
      for (int r = 0; r < kScoreRows; ++r) {
        _mm256_storeu_ps(s + (size_t)(l0 + r) * Lp + m0, a0[r]);
        _mm256_storeu_ps(s + (size_t)(l0 + r) * Lp + m0 + 8, a1[r]);
      }
    }
  }

  for (int l0 = 0; l0 < Lr; l0 += MR) {
    // The tile's rows: exp(S - max) in place; 1 / sum is applied to the output.
    float inv[MR];
    for (int r = 0; r < MR; ++r) {
      float* row = s + (size_t)(l0 + r) * Lp;
      __m256 mx = _mm256_loadu_ps(row);
      for (int m = 8; m < Lp; m += 8) mx = _mm256_max_ps(_mm256_loadu_ps(row + m), mx);
      const float row_max = MaxOf(mx);
      const __m256 vm = _mm256_set1_ps(row_max);
      __m256 sum = _mm256_setzero_ps();
      for (int m = 0; m < Lp; m += 8) {
        const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(row + m), vm));
        _mm256_storeu_ps(row + m, e);
        sum = _mm256_add_ps(sum, e);
      }
      const float row_sum = SumOf(sum);
      inv[r] = 1.0f / row_sum;
      if (l0 + r < L) row_maxes[l0 + r] = row_max, row_sums[l0 + r] = row_sum;
    }
    // out = E v / sum, MR x (NV * 8) a tile.
    __m256 acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_setzero_ps();
    const float* er = s + (size_t)l0 * Lp;
    for (int m = 0; m < L; ++m) {
      __m256 b[NV];
      for (int j = 0; j < NV; ++j) b[j] = _mm256_loadu_ps(vp + (size_t)m * Kp + 8 * j);
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(er + (size_t)r * Lp + m);
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm256_fmadd_ps(a, b[j], acc[r][j]);
      }
    }
    alignas(32) float tile[MR][NV * 8];
    for (int r = 0; r < MR; ++r) {
      const __m256 scale = _mm256_set1_ps(inv[r]);
      for (int j = 0; j < NV; ++j) _mm256_store_ps(tile[r] + 8 * j, _mm256_mul_ps(acc[r][j], scale));
    }
    for (int r = 0; r < MR && l0 + r < L; ++r) std::memcpy(out + (size_t)(l0 + r) * K, tile[r], K * sizeof(float));
  }
}

using HeadFn = void (*)(const Sizes&, const float*, const float*, const float*, const float*, float*, float*, float*,
                        float*);

int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> row_max,
                   ffi::ResultBuffer<ffi::F32> row_sum) {
  const auto d = q.dimensions();
  bool same = d.size() >= 3 && k.dimensions().size() == d.size() && v.dimensions().size() == d.size();
  for (size_t i = 0; same && i < d.size(); ++i) same = k.dimensions()[i] == d[i] && v.dimensions()[i] == d[i];
  if (!same) return ffi::Error::InvalidArgument("q, k and v must share one shape [..., H, L, K]");
  const int r = (int)d.size();
  const int64_t H = d[r - 3], L = d[r - 2], K = d[r - 1];
  if (K < 1 || K > 32) return ffi::Error::InvalidArgument("head size must be 1..32, got " + std::to_string(K));
  int64_t n = 1;
  for (int i = 0; i < r - 2; ++i) n *= d[i];  // (batch..., head) pairs
  if ((int64_t)bias.element_count() != n / std::max<int64_t>(H, 1) * L)
    return ffi::Error::InvalidArgument("bias must have shape [..., L] (q's leading dims without H)");
  if (n == 0 || L == 0) return ffi::Error::Success();
  Sizes z{(int)L, (int)K, (int)((L + 15) / 16 * 16), (int)((L + 11) / 12 * 12), (int)((K + 7) / 8 * 8)};
  static const HeadFn kByVectors[4] = {HeadForward<1>, HeadForward<2>, HeadForward<3>, HeadForward<4>};
  const HeadFn head = kByVectors[z.Kp / 8 - 1];
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data(), *bd = bias.typed_data();
  float *od = out->typed_data(), *md = row_max->typed_data(), *sd = row_sum->typed_data();
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> work(z.WorkFloats());
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      const size_t off = (size_t)i * L * K;
      head(z, qd + off, kd + off, vd + off, bd + (size_t)(i / H) * L, od + off, md + (size_t)i * L, sd + (size_t)i * L,
           work.data());
    }
  };
  const int threads = (int)std::min<int64_t>(UsableCpus(), n);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q, pre-scaled
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // row max of the scores
                                  .Ret<ffi::Buffer<ffi::F32>>());  // row sum of exp(scores - row max)
