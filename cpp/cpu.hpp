#pragma once
// CPU feature detection and the run-time choice of kernel family. The library is compiled for the
// baseline ISA of the target (x86-64 / armv8-a); faster kernels are compiled with per-function target
// attributes and picked here at run time, never with -march=native.
#include <string>
#include <vector>

namespace rar {

// neon_dot: NEON plus the Armv8.2 dot-product instructions (sdot; /proc/cpuinfo "asimddp": Jetson Orin's
// Cortex-A78AE, Xavier's Carmel, Apple M-series). Within one architecture a larger value is the better family.
enum class Simd { scalar = 0, neon = 1, avx2 = 2, avx512 = 3, neon_dot = 4 };

struct CpuFeatures {
  bool sse2 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false;
  bool neon = false, asimddp = false;
};

const CpuFeatures& cpu_features();

// Kernel families compiled into this build (independent of the CPU it runs on).
std::vector<Simd> compiled_simd();
// The best compiled family this CPU supports.
Simd best_simd();
// The family in use (best_simd() unless overridden with set_simd; tests use the override).
Simd selected_simd();
// Returns false (and changes nothing) when the family is not compiled or not supported by this CPU.
bool set_simd(Simd s);

const char* simd_name(Simd s);
bool simd_from_name(const std::string& name, Simd* out);
// Feature names this CPU reports that matter to the kernels, e.g. {"avx2", "fma", "f16c"}.
std::vector<std::string> cpu_feature_names();

}  // namespace rar
