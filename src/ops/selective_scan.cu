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
// With K = 1 (short prompts, big batches) scan_out alone runs, reading and writing the state;
// the decode step of a batch is scan_step for Mamba-1 (dt_proj fused) and ssd_step for Mamba-2
// (below).
// Bytes per (t, c): u, δ, z read and y written (8 in 16-bit types; B, C are per group, read once
// per block), twice u and δ when chunked. Work per (t, c, state): one exp2 and ~5
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

// ---- One lane per state: Mamba-1 (N = 16) over the whole sequence in one pass -------------
//
// When sequences × channels are too few to fill the GPU with a thread per channel (under 128K:
// batch 1 at any width, batch 16 at 1.4B), the chunked passes above compute every exp2 twice:
// for the chunk ends, then again for the outputs. Here each of a channel's 16 states gets a lane
// of its own instead: 16× the threads, so one pass over the sequence fills the GPU with one exp2
// per (step, channel, state), the least there is. What it costs instead is the readout
// y_t = Σ_n C_t,n h_t,n across 16 lanes, done per tile of 32 steps as a transpose through shared
// memory after which lane q owns steps q and q + 16; the per-(step, channel) work (softplus, D,
// gate) is shared out the same way.
// A block is 8 channels × 16 states = 4 warps, one per SM quarter at D = 1024, so there is no
// other warp to hide latency behind: each tile's loop body is one stretch without branches that
// issues all its shared-memory loads first and its stores last, and runs the readout of the tile
// before and the preparation of the tile after beside this tile's scan, which depends on neither.
// The inputs stream through a ring of STATES_RING tiles that cp.async fills (16-byte pieces: 8
// channels of a u, δ, z row; B and C rows), deep enough to cover HBM latency.
// Bytes per (t, c): u, δ, z read and y written once (8 in 16-bit types). Work per (t, c, state):
// one exp2 and ~15 other instructions (~520 per lane and tile in the SASS), issued at ~2 cycles
// each with one warp per quarter — which at D = 1024 ties the chunked passes (bound by their two
// exp2 per state) from 64K steps on, and beats them by up to 2.2× below; wider layers bring
// more warps per quarter.
#define STATES_TILE 32
#define STATES_CH 8
// Tiles in the ring: 3 ahead of the one in use, ~100 steps, enough for HBM latency at D = 1024;
// with the rest a block has 48 KB of shared memory in 16-bit types, so 4 blocks fit an SM when
// the layer is wide.
#define STATES_RING 4
#define STATES_RED (STATES_TILE * 20 + 16)  // floats per channel of the readout transpose (see below)

template <typename T> struct StatesSlot {  // one tile of inputs, as copied
    T u[STATES_TILE][STATES_CH], dt[STATES_TILE][STATES_CH], z[STATES_TILE][STATES_CH];
    T b[STATES_TILE][16], c[STATES_TILE][16];
};
// Dynamic shared memory of scan_states (model.rs's states_smem mirrors its size). bc, dd and y
// hold two tiles: the one being read and the one being written.
template <typename T> struct StatesSmem {
    StatesSlot<T> ring[STATES_RING];
    float2 bc[2][STATES_TILE][16];              // (B, C) per step and state in f32
    float2 dd[2][STATES_CH][STATES_TILE];       // (δ, δ·u) per channel and step
    float red[STATES_CH][STATES_RED];           // C·h per step (row) and state, rows of 20 floats
    T y[2][STATES_TILE][STATES_CH];             // outputs, stored by rows
};

