// LayerNorm over the last axis for x86 CPUs with AVX2 and FMA, forward and backward, as XLA FFI handlers.
//
// Forward, per row x of width D: mean, rstd = 1 / sqrt(mean((x - mean)^2) + eps) (two passes over the
// row), y = (x - mean) * rstd * scale + bias; mean and rstd are returned for the backward pass, which
// gives dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with xhat = (x - mean) * rstd, g = dy * scale,
// and dscale = sum over rows of dy * xhat, dbias = sum of dy, in one pass over the rows (each range of
// rows is summed in blocks of 128; the ranges' sums are added in a fixed order). XLA:CPU computes the same as
// several fusions and splits the column sums into trees of 32-wide partial sums (BENCHMARKS.md,
// sessions 20-21). Built and loaded by cpu_kernels.py.
//
// Shapes: x, y, dy, dx [..., D] float32; scale, bias, dscale, dbias [D]; mean, rstd [...].

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Lanes [0, n) set, n in 0..8.
inline __m256i Lanes(int n) {
  alignas(32) static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 8 - n));
}

// Splits rows [0, m) into one contiguous range per usable core (fewer for small m) and runs
// fn(range, begin, end) for each on XLA's thread pool (labram_cpu::ForEachPart): the ranges, and
// so the order the parameter gradients' sums are added in, do not depend on which thread runs them.
template <typename Fn>
void ForEachRange(ffi::ThreadPool& pool, int64_t m, int64_t min_rows, Fn fn) {
  const int64_t by_rows = std::max<int64_t>(1, m / min_rows);
  const int64_t ranges = std::min<int64_t>(labram_cpu::UsableCpus(), by_rows);
  labram_cpu::ForEachPart(pool, ranges, 0, /*zeroed=*/false, [&](int64_t t, float*) {
    fn((int)t, m * t / ranges, m * (t + 1) / ranges);
  });
}

struct Row {
  int d, full, tail;  // width, whole 8-vectors, lanes in the last partial one
  __m256i mask;
  // Whether the partial vector's lanes past D fit in the next row (8 - tail <= D): then, before the last row
  // of a loop, it is stored whole, the next row written over those lanes right after (a masked store costs
  // several times more on AMD cores: LayerNorm over 20-wide rows 0.43 -> 0.32 ms forward).
  bool whole_tail;
  explicit Row(int d_)
      : d(d_), full(d_ / 8), tail(d_ % 8), mask(Lanes(d_ % 8)), whole_tail(d_ % 8 && 8 - d_ % 8 <= d_) {}

  // Stores the partial last vector v of a row at p: whole where whole_tail and another row of the loop
  // follows (`next_row`), else masked to the row's lanes.
  void StoreTail(float* p, __m256 v, bool next_row) const {
    if (whole_tail && next_row) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, mask, v);
    }
  }
};

void ForwardRows(const Row& r, const float* x, const float* scale, const float* bias, float eps, int64_t begin,
                 int64_t end, float* y, float* mean_out, float* rstd_out) {
  const int d = r.d;
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * d;
    float* yi = y + i * d;
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j < r.full * 8; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xi + j));
    if (r.tail) acc = _mm256_add_ps(acc, _mm256_maskload_ps(xi + j, r.mask));
    const float mean = Sum8(acc) / d;
    const __m256 vm = _mm256_set1_ps(mean);
    acc = _mm256_setzero_ps();
    for (j = 0; j < r.full * 8; j += 8) {
      const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(xi + j), vm);
      acc = _mm256_fmadd_ps(c, c, acc);
    }
    if (r.tail) {
      const __m256 c = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(xi + j, r.mask), vm),
                                     _mm256_castsi256_ps(r.mask));  // the lanes past D add nothing
      acc = _mm256_fmadd_ps(c, c, acc);
    }
    const float rstd = 1.0f / std::sqrt(Sum8(acc) / d + eps);
    const __m256 vr = _mm256_set1_ps(rstd);
    for (j = 0; j < r.full * 8; j += 8) {
      const __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xi + j), vm), vr);
      _mm256_storeu_ps(yi + j, _mm256_fmadd_ps(h, _mm256_loadu_ps(scale + j), _mm256_loadu_ps(bias + j)));
    }
    if (r.tail) {
      const __m256 h = _mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(xi + j, r.mask), vm), vr);
      const __m256 sv = _mm256_maskload_ps(scale + j, r.mask), bv = _mm256_maskload_ps(bias + j, r.mask);
      r.StoreTail(yi + j, _mm256_fmadd_ps(h, sv, bv), i + 1 < end);
    }
    mean_out[i] = mean;
    rstd_out[i] = rstd;
  }
}

