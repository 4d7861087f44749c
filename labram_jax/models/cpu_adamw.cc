// One AdamW step over every parameter array of a model in one call, for x86 CPUs with AVX2, as an XLA FFI
// handler (labram_jax.optim's `fused` optimizer; PyTorch calls this a "foreach" implementation).
//
// XLA:CPU runs the same update (optax's clip_by_global_norm, scale_by_adam, masked add_decayed_weights,
// scale_by_learning_rate and per-parameter scales, then apply_updates, the gradient and parameter norms and
// the finite-step guard) as ~10 small operations per parameter array: ~2,200 for LaBraM-Base, 17-24 ms a
// step, most of it the cost of starting each (BENCHMARKS.md, "Session 31"). Here: one pass over the
// gradients for their norm, then one pass over gradients, parameters and moments, writing the new
// parameters and moments (in place where XLA aliases them, as it does for a donated train state) and
// summing the squares of the new parameters. Both passes are split into pieces of at most kPiece elements,
// shared with XLA's thread pool (labram_cpu::ForEachPart); each piece's sum is kept in its own slot and
// the slots added in order, so the norms do not depend on which thread ran what.
//
// Per element, in optax's order of operations (float32): g' = g, or g / |g| * clip where |g| >= clip;
// m' = (1 - b1) g' + b1 m; v' = (1 - b2) g'^2 + b2 v; u = (m' / c1) / (sqrt(v' / c2) + eps) with the bias
// corrections c1 = 1 - b1^t, c2 = 1 - b2^t; u += wd p (arrays with weight decay); u = (-lr u) s with s the
// array's (or its row's) scale; p' = p + u.
//
// Arguments: hyper [4] = (loss, -lr, c1, c2); then the n gradients, the n parameters, the n first moments,
// the n second moments (n = len(weight_decay), array i of each group of one shape, float32). Results: the
// n new parameters, the n new first moments, the n new second moments, stats [3] = (gradient norm, new
// parameter norm, 1 if the step was applied else 0). A step is not applied (results = arguments) where the
// loss or the gradient norm is not finite. Attributes: b1, b2, eps, clip (0: no clipping); weight_decay
// [n] (0: none for that array); rows [n] (array i is cut along its first axis into rows[i] equal rows
// with scales of their own: 1 for one scale); scales [sum(rows)].

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPiece = 1 << 15;  // elements per piece of work (128 KiB of each operand)

struct Array {
  const float *g, *p, *m, *v;  // arguments
  float *p_out, *m_out, *v_out;  // results (the same memory where XLA aliased them)
};

// A piece of one array's row: elements [begin, end) of array `array`, with weight decay wd and scale s.
struct Piece {
  int array;
  int64_t begin, end;
  float wd, s;
};

struct Constants {
  double b1, b2, eps;  // as given (1 - b1 is rounded to float32 from double, as Python's 1 - b1 is)
  float neg_lr, c1, c2;
  bool clip;    // whether to scale the gradients by clip / |g|
  float gnorm, max_norm;
};

// The norm sqrt(sum of squares) as float32 arithmetic gives it: infinite where the sum passes the
// largest float (as optax's float32 norm does; a gradient that large would overflow v = g^2 too).
float Norm(double squares) {
  return squares > (double)std::numeric_limits<float>::max() ? INFINITY : (float)std::sqrt(squares);
}

// The sum of squares of x[0:n], in double (float lanes over blocks of 8 x 8 elements, then added up).
double SumOfSquares(const float* x, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  while (i + 64 <= n) {
    const int64_t stop = std::min<int64_t>(n, i + 4096) & ~int64_t{63};  // float partial sums over 4 K elements
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    for (; i < stop; i += 64)
      for (int j = 0; j < 8; ++j) {
        const __m256 y = _mm256_loadu_ps(x + i + 8 * j);
        a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(y, y));
      }
    alignas(32) float lanes[8];
    for (int j = 1; j < 8; ++j) a[0] = _mm256_add_ps(a[0], a[j]);
    _mm256_store_ps(lanes, a[0]);
    for (float lane : lanes) total += lane;
  }
  for (; i < n; ++i) total += (double)x[i] * x[i];
  return total;
}

// Eight elements' update (the header's formula) from g, p, m, v; the new p, m, v out.
struct Step8 {
  __m256 one_minus_b1, b1, one_minus_b2, b2, c1, c2, eps, neg_lr, wd, s, gnorm, max_norm;
  bool clip, decay, scaled;

  Step8(const Constants& k, const Piece& piece)
      : one_minus_b1(_mm256_set1_ps((float)(1.0 - k.b1))), b1(_mm256_set1_ps((float)k.b1)),
        one_minus_b2(_mm256_set1_ps((float)(1.0 - k.b2))), b2(_mm256_set1_ps((float)k.b2)), c1(_mm256_set1_ps(k.c1)),
        c2(_mm256_set1_ps(k.c2)), eps(_mm256_set1_ps((float)k.eps)),
        neg_lr(_mm256_set1_ps(k.neg_lr)), wd(_mm256_set1_ps(piece.wd)), s(_mm256_set1_ps(piece.s)),
        gnorm(_mm256_set1_ps(k.gnorm)), max_norm(_mm256_set1_ps(k.max_norm)), clip(k.clip), decay(piece.wd != 0.0f),
        scaled(piece.s != 1.0f) {}