template <typename T> __device__ void scan_states(const ScanParams& p) {  // 128 threads
    extern __shared__ float4 states_smem[];
    StatesSmem<T>& sm = *(StatesSmem<T>*)states_smem;
    const int tid = threadIdx.x, cl = tid / 16, q = tid % 16;  // lane q of channel cl: state q
    const int c0 = blockIdx.x * STATES_CH, c = c0 + cl, s = blockIdx.y, L = p.L;
    const int tiles = (L + STATES_TILE - 1) / STATES_TILE;
    const long row0 = (long)s * L;
    // 16-byte pieces of a row: u, δ, z (CU each), B, C (CB each). A thread copies one piece
    // kind (k) of rows j0, j0 + RSTEP, …: its source and destination are fixed but for the row.
    // Without a gate, u stands in for z (copied, unused). Rows past the end are zero-filled, so
    // the masked steps see finite B, C.
    constexpr int CU = STATES_CH * sizeof(T) / 16, CB = 16 * sizeof(T) / 16, ROW = 3 * CU + 2 * CB;
    constexpr int ROWP = ROW <= 8 ? 8 : 16, RSTEP = 128 / ROWP;  // threads per row, rows per round
    const int k = tid % ROWP, j0 = tid / ROWP;
    const char* src = nullptr;
    long src_rs = 0;  // bytes from row to row
    int dst = 0;      // byte offset in a slot
    if (k < 3 * CU) {
        const int which = k / CU, part = k % CU;
        const void* base = which == 0 ? p.u : which == 1 ? p.dt : p.z ? p.z : p.u;
        const int rs = which == 0 ? p.u_rs : which == 1 ? p.dt_rs : p.z ? p.z_rs : p.u_rs;
        src = (const char*)base + (row0 * rs + c0) * sizeof(T) + part * 16;
        src_rs = (long)rs * sizeof(T);
        const StatesSlot<T>& s0 = sm.ring[0];
        dst = (const char*)(which == 0 ? s0.u[j0] : which == 1 ? s0.dt[j0] : s0.z[j0]) - (const char*)&s0 + part * 16;
    } else if (k < ROW) {
        const int which = (k - 3 * CU) / CB, part = (k - 3 * CU) % CB;
        src = (const char*)(which ? p.cm : p.b) + row0 * p.bc_rs * sizeof(T) + part * 16;
        src_rs = (long)p.bc_rs * sizeof(T);
        const StatesSlot<T>& s0 = sm.ring[0];
        dst = (const char*)(which ? s0.c[j0] : s0.b[j0]) - (const char*)&s0 + part * 16;
    }
    const int dst_rs = k < 3 * CU ? STATES_CH * sizeof(T) : 16 * sizeof(T);
    auto issue = [&](int tile) {
        if (k < ROW && tile < tiles) {
            char* sl = (char*)&sm.ring[tile % STATES_RING];
#pragma unroll
            for (int m = 0; m < STATES_TILE / RSTEP; m++) {
                const int t = tile * STATES_TILE + j0 + m * RSTEP;
                cp16_or_zero(sl + dst + m * RSTEP * dst_rs, src + (long)min(t, L - 1) * src_rs, t < L);
            }
        }
        cp_commit();  // a group per tile, empty past the end, so the waits below count tiles
    };
    // B, C of a tile to f32 (B, C) pairs: a thread converts two states of a step at a time.
    // Loads and stores are apart (here and below) so the loop can issue every load first and
    // every store last, leaving the arithmetic between them free to interleave.
    constexpr int CONV = STATES_TILE * 8 / 128;  // (B, C) pairs of states per thread
    auto convert_load = [&](int tile, T (&raw)[CONV][4]) {
        const StatesSlot<T>& sl = sm.ring[tile % STATES_RING];
#pragma unroll
        for (int k = 0; k < CONV; k++) {
            const int i = tid + 128 * k, j = i / 8, n = i % 8 * 2;
            raw[k][0] = sl.b[j][n], raw[k][1] = sl.c[j][n], raw[k][2] = sl.b[j][n + 1], raw[k][3] = sl.c[j][n + 1];
        }
    };
    auto convert_store = [&](int tile, const T (&raw)[CONV][4]) {
#pragma unroll
        for (int k = 0; k < CONV; k++) {
            const int i = tid + 128 * k, j = i / 8, n = i % 8 * 2;
            *(float4*)&sm.bc[tile % 2][j][n] = make_float4(to_f32(raw[k][0]), to_f32(raw[k][1]), to_f32(raw[k][2]), to_f32(raw[k][3]));
        }
    };
    // Lane q prepares steps q and q + 16 of its channel: (δ, δ·u) for the scan, D·u and the
    // gate (sg) for the output. Steps past the end get δ = 0: decay 1, input 0.
    const float bias = p.dt_bias[c], dskip = p.d ? p.d[c] : 0.0f;
    auto prep_load = [&](int tile, T (&raw)[2][3]) {
        const StatesSlot<T>& sl = sm.ring[tile % STATES_RING];
#pragma unroll
        for (int k = 0; k < 2; k++) raw[k][0] = sl.u[q + 16 * k][cl], raw[k][1] = sl.dt[q + 16 * k][cl], raw[k][2] = sl.z[q + 16 * k][cl];
    };
    auto prep_store = [&](int tile, const T (&raw)[2][3], float4& sg) {
        float2 dd[2];
        float o[4];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const float u = to_f32(raw[k][0]);
            const float d = fminf(fmaxf(softplus(to_f32(raw[k][1]) + bias), p.dt_min), p.dt_max);
            const bool live = tile * STATES_TILE + q + 16 * k < L;
            dd[k] = live ? make_float2(d, d * u) : make_float2(0.0f, 0.0f);
            const float g = silu(to_f32(raw[k][2]));
            o[2 * k] = dskip * u;
            o[2 * k + 1] = p.z ? g : 1.0f;
        }
        sg = make_float4(o[0], o[1], o[2], o[3]);
        sm.dd[tile % 2][cl][q] = dd[0];
        sm.dd[tile % 2][cl][q + 16] = dd[1];
    };
    // Transposed through shared memory: lane q sums the rows of steps q and q + 16 of the
    // products C·h its channel's lanes stored as columns. Rows of 20 floats and channels
    // STATES_RED apart keep both the column writes and the 16-byte row reads free of bank
    // conflicts.
    auto readout_load = [&](int tile, float4 (&v)[2][4]) {
        const float* red = sm.red[cl];
#pragma unroll
        for (int k = 0; k < 2; k++)
#pragma unroll
            for (int i = 0; i < 4; i++) v[k][i] = *(const float4*)&red[(q + 16 * k) * 20 + 4 * i];
    };
    auto readout_store = [&](int tile, const float4 (&v)[2][4], float4 sg) {
        float y[2];
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const float4* w = v[k];
            y[k] = (((w[0].x + w[0].y) + (w[0].z + w[0].w)) + ((w[1].x + w[1].y) + (w[1].z + w[1].w))) +
                   (((w[2].x + w[2].y) + (w[2].z + w[2].w)) + ((w[3].x + w[3].y) + (w[3].z + w[3].w)));
        }
        sm.y[tile % 2][q][cl] = from_f32<T>((y[0] + sg.x) * sg.y);
        sm.y[tile % 2][q + 16][cl] = from_f32<T>((y[1] + sg.z) * sg.w);
    };
    auto store_y = [&](int tile) {  // a 16-byte piece per thread (STATES_TILE · CU ≤ 128)
        const int j = tid / CU, part = tid % CU, t = tile * STATES_TILE + j;
        if (tid < STATES_TILE * CU && t < L)
            *(float4*)((char*)p.y + ((row0 + t) * p.y_rs + c0) * sizeof(T) + part * 16) =
                *(const float4*)((const char*)sm.y[tile % 2][j] + part * 16);
    };
    const float a2 = p.a2[q * p.a_ns + c];
    float* st = p.state + s * p.state_stride + state_index(p, c, q);
    float h = *st;
    // D·u and gate of steps q, q + 16 (x, y; z, w) of the tiles before, at and after this one.
    float4 sg_prev = make_float4(0.0f, 0.0f, 0.0f, 0.0f), sg_cur;

    for (int i = 0; i < STATES_RING - 1; i++) issue(i);
    cp_wait<STATES_RING - 2>();  // tile 0 is in
    __syncthreads();
    {
        T braw[CONV][4], praw[2][3];
        convert_load(0, braw);
        prep_load(0, praw);
        convert_store(0, braw);
        prep_store(0, praw, sg_cur);
    }
    // Tile `tile`'s scan runs beside the readout of tile − 1 and the preparation of tile + 1,
    // which do not depend on it. (At the first tile the readout is of a buffer nobody filled,
    // past the last the preparation of a stale ring slot; neither result is stored.)
    for (int tile = 0; tile < tiles; tile++) {
        cp_wait<STATES_RING - 3>();  // this thread's copies of tiles `tile` and `tile + 1` are in
        __syncthreads();             // everyone's are; the buffers of tile − 2 are free again
        if (tile > 1) store_y(tile - 2);
        issue(tile + STATES_RING - 1);  // into tile − 1's slot
        float4 e[STATES_TILE / 2], v[2][4];
        float2 bc[STATES_TILE];
        T braw[CONV][4], praw[2][3];
        const float4* ep = (const float4*)sm.dd[tile % 2][cl];
#pragma unroll
        for (int j = 0; j < STATES_TILE / 2; j++) e[j] = ep[j];
#pragma unroll
        for (int j = 0; j < STATES_TILE; j++) bc[j] = sm.bc[tile % 2][j][q];
        readout_load(tile + 1, v);  // tile − 1's C·h
        convert_load(tile + 1, braw);
        prep_load(tile + 1, praw);
        // Lane q runs state q through the tile's steps.
        float pr[STATES_TILE];
#pragma unroll
        for (int j = 0; j < STATES_TILE / 2; j++) {
            h = fmaf(exp2_ftz(e[j].x * a2), h, e[j].y * bc[2 * j].x);
            pr[2 * j] = bc[2 * j].y * h;
            h = fmaf(exp2_ftz(e[j].z * a2), h, e[j].w * bc[2 * j + 1].x);
            pr[2 * j + 1] = bc[2 * j + 1].y * h;
        }
        float4 sg_next;
        readout_store(tile + 1, v, sg_prev);
        convert_store(tile + 1, braw);
        prep_store(tile + 1, praw, sg_next);
        __syncwarp();  // every lane has read tile − 1's C·h
        float* red = sm.red[cl];
#pragma unroll
        for (int j = 0; j < STATES_TILE; j++) red[j * 20 + q] = pr[j];
        sg_prev = sg_cur;
        sg_cur = sg_next;
    }
    __syncthreads();  // the last tile's C·h are in, and store_y(tiles − 3) has read its buffer
    if (tiles > 0) {
        float4 v[2][4];
        readout_load(tiles - 1, v);
        readout_store(tiles - 1, v, sg_prev);
    }
    __syncthreads();
    if (tiles > 1) store_y(tiles - 2);
    if (tiles > 0) store_y(tiles - 1);
    *st = h;
}

