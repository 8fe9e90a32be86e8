// Backward of Mamba-1's selective scan (selective_scan.rs's selective_scan_backward on the GPU),
// f32, for S sequences that each start from a zero state.
//
// scan_backward_slow: the plain form, the reference scan_backward is tested against (and the
// path for state sizes scan_backward does not take). One lane per (channel, state). A channel's N states sit in N adjacent lanes of
// a warp (N a power of two ≤ 32), so sums over states (the output y, ∂u, ∂δ) are log2 N
// shuffles. Each lane runs the recurrence forward once and keeps its state every SCAN_BWD_SUB
// steps (the workspace `ckpt`: L·E·N / SCAN_BWD_SUB floats per sequence, shared by all layers:
// nothing of size L·E·N is kept); then, sub-chunk by sub-chunk from the end, it recomputes the
// sub-chunk's states in registers from the kept one and runs the adjoint recurrence
//   gh_t = C_t·gy_t + exp(δ_{t+1}A)·gh_{t+1}
// backwards through them (training-spec §2). ∂B_t and ∂C_t are sums over channels: a warp's by
// shuffles, the block's through shared memory, written per block to `parts_bc` and summed over
// the blocks by sum_parts in a fixed order; ∂A_log, ∂D and ∂dt_bias are per-sequence partials
// summed the same way. No atomics: the result is the same every run.
// Cost per (t, c, n): 3 exps and ~25 FLOPs. Bytes per (t, c): u, δ, z read three times and gy
// once, ∂u, ∂δ, ∂z and the gated output y written once; B, C are per step, broadcast to the
// channels.
//
// scan_a2: the training forward's A·log2(e) in the (N, E) layout of ScanParams.a2, from A_log
// ((E, N), the parameter) after each update.

// SCAN_BWD_SUB, SCAN_BWD_THREADS, SCAN_BWD_MAX_N, SCAN_BWD_LANE_THREADS, SCAN_BWD_SPL: src/cuda/consts.rs.

struct ScanBwdParams {
    const float* u;         // u[r·u_rs + c], r = s·L + t
    const float* dt;        // raw δ (before the bias) at dt[r·dt_rs + c]
    const float* dt_bias;   // (E)
    const float* a_log;     // (E, N): A = −exp(A_log)
    const float* b;         // B[r·bc_rs + n]
    const float* cm;        // C likewise
    const float* d;         // (E)
    const float* z;         // gate z[r·z_rs + c], or null
    const float* gy;        // (S·L, E) ∂/∂(gated output)
    float* gu;              // (S·L, E) written
    float* gdt;             // (S·L, E) ∂/∂(raw δ), written
    float* gz;              // gz[r·z_rs + c], written when z is given
    float* y;               // (S·L, E) the forward's gated output, written again (for out_proj's
                            // weight gradient, so that the forward need not keep it)
    float* ckpt;            // (S, ⌈L/SUB⌉, E, N) workspace
    float* parts_bc;        // (S, blocks, L, 2N): the block's Σ over its channels of ∂B | ∂C
    float* parts_a;         // (S, E, N) ∂A_log of each sequence
    float* parts_dd;        // (S, 2, E) ∂D, ∂dt_bias of each sequence
    int u_rs, dt_rs, bc_rs, z_rs;
    int L, E, N;
};

