#include "cpu.hpp"

#include <atomic>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace rar {

namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.sse2 = __builtin_cpu_supports("sse2");
  f.avx = __builtin_cpu_supports("avx");
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  // F16C has no __builtin_cpu_supports name in older GCC; every AVX2 CPU shipped so far has it, but
  // check CPUID leaf 1 ECX bit 29 to be exact.
  {
    unsigned a = 1, b = 0, c = 0, d = 0;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d) : "c"(0));
    f.f16c = (c >> 29) & 1u;
  }
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
#elif defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is part of the armv8-a baseline.
#if defined(__linux__)
  f.asimddp = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  f.asimddp = true;  // every Apple arm64 CPU has the dot-product instructions
#endif
#endif
  return f;
}

bool cpu_supports(Simd s) {
  const CpuFeatures& f = cpu_features();
  switch (s) {
    case Simd::scalar: return true;
    case Simd::neon: return f.neon;
    case Simd::neon_dot: return f.neon && f.asimddp;
    case Simd::avx2: return f.avx2 && f.fma && f.f16c;
    case Simd::avx512: return f.avx512f && f.avx512bw && f.avx512vl && f.avx2 && f.fma && f.f16c;
  }
  return false;
}

bool compiled(Simd s) {
  for (Simd c : compiled_simd())
    if (c == s) return true;
  return false;
}

std::atomic<int>& selected() {
  static std::atomic<int> sel{static_cast<int>(best_simd())};
  return sel;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

std::vector<Simd> compiled_simd() {
#if defined(__x86_64__)
  return {Simd::scalar, Simd::avx2, Simd::avx512};
#elif defined(__aarch64__)
  return {Simd::scalar, Simd::neon, Simd::neon_dot};
#else
  return {Simd::scalar};
#endif
}

Simd best_simd() {
  Simd best = Simd::scalar;
  for (Simd s : compiled_simd())
    if (cpu_supports(s) && static_cast<int>(s) > static_cast<int>(best)) best = s;
  return best;
}

Simd selected_simd() { return static_cast<Simd>(selected().load()); }

bool set_simd(Simd s) {
  if (!compiled(s) || !cpu_supports(s)) return false;
  selected().store(static_cast<int>(s));
  return true;
}

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::scalar: return "scalar";
    case Simd::neon: return "neon";
    case Simd::neon_dot: return "neon_dot";
    case Simd::avx2: return "avx2";
    case Simd::avx512: return "avx512";
  }
  return "unknown";
}

bool simd_from_name(const std::string& name, Simd* out) {
  for (Simd s : {Simd::scalar, Simd::neon, Simd::avx2, Simd::avx512, Simd::neon_dot})
    if (name == simd_name(s)) {
      *out = s;
      return true;
    }
  return false;
}

std::vector<std::string> cpu_feature_names() {
  const CpuFeatures& f = cpu_features();
  std::vector<std::string> v;
  if (f.sse2) v.push_back("sse2");
  if (f.avx) v.push_back("avx");
  if (f.avx2) v.push_back("avx2");
  if (f.fma) v.push_back("fma");
  if (f.f16c) v.push_back("f16c");
  if (f.avx512f) v.push_back("avx512f");
  if (f.avx512bw) v.push_back("avx512bw");
  if (f.avx512vl) v.push_back("avx512vl");
  if (f.neon) v.push_back("neon");
  if (f.asimddp) v.push_back("asimddp");
  return v;
}

}  // namespace rar