// scan_step: Mamba-1's decode step for a batch of sequences (L = 1), with dt_proj fused in. A
// block takes 128 channels (a thread each) of SCAN_STEP_SEQS sequences, so each channel's dt_proj
// row and A are loaded once for all of them: δ = softplus(row · dt_low + bias) against the block's
// staged x_proj rows (dt_low, B, C), the product rounded to T as the dt_proj GEMM stores it; then
// the N-state update, D skip and SiLU(z) gate as scan_chunk computes them. The block's dt_proj
// rows lie contiguous in memory, so they arrive by coalesced 16-byte cp.async into shared memory
// (a thread reading its own row there instead would touch 32 rows a load); every load is issued
// before the one wait, so a step costs about one memory round trip (launched early, the weights'
// part of it overlaps the x_proj kernel's end), and the sequences' dot products run as
// independent sums. Bytes per (channel, sequence): the state read and written
// (8N), u, z, y (6 in 16-bit types); dt_proj and A once per block (2R + 4N per channel).
// 2R + ~6N FLOPs per (channel, sequence).
// SCAN_STEP_SEQS 2: 4 left one warp a scheduler at batch 16, 5 % slower there.

struct ScanStepParams {
    const void* u;          // conv output, (S, E) T
    const void* z;          // z of sequence s at z[s·z_rs + c], T
    const void* xdbl;       // x_proj output, (S, R + 2N) T: dt_low, B, C; rows of whole 16-byte pieces
    const void* dt_w;       // dt_proj, (E, R) T, R a multiple of 16 bytes
    const float* dt_bias;   // (E)
    const float* a2;        // A·log2(e), (N, E)
    const float* d;         // (E)
    float* state;           // sequence s: state + s·state_stride + n·E + c
    void* y;                // (S, E) T
    long state_stride;
    int z_rs, S, E, N, R;
};

