// Softmax cross-entropy of rows of logits with its gradient, for x86 CPUs with AVX2 and FMA, as an XLA FFI
// handler (the pretraining lm_head's loss: labram_jax.models.linear_cross_entropy).
//
// Per row l [V] with label y and weight w: m = max(l), e = exp(l - m), s = sum(e), ce = log(s) + m - l[y],
// correct = (the first index of the maximum == y), and the gradient of w * ce, (e / s - onehot(y)) * w,
// written over the logits (XLA aliases them: no second [rows, V] buffer). Three passes over each row while
// it is in the core's cache (max; exp and sum; scale), where XLA:CPU's fusions took ~5-7 ms of glue
// per 368 x 8192 piece around its products (~1.5 ms here) (BENCHMARKS.md, "Session 31"). A row holding NaN has NaN ce and
// gradient and no correct token (as XLA's reductions give).
//
// Shapes: logits and gradient [R, V] float32; labels [R] int32; weights [R] float32; ce [R] float32;
// correct [R] int8 (1 or 0).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerPart = 16;

// One row: its gradient written to g (may be l itself); returns ce, sets *correct.
float Row(const float* l, int64_t v, int32_t label, float w, float* g, bool* correct) {
  // Pass 1: the maximum (NaN-propagating, as XLA's max).
  __m256 mx = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= v; j += 8) {
    const __m256 x = _mm256_loadu_ps(l + j);
    mx = _mm256_max_ps(mx, x);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = -INFINITY;
  for (float x : lanes) m = std::max(m, x);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; j < v; ++j) {
    m = std::max(m, l[j]);
    has_nan |= std::isnan(l[j]);
  }
  const float picked = l[label];
  if (has_nan) {
    for (int64_t i = 0; i < v; ++i) g[i] = NAN;
    *correct = false;
    return NAN;
  }
  // The first index of the maximum.
  int64_t first = 0;
  while (first < v && l[first] != m) ++first;
  *correct = first == label;
  // Pass 2: e = exp(l - m) into g, and its sum.
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  j = 0;
  for (; j + 16 <= v; j += 16) {
    const __m256 e0 = labram_cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(l + j), vm));
    const __m256 e1 = labram_cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(l + j + 8), vm));
    _mm256_storeu_ps(g + j, e0);
    _mm256_storeu_ps(g + j + 8, e1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
  }
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  double sum = 0.0;
  for (float x : lanes) sum += x;
  for (; j < v; ++j) {
    const float e = std::exp(l[j] - m);
    g[j] = e;
    sum += e;
  }
  const float s = (float)sum;
  // Pass 3: (e / s - onehot) * w.
  const __m256 scale = _mm256_set1_ps(w / s);
  j = 0;
  for (; j + 8 <= v; j += 8) _mm256_storeu_ps(g + j, _mm256_mul_ps(_mm256_loadu_ps(g + j), scale));
  for (; j < v; ++j) g[j] *= w / s;
  g[label] -= w;
  return std::log(s) + m - picked;
}

ffi::Error SoftmaxCrossEntropy(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                               ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> gradient,
                               ffi::ResultBuffer<ffi::F32> ce, ffi::ResultBuffer<ffi::S8> correct,
                               ffi::ThreadPool pool) {
  const auto d = logits.dimensions();
  if (d.size() != 2) return ffi::Error::InvalidArgument("softmax cross-entropy: logits must be [rows, vocab]");
  const int64_t rows = d[0], v = d[1];
  if (labels.element_count() != (size_t)rows || weights.element_count() != (size_t)rows ||
      ce->element_count() != (size_t)rows || correct->element_count() != (size_t)rows ||
      gradient->element_count() != logits.element_count())
    return ffi::Error::InvalidArgument("softmax cross-entropy: labels, weights, ce and correct must be [rows], the "
                                       "gradient as the logits");
  if (rows == 0) return ffi::Error::Success();
  if (v == 0) return ffi::Error::InvalidArgument("softmax cross-entropy: an empty vocabulary");
  const int32_t* y = labels.typed_data();
  for (int64_t r = 0; r < rows; ++r)
    if (y[r] < 0 || y[r] >= v)
      return ffi::Error::InvalidArgument("softmax cross-entropy: label " + std::to_string(y[r]) + " of row " +
                                         std::to_string(r) + " is outside [0, " + std::to_string(v) + ")");
  const float* l = logits.typed_data();
  const float* w = weights.typed_data();
  float* g = gradient->typed_data();
  float* out = ce->typed_data();
  int8_t* hit = correct->typed_data();
  const int64_t parts = (rows + kRowsPerPart - 1) / kRowsPerPart;
  labram_cpu::ForEachPart(pool, parts, 0, /*zeroed=*/false, [&](int64_t t, float*) {
    for (int64_t r = t * kRowsPerPart; r < std::min(rows, (t + 1) * kRowsPerPart); ++r) {
      bool c = false;
      out[r] = Row(l + r * v, v, y[r], w[r], g + r * v, &c);
      hit[r] = c;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramSoftmaxCrossEntropy, SoftmaxCrossEntropy,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits [R, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // labels [R]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [R]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gradient [R, V] (aliases the logits)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ce [R]
                                  .Ret<ffi::Buffer<ffi::S8>>()    // correct [R]
                                  .Ctx<ffi::ThreadPool>());
