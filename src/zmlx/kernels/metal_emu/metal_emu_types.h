// Metal's value types and math for the emulation (metal_emu.h): uint vectors, bfloat16_t and
// half that round after every operation, metal:: math, as_type.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

typedef unsigned int uint;
struct uint2 { uint x = 0, y = 0; };
struct uint3 { uint x = 0, y = 0, z = 0; };

// ---- 16-bit floats: every operation rounds to the type, as on the GPU
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
struct half {
  _Float16 v;
  half() = default;
  half(float f) : v(static_cast<_Float16>(f)) {}  // correctly rounded
  operator float() const { return static_cast<float>(v); }
};
// One operation of a 16-bit type computed in float is exact before its one rounding (float
// has more than twice the bits), so T(float(a) op float(b)) is the correctly rounded T op.
#define ZMLX_EMU_F16_OP(T, OP)                                                             \
  inline T operator OP(T a, T b) { return T(float(a) OP float(b)); }                      \
  inline float operator OP(T a, float b) { return float(a) OP b; }                        \
  inline float operator OP(float a, T b) { return a OP float(b); }                        \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                    \
  inline T operator OP(T a, I b) { return T(float(a) OP float(b)); }                      \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                    \
  inline T operator OP(I a, T b) { return T(float(a) OP float(b)); }                      \
  template <class U>                                                                       \
  inline T& operator OP##=(T& a, U b) { a = T(a OP b); return a; }
#define ZMLX_EMU_F16(T)                                                                    \
  ZMLX_EMU_F16_OP(T, +) ZMLX_EMU_F16_OP(T, -) ZMLX_EMU_F16_OP(T, *) ZMLX_EMU_F16_OP(T, /) \
  inline T operator-(T a) { return T(-float(a)); }                                         \
  inline T operator+(T a) { return a; }
ZMLX_EMU_F16(bfloat16_t)
ZMLX_EMU_F16(half)
#define ZMLX_EMU_MIXED(OP)                                                                 \
  inline float operator OP(bfloat16_t a, half b) { return float(a) OP float(b); }          \
  inline float operator OP(half a, bfloat16_t b) { return float(a) OP float(b); }
ZMLX_EMU_MIXED(+) ZMLX_EMU_MIXED(-) ZMLX_EMU_MIXED(*) ZMLX_EMU_MIXED(/)

namespace metal {
using std::abs; using std::exp; using std::log; using std::sqrt; using std::isnan; using std::isinf;
using std::max; using std::min; using std::fma;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
// non-template overloads, as Metal's: an argument converts (a threadgroup element, an int)
inline float max(float a, float b) { return std::max(a, b); }
inline float min(float a, float b) { return std::min(a, b); }
#define ZMLX_EMU_MATH16(T)                                                   \
  inline T exp(T x) { return T(std::exp(float(x))); }                       \
  inline T log(T x) { return T(std::log(float(x))); }                       \
  inline T sqrt(T x) { return T(std::sqrt(float(x))); }                     \
  inline T rsqrt(T x) { return T(1.0f / std::sqrt(float(x))); }             \
  inline T abs(T x) { return T(std::abs(float(x))); }                       \
  inline T max(T a, T b) { return T(std::max(float(a), float(b))); }        \
  inline T min(T a, T b) { return T(std::min(float(a), float(b))); }
ZMLX_EMU_MATH16(bfloat16_t)
ZMLX_EMU_MATH16(half)
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
