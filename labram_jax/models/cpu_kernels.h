// What the CPU kernels (cpu_attention.cc, cpu_layer_norm.cc) share; built by cpu_kernels.py.
#pragma once

#include <sched.h>

#include <algorithm>
#include <thread>

namespace labram_cpu {

// The cores this process may run on (its affinity mask), at least 1.
inline int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace labram_cpu
