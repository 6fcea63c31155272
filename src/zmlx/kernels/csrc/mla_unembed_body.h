
// One threadgroup per (b, h): the chunks combined once, in parallel, then every row.
// Thread (cl, qd) takes quad qd of chunks cl, cl + CL, ... with its own running max (no
// reduction before its loads: they are all independent), then the CL partial sums are
// rescaled to the largest max and added in threadgroup memory.
constexpr uint QD = R / 4;  // quads of latent values
constexpr uint CL = NT / QD;  // threads per quad
const uint NC = uint(o_shape[1]);
const uint h = zmlx_gid % H;
const uint b = zmlx_gid / H;
ZMLX_SHARED float xs[R];
ZMLX_SHARED float part[CL * R];
ZMLX_SHARED float pm[CL];
ZMLX_SHARED float pd[CL];
const uint qd = zmlx_lid % QD;
const uint cl = zmlx_lid / QD;
float mt = -3.0e38f;
float dl = 0.0f;
float xa[4] = {0.0f, 0.0f, 0.0f, 0.0f};
ZMLX_UNROLL8  // independent loads in flight
for (uint c = cl; c < NC; c += CL) {
    const size_t i = (size_t(b) * NC + c) * H + h;
    const float mc = m[i];
    const float lc = l[i];
    float v[4];
    zmlx_mla_load4(o + i * R + 4 * qd, v);
    const float mn = ZMLX_FMAX(mt, mc);
    const float sa = ZMLX_EXP(mt - mn);
    const float sb = ZMLX_EXP(mc - mn);
    dl = dl * sa + lc * sb;
    ZMLX_UNROLL
    for (uint k = 0; k < 4; ++k) xa[k] = xa[k] * sa + v[k] * sb;
    mt = mn;
}
ZMLX_UNROLL
for (uint k = 0; k < 4; ++k) part[cl * R + 4 * qd + k] = xa[k];
if (qd == 0) {
    pm[cl] = mt;
    pd[cl] = dl;
}
ZMLX_BARRIER;
float mmax = pm[0];
for (uint k = 1; k < CL; ++k) mmax = ZMLX_FMAX(mmax, pm[k]);
float den = 0.0f;
for (uint k = 0; k < CL; ++k) den += ZMLX_EXP(pm[k] - mmax) * pd[k];
for (uint d = zmlx_lid; d < R; d += NT) {
    float sum = 0.0f;
    for (uint k = 0; k < CL; ++k) sum += ZMLX_EXP(pm[k] - mmax) * part[k * R + d];
    xs[d] = sum / den;
}
ZMLX_BARRIER;
// 4. unembed_out: each warp RW rows at a time
ZMLX_MLA_X_UNITS(BITS, R, xs, xr, xsum)
for (uint j0 = zmlx_warp * RW; j0 < V; j0 += (NT / 32) * RW) {
    const uint nrows = V - j0 < RW ? V - j0 : RW;
    float acc[RW];
    zmlx_mla_rows<BITS, GS, R, RW>(w, s, bi, size_t(h) * V + j0, nrows, zmlx_lane, xr, xsum, acc);
    for (uint r = 0; r < nrows; ++r) {
        if (zmlx_lane == 0) out[(size_t(b) * H + h) * V + j0 + r] = static_cast<T>(acc[r]);
    }
}
