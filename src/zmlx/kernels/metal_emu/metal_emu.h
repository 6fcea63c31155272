// A small C++20 emulation of the Metal Shading Language subset zmlx's kernels use, so
// that each Metal body can be compiled with g++ and run on the CPU against its
// reference (zmlx.kernels.metal_emu). One std::thread per GPU thread of a threadgroup,
// threadgroups one after another; barriers are real.
//
// Supported: bfloat16_t, half, uint/uint2/uint3, the device/constant/threadgroup/thread
// address-space qualifiers, thread_position_in_grid, thread_position_in_threadgroup,
// threadgroup_position_in_grid, threads_per_threadgroup, thread_index_in_simdgroup,
// simdgroup_index_in_threadgroup, threadgroup_barrier(mem_flags::...),
// simd_sum / simd_max / simd_min / simd_shuffle_xor (32-wide), metal:: math (exp, log,
// sqrt, rsqrt, abs, max, min, fma, precise::exp/log/sqrt/rsqrt, isnan, isinf), as_type<T>.
// Anything else fails to compile, which the test reports as outside the subset.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {  // round to nearest even, as Metal's conversion does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef _Float16 half;
typedef unsigned int uint;
struct uint2 { uint x = 0, y = 0; };
struct uint3 { uint x = 0, y = 0, z = 0; };

#define device
#define constant
#define thread
#define threadgroup static  // threadgroup arrays: shared by the group (groups run one at a time)
#define kernel

enum class mem_flags { mem_none, mem_device, mem_threadgroup };

namespace zmlx_emu {
struct Ctx {
  uint3 tpig, tpitg, tgpig, tptg;
  uint lane, simd;
  std::barrier<>* group_barrier;
  std::barrier<>* simd_barrier;
  float* simd_slots;  // 32 floats per simdgroup
};
inline thread_local Ctx ctx;
}  // namespace zmlx_emu

inline void threadgroup_barrier(mem_flags) { zmlx_emu::ctx.group_barrier->arrive_and_wait(); }

template <typename Op>
inline float zmlx_simd_all(float v, Op op) {
  auto& c = zmlx_emu::ctx;
  c.simd_barrier->arrive_and_wait();
  c.simd_slots[c.lane] = v;
  c.simd_barrier->arrive_and_wait();
  float r = c.simd_slots[0];
  for (uint i = 1; i < 32; ++i) r = op(r, c.simd_slots[i]);
  c.simd_barrier->arrive_and_wait();
  return r;
}
inline float simd_sum(float v) { return zmlx_simd_all(v, [](float a, float b) { return a + b; }); }
inline float simd_max(float v) { return zmlx_simd_all(v, [](float a, float b) { return std::max(a, b); }); }
inline float simd_min(float v) { return zmlx_simd_all(v, [](float a, float b) { return std::min(a, b); }); }
inline float simd_shuffle_xor(float v, uint mask) {
  auto& c = zmlx_emu::ctx;
  c.simd_barrier->arrive_and_wait();
  c.simd_slots[c.lane] = v;
  c.simd_barrier->arrive_and_wait();
  float r = c.simd_slots[c.lane ^ mask];
  c.simd_barrier->arrive_and_wait();
  return r;
}

namespace metal {
using std::abs; using std::exp; using std::log; using std::sqrt; using std::isnan; using std::isinf;
using std::max; using std::min; using std::fma;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
namespace precise {
using std::exp; using std::log; using std::sqrt;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
}  // namespace metal

// as_type<T>(v): reinterpret v's bits (same size), as Metal's as_type does.
template <typename T, typename U>
inline T as_type(U v) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T r;
  std::memcpy(&r, &v, sizeof(T));
  return r;
}
