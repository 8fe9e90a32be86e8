// The selective scan of Mamba-1, fused: softplus(δ + bias) discretisation, the recurrence
// h_t = exp(δ_t A) h_t−1 + δ_t B_t u_t, the readout y_t = C_t·h_t + D u_t and the SiLU(z) gate in
// one pass over the inputs, with the state in f32 registers. Mamba-2's SSD is the same recurrence
// with δ and A shared by the P channels of a head and B, C shared by a group, so it runs here too
// (channel c = head·P + p; see the index parameters).
//
// Parallel over the sequence as well as the channels, so batch 1 with a long sequence fills the
// GPU (the official kernel walks L sequentially per channel block):
//   scan_end   (when L is cut into K chunks) each thread scans one (channel, chunk) from a zero
//              state and writes the chunk's end state and Σδ over the chunk;
//   scan_carry one thread per (channel, state) walks the K chunk summaries: the state entering
//              chunk k+1 is exp(A·Σδ_k)·h_in,k + h_end,k (A is constant over the chunk);
//   scan_out   each (channel, chunk) rescans from its true entering state and writes y.
// With K = 1 (decode, short prompts, big batches) scan_out alone runs, reading and writing the
// state. Bytes per (t, c): u, δ, z read and y written (8 in 16-bit types; B, C are per group,
// read once per block), twice u and δ when chunked. Work per (t, c, state): one exp2 and ~5
// other instructions per pass — at N = 16 the special-function unit (16 exp2/clk/SM: 4.2e12/s
// on an H100) and the issue rate are the roof for long sequences, not HBM.

struct ScanParams {
    const void* u;          // u of row r (= s·L + t), channel c at u[r·u_rs + c], T
    const void* dt;         // raw δ at dt[r·dt_rs + c/dt_div], T
    const float* dt_bias;   // [c/dt_div]
    const float* a2;        // A·log2(e) at a2[n·a_ns + c/a_div]
    const void* b;          // B at b[r·bc_rs + (c/g_ch)·N + n], T
    const void* cm;         // C likewise
    const float* d;         // D at d[c/d_div], or null
    const void* z;          // gate z[r·z_rs + c], or null
    float* state;           // sequence s: state + s·state_stride + ((c/p_blk)·N + n)·p_blk + c%p_blk
    void* y;                // y[r·y_rs + c], T
    float* chunk_h;         // (S, K, N, E) workspace
    float* chunk_dt;        // (S, K, E) workspace
    long state_stride;
    int u_rs, dt_rs, dt_div, a_ns, a_div, bc_rs, g_ch, d_div, z_rs, p_blk, y_rs;
    int L, E, N, chunk;
    int gpb;                // groups a block of scan_chunk may touch (its staged B, C rows)
    float dt_min, dt_max;
};

__device__ __forceinline__ long state_index(const ScanParams& p, int c, int n) {
    return ((long)(c / p.p_blk) * p.N + n) * p.p_blk + c % p.p_blk;
}

// Steps per tile: each thread loads its u, δ, z for a tile of steps before using any, so the
// loads' latencies overlap instead of stalling every step. B and C (one row per step, the same
// for every channel of a group) are staged by the block into shared memory, SCAN_STAGE steps at
// a time and already in f32, so the inner loop reads them as broadcast 16-byte loads with no
// conversions. The loop is then bound by the special-function unit (one exp2 per state) and the
// issue rate; Mamba-1's instance (N ≤ 16) is latency-bound at its 64-register cap (8 blocks of
// 128 threads per SM), which beats deeper prefetch at lower occupancy. Mamba-2's (N up to 128)
// keeps its states in registers uncapped.
#define SCAN_TILE(NMAX) ((NMAX) <= 16 ? 2 : 8)
#define SCAN_MIN_BLOCKS(NMAX) ((NMAX) <= 16 ? 8 : 1)
#define SCAN_STAGE(NMAX) ((NMAX) <= 16 ? 32 : 8)

