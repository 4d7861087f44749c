// What the CPU kernels (cpu_attention.cc, cpu_layer_norm.cc, cpu_matmul.cc) share; built by cpu_kernels.py.
#pragma once

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace labram_cpu {

// The cores this process may run on (its affinity mask), at least 1.
inline int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// A 32-byte aligned workspace of `floats` floats owned by the calling thread, kept between calls.
inline float* ThreadWorkspace(size_t floats) {
  thread_local std::vector<float> workspace;  // XLA's pool threads persist: allocated once each
  if (workspace.size() < floats + 8) workspace.resize(floats + 8);
  return (float*)(((uintptr_t)workspace.data() + 31) & ~(uintptr_t)31);
}

// Runs fn(i, work) for i in [0, parts) on the calling thread and on XLA's intra-op thread pool,
// `work` a 32-byte aligned workspace of work_floats floats per thread (kept between calls; set to
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

}  // namespace labram_cpu
