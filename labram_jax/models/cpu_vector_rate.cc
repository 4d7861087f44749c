// How much faster a core multiplies-and-adds 16-float (AVX-512) vectors than 8-float (AVX2) ones.
//
// CPUs that list avx512f split into two classes the flags do not tell apart: those whose vector
// units are 512 bits wide (an AVX-512 FMA does twice an AVX2 FMA's work per cycle) and those that
// run each AVX-512 instruction on 256-bit units (AMD Zen 4, Intel parts with one 512-bit FMA
// port: the same float32 rate as AVX2). The kernels beside this file run their products (and the
// attention's softmax passes) in AVX-512 forms only on the first class (cpu_kernels.full_width_avx512,
// the FFI attribute `wide`), told apart by this measurement; elsewhere their AVX2 code.
// Also the CPU's float32 FMA peak over several threads (LabramFmaFlops), for the benchmarks' MFU.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 12;  // independent accumulators: enough to cover FMA latency x issue width

// The same loop at both widths (one function each: a function's instruction set is its own).
#define LABRAM_FMA_LOOP(Vector, set1, fmadd)                                                    \
  Vector acc[kChains];                                                                          \
  for (int c = 0; c < kChains; ++c) acc[c] = set1(1.0f + c);                                    \
  const Vector m = set1(0.999999f), a = set1(1e-6f); /* acc stays near its start: no denormals */ \
  const auto start = std::chrono::steady_clock::now();                                          \
  for (long i = 0; i < iterations; ++i) {                                                       \
    for (int c = 0; c < kChains; ++c) acc[c] = fmadd(acc[c], m, a);                              \
    asm volatile("" : "+x"(acc[0]), "+x"(acc[1]), "+x"(acc[2]), "+x"(acc[3]), "+x"(acc[4]),    \
                 "+x"(acc[5]), "+x"(acc[6]), "+x"(acc[7]), "+x"(acc[8]), "+x"(acc[9]),          \
                 "+x"(acc[10]), "+x"(acc[11])); /* keep every FMA, in registers */              \
  }                                                                                             \
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

double Seconds8(long iterations) { LABRAM_FMA_LOOP(__m256, _mm256_set1_ps, _mm256_fmadd_ps) }

__attribute__((target("avx512f"))) double Seconds16(long iterations) {
  LABRAM_FMA_LOOP(__m512, _mm512_set1_ps, _mm512_fmadd_ps)
}

#undef LABRAM_FMA_LOOP

}  // namespace

// float32 FLOP per second with 16-lane FMAs over that with 8-lane ones, on the calling thread: the
// median of `repeats` ratios, each of an 8-lane run and a 16-lane run back to back (in alternating
// order, after one unmeasured run of each). A descheduled or slowed run spoils only its own pair, and
// the median stands on the pairs that were not: the best of each width alone can pair one width's
// luckiest run with the other's unluckiest (CI once read 2.75 on a host that otherwise reads 2.0).
// About 2 on full-width AVX-512 units, about 1 on split ones. Call only where the CPU lists avx512f.
extern "C" double LabramAvx512RateRatio(long iterations, int repeats) {
  Seconds8(iterations);
  Seconds16(iterations);
  std::vector<double> ratios;
  for (int r = 0; r < repeats; ++r) {
    const bool narrow_first = r % 2 == 0;
    const double first = narrow_first ? Seconds8(iterations) : Seconds16(iterations);
    const double second = narrow_first ? Seconds16(iterations) : Seconds8(iterations);
    const double t8 = narrow_first ? first : second, t16 = narrow_first ? second : first;
    ratios.push_back(2.0 * t8 / t16);  // twice the lanes in the same number of instructions
  }
  std::nth_element(ratios.begin(), ratios.begin() + ratios.size() / 2, ratios.end());
  return ratios[ratios.size() / 2];
}

// float32 FLOP per second of `threads` threads running the FMA loop at once, 16-lane FMAs with
// `wide` (call only where the CPU lists avx512f), else 8-lane: the fastest of `repeats` runs, each
// timed by its slowest thread. What the vector units can do, the bound any product kernel works
// under (a matmul library's measured rate also pays its packing and its cache misses).
extern "C" double LabramFmaFlops(long iterations, int threads, int repeats, int wide) {
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    std::vector<double> seconds(threads);
    std::vector<std::thread> running;
    for (int t = 0; t < threads; ++t) {
      running.emplace_back([&seconds, t, iterations, wide] {
        seconds[t] = wide ? Seconds16(iterations) : Seconds8(iterations);
      });
    }
    for (std::thread& thread : running) thread.join();
    const double slowest = *std::max_element(seconds.begin(), seconds.end());
    const double flop = 2.0 * (wide ? 16 : 8) * kChains * (double)iterations * threads;
    best = std::max(best, flop / slowest);
  }
  return best;
}