// Dynamic shared memory: x_proj rows in f32 and as stored (Q × XD each), then 128 dt_proj rows
// of R + one 16-byte piece (the padding keeps a quarter-warp's row reads on distinct banks).
template <typename T> __device__ void scan_step(const ScanStepParams p) {
    constexpr int V = 16 / sizeof(T), Q = SCAN_STEP_SEQS, C = SCAN_STEP_CHANNELS;
    extern __shared__ float4 step_smem[];
    const int E = p.E, N = p.N, R = p.R, XD = R + 2 * N, RP = R + V, pieces = R / V, xpieces = XD / V;
    float* xf = (float*)step_smem;
    T* xraw = (T*)(xf + Q * XD);
    T* rows = xraw + Q * XD;
    const int c0 = blockIdx.x * C, c = c0 + threadIdx.x, s0 = blockIdx.y * Q;
    const bool on = c < E;
    const int cc = on ? c : 0;  // loads of idle threads stay in bounds
    for (int i = threadIdx.x; i < min(C, E - c0) * pieces; i += C)
        cp16(rows + i / pieces * RP + i % pieces * V, (const T*)p.dt_w + (long)c0 * R + (long)i * V);
    float a2[SCAN_STEP_N], h[Q][SCAN_STEP_N], u[Q], z[Q];
#pragma unroll
    for (int j = 0; j < SCAN_STEP_N; j++) a2[j] = j < N ? p.a2[j * E + cc] : 0.0f;
    const float bias = p.dt_bias[cc], dskip = p.d[cc];
    wait_inputs();
    for (int i = threadIdx.x; i < Q * xpieces; i += C) {
        const int s = min(s0 + i / xpieces, p.S - 1);  // past the batch: a copy of the last, not stored
        cp16(xraw + i * V, (const T*)p.xdbl + (long)s * XD + i % xpieces * V);
    }
    cp_commit();
#pragma unroll
    for (int q = 0; q < Q; q++) {
        const int s = min(s0 + q, p.S - 1);
        const float* st = p.state + s * p.state_stride + cc;
#pragma unroll
        for (int j = 0; j < SCAN_STEP_N; j++) h[q][j] = j < N ? st[j * E] : 0.0f;
        u[q] = to_f32(((const T*)p.u)[(long)s * E + cc]);
        z[q] = to_f32(((const T*)p.z)[(long)s * p.z_rs + cc]);
    }
    cp_wait<0>();
    __syncthreads();
    for (int i = threadIdx.x; i < Q * XD; i += C) xf[i] = to_f32(xraw[i]);
    __syncthreads();
    float dt[Q] = {};
    const T* row = rows + threadIdx.x * RP;
    for (int k = 0; k < pieces; k++) {
        const uint4 w = *(const uint4*)(row + k * V);
#pragma unroll
        for (int q = 0; q < Q; q++) dt[q] += dot_piece<T>(w, xf + q * XD + k * V);
    }
#pragma unroll
    for (int q = 0; q < Q; q++) {
        const float* x = xf + q * XD;
        // Mamba-1's δ limits are (0, ∞), as scan_chunk clamps them: a NaN δ becomes 0.
        const float d = fmaxf(softplus(round_to<T>(dt[q]) + bias), 0.0f);
        const float du = d * u[q];
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < SCAN_STEP_N; j++) {
            if (j < N) {
                h[q][j] = fmaf(exp2_ftz(d * a2[j]), h[q][j], du * x[R + j]);
                acc = fmaf(x[R + N + j], h[q][j], acc);
            }
        }
        const int s = s0 + q;
        if (!on || s >= p.S) continue;
        float* st = p.state + s * p.state_stride + c;
#pragma unroll
        for (int j = 0; j < SCAN_STEP_N; j++)
            if (j < N) st[j * E] = h[q][j];
        ((T*)p.y)[(long)s * E + c] = from_f32<T>((acc + dskip * u[q]) * silu(z[q]));
    }
}