  // Separate multiplies and adds (no FMA), as XLA's elementwise code rounds them.
  inline void operator()(__m256 g, __m256 p, __m256 m, __m256 v, __m256* p_out, __m256* m_out,
                         __m256* v_out) const {
    if (clip) g = _mm256_mul_ps(_mm256_div_ps(g, gnorm), max_norm);
    m = _mm256_add_ps(_mm256_mul_ps(one_minus_b1, g), _mm256_mul_ps(b1, m));
    v = _mm256_add_ps(_mm256_mul_ps(one_minus_b2, _mm256_mul_ps(g, g)), _mm256_mul_ps(b2, v));
    __m256 u = _mm256_div_ps(_mm256_div_ps(m, c1), _mm256_add_ps(_mm256_sqrt_ps(_mm256_div_ps(v, c2)), eps));
    if (decay) u = _mm256_add_ps(u, _mm256_mul_ps(wd, p));
    u = _mm256_mul_ps(neg_lr, u);
    if (scaled) u = _mm256_mul_ps(u, s);
    *p_out = _mm256_add_ps(p, u);
    *m_out = m;
    *v_out = v;
  }
};

// The piece's update; returns the sum of squares of its new parameters (double).
double Update(const Constants& k, const Array& a, const Piece& piece) {
  const Step8 step(k, piece);
  double total = 0.0;
  int64_t i = piece.begin;
  __m256 acc = _mm256_setzero_ps();
  int since = 0;
  auto flush = [&]() {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc);
    for (float lane : lanes) total += lane;
    acc = _mm256_setzero_ps();
    since = 0;
  };
  for (; i + 8 <= piece.end; i += 8) {
    __m256 p, m, v;
    step(_mm256_loadu_ps(a.g + i), _mm256_loadu_ps(a.p + i), _mm256_loadu_ps(a.m + i), _mm256_loadu_ps(a.v + i), &p,
         &m, &v);
    _mm256_storeu_ps(a.p_out + i, p);
    _mm256_storeu_ps(a.m_out + i, m);
    _mm256_storeu_ps(a.v_out + i, v);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(p, p));
    if (++since == 512) flush();  // float partial sums over 4 K elements, as SumOfSquares
  }
  if (i < piece.end) {  // the last few through zero-padded copies, so they round as the rest
    const int w = (int)(piece.end - i);
    alignas(32) float in[4][8] = {}, out[3][8];
    std::memcpy(in[0], a.g + i, w * sizeof(float));
    std::memcpy(in[1], a.p + i, w * sizeof(float));
    std::memcpy(in[2], a.m + i, w * sizeof(float));
    std::memcpy(in[3], a.v + i, w * sizeof(float));
    __m256 p, m, v;
    step(_mm256_load_ps(in[0]), _mm256_load_ps(in[1]), _mm256_load_ps(in[2]), _mm256_load_ps(in[3]), &p, &m, &v);
    _mm256_store_ps(out[0], p), _mm256_store_ps(out[1], m), _mm256_store_ps(out[2], v);
    std::memcpy(a.p_out + i, out[0], w * sizeof(float));
    std::memcpy(a.m_out + i, out[1], w * sizeof(float));
    std::memcpy(a.v_out + i, out[2], w * sizeof(float));
    for (int j = 0; j < w; ++j) total += (double)out[0][j] * out[0][j];
  }
  flush();
  return total;
}

// Results = arguments where they are not the same memory (a step not applied).
void Keep(const Array& a, const Piece& piece) {
  const size_t bytes = (piece.end - piece.begin) * sizeof(float);
  if (a.p_out != a.p) std::memcpy(a.p_out + piece.begin, a.p + piece.begin, bytes);
  if (a.m_out != a.m) std::memcpy(a.m_out + piece.begin, a.m + piece.begin, bytes);
  if (a.v_out != a.v) std::memcpy(a.v_out + piece.begin, a.v + piece.begin, bytes);
}

