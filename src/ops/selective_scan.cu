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
// state. Bytes per (t, c): u, δ, z read and y written (8 in 16-bit types; B, C are per group and
// hit in L1), twice u and δ when chunked. FLOPs: ~6N per (t, c) plus N exp2 — at N = 16 the
// special-function unit (16 exp2/clk/SM) is the roof for long sequences, not HBM.

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
    int bc_vec;             // B and C rows are 16-byte aligned and N fills whole 16-byte pieces
    float dt_min, dt_max;
};

__device__ __forceinline__ long state_index(const ScanParams& p, int c, int n) {
    return ((long)(c / p.p_blk) * p.N + n) * p.p_blk + c % p.p_blk;
}

// Steps per tile: each thread loads its u, δ, z for a tile of steps before using any, so the
// loads' latencies overlap instead of stalling every step. B and C (one row per step, the same
// for every channel of a group) are read through L1, where the block's warps share them, in
// 16-byte pieces when aligned: the load instructions, not bytes, bound this loop.
// Mamba-1's instance (N ≤ 16) is latency-bound: a short tile and a 64-register cap (8 blocks of
// 128 threads per SM) beat deeper prefetch at lower occupancy (measured: 1.5× at L = 64K).
// Mamba-2's (N up to 128) keeps its states in registers uncapped.
#define SCAN_TILE(NMAX) ((NMAX) <= 16 ? 4 : 8)
#define SCAN_MIN_BLOCKS(NMAX) ((NMAX) <= 16 ? 8 : 1)

// NMAX: the largest N the instance handles (register arrays need a constant size). SCALAR_A: A
// is one value per channel (Mamba-2), so the decay is one exp2 per step instead of N. S: each
// channel's states are split over S adjacent lanes (NMAX / S each, a multiple of 8): more
// threads in flight for the same work, the readout summed by warp shuffles; the lanes share the
// channel's δ and u (so Mamba-1, whose softplus they then repeat, splits only when the sequence
// is too short for chunks to fill the GPU). Mamba-2 always splits, 16 states to a lane.
template <typename T, int NMAX, bool SCALAR_A, int S, bool OUT> __device__ void scan_chunk(const ScanParams& p) {
    constexpr int VB = 16 / sizeof(T);
    constexpr int TILE = SCAN_TILE(NMAX);
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
    const long g = (long)(cc / p.g_ch) * N + n0;
    const T* up = (const T*)p.u + cc;
    const T* dtp = (const T*)p.dt + cc / p.dt_div;
    const T* zp = (const T*)p.z + cc;
    T* yp = (T*)p.y + c;
    float dtsum = 0.0f;
    for (int tt = t0; tt < t1; tt += TILE) {
        const int nt = min(TILE, t1 - tt);
        const long r0 = (long)s * p.L + tt;
        float u[TILE], dt[TILE], z[TILE];
#pragma unroll
        for (int j = 0; j < TILE; j++) {
            if (j < nt) {
                const long r = r0 + j;
                u[j] = to_f32(up[r * p.u_rs]);
                dt[j] = to_f32(dtp[r * p.dt_rs]);
                z[j] = OUT && p.z ? to_f32(zp[r * p.z_rs]) : 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < TILE; j++) {
            if (j < nt) {
                const long r = r0 + j;
                const T* bt = (const T*)p.b + r * p.bc_rs + g;
                const T* ct = (const T*)p.cm + r * p.bc_rs + g;
                const float d = fminf(fmaxf(softplus(dt[j] + bias), p.dt_min), p.dt_max);
                const float du = d * u[j];
                const float decay = SCALAR_A ? exp2f(d * a2[0]) : 0.0f;
                float acc = 0.0f;
#pragma unroll
                for (int i0 = 0; i0 < NS; i0 += VB) {
                    if (n0 + i0 < N) {
                        float bb[VB], cc2[VB];
                        if (p.bc_vec) {
                            const uint4 qb = *(const uint4*)(bt + i0);
                            const uint4 qc = OUT ? *(const uint4*)(ct + i0) : qb;
#pragma unroll
                            for (int i = 0; i < VB; i++) {
                                bb[i] = to_f32(((const T*)&qb)[i]);
                                cc2[i] = to_f32(((const T*)&qc)[i]);
                            }
                        } else {
#pragma unroll
                            for (int i = 0; i < VB; i++) {
                                bb[i] = n0 + i0 + i < N ? to_f32(bt[i0 + i]) : 0.0f;
                                cc2[i] = OUT && n0 + i0 + i < N ? to_f32(ct[i0 + i]) : 0.0f;
                            }
                        }
#pragma unroll
                        for (int i = 0; i < VB; i++) {
                            const int j2 = i0 + i;
                            if (n0 + j2 < N) {
                                h[j2] = (SCALAR_A ? decay : exp2f(d * a2[SCALAR_A ? 0 : j2])) * h[j2] + du * bb[i];
                                if (OUT) acc += cc2[i] * h[j2];
                            }
                        }
                    }
                }
                if (OUT) {
#pragma unroll
                    for (int o = S / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                    float y = acc + dskip * u[j];
                    if (p.z) y *= silu(z[j]);
                    if (on && n0 == 0) yp[r * p.y_rs] = from_f32<T>(y);
                }
                dtsum += d;
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
    // Loads a batch of chunks ahead of the (dependent) carry chain, so their latencies overlap.
    constexpr int B = 8;
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
                carry = exp2f(a2 * dsum[j]) * carry + end[j];
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