// Lanes [j, j + 8) of a row (the last piece masked to D): xhat = (x - mean) * rstd, dy, and g = dy * scale.
// Lanes past D read dy = 0, which zeroes everything they would add below.
struct Piece {
  __m256 h, dy, g;
};

inline Piece LoadPiece(const Row& r, int j, bool part, const float* xi, const float* dyi, const float* scale,
                       __m256 mean, __m256 rstd) {
  const __m256 xv = part ? _mm256_maskload_ps(xi + j, r.mask) : _mm256_loadu_ps(xi + j);
  const __m256 dv = part ? _mm256_maskload_ps(dyi + j, r.mask) : _mm256_loadu_ps(dyi + j);
  const __m256 sv = part ? _mm256_maskload_ps(scale + j, r.mask) : _mm256_loadu_ps(scale + j);
  return {_mm256_mul_ps(_mm256_sub_ps(xv, mean), rstd), dv, _mm256_mul_ps(dv, sv)};
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale; adds dy * xhat and dy to dscale, dbias.
void BackwardRows(const Row& r, const float* x, const float* scale, const float* mean, const float* rstd,
                  const float* dy, int64_t begin, int64_t end, float* dx, float* dscale, float* dbias) {
  const int d = r.d;
  const int nv = r.full + (r.tail ? 1 : 0);
  for (int64_t i = begin; i < end; ++i) {
    const float* xi = x + i * d;
    const float* dyi = dy + i * d;
    float* dxi = dx + i * d;
    const __m256 vm = _mm256_set1_ps(mean[i]), vr = _mm256_set1_ps(rstd[i]);
    __m256 sg = _mm256_setzero_ps(), sgh = _mm256_setzero_ps();
    for (int v = 0; v < nv; ++v) {
      const int j = v * 8;
      const Piece p = LoadPiece(r, j, v == r.full, xi, dyi, scale, vm, vr);
      sg = _mm256_add_ps(sg, p.g);
      sgh = _mm256_fmadd_ps(p.g, p.h, sgh);
      _mm256_storeu_ps(dscale + j, _mm256_fmadd_ps(p.dy, p.h, _mm256_loadu_ps(dscale + j)));
      _mm256_storeu_ps(dbias + j, _mm256_add_ps(p.dy, _mm256_loadu_ps(dbias + j)));
    }
    const __m256 a = _mm256_set1_ps(Sum8(sg) / d), b = _mm256_set1_ps(Sum8(sgh) / d);
    for (int v = 0; v < nv; ++v) {
      const int j = v * 8;
      const bool part = v == r.full;
      const Piece p = LoadPiece(r, j, part, xi, dyi, scale, vm, vr);
      const __m256 out = _mm256_mul_ps(vr, _mm256_sub_ps(_mm256_sub_ps(p.g, a), _mm256_mul_ps(p.h, b)));
      if (part) {
        r.StoreTail(dxi + j, out, i + 1 < end);
      } else {
        _mm256_storeu_ps(dxi + j, out);
      }
    }
  }
}

bool SameShape(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) if (a[i] != b[i]) return false;
  return true;
}