ffi::Error AdamW(ffi::Buffer<ffi::F32> hyper, ffi::RemainingArgs args, ffi::RemainingRets rets, double b1, double b2,
                 double eps, double clip, ffi::Span<const float> weight_decay, ffi::Span<const int64_t> rows,
                 ffi::Span<const float> scales, ffi::ThreadPool pool) {
  const size_t n = weight_decay.size();
  if (hyper.element_count() != 4) return ffi::Error::InvalidArgument("adamw: hyper must be [loss, -lr, c1, c2]");
  if (args.size() != 4 * n || rets.size() != 3 * n + 1 || rows.size() != n)
    return ffi::Error::InvalidArgument("adamw: expected 4 x " + std::to_string(n) + " arguments after hyper, 3 x " +
                                       std::to_string(n) + " + 1 results and " + std::to_string(n) + " row counts");
  std::vector<Array> arrays(n);
  std::vector<Piece> pieces;
  size_t scale_index = 0;
  for (size_t i = 0; i < n; ++i) {
    ffi::ErrorOr<ffi::AnyBuffer> in[4] = {args.get<ffi::AnyBuffer>(i), args.get<ffi::AnyBuffer>(n + i),
                                          args.get<ffi::AnyBuffer>(2 * n + i), args.get<ffi::AnyBuffer>(3 * n + i)};
    ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> out[3] = {rets.get<ffi::AnyBuffer>(i), rets.get<ffi::AnyBuffer>(n + i),
                                                        rets.get<ffi::AnyBuffer>(2 * n + i)};
    for (auto& x : in)
      if (x.has_error() || x->element_type() != ffi::F32 || x->element_count() != in[0]->element_count())
        return ffi::Error::InvalidArgument("adamw: gradient, parameter and moments " + std::to_string(i) +
                                           " must be float32 arrays of one size");
    for (auto& x : out)
      if (x.has_error() || (*x)->element_type() != ffi::F32 || (*x)->element_count() != in[0]->element_count())
        return ffi::Error::InvalidArgument("adamw: results must match the parameters");
    arrays[i] = {in[0]->typed_data<float>(), in[1]->typed_data<float>(), in[2]->typed_data<float>(),
                 in[3]->typed_data<float>(), (*out[0])->typed_data<float>(), (*out[1])->typed_data<float>(),
                 (*out[2])->typed_data<float>()};
    const int64_t size = in[0]->element_count(), r = rows[i];
    if (r < 1 || size % r != 0 || scale_index + r > scales.size())
      return ffi::Error::InvalidArgument("adamw: array " + std::to_string(i) + " of " + std::to_string(size) +
                                         " elements cannot be cut into " + std::to_string(r) + " scaled rows");
    const int64_t row = size / r;
    for (int64_t j = 0; j < r; ++j, ++scale_index)
      for (int64_t b = j * row; b < (j + 1) * row; b += kPiece)
        pieces.push_back({(int)i, b, std::min((j + 1) * row, b + kPiece), weight_decay[i], scales[scale_index]});
  }
  if (scale_index != scales.size()) return ffi::Error::InvalidArgument("adamw: one scale per row");
  auto stats = rets.get<ffi::AnyBuffer>(3 * n);
  if (stats.has_error() || (*stats)->element_type() != ffi::F32 || (*stats)->element_count() != 3)
    return ffi::Error::InvalidArgument("adamw: the last result must be float32 [3]");
  float* out = (*stats)->typed_data<float>();

  const int64_t count = (int64_t)pieces.size();
  std::vector<double> sums(count);
  labram_cpu::ForEachPart(pool, count, 0, /*zeroed=*/false, [&](int64_t t, float*) {
    const Piece& piece = pieces[t];
    sums[t] = SumOfSquares(arrays[piece.array].g + piece.begin, piece.end - piece.begin);
  });
  double squares = 0.0;
  for (double s : sums) squares += s;
  const float* h = hyper.typed_data();
  const float gnorm = Norm(squares);
  out[0] = gnorm;
  if (!std::isfinite(h[0]) || !std::isfinite(gnorm)) {
    labram_cpu::ForEachPart(pool, count, 0, /*zeroed=*/false,
                            [&](int64_t t, float*) { Keep(arrays[pieces[t].array], pieces[t]); });
    double params = 0.0;
    for (const Piece& piece : pieces) params += SumOfSquares(arrays[piece.array].p + piece.begin, piece.end - piece.begin);
    out[1] = Norm(params);
    out[2] = 0.0f;
    return ffi::Error::Success();
  }
  const Constants k{b1, b2, eps, h[1], h[2], h[3], clip > 0.0 && gnorm >= (float)clip, gnorm, (float)clip};
  labram_cpu::ForEachPart(pool, count, 0, /*zeroed=*/false, [&](int64_t t, float*) {
    sums[t] = Update(k, arrays[pieces[t].array], pieces[t]);
  });
  double params = 0.0;
  for (double s : sums) params += s;
  out[1] = Norm(params);
  out[2] = 1.0f;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LabramAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hyper: loss, -lr, c1, c2
                                  .RemainingArgs()                // gradients, parameters, first, second moments
                                  .RemainingRets()                // parameters, first, second moments; stats [3]
                                  .Attr<double>("b1")
                                  .Attr<double>("b2")
                                  .Attr<double>("eps")
                                  .Attr<double>("clip")
                                  .Attr<ffi::Span<const float>>("weight_decay")
                                  .Attr<ffi::Span<const int64_t>>("rows")
                                  .Attr<ffi::Span<const float>>("scales")
                                  .Ctx<ffi::ThreadPool>());
