// mla_decode_q's tensor-core loader (csrc/mla_decode_q.h, CUDA only) on the host: the bf16 types
// and intrinsics it uses stubbed (round to nearest even), each lane's fragments checked against
// mx.dequantize's values (q * scale + bias, rounded once to bf16) at the positions and dims
// zmlx_mla_fragments reads for a bf16 cache (rows past the chunk repeat its last). Exit code 1
// if any value is wrong (the counts are printed). Built and run by tests/kernels/test_mla_decode_q.py.
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstdlib>
#include <cstddef>
#define ZMLX_CUDA 1
#define ZMLX_FN inline
#define ZMLX_UNROLL
typedef unsigned int uint;
struct bf16 { uint16_t x; operator float() const { uint32_t u = uint32_t(x) << 16; float f; memcpy(&f, &u, 4); return f; } };
static uint16_t rn(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
struct __nv_bfloat162 { uint16_t x, y; };
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {rn(a), rn(b)}; }
#include "mla_decode_q.h"
template <int BITS, int GS>
int run() {
  constexpr int R = 512, RD = 64, S = 40, UV = 32 / BITS;
  static float lat[2][S][R], kpe[2][S][RD];
  static uint lw[2][S][R / UV], pw[2][S][RD / UV];
  static bf16 ls[2][S][R / GS], lb[2][S][R / GS], ps[2][S][RD / GS], pb[2][S][RD / GS];
  srand(BITS * 100 + GS);
  for (int bb = 0; bb < 2; ++bb) for (int p = 0; p < S; ++p) {
    for (int gi = 0; gi < R / GS; ++gi) { ls[bb][p][gi].x = rn(0.01f + (rand() % 100) * 1e-3f); lb[bb][p][gi].x = rn(-0.5f + (rand() % 100) * 1e-2f); }
    for (int gi = 0; gi < RD / GS; ++gi) { ps[bb][p][gi].x = rn(0.01f + (rand() % 100) * 1e-3f); pb[bb][p][gi].x = rn(-0.5f + (rand() % 100) * 1e-2f); }
    for (int u = 0; u < R / UV; ++u) { uint w = 0; for (int i = 0; i < UV; ++i) { uint q = rand() & ((1u << BITS) - 1); w |= q << (BITS * i); int d = u * UV + i; lat[bb][p][d] = float(bf16{rn(float(q) * float(ls[bb][p][d / GS]) + float(lb[bb][p][d / GS]))}); } lw[bb][p][u] = w; }
    for (int u = 0; u < RD / UV; ++u) { uint w = 0; for (int i = 0; i < UV; ++i) { uint q = rand() & ((1u << BITS) - 1); w |= q << (BITS * i); int d = u * UV + i; kpe[bb][p][d] = float(bf16{rn(float(q) * float(ps[bb][p][d / GS]) + float(pb[bb][p][d / GS]))}); } pw[bb][p][u] = w; }
  }
  int bad = 0;
  for (uint b = 0; b < 2; ++b) for (uint w = 0; w < R / 64; ++w) for (uint lane = 0; lane < 32; ++lane) {
    uint g = lane / 4, tg = lane % 4;
    zmlx_mla_qrows<R, RD, BITS, GS, bf16> rows{&lw[0][0][0], &ls[0][0][0], &lb[0][0][0], &pw[0][0][0], &ps[0][0][0], &pb[0][0][0]};
    rows.start(b, S, w, tg);
    uint p0 = 16, n = 20;
    for (uint t0 = 0; t0 < n; t0 += 16) {
      uint la[4][4], ka[4];
      rows.fragments(p0, n, t0, g, w < RD / 16, la, ka);
      uint r0 = p0 + (t0 + g < n ? t0 + g : n - 1), r1 = p0 + (t0 + g + 8 < n ? t0 + g + 8 : n - 1);
      auto chk = [&](uint v, float a, float c) { float x = float(bf16{uint16_t(v & 0xffff)}), y = float(bf16{uint16_t(v >> 16)}); if (x != a || y != c) ++bad; };
      for (uint ks = 0; ks < 4; ++ks) {
        uint d = 64 * w + 16 * ks + 2 * tg;
        chk(la[ks][0], lat[b][r0][d], lat[b][r0][d + 1]);
        chk(la[ks][1], lat[b][r1][d], lat[b][r1][d + 1]);
        chk(la[ks][2], lat[b][r0][d + 8], lat[b][r0][d + 9]);
        chk(la[ks][3], lat[b][r1][d + 8], lat[b][r1][d + 9]);
      }
      if (w < RD / 16) {
        uint e = 16 * w + 2 * tg;
        chk(ka[0], kpe[b][r0][e], kpe[b][r0][e + 1]); chk(ka[1], kpe[b][r1][e], kpe[b][r1][e + 1]);
        chk(ka[2], kpe[b][r0][e + 8], kpe[b][r0][e + 9]); chk(ka[3], kpe[b][r1][e + 8], kpe[b][r1][e + 9]);
      }
    }
  }
  printf("bits %d gs %d bad %d\n", BITS, GS, bad);
  return bad;
}
int main() { return (run<4, 64>() + run<4, 32>() + run<8, 64>() + run<8, 32>()) != 0; }