// NMAX: the largest N the instance handles (register arrays need a constant size). SCALAR_A: A
// is one value per channel (Mamba-2), so the decay is one exp2 per step instead of N. S: each
// channel's states are split over S adjacent lanes (NMAX / S each, a multiple of 8): more
// threads in flight for the same work, the readout summed by warp shuffles; the lanes share the
// channel's δ and u (so Mamba-1, whose softplus they then repeat, splits only when the sequence
// is too short for chunks to fill the GPU). Mamba-2 always splits, 16 states to a lane.
// Shared memory: SCAN_STAGE steps × gpb groups × (B, C) × NMAX floats, zero past N.
template <typename T, int NMAX, bool SCALAR_A, int S, bool OUT> __device__ void scan_chunk(const ScanParams& p) {
    extern __shared__ float4 stage4[];
    float* stage = (float*)stage4;
    constexpr int TILE = SCAN_TILE(NMAX), STAGE = SCAN_STAGE(NMAX);
    constexpr int NS = NMAX / S;
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) / S, n0 = threadIdx.x % S * NS;
    // Lanes past the last channel run along (guarded) so the shuffles see whole groups.
    const bool on = c < p.E;
    const int k = blockIdx.y, K = gridDim.y, s = blockIdx.z, N = p.N;
    const int t0 = k * p.chunk, t1 = min(t0 + p.chunk, p.L);
    float a2[SCALAR_A ? 1 : NS], h[NS];
    float* st = p.state + s * p.state_stride;
    float* ch = p.chunk_h + ((long)(s * K + k) * N) * p.E + c;
