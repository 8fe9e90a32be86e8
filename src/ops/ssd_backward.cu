// Backward of Mamba-2's scan (ssd.rs's ssd_backward on the GPU), f32, in its recurrence form,
// through Mamba-1's scan backward (selective_scan_backward.cu). That kernel walks one channel's
// states with δ and A per channel and B, C rows shared by all the channels it is given, at most
// 32 states. Mamba-2's channel c = h·P + p of group g (a group's heads are adjacent) has the δ
// and the scalar A of its head, the B and C of its group, and up to 128 states, so its backward
// runs as one Mamba-1 backward per (group, slice of NS states) over the group's Eg channels,
// these kernels around it:
//   ssd_bwd_in      before a group: the raw δ of each channel (R, Eg) from its head's column, the
//                   group's ∂y columns (R, Eg) when there are several groups, and per channel
//                   dt_bias, A_log (Eg, NS) and a zero D (the D skip is added here instead);
//   ssd_bwd_out     after each slice: ∂x += the slice's ∂u (the first adds D·∂y), each head's
//                   ∂(raw δ) += Σ over its P channels of theirs, and the slice's ∂B, ∂C copied
//                   into their columns; in a fixed order, so the sums are the same every run;
//   ssd_bwd_params  after all: per head ∂A_log, ∂dt_bias (and ∂D) from the per-channel sums.
// Every state's work is the Mamba-1 kernel's (2 exp2 and ~20 instructions per (t, c, state));
// around it these move ~5 floats per (t, c) for each slice and 2 for the δ expansion.

struct SsdBwdParams {
    const float* raw_dt;  // head h's raw δ at raw_dt[r·dt_rs + h]
    const float* gy;      // (R, E) ∂ of the SSD output (D skip included)
    const float* bias;    // (H) dt_bias
    const float* a_log;   // (H)
    const float* dp;      // D: (H), or (E) with d_per_channel
    float* dt_e;          // (R, Eg) raw δ of the group's channels
    float* gy_g;          // (R, Eg) the group's ∂y columns, or null (one group: gy itself)
    float* bias_e;        // (Eg)
    float* alog_e;        // (Eg, NS)
    float* zero_e;        // (Eg)
    const float* gu;      // (R, Eg) the slice's ∂u
    const float* gdt;     // (R, Eg) the slice's ∂(raw δ) per channel
    const float* gbc;     // (R, 2·NS) the slice's ∂B | ∂C
    float* gx;            // ∂x at gx[r·gx_rs + c]; ∂B at gx[r·gx_rs + E + n], ∂C at + G·N
    float* graw;          // ∂(raw δ) of head h at graw[r·graw_rs + h]
    const float* ga_e;    // (E, NS) ∂A_log per channel and state
    const float* gd_e;    // (E) Σ ∂y·x per channel
    const float* gbias_e; // (E) ∂dt_bias per channel
    float* ga;            // (H) added to
    float* gd;            // (H) or (E) added to
    float* gbias;         // (H) added to
    int R, E, H, P, N, NS, G, g, k;
    int dt_rs, gx_rs, graw_rs, d_per_channel;
};

extern "C" __global__ void ssd_bwd_in(const SsdBwdParams p) {
    const int eg = p.E / p.G, c0 = p.g * eg;
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)p.R * eg) {
        const long r = i / eg;
        const int c = i % eg;
        p.dt_e[i] = p.raw_dt[r * p.dt_rs + (c0 + c) / p.P];
        if (p.gy_g) p.gy_g[i] = p.gy[r * p.E + c0 + c];
    }
    if (i < (long)eg * p.NS) p.alog_e[i] = p.a_log[(c0 + i / p.NS) / p.P];
    if (i < eg) {
        p.bias_e[i] = p.bias[(c0 + i) / p.P];
        p.zero_e[i] = 0.0f;
    }
}

// One block per row.
extern "C" __global__ void ssd_bwd_out(const SsdBwdParams p) {
    const int eg = p.E / p.G, c0 = p.g * eg, first = p.k == 0;
    const long r = blockIdx.x;
    const float *gu = p.gu + r * eg, *gdt = p.gdt + r * eg;
    float* gx = p.gx + r * p.gx_rs;
    for (int c = threadIdx.x; c < eg; c += blockDim.x) {
        const int ch = c0 + c;
        const float d = p.dp[p.d_per_channel ? ch : ch / p.P];
        gx[ch] = (first ? d * p.gy[r * p.E + ch] : gx[ch]) + gu[c];
    }
    for (int hh = threadIdx.x; hh < eg / p.P; hh += blockDim.x) {
        float s = 0.0f;
        for (int q = 0; q < p.P; q++) s += gdt[hh * p.P + q];
        float* o = p.graw + r * p.graw_rs + c0 / p.P + hh;
        *o = (first ? 0.0f : *o) + s;
    }
    for (int j = threadIdx.x; j < 2 * p.NS; j += blockDim.x) {
        const int col = p.E + (j < p.NS ? 0 : p.G * p.N) + p.g * p.N + p.k * p.NS + j % p.NS;
        gx[col] = p.gbc[r * 2 * p.NS + j];
    }
}

extern "C" __global__ void ssd_bwd_params(const SsdBwdParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.H) {
        float a = 0.0f, b = 0.0f, d = 0.0f;
        for (int c = i * p.P; c < (i + 1) * p.P; c++) {
            for (int n = 0; n < p.NS; n++) a += p.ga_e[c * p.NS + n];
            b += p.gbias_e[c];
            d += p.gd_e[c];
        }
        p.ga[i] += a;
        p.gbias[i] += b;
        if (!p.d_per_channel) p.gd[i] += d;
    }
    if (p.d_per_channel && i < p.E) p.gd[i] += p.gd_e[i];
}