// ssd_step: Mamba-2's decode step for a batch of sequences (L = 1). A block takes 64 channels
// (head·P + p) of one sequence; its 8 warp pairs split each channel's N states 8 ways (pair q
// takes n ≡ q mod 8), so a small batch still has enough loads in flight. Consecutive lanes take
// consecutive p, which lie next to each other in the state's (head, state, P) layout, so every
// state load and store of a warp is one coalesced row (scan_out's lanes split a channel's
// states instead, so a warp's loads there touch 8 rows, a quarter of each used). The block's
// channels share one group, whose B and C rows it stages in shared memory as f32; δ and A are
// per head: one exp2 per thread. The 8 partial readouts meet in shared memory. The math is
// scan_chunk's for one step. Channels per group (so E) are a multiple of 64, as the caller
// checks. Bytes per (channel, sequence): the state read and written (8N), u, z and y; B, C per
// block. 4N FLOPs.

template <typename T> __device__ void ssd_step(const ScanParams p) {
    __shared__ float bc[2][SSD_STEP_NMAX];
    __shared__ float part[SSD_STEP_SPLIT][SSD_STEP_CHANNELS];
    const int k = threadIdx.x % SSD_STEP_CHANNELS, q = threadIdx.x / SSD_STEP_CHANNELS;
    const int c0 = blockIdx.x * SSD_STEP_CHANNELS, c = c0 + k, s = blockIdx.y, N = p.N;
    const long r = s;  // the sequence's one row
    const T* bsrc = (const T*)p.b + r * p.bc_rs + (long)(c0 / p.g_ch) * N;
    const T* csrc = (const T*)p.cm + r * p.bc_rs + (long)(c0 / p.g_ch) * N;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        bc[0][i] = to_f32(bsrc[i]);
        bc[1][i] = to_f32(csrc[i]);
    }
    const float u = to_f32(((const T*)p.u)[r * p.u_rs + c]);
    const float d = fminf(fmaxf(softplus(to_f32(((const T*)p.dt)[r * p.dt_rs + c / p.dt_div]) + p.dt_bias[c / p.dt_div]), p.dt_min), p.dt_max);
    const float decay = exp2_ftz(d * p.a2[c / p.a_div]), du = d * u;
    __syncthreads();
    float* st = p.state + s * p.state_stride + state_index(p, c, 0);
    float acc = 0.0f;