// Σ of v over the N lanes of a channel (every lane gets it).
__device__ __forceinline__ float state_sum(float v, int n) {
    for (int o = n / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(SCAN_BWD_THREADS) scan_backward_slow(const ScanBwdParams p) {
    __shared__ float red[SCAN_BWD_THREADS / 32][SCAN_BWD_SUB][2 * SCAN_BWD_MAX_N];
    const int N = p.N, E = p.E, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n = threadIdx.x % N, c = blockIdx.x * (SCAN_BWD_THREADS / N) + threadIdx.x / N, s = blockIdx.y;
    // Lanes past the last channel run along with zeros (the shuffles need every lane).
    const bool on = c < E;
    const long row0 = (long)s * p.L;
    const float A = on ? -expf(p.a_log[c * N + n]) : 0.0f;
    const float bias = on ? p.dt_bias[c] : 0.0f, D = on ? p.d[c] : 0.0f;
    const int nsub = (p.L + SCAN_BWD_SUB - 1) / SCAN_BWD_SUB;
    float* ck = p.ckpt + ((long)s * nsub * E + c) * N + n;
    const long ck_step = (long)E * N;
    // δ_t u_t B_t and exp(δ_t A) of step t (zeros past L and for idle lanes).
    auto step = [&](int t, float& delta, float& decay, float& dub) {
        delta = decay = dub = 0.0f;
        if (on && t < p.L) {
            const long r = row0 + t;
            delta = softplus(p.dt[r * p.dt_rs + c] + bias);
            decay = expf(delta * A);
            dub = delta * p.u[r * p.u_rs + c] * p.b[r * p.bc_rs + n];
        }
    };

    float h = 0.0f;
    for (int j = 0; j < nsub; j++) {
        if (on) ck[j * ck_step] = h;
#pragma unroll
        for (int i = 0; i < SCAN_BWD_SUB; i++) {
            float delta, decay, dub;
            step(j * SCAN_BWD_SUB + i, delta, decay, dub);
            h = fmaf(decay, h, dub);
        }
    }

    float gh = 0.0f, ga = 0.0f, gd = 0.0f, gbias = 0.0f;
    for (int j = nsub - 1; j >= 0; j--) {
        const int t0 = j * SCAN_BWD_SUB;
        float hs[SCAN_BWD_SUB + 1];  // hs[i]: the state before step t0 + i
        hs[0] = on ? ck[j * ck_step] : 0.0f;
#pragma unroll
        for (int i = 0; i < SCAN_BWD_SUB; i++) {
            float delta, decay, dub;
            step(t0 + i, delta, decay, dub);
            hs[i + 1] = fmaf(decay, hs[i], dub);
        }
#pragma unroll
        for (int i = SCAN_BWD_SUB - 1; i >= 0; i--) {
            const int t = t0 + i;
            float vb = 0.0f, vc = 0.0f;
            if (t < p.L) {  // the same for the whole block
                const long r = row0 + t;
                float u = 0.0f, raw = 0.0f, bn = 0.0f, cn = 0.0f, zt = 0.0f, g = 0.0f;
                if (on) {
                    u = p.u[r * p.u_rs + c];
                    raw = p.dt[r * p.dt_rs + c] + bias;
                    bn = p.b[r * p.bc_rs + n];
                    cn = p.cm[r * p.bc_rs + n];
                    g = p.gy[r * E + c];
                    if (p.z) zt = p.z[r * p.z_rs + c];
                }
                const float delta = softplus(raw), decay = expf(delta * A);
                float gy = g;
                const float y = state_sum(cn * hs[i + 1], N) + D * u;
                if (p.z) {
                    const float sg = 1.0f / (1.0f + expf(-zt));
                    if (on && n == 0) {
                        p.gz[r * p.z_rs + c] = g * y * sg * (1.0f + zt * (1.0f - sg));
                        p.y[r * E + c] = y * zt * sg;
                    }
                    gy = g * zt * sg;
                } else if (on && n == 0) {
                    p.y[r * E + c] = y;
                }
                gd += gy * u;
                gh = fmaf(cn, gy, gh);
                vc = gy * hs[i + 1];
                vb = gh * delta * u;
                const float gu = state_sum(gh * delta * bn, N) + D * gy;
                const float gdelta = state_sum(gh * (A * decay * hs[i] + bn * u), N);
                ga += gh * delta * decay * hs[i];
                gh *= decay;
                const float graw = gdelta / (1.0f + expf(-raw));
                gbias += graw;
                if (on && n == 0) {
                    p.gu[r * E + c] = gu;
                    p.gdt[r * E + c] = graw;
                }
            }
            // Σ over the warp's channels: the lanes that hold the same state.
            for (int o = N; o < 32; o <<= 1) {
                vb += shfl_xor(vb, o);
                vc += shfl_xor(vc, o);
            }
            if (lane < N) {
                red[warp][i][n] = vb;
                red[warp][i][N + n] = vc;
            }
        }
        __syncthreads();
        for (int k = threadIdx.x; k < SCAN_BWD_SUB * 2 * N; k += blockDim.x) {
            const int i = k / (2 * N), q = k % (2 * N);
            if (t0 + i < p.L) {
                float v = 0.0f;
                for (int w = 0; w < SCAN_BWD_THREADS / 32; w++) v += red[w][i][q];
                p.parts_bc[(((long)s * gridDim.x + blockIdx.x) * p.L + t0 + i) * 2 * N + q] = v;
            }
        }
        __syncthreads();
    }
    if (on) p.parts_a[((long)s * E + c) * N + n] = ga * A;  // ∂A_log = ∂A · A
    if (on && n == 0) {
        p.parts_dd[(long)s * 2 * E + c] = gd;
        p.parts_dd[(long)s * 2 * E + E + c] = gbias;
    }
}

// scan_backward: the same two walks, with each lane holding SPL = 4 states of one channel (N / 4
// adjacent lanes a channel, as the forward scan splits them), so that a step's per-channel work
// and its sums over states are shared by 4 states instead of 1. Per sub-chunk the block stages
// the steps' inputs of its channels in shared memory, turned once per (step, channel) into δ =
// softplus(raw δ + bias), σ(raw), σ(z) and gy = ∂y·z·σ(z), with the steps' B, C rows; each lane
// recomputes its states and decays into registers and runs the adjoint recurrence back through
// them. The sums over a channel's states (C·h for y, gh·B for ∂u, gh·(A·decay·h + B·u) for ∂δ)
// are log2(N/4) shuffles, parked per (step, channel); ∂B and ∂C, sums over the warp's channels,
// are one transpose-reduction (each level hands half of a lane's values to its partner and adds
// the other half: 7 shuffles for the 8 values of 8 channels at N = 16) that leaves each lane one
// of the warp's 2N sums, which the block adds over its warps. After the sub-chunk one thread per
// (step, channel) finishes ∂z, ∂u, ∂δ and the gated output.
// Per (t, c, state): 2 exp2 (state walk and recompute) and ~20 other instructions; per (t, c)
// and lane: ~13 shuffles. Shared memory (floats; CH = 4·threads/N channels, NW warps): the tile
// 7·SUB·CH, B and C SUB·2N, the state sums 3·SUB·CH, ∂B and ∂C per warp SUB·NW·2N.
// Needs N in {8, 16, 32}.

template <int N> __device__ __forceinline__ void scan_backward_lanes(const ScanBwdParams& p) {
    constexpr int SPL = SCAN_BWD_SPL, LPC = N / SPL, T = SCAN_BWD_LANE_THREADS, CH = T / LPC;
    constexpr int SUB = SCAN_BWD_SUB, NW = T / 32;
    static_assert(SPL == 4, "a lane's states are one float4 (loads, kept states)");
    static_assert(SUB * CH >= T, "the closing dD, d(dt_bias) sums reuse t_sum, one float a thread");
    __shared__ float t_u[SUB * CH], t_d[SUB * CH], t_gy[SUB * CH], t_sr[SUB * CH];
    __shared__ float t_z[SUB * CH], t_sz[SUB * CH], t_g[SUB * CH];
    __shared__ __align__(16) float t_bc[SUB * 2 * N];  // [step][B | C]
    __shared__ float t_sum[3][SUB * CH];                 // y, ∂u, ∂δ sums over states
    __shared__ float t_red[SUB][NW][2 * N];              // ∂B | ∂C per warp
    const int E = p.E, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = tid % LPC, ch = tid / LPC, c0 = blockIdx.x * CH, c = c0 + ch, s = blockIdx.y;
    const bool on = c < E;
    const long row0 = (long)s * p.L;
    float A[SPL], A2[SPL];
#pragma unroll
    for (int j = 0; j < SPL; j++) {
        A[j] = on ? -expf(p.a_log[c * N + g * SPL + j]) : 0.0f;
        A2[j] = A[j] * 1.44269504088896340736f;
    }
    const int nsub = (p.L + SUB - 1) / SUB;
    float4* ck = reinterpret_cast<float4*>(p.ckpt + ((long)s * nsub * E + c) * N + g * SPL);
    const long ck_step = (long)E * N / SPL;

    // Stages sub-chunk j (all of it when `full`, else u, δ and B for the first walk).
    auto load = [&](int j, bool full) {
        const int t0 = j * SUB;
        for (int k = tid; k < SUB * CH; k += T) {
            const int i = k / CH, cc = c0 + k % CH, t = t0 + i;
            float u = 0.0f, d = 0.0f, sr = 0.0f, z = 0.0f, sz = 0.0f, gr = 0.0f;
            if (cc < E && t < p.L) {
                const long r = row0 + t;
                const float raw = p.dt[r * p.dt_rs + cc] + p.dt_bias[cc];
                u = p.u[r * p.u_rs + cc];
                d = softplus(raw);
                if (full) {
                    sr = 1.0f / (1.0f + expf(-raw));
                    gr = p.gy[r * E + cc];
                    if (p.z) {
                        z = p.z[r * p.z_rs + cc];
                        sz = 1.0f / (1.0f + expf(-z));
                    }
                }
            }
            t_u[k] = u;
            t_d[k] = d;
            if (full) {
                t_sr[k] = sr;
                t_z[k] = z;
                t_sz[k] = sz;
                t_g[k] = gr;
                t_gy[k] = p.z ? gr * z * sz : gr;
            }
        }
        for (int k = tid; k < SUB * 2 * N; k += T) {
            const int i = k / (2 * N), q = k % (2 * N), t = t0 + i;
            float v = 0.0f;
            if (t < p.L && (full || q < N)) {
                const long r = row0 + t;
                v = q < N ? p.b[r * p.bc_rs + q] : p.cm[r * p.bc_rs + q - N];
            }
            t_bc[k] = v;
        }
    };
    auto row4 = [&](int i, int half) { return *reinterpret_cast<const float4*>(&t_bc[i * 2 * N + half * N + g * SPL]); };

    // First walk: the state entering every sub-chunk.
    float h[SPL] = {};
    for (int j = 0; j < nsub; j++) {
        load(j, false);
        __syncthreads();
        if (on) ck[j * ck_step] = make_float4(h[0], h[1], h[2], h[3]);
#pragma unroll
        for (int i = 0; i < SUB; i++) {
            const float d = t_d[i * CH + ch], du = d * t_u[i * CH + ch];
            const float4 b4 = row4(i, 0);
            const float b[SPL] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int q = 0; q < SPL; q++) h[q] = fmaf(exp2f(d * A2[q]), h[q], du * b[q]);
        }
        __syncthreads();
    }

    float gh[SPL] = {}, ga[SPL] = {}, acc_d = 0.0f, acc_bias = 0.0f;
    for (int j = nsub - 1; j >= 0; j--) {
        const int t0 = j * SUB;
        load(j, true);
        __syncthreads();
        const float4 h0 = on ? ck[j * ck_step] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        float hs[SUB + 1][SPL] = {{h0.x, h0.y, h0.z, h0.w}}, dk[SUB][SPL];  // hs[i]: before step t0 + i
#pragma unroll
        for (int i = 0; i < SUB; i++) {
            const float d = t_d[i * CH + ch], du = d * t_u[i * CH + ch];
            const float4 b4 = row4(i, 0);
            const float b[SPL] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int q = 0; q < SPL; q++) {
                dk[i][q] = exp2f(d * A2[q]);
                hs[i + 1][q] = fmaf(dk[i][q], hs[i][q], du * b[q]);
            }
        }
#pragma unroll
        for (int i = SUB - 1; i >= 0; i--) {
            const float d = t_d[i * CH + ch], u = t_u[i * CH + ch], gy = t_gy[i * CH + ch];
            const float4 b4 = row4(i, 0), c4 = row4(i, 1);
            const float b[SPL] = {b4.x, b4.y, b4.z, b4.w}, cm[SPL] = {c4.x, c4.y, c4.z, c4.w};
            float ys = 0.0f, gus = 0.0f, gds = 0.0f, v[2 * SPL];
#pragma unroll
            for (int q = 0; q < SPL; q++) {
                gh[q] = fmaf(cm[q], gy, gh[q]);
                ys = fmaf(cm[q], hs[i + 1][q], ys);
                gus = fmaf(gh[q], b[q], gus);
                const float dh = dk[i][q] * hs[i][q];
                gds = fmaf(gh[q], fmaf(A[q], dh, b[q] * u), gds);
                ga[q] = fmaf(gh[q], d * dh, ga[q]);
                v[q] = gh[q] * d * u;
                v[SPL + q] = gy * hs[i + 1][q];
                gh[q] *= dk[i][q];
            }
            // Over the channel's lanes.
#pragma unroll
            for (int o = 1; o < LPC; o <<= 1) {
                ys += shfl_xor(ys, o);
                gus += shfl_xor(gus, o);
                gds += shfl_xor(gds, o);
            }
            if (g == 0) {
                t_sum[0][i * CH + ch] = ys;
                t_sum[1][i * CH + ch] = gus * d;
                t_sum[2][i * CH + ch] = gds;
            }
            // Over the warp's channels (lanes o apart hold the same states): while a lane has
            // several values it keeps half, its partner the other half; then plain sums, whose
            // lanes (`dup`) hold copies.
            int cnt = 2 * SPL, base = 0, dup = 0;
#pragma unroll
            for (int o = 16; o >= LPC; o >>= 1) {
                if (cnt > 1) {
                    const bool up = lane & o;
                    const int half = cnt / 2;
#pragma unroll
                    for (int k = 0; k < half; k++) {
                        const float keep = up ? v[k + half] : v[k], send = up ? v[k] : v[k + half];
                        v[k] = keep + shfl_xor(send, o);
                    }
                    base += up ? half : 0;
                    cnt = half;
                } else {
                    v[0] += shfl_xor(v[0], o);
                    dup |= o;
                }
            }
            if ((lane & dup) == 0) {
#pragma unroll
                for (int k = 0; k < cnt; k++) {
                    const int idx = base + k;
                    t_red[i][warp][(idx / SPL) * N + g * SPL + idx % SPL] = v[k];
                }
            }
        }
        __syncthreads();
        // One thread per (step, channel): ∂z, ∂u, ∂δ and the gated output.
        for (int k = tid; k < SUB * CH; k += T) {
            const int i = k / CH, cc = c0 + k % CH, t = t0 + i;
            if (cc < E && t < p.L) {
                const long r = row0 + t;
                const float u = t_u[k], gy = t_gy[k], dd = p.d[cc], yd = t_sum[0][k] + dd * u;
                if (p.z) {
                    const float z = t_z[k], sz = t_sz[k];
                    p.gz[r * p.z_rs + cc] = t_g[k] * yd * sz * (1.0f + z * (1.0f - sz));
                    p.y[r * E + cc] = yd * z * sz;
                } else {
                    p.y[r * E + cc] = yd;
                }
                const float graw = t_sum[2][k] * t_sr[k];
                p.gu[r * E + cc] = t_sum[1][k] + dd * gy;
                p.gdt[r * E + cc] = graw;
                acc_d += gy * u;
                acc_bias += graw;
            }
        }
        for (int k = tid; k < SUB * 2 * N; k += T) {
            const int i = k / (2 * N), q = k % (2 * N);
            if (t0 + i < p.L) {
                float v = 0.0f;
#pragma unroll
                for (int w = 0; w < NW; w++) v += t_red[i][w][q];
                p.parts_bc[(((long)s * gridDim.x + blockIdx.x) * p.L + t0 + i) * 2 * N + q] = v;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < SPL; q++)
        if (on) p.parts_a[((long)s * E + c) * N + g * SPL + q] = ga[q] * A[q];  // ∂A_log = ∂A · A
    // ∂D, ∂dt_bias: thread k summed channel k % CH; add up the threads of each channel.
    t_sum[0][tid] = acc_d;
    t_sum[1][tid] = acc_bias;
    __syncthreads();
    if (tid < CH && c0 + tid < E) {
        float gd = 0.0f, gb = 0.0f;
        for (int k = tid; k < T; k += CH) {
            gd += t_sum[0][k];
            gb += t_sum[1][k];
        }
        p.parts_dd[(long)s * 2 * E + c0 + tid] = gd;
        p.parts_dd[(long)s * 2 * E + E + c0 + tid] = gb;
    }
}

#define SCAN_BACKWARD(N)                                                                              \
    extern "C" __global__ void __launch_bounds__(SCAN_BWD_LANE_THREADS, 4) scan_backward_##N(const ScanBwdParams p) { \
        scan_backward_lanes<N>(p);                                                                    \
    }
SCAN_BACKWARD(8)
SCAN_BACKWARD(16)
SCAN_BACKWARD(32)

struct ScanA2Params {
    const float* a_log;  // (E, N)
    float* a2;           // (N, E)
    int E, N;
};

extern "C" __global__ void scan_a2(const ScanA2Params p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.E * p.N) return;
    const int c = i / p.N, n = i % p.N;
    p.a2[n * p.E + c] = -expf(p.a_log[i]) * 1.44269504088896340736f;
}