#pragma unroll
    for (int j = 0; j < NS; j++) {
        const int n = n0 + j;
        if (on && n < N) {
            if (!SCALAR_A || j == 0) a2[SCALAR_A ? 0 : j] = p.a2[n * p.a_ns + c / p.a_div];
            h[j] = !OUT ? 0.0f : (K == 1 ? st[state_index(p, c, n)] : ch[(long)n * p.E]);
        } else {
            if (!SCALAR_A || j == 0) a2[SCALAR_A ? 0 : j] = 0.0f;
            h[j] = 0.0f;
        }
    }
    const int cc = on ? c : 0;  // loads of idle lanes stay in bounds
    const float bias = p.dt_bias[cc / p.dt_div];
    const float dskip = p.d ? p.d[cc / p.d_div] : 0.0f;
    const int g0 = blockIdx.x * blockDim.x / S / p.g_ch;  // the block's first group
    const int slot = (cc / p.g_ch - g0) * 2 * NMAX + n0;   // this lane's B row in a staged step
    const int row = p.gpb * 2 * NMAX;                       // floats per staged step
    const T* up = (const T*)p.u + cc;
    const T* dtp = (const T*)p.dt + cc / p.dt_div;
    const T* zp = (const T*)p.z + cc;
    T* yp = (T*)p.y + c;
    float dtsum = 0.0f;
    // Raw u, δ, z of the next tile, loaded a tile ahead so their latency hides behind a tile
    // of work.
    T nu[TILE] = {}, ndt[TILE] = {}, nz[TILE] = {};
    auto fetch = [&](int tt) {
#pragma unroll
        for (int j = 0; j < TILE; j++) {
            if (tt + j < t1) {
                const long r = (long)s * p.L + tt + j;
                nu[j] = up[r * p.u_rs];
                ndt[j] = dtp[r * p.dt_rs];
                if (OUT && p.z) nz[j] = zp[r * p.z_rs];
            }
        }
    };
    fetch(t0);
    for (int ts = t0; ts < t1; ts += STAGE) {
        const int ns = min(STAGE, t1 - ts);
        // Stage B, C of steps ts … ts + ns − 1 for the block's groups (past G: zeros, unused).
        __syncthreads();  // the previous stage has been read
        for (int i = threadIdx.x; i < ns * row; i += blockDim.x) {
            const int j = i / row, w = i % row, gi = w / (2 * NMAX), bc = w / NMAX % 2, n = w % NMAX;
            const int gg = g0 + gi;
            float v = 0.0f;
            if (n < N && gg * p.g_ch < p.E) {
                const T* src = (const T*)(bc ? p.cm : p.b);
                if (OUT || bc == 0) v = to_f32(src[((long)s * p.L + ts + j) * p.bc_rs + (long)gg * N + n]);
            }
            stage[i] = v;
        }
        __syncthreads();
        for (int tt = ts; tt < ts + ns; tt += TILE) {
            const int nt = min(TILE, ts + ns - tt);
            const long r0 = (long)s * p.L + tt;
            float u[TILE], dt[TILE], z[TILE];
#pragma unroll
            for (int j = 0; j < TILE; j++) {
                u[j] = to_f32(nu[j]);
                dt[j] = to_f32(ndt[j]);
                z[j] = to_f32(nz[j]);
            }
            if (tt + TILE < t1) fetch(tt + TILE);
#pragma unroll
            for (int j = 0; j < TILE; j++) {
                if (j < nt) {
                    const float* bs = stage + (tt - ts + j) * row + slot;
                    const float d = fminf(fmaxf(softplus(dt[j] + bias), p.dt_min), p.dt_max);
                    const float du = d * u[j];
                    const float decay = SCALAR_A ? exp2_ftz(d * a2[0]) : 0.0f;
                    float acc = 0.0f;
                    // Branch-free over the states, so their chains interleave: states past N
                    // have A = 0 and B = C = 0, so they stay zero and add nothing.
#pragma unroll
                    for (int i0 = 0; i0 < NS; i0 += 4) {
                        const float4 b4 = *(const float4*)(bs + i0);
                        const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
                        float cc4[4] = {};
                        if (OUT) {
                            const float4 c4 = *(const float4*)(bs + NMAX + i0);
                            cc4[0] = c4.x, cc4[1] = c4.y, cc4[2] = c4.z, cc4[3] = c4.w;
                        }
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            const int j2 = i0 + i;
                            h[j2] = fmaf(SCALAR_A ? decay : exp2_ftz(d * a2[SCALAR_A ? 0 : j2]), h[j2], du * bb[i]);
                            if (OUT) acc = fmaf(cc4[i], h[j2], acc);
                        }
                    }
                    if (OUT) {
#pragma unroll
                        for (int o = S / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                        float y = acc + dskip * u[j];
                        if (p.z) y *= silu(z[j]);
                        if (on && n0 == 0) yp[(r0 + j) * p.y_rs] = from_f32<T>(y);
                    }
                    dtsum += d;
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NS; j++) {
        const int n = n0 + j;
        if (on && n < N) {
            if (!OUT) ch[(long)n * p.E] = h[j];
            else if (K == 1) st[state_index(p, c, n)] = h[j];
        }
    }
    if (!OUT && on && n0 == 0) p.chunk_dt[(long)(s * K + k) * p.E + c] = dtsum;
}

extern "C" __global__ void __launch_bounds__(128) scan_carry(const ScanParams p, int K) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.N * p.E) return;
    const int n = i / p.E, c = i % p.E, s = blockIdx.y;
    const float a2 = p.a2[n * p.a_ns + c / p.a_div];
    float* st = p.state + s * p.state_stride + state_index(p, c, n);
    float carry = *st;
    // Loads a batch of chunks ahead of the (dependent) carry chain, so their latencies overlap
    // (measured at L = 2K, 128 chunks: 32 beats 16 and 8).
    constexpr int B = 32;
    for (int k0 = 0; k0 < K; k0 += B) {
        float end[B], dsum[B];
#pragma unroll
        for (int j = 0; j < B; j++) {
            if (k0 + j < K) {
                const long sk = s * K + k0 + j;
                end[j] = p.chunk_h[sk * p.N * p.E + (long)n * p.E + c];
                dsum[j] = p.chunk_dt[sk * p.E + c];
            }
        }
#pragma unroll
        for (int j = 0; j < B; j++) {
            if (k0 + j < K) {
                p.chunk_h[(s * K + k0 + j) * p.N * p.E + (long)n * p.E + c] = carry;
                carry = exp2_ftz(a2 * dsum[j]) * carry + end[j];
            }
        }
    }
    *st = carry;
}

#define SCAN_KERNELS(T, NMAX, A, SCALAR, S)                                                           \
    extern "C" __global__ void __launch_bounds__(128, SCAN_MIN_BLOCKS(NMAX)) scan_end_##T##_##NMAX##A(const ScanParams p) {   \
        scan_chunk<T, NMAX, SCALAR, S, false>(p);                                                     \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128, SCAN_MIN_BLOCKS(NMAX)) scan_out_##T##_##NMAX##A(const ScanParams p) {   \
        scan_chunk<T, NMAX, SCALAR, S, true>(p);                                                      \
    }
// Instances are made by the loader, one compilation each: SCAN_KERNELS(type, NMAX, kind, bool,
// lanes), kind v for A per (channel, state) (Mamba-1), w for the same on 2 lanes per channel, s
// for A per channel (Mamba-2, NMAX / 16 lanes).