#pragma unroll 4
    for (int n = q; n < N; n += SSD_STEP_SPLIT) {
        const float h = fmaf(decay, st[(long)n * p.p_blk], du * bc[0][n]);
        st[(long)n * p.p_blk] = h;
        acc = fmaf(bc[1][n], h, acc);
    }
    part[q][k] = acc;
    __syncthreads();
    if (q != 0) return;
    float y = (p.d ? p.d[c / p.d_div] : 0.0f) * u;
#pragma unroll
    for (int j = 0; j < SSD_STEP_SPLIT; j++) y += part[j][k];
    if (p.z) y *= silu(to_f32(((const T*)p.z)[r * p.z_rs + c]));
    ((T*)p.y)[r * p.y_rs + c] = from_f32<T>(y);
}

#define SSD_STEP_KERNEL(T)                                                                            \
    extern "C" __global__ void __launch_bounds__(SSD_STEP_CHANNELS * SSD_STEP_SPLIT) ssd_step_##T(const ScanParams p) { ssd_step<T>(p); }

#define SCAN_STEP_KERNEL(T)                                                                           \
    extern "C" __global__ void __launch_bounds__(SCAN_STEP_CHANNELS) scan_step_##T(const ScanStepParams p) { scan_step<T>(p); }

#define STATES_KERNEL(T)                                                                              \
    extern "C" __global__ void __launch_bounds__(128, 1) scan_states_##T(const ScanParams p) { scan_states<T>(p); }

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