// Elements per range at least (fewer: handing them to another core costs more). 2^19 from session 21
// (an AMD host, threads started otherwise) kept LaBraM-Base's [8 x 231, 200] rows on one core; at 2^15,
// two cores: the call 0.54-0.60x (forward) and 0.59-0.78x (both passes), the steps 0.970x / 0.979x /
// 0.978x (fine-tuning / tokenizer / pretraining, paired; an Intel host, session 38).
constexpr int64_t kMinElements = 1 << 15;
constexpr int64_t kBlockRows = 128;          // rows summed apart before the parameter gradients' running sums
ffi::Error LayerNormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            float eps, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd, ffi::ThreadPool pool) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("x must have shape [..., D]");
  const int64_t d = dims.back();
  if ((int64_t)scale.element_count() != d || (int64_t)bias.element_count() != d ||
      !SameShape(dims, y->dimensions()))
    return ffi::Error::InvalidArgument("scale and bias must have shape [D] and y x's shape [..., D]");
  const int64_t m = d ? (int64_t)x.element_count() / d : 0;
  if ((int64_t)mean->element_count() != m || (int64_t)rstd->element_count() != m)
    return ffi::Error::InvalidArgument("mean and rstd must have x's shape without D");
  if (m == 0 || d == 0) return ffi::Error::Success();
  const Row r((int)d);
  ForEachRange(pool, m, std::max<int64_t>(1, kMinElements / d), [&](int, int64_t begin, int64_t end) {
    ForwardRows(r, x.typed_data(), scale.typed_data(), bias.typed_data(), eps, begin, end, y->typed_data(),
                mean->typed_data(), rstd->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                             ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias,
                             ffi::ThreadPool pool) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("x must have shape [..., D]");
  const int64_t d = dims.back();
  if (!SameShape(dims, dy.dimensions()) || !SameShape(dims, dx->dimensions()))
    return ffi::Error::InvalidArgument("dy and dx must have x's shape [..., D]");
  if ((int64_t)scale.element_count() != d || (int64_t)dscale->element_count() != d ||
      (int64_t)dbias->element_count() != d)
    return ffi::Error::InvalidArgument("scale, dscale and dbias must have shape [D]");
  const int64_t m = d ? (int64_t)x.element_count() / d : 0;
  if ((int64_t)mean.element_count() != m || (int64_t)rstd.element_count() != m)
    return ffi::Error::InvalidArgument("mean and rstd must have x's shape without D");
  std::fill(dscale->typed_data(), dscale->typed_data() + d, 0.f);
  std::fill(dbias->typed_data(), dbias->typed_data() + d, 0.f);
  if (m == 0 || d == 0) return ffi::Error::Success();
  const Row r((int)d);
  const int64_t padded = (d + 7) / 8 * 8;
  const int threads = labram_cpu::UsableCpus();
  std::vector<float> partial((size_t)threads * 2 * padded, 0.f);  // per thread: dscale, dbias
  ForEachRange(pool, m, std::max<int64_t>(1, kMinElements / d), [&](int t, int64_t begin, int64_t end) {
    float* own = partial.data() + (size_t)t * 2 * padded;
    std::vector<float> block(2 * padded);  // sums of kBlockRows rows, then added to the thread's: float32 sums over
    for (int64_t b = begin; b < end; b += kBlockRows) {  // 10^5 rows lose far fewer digits than one running sum
      std::fill(block.begin(), block.end(), 0.f);
      BackwardRows(r, x.typed_data(), scale.typed_data(), mean.typed_data(), rstd.typed_data(), dy.typed_data(), b,
                   std::min(end, b + kBlockRows), dx->typed_data(), block.data(), block.data() + padded);
      for (int64_t j = 0; j < 2 * padded; ++j) own[j] += block[j];
    }
  });
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < d; ++j) {
      dscale->typed_data()[j] += partial[(size_t)t * 2 * padded + j];
      dbias->typed_data()[j] += partial[(size_t)t * 2 * padded + padded + j];
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean of each row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // 1 / sqrt(variance + eps) of each row
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Ctx<ffi::ThreadPool>());
