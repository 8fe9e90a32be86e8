// The batch-1 decode step as one persistent kernel: a token runs from the embedding to the
// argmax of its logits in a single launch, so per-token time approaches that of reading every
// weight once rather than a chain of ~150 kernel launches.
//
// Strategy. One block of 512 threads per multiprocessor, all resident at once (launched
// cooperatively), walking the layers in phases; a phase is either a weight-streaming
// matrix-vector product spread over every warp of the grid, or per-channel work.
// Each warp streams its rows through a ring of STEP_NST chunks in shared memory (cp.async, 2 KB per
// chunk, 6 KB in flight per warp, ~13 MB over the GPU). Weights never change, so while waiting
// for the previous phase every warp fills its ring with the coming product's first chunks,
// together with whatever else the phase reads that is already final (conv taps, x_proj's slices,
// dt_proj's rows, states): after that only the vectors just produced are read.
// Hand-over between phases, mostly without grid barriers: a value one block passes to another
// is a 64-bit word (the value as f32, the epoch of the phase that wrote it) stored in one
// access, and its readers poll the words themselves until they carry that epoch or a later one
// (the LL protocol of NCCL). A barrier costs three dependent memory round trips (the writes and the
// release, the poll, the read of the data); a flagged word costs one. Reuse of a word by a later
// phase needs no fence: that phase's writer has itself read words that depend on every read of
// the earlier value (each phase reads all of the previous phase's output).
//   Mamba-1, per layer (2 hand-overs and a barrier):
//     in_proj   x = norm(resid) in every block (d values, cheap); row o of in_proj; the rows of
//               the x half end in the causal-conv step of channel o (its lanes hold the taps).
//               x_proj rides along: each block multiplies its x channels' conv outputs by its
//               slice of x_proj's columns, one partial per row (dt_rank + 2N) into `part`.
//     scan      after a grid barrier (the partials, a few hundred floats from every block, are
//               fewer loads as plain floats than as flagged words: measured, BENCHMARKS.md),
//               the partials summed in a fixed order (deterministic); per channel: dt_proj
//               row · dt, softplus, the N-state update, D skip, SiLU(z) gate; the channel's
//               states and A were loaded while waiting.
//     out_proj  y → residual stream (added, rounded to the activation type first); every block
//               keeps its own copy of the stream in shared memory and reads the new rows.
//   Mamba-2, per layer (3 hand-overs):
//     in_proj   as above; z, dt stored; xBC rows end in their conv step.
//     ssd step  one block per 32 channels (head·P + column): warps take slices of the N states.
//     out_proj  with the grouped RMSNorm of y·SiLU(z) as prologue.
//   Final: norm_f and the LM head; each block keeps its best (logit, index) and merges it into
//   one 64-bit atomicMax; the one grid barrier publishes the token as the next step's input.
// Bytes: every weight once (2 bytes each in 16-bit types) plus the state read and written once
// (N·E·8 bytes per layer) and L2 traffic for the small vectors each block rebuilds (8 bytes a
// value). FLOPs: 2 per weight. Small models are latency-bound: each hand-over and the phase
// after it cost a few µs of dependent round trips even with the weights already in shared
// memory (BENCHMARKS.md).
// Epochs grow across launches (the base is kept in `bar`), so words and flags never need resetting.

typedef unsigned long long u64;

// STEP_THREADS, STEP_PF (16-byte pieces per lane of a chunk), STEP_NST (chunks in flight per
// warp), STEP_M1_N, STEP_M2_MAX_N, STEP_NORM_PT, STEP_EPOCHS: src/cuda/consts.rs.
#define STEP_WARPS (STEP_THREADS / 32)
#define CH (32 * STEP_PF)

struct StepLayer {
    const float* norm_w;
    const float* norm_b;      // null: RMSNorm
    const void* in_proj;      // (rows, d_model) T
    const float* conv_w;      // (W, C) tap-major
    const float* conv_b;      // or null
    const void* x_proj;       // Mamba-1: (R + 2N, E) T
    const void* dt_proj;      // Mamba-1: (E, R) T
    const float* dt_bias;
    const float* a2;          // A·log2(e): (N, E) for Mamba-1, per head for Mamba-2
    const float* d;
    const float* gnorm_w;     // Mamba-2's gated norm
    const void* out_proj;     // (d_model, E) T
    float* conv_state;        // (W−1, C)
    float* ssm_state;         // Mamba-1 (N, E); Mamba-2 (H, N, P)
    float eps;
};

struct StepParams {
    const StepLayer* layers;
    const void* embedding;    // (vocab, d_model) T
    const void* head;         // (head_rows, d_model) T
    const float* normf_w;
    const float* normf_b;
    const unsigned* token;    // this step's input
    // Flagged words (value, epoch) handed between phases:
    u64* resid;               // the residual stream after out_proj, (d_model)
    u64* act;                 // in_proj outputs, conv applied, rounded to T
    float* part;              // Mamba-1 x_proj partial sums, (blocks, R + 2N rounded up to 4),
                              // handed over with a grid barrier (see m1_scan)
    u64* y;                   // (E), rounded to T
    float* logits;            // (head_rows)
    unsigned long long* best; // packed (logit, index), zero between steps
    unsigned* ids;            // the argmax
    unsigned* next_token;     // the argmax again, as the next step's input
    unsigned* bar;            // final barrier: a flag per block, then the launch's base epoch
    int mamba2, n_layer, d_model, e, n, r, w, h, p, g, conv_dim, in_rows, d_per_channel;
    int head_rows, limit;
    int groups;               // Mamba-1: groups of 16 x channels per block (x_proj_slices)
    int smem_dt, smem_wx, smem_xc, smem_res;  // byte offsets in shared memory (see decode_step)
    float normf_eps, gnorm_eps, dt_min, dt_max;
};

__device__ __forceinline__ unsigned ld_acquire(const unsigned* a) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}
__device__ __forceinline__ void st_release(unsigned* a, unsigned v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(a), "r"(v) : "memory");
}

// Polls are spaced by a short sleep, leaving L2 to the weights and the vectors: 4–8 % off a
// token at 130M / 370M (sleeps of 100 to 500 ns did alike), against polling flat out.
#define POLL_NS 250

// Flagged words: a naturally aligned 64-bit access is single-copy atomic, so a reader sees the
// value and its epoch together. Relaxed at GPU scope: read from L2, never a stale L1 line.
__device__ __forceinline__ void ll_put(u64* a, float v, unsigned epoch) {
    const u64 w = ((u64)epoch << 32) | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(a), "l"(w) : "memory");
}
__device__ __forceinline__ u64 ll_ld(const u64* a) {
    u64 w;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(a) : "memory");
    return w;
}

// Whether word w was written in phase `epoch` or later (wrap-safe: every word is rewritten each
// token, so its epoch is never far behind).
__device__ __forceinline__ bool ll_since(u64 w, unsigned epoch) { return (int)((unsigned)(w >> 32) - epoch) >= 0; }

// v[j] ← the value of word src(j) (0 where src(j) is null) once it was written in phase `epoch`
// or later. All K loads go out together; after a sleep only the late words are read again.
template <int K, typename Src> __device__ __forceinline__ void ll_read(float (&v)[K], unsigned epoch, Src src) {
    const u64 ready = (u64)epoch << 32;
    u64 w[K];
#pragma unroll
    for (int j = 0; j < K; j++) w[j] = src(j) ? ll_ld(src(j)) : ready;
    for (;;) {
        bool all = true;
#pragma unroll
        for (int j = 0; j < K; j++) all &= ll_since(w[j], epoch);
        if (all) break;
        __nanosleep(POLL_NS);
#pragma unroll
        for (int j = 0; j < K; j++)
            if (!ll_since(w[j], epoch)) w[j] = ll_ld(src(j));
    }
#pragma unroll
    for (int j = 0; j < K; j++) v[j] = __uint_as_float((unsigned)w[j]);
}

// Grid barrier at `epoch`: each block publishes the epoch in its own flag and one thread per
// flag waits for all to reach it (wrap-safe comparison; no contended counter). In two halves,
// so that a phase's loads of what is already final go between them: arrive, issue the loads,
// wait. Arrive: the block's writes are released with its flag, and the block waits until the
// store has left (a release issued behind a burst of loads waits for them: arriving first took
// 8–15 % off a token at 130M). The polls are acquires: relaxed reads and then a fence cost
// ~15 % more at 130M, as a fence also waits for the thread's loads in flight.
__device__ void grid_arrive(const StepParams& p, unsigned epoch) {
    __syncthreads();
    if (threadIdx.x == 0) st_release(p.bar + blockIdx.x, epoch);
    __syncthreads();
}
__device__ void grid_wait(const StepParams& p, unsigned epoch) {
    if (threadIdx.x < gridDim.x)
        while ((int)(ld_acquire(p.bar + threadIdx.x) - epoch) < 0) __nanosleep(POLL_NS);
    __syncthreads();
}

// A matrix-vector product spread over the grid's warps: warp gw takes rows (tasks) gw, gw + nw,
// …, each as chunks of CH pieces of nv; `Walk` is a position in that sequence.
struct Rows {
    const uint4* w;
    int nv, tasks, gw, nw;
    __device__ const uint4* row(int t) const { return w + (long)t * nv; }
};

__device__ __forceinline__ Rows make_rows(const void* w, int out, int inp, int vec) {
    Rows r;
    r.w = (const uint4*)w;
    r.nv = inp / vec;
    r.tasks = out;
    r.nw = gridDim.x * STEP_WARPS;
    r.gw = blockIdx.x * STEP_WARPS + threadIdx.x / 32;
    return r;
}

struct Walk {
    int t, c;
};

__device__ __forceinline__ void advance(const Rows& r, Walk& w) {
    if (++w.c * CH >= r.nv) {
        w.t += r.nw;
        w.c = 0;
    }
}

// The warp's ring: chunk slot s holds piece k of lane l at buf[(s·STEP_PF + k)·32 + l], and a 16-byte
// aux word per lane (the task's epilogue inputs, copied with its first chunk).
struct Ring {
    uint4* buf;
    uint4* aux;
    Walk next;  // the next chunk to issue
    int slot;   // the slot of the next chunk to consume
};

// Issues the ring's next chunk into the slot it frees (one commit group per chunk, empty past
// the end, so wait_group counts stay exact). aux(t, dst) may cp.async the task's aux word.
template <typename Aux> __device__ __forceinline__ void issue(const Rows& r, Ring& g, int slot, Aux aux) {
    const int lane = threadIdx.x % 32;
    if (g.next.t < r.tasks) {
        const uint4* src = r.row(g.next.t) + g.next.c * CH;
        const int n = r.nv - g.next.c * CH;
#pragma unroll
        for (int k = 0; k < STEP_PF; k++)
            if (lane + 32 * k < n) cp16(g.buf + (slot * STEP_PF + k) * 32 + lane, src + lane + 32 * k);
        if (g.next.c == 0) aux(g.next.t, g.aux + slot * 32 + lane);
        advance(r, g.next);
    }
    cp_commit();
}

// Fills the warp's ring with the first STEP_NST chunks of `r` (between arriving at the barrier and
// waiting).
template <typename Aux> __device__ __forceinline__ Ring prefetch(const Rows& r, uint4* ring, Aux aux) {
    const int warp = threadIdx.x / 32;
    Ring g = {ring + warp * STEP_NST * STEP_PF * 32, ring + STEP_WARPS * STEP_NST * STEP_PF * 32 + warp * STEP_NST * 32, {r.gw, 0}, 0};
#pragma unroll
    for (int s = 0; s < STEP_NST; s++) issue(r, g, s, aux);
    return g;
}

// Runs the warp's tasks against x (shared memory, f32), refilling the ring as chunks are used;
// epi(t, acc, aux word) on every lane when a task's dot product is complete.
template <typename T, typename Aux, typename Epi>
__device__ __forceinline__ void run_rows(const Rows& r, Ring& g, const float* x, Aux aux, Epi epi) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x % 32;
    float acc = 0.0f;
    uint4 a = make_uint4(0, 0, 0, 0);
    for (Walk w = {r.gw, 0}; w.t < r.tasks;) {
        cp_wait<STEP_NST - 1>();
        const int n = r.nv - w.c * CH;
        const float* xt = x + w.c * CH * V;
        const uint4* b = g.buf + g.slot * STEP_PF * 32 + lane;
#pragma unroll
        for (int k = 0; k < STEP_PF; k++)
            if (lane + 32 * k < n) acc += dot_piece<T>(b[k * 32], xt + (lane + 32 * k) * V);
        if (w.c == 0) a = g.aux[g.slot * 32 + lane];
        issue(r, g, g.slot, aux);
        g.slot = (g.slot + 1) % STEP_NST;
        const int t = w.t;
        advance(r, w);
        if (w.c == 0) {
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            epi(t, acc, a);
            acc = 0.0f;
        }
    }
    cp_wait<0>();
}

// x ← norm(src)·w (+ b), rounded to T, in shared memory, and the block's copy of the residual
// stream res ← src: src is the stream's words of `epoch` or, for the first layer, the embedding
// row in T. The weights are loaded with the row, so the whole prologue waits on one round trip.
template <typename T>
__device__ void norm_into(float* x, float* res, const StepParams& p, const float* w, const float* b, float eps,
                          const T* emb, unsigned epoch) {
    float v[STEP_NORM_PT], wv[STEP_NORM_PT], bv[STEP_NORM_PT];
    float s = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int j = 0; j < STEP_NORM_PT; j++) {
        const int i = threadIdx.x + j * STEP_THREADS;
        if (i < p.d_model) {
            if (emb) v[j] = to_f32(emb[i]);
            wv[j] = w[i];
            bv[j] = b ? b[i] : 0.0f;
        }
    }
    if (!emb)
        ll_read(v, epoch, [&](int j) {
            const int i = threadIdx.x + j * STEP_THREADS;
            return i < p.d_model ? p.resid + i : nullptr;
        });
#pragma unroll
    for (int j = 0; j < STEP_NORM_PT; j++) {
        const int i = threadIdx.x + j * STEP_THREADS;
        if (i < p.d_model) {
            res[i] = v[j];
            s += v[j];
            s2 += v[j] * v[j];
        }
    }
    float mean;
    const float inv = norm_scale(s, s2, p.d_model, b != nullptr, eps, mean);
#pragma unroll
    for (int j = 0; j < STEP_NORM_PT; j++) {
        const int i = threadIdx.x + j * STEP_THREADS;
        if (i < p.d_model) x[i] = round_to<T>((v[j] - mean) * inv * wv[j] + bv[j]);
    }
    __syncthreads();
}

// The conv step's inputs for channel c as the task's aux word (x component): lane k < W holds
// tap weight k, lane W + k the state value k, lane 31 the bias.
__device__ __forceinline__ void conv_taps(const StepLayer& L, int C, int W, int c, uint4* dst) {
    const int k = threadIdx.x % 32;
    if (c < 0 || c >= C) return;
    if (k < W) cp4(dst, L.conv_w + k * C + c);
    else if (k < 2 * W - 1) cp4(dst, L.conv_state + (k - W) * C + c);
    else if (k == 31 && L.conv_b) cp4(dst, L.conv_b + c);
}

// Finishes channel c's conv step with its new input x (every lane calls it): returns
// SiLU(conv) and shifts the state (value k moves to slot k − 1, x into the last).
__device__ __forceinline__ float conv_finish(const StepLayer& L, int C, int W, int c, float x, uint4 a) {
    const int k = threadIdx.x % 32;
    const float s = __shfl_sync(0xffffffffu, __uint_as_float(a.x), min(W + k, 31));
    const float v = k == W - 1 ? x : s;
    float acc = k < W ? __uint_as_float(a.x) * v : 0.0f;
    for (int off = 4; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (k >= 1 && k < W) L.conv_state[(k - 1) * C + c] = v;
    const float bias = __shfl_sync(0xffffffffu, __uint_as_float(a.x), 31);
    return silu(acc + (L.conv_b ? bias : 0.0f));
}

// Mamba-1's x_proj, folded into in_proj (no phase of its own): block b's in_proj rows include
// the x channels b·16 + k·nw + w (group k < groups, warp w), whose conv outputs the epilogue
// leaves in xc[k·16 + w]. The block multiplies them by its slices of x_proj's columns into one
// partial per row (`part`), which the scan phase sums over the blocks.
// Issues the slices into wx: group k, row i, 16-byte piece q (V channels) at wx[(k·RN + i)·PP + q].
template <typename T> __device__ void x_proj_slices(const StepParams& p, const StepLayer& L, uint4* wx) {
    constexpr int V = 16 / sizeof(T), PP = 16 / V;
    const int RN = p.r + 2 * p.n, nw = gridDim.x * STEP_WARPS;
    for (int j = threadIdx.x; j < p.groups * RN * PP; j += STEP_THREADS) {
        const int k = j / (RN * PP), i = j / PP % RN, q = j % PP;
        const int col = blockIdx.x * STEP_WARPS + k * nw + q * V;
        if (col < p.e) cp16(wx + j, (const T*)L.x_proj + (long)i * p.e + col);
    }
}

// The block's partials (wx landed and xc complete: after run_rows and a __syncthreads).
template <typename T> __device__ void x_proj_partials(const StepParams& p, const uint4* wx, const float* xc) {
    constexpr int V = 16 / sizeof(T), PP = 16 / V;
    const int RN = p.r + 2 * p.n, RNP = (RN + 3) & ~3, nw = gridDim.x * STEP_WARPS;
    if (blockIdx.x * STEP_WARPS >= p.e) return;
    for (int i = threadIdx.x; i < RNP; i += STEP_THREADS) {
        float s = 0.0f;
        for (int k = 0; k < p.groups && i < RN; k++)
            for (int q = 0; q < PP; q++)
                if (blockIdx.x * STEP_WARPS + k * nw + q * V < p.e) s += dot_piece<T>(wx[(k * RN + i) * PP + q], xc + k * 16 + q * V);
        p.part[blockIdx.x * RNP + i] = s;
    }
}

// Mamba-1's per-channel phase: lane = channel within a group of 32; group gi belongs to block
// gi % grid, warp gi / grid. What the in_proj phase did not produce is loaded between arriving
// at the barrier and waiting, into `dtr` (its own space: the rings refill with out_proj's rows while other
// warps still read theirs): the dt_proj row, piece k at dw[k·32], then the states and A, state
// j at hs[j·32] and A at hs[(N + j)·32] (registers would spill while the partials are read).
// The in_proj phase's outputs are those of `epoch` (its barrier); writes y with epoch + 1.
template <typename T>
__device__ void m1_scan(const StepParams& p, const StepLayer& L, float* sbc, float* xs, uint4* dtr, unsigned epoch) {
    constexpr int DV = 16 / sizeof(T);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int c = (warp * gridDim.x + blockIdx.x) * 32 + lane;
    const int E = p.e, N = p.n, R = p.r;
    const bool mine = c < E;
    // dt_proj's row as 16-byte pieces when it divides into them (the published shapes do).
    const bool vec = R % DV == 0;
    const int rp = R / DV, nwc = (E + 32 * gridDim.x - 1) / (32 * gridDim.x);
    uint4* dw = dtr + warp * 32 * rp + lane;
    float* hs = (float*)(dtr + nwc * 32 * ((R + DV - 1) / DV)) + warp * 2 * STEP_M1_N * 32 + lane;
    float dtb = 0.0f, dd = 0.0f;
    grid_arrive(p, epoch);
    if (mine) {
        for (int j = 0; j < N; j++) {
            cp4(hs + j * 32, L.ssm_state + j * E + c);
            cp4(hs + (N + j) * 32, L.a2 + j * E + c);
        }
        if (vec)
            for (int k = 0; k < rp; k++) cp16(dw + k * 32, (const uint4*)((const T*)L.dt_proj + (long)c * R) + k);
        dtb = L.dt_bias[c];
        dd = L.d[c];
    }
    cp_commit();
    grid_wait(p, epoch);
    float uz[2];
    ll_read(uz, epoch, [&](int j) { return mine ? p.act + j * E + c : nullptr; });
    // Blocks with channels sum the blocks' x_proj partials in a fixed order: dt (R), B (N),
    // C (N), rounded as stored. Thread (q, i4) sums float4 i4 of blocks q, q + BS, …; then
    // row i sums the BS subtotals.
    if (blockIdx.x * 32 < E) {
        const int RN = R + 2 * N, RNP = (RN + 3) & ~3, RN4 = RNP / 4, BS = STEP_THREADS / RN4;
        const int nb = min((int)gridDim.x, (E + STEP_WARPS - 1) / STEP_WARPS);
        const int i4 = threadIdx.x % RN4, q = threadIdx.x / RN4;
        if (q < BS) {
            float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int b0 = q; b0 < nb; b0 += 8 * BS) {  // 8 loads in flight
                float4 v[8];
#pragma unroll
                for (int j = 0; j < 8; j++)
                    v[j] = b0 + j * BS < nb ? __ldcg((const float4*)(p.part + (long)(b0 + j * BS) * RNP) + i4)
                                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    acc.x += v[j].x;
                    acc.y += v[j].y;
                    acc.z += v[j].z;
                    acc.w += v[j].w;
                }
            }
            ((float4*)xs)[q * RN4 + i4] = acc;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < RN; i += blockDim.x) {
            float s = 0.0f;
            for (int k = 0; k < BS; k++) s += xs[k * RNP + i];
            sbc[i] = round_to<T>(s);
        }
        __syncthreads();
    }
    cp_wait<0>();
    if (!mine) return;
    const float u = uz[0], z = uz[1];
    float dt = 0.0f;
    if (vec) {
        for (int k = 0; k < rp; k++) dt += dot_piece<T>(dw[k * 32], sbc + k * DV);
    } else {
        for (int k = 0; k < R; k++) dt += to_f32(((const T*)L.dt_proj)[(long)c * R + k]) * sbc[k];
    }
    dt = softplus(round_to<T>(dt) + dtb);
    const float du = dt * u;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < STEP_M1_N; j++)
        if (j < N) {
            const float v = exp2f(dt * hs[(N + j) * 32]) * hs[j * 32] + du * sbc[R + j];
            L.ssm_state[j * E + c] = v;
            acc += sbc[R + N + j] * v;
        }
    ll_put(p.y + c, round_to<T>((acc + dd * u) * silu(z)), epoch + 1);
}

// Mamba-2's step over channels (head·P + column) in units of 32, one unit per block: lane =
// channel, warp = a slice of the states (n ≡ warp mod 16); the slices' readouts meet in shared
// memory. B and C of every group are staged once per block. Reads the words of `epoch`, writes
// y with epoch + 1.
template <typename T>
__device__ void m2_ssd(const StepParams& p, const StepLayer& L, float* sbc, float* red, unsigned epoch) {
    constexpr int NS = STEP_M2_MAX_N / STEP_WARPS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int N = p.n, P = p.p, E = p.e, GN = p.g * p.n, units = (E + 31) / 32;
    float hs[NS], dtb = 0.0f, a2 = 0.0f, dskip = 0.0f;
    const auto load = [&](int unit) {
        const int ch = unit * 32 + lane;
        if (ch >= E) return;
        const int hd = ch / P;
        const float* st = L.ssm_state + (long)hd * N * P + ch % P;
#pragma unroll
        for (int j = 0; j < NS; j++)
            if (warp + STEP_WARPS * j < N) hs[j] = st[(warp + STEP_WARPS * j) * P];
        dtb = L.dt_bias[hd];
        a2 = L.a2[hd];
        dskip = L.d[p.d_per_channel ? ch : hd];
    };
    int u = blockIdx.x;
    if (u >= units) return;
    load(u);
    for (int i = threadIdx.x; i < 2 * GN; i += blockDim.x) {
        float v[1];
        ll_read(v, epoch, [&](int) { return p.act + 2 * E + i; });
        sbc[i] = v[0];
    }
    for (; u < units; u += gridDim.x) {
        if (u != (int)blockIdx.x) load(u);
        const int ch = u * 32 + lane;
        const bool ok = ch < E;
        const int hd = ok ? ch / P : 0, grp = hd / (p.h / p.g);
        float dx[2];
        ll_read(dx, epoch, [&](int j) { return j == 0 ? p.act + p.e + p.conv_dim + hd : ok ? p.act + E + ch : nullptr; });
        const float dt = fminf(fmaxf(softplus(dx[0] + dtb), p.dt_min), p.dt_max);
        const float xv = dx[1];
        __syncthreads();  // sbc staged (first unit); red consumed (later units)
        const float decay = exp2f(dt * a2);
        const float* b = sbc + grp * N;
        const float* cm = sbc + GN + grp * N;
        float* st = L.ssm_state + (long)hd * N * P + ch % P;
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < NS; j++) {
            const int n = warp + STEP_WARPS * j;
            if (ok && n < N) {
                const float v = decay * hs[j] + dt * xv * b[n];
                st[n * P] = v;
                acc += cm[n] * v;
            }
        }
        red[threadIdx.x] = acc;
        __syncthreads();
        if (warp == 0 && ok) {
            for (int k = 1; k < STEP_WARPS; k++) acc += red[k * 32 + lane];
            ll_put(p.y + ch, round_to<T>(acc + dskip * xv), epoch + 1);
        }
    }
}

// x[i] ← a[i], or a[i]·SiLU(b[i]) when b is given, for i < n, from words written in phase
// `epoch` or later: each thread's words of a batch are awaited together.
#define LOAD_PT 8
__device__ void load_into(float* x, const u64* a, const u64* b, int n, unsigned epoch) {
    for (int s = 0; s < n; s += LOAD_PT * STEP_THREADS) {
        float v[2 * LOAD_PT];
        ll_read(v, epoch, [&](int j) {
            const int i = s + threadIdx.x + j % LOAD_PT * STEP_THREADS;
            return i >= n || (j >= LOAD_PT && !b) ? nullptr : (j < LOAD_PT ? a : b) + i;
        });
#pragma unroll
        for (int j = 0; j < LOAD_PT; j++) {
            const int i = s + threadIdx.x + j * STEP_THREADS;
            if (i < n) x[i] = b ? v[j] * silu(v[LOAD_PT + j]) : v[j];
        }
    }
    __syncthreads();
}

// x ← grouped RMSNorm of y·SiLU(z), rounded to T; the weights are requested first (their
// round trip overlaps the wait for y and z), each group's scale goes through `ginv`.
#define GNORM_PT 24
template <typename T>
__device__ void gated_norm_into(float* x, const StepParams& p, const StepLayer& L, float* ginv, unsigned epoch) {
    const int gs = p.e / p.g;
    float wv[GNORM_PT];
#pragma unroll
    for (int j = 0; j < GNORM_PT; j++) {
        const int i = threadIdx.x + j * STEP_THREADS;
        if (i < p.e) wv[j] = L.gnorm_w[i];
    }
    // z (in_proj's first E rows) is a phase older than y: the older phase bounds both (the y
    // words before it are a layer old).
    load_into(x, p.y, p.act, p.e, epoch - 1);
    for (int g = 0; g < p.g; g++) {
        float s2 = 0.0f;
        for (int i = g * gs + threadIdx.x; i < (g + 1) * gs; i += blockDim.x) s2 += x[i] * x[i];
        s2 = block_sum(s2);
        if (threadIdx.x == 0) ginv[g] = rsqrtf(s2 / gs + p.gnorm_eps);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < GNORM_PT; j++) {
        const int i = threadIdx.x + j * STEP_THREADS;
        if (i < p.e) x[i] = round_to<T>(x[i] * ginv[i / gs] * wv[j]);
    }
    __syncthreads();
}

// Orders floats as unsigned integers (larger float → larger key).
__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

// Shared memory: the warps' rings, their aux words, x (f32, max(d_model, E, 4·STEP_THREADS)),
// the block's copy of the residual stream (d_model) at smem_res, and for Mamba-1 at the given
// offsets: the dt_proj rows of the warps with scan channels, the x_proj slices and the x
// channels' conv outputs (x_proj_slices).
#define RING_PIECES (STEP_WARPS * STEP_NST * STEP_PF * 32)
#define AUX_WORDS (STEP_WARPS * STEP_NST * 32)

template <typename T> __device__ void decode_step(const StepParams& p) {
    constexpr int V = 16 / sizeof(T);
    extern __shared__ uint4 dyn[];
    uint4* ring = dyn;
    float* xs = (float*)(dyn + RING_PIECES + AUX_WORDS);
    uint4* dtr = (uint4*)((char*)dyn + p.smem_dt);
    uint4* wx = (uint4*)((char*)dyn + p.smem_wx);
    float* xc = (float*)((char*)dyn + p.smem_xc);
    float* res = (float*)((char*)dyn + p.smem_res);
    __shared__ __align__(16) float sbc[2 * STEP_M2_MAX_N];
    __shared__ float red[STEP_THREADS];
    __shared__ unsigned long long sbest;
    const int lane = threadIdx.x % 32;
    unsigned* base = p.bar + gridDim.x;
    // The epoch of the last phase handed over; phase k of this launch writes base + k.
    unsigned epoch = *(volatile unsigned*)base;
    const T* emb = (const T*)p.embedding + (long)*p.token * p.d_model;
    const auto no_aux = [](int, uint4*) {};
    // Each layer's table entry is read into shared memory a layer ahead (its pointers are used
    // right after hand-overs, when a global load would cost a round trip).
    __shared__ StepLayer sl[2];
    constexpr int LW = sizeof(StepLayer) / 8;
    if (threadIdx.x < LW) ((unsigned long long*)sl)[threadIdx.x] = ((const unsigned long long*)p.layers)[threadIdx.x];
    for (int l = 0; l < p.n_layer; l++) {
        __syncthreads();
        const StepLayer& L = sl[l & 1];
        const bool more = l + 1 < p.n_layer && threadIdx.x < LW;
        const unsigned long long nxt = more ? ((const unsigned long long*)(p.layers + l + 1))[threadIdx.x] : 0;
        // in_proj, its x (Mamba-1) or xBC (Mamba-2) rows through the conv step.
        const int conv0 = p.mamba2 ? p.e : 0;
        const int C = p.conv_dim, W = p.w;
        const auto taps = [&](int t, uint4* dst) { conv_taps(L, C, W, t - conv0, dst); };
        Rows r = make_rows(L.in_proj, p.in_rows, p.d_model, V);
        if (!p.mamba2) {
            for (int i = threadIdx.x; i < p.groups * 16; i += STEP_THREADS) xc[i] = 0.0f;
            x_proj_slices<T>(p, L, wx);  // committed with the ring's first chunk
        }
        Ring g = prefetch(r, ring, taps);
        norm_into<T>(xs, res, p, L.norm_w, L.norm_b, L.eps, l == 0 ? emb : nullptr, epoch);
        epoch++;
        run_rows<T>(r, g, xs, taps, [&](int t, float acc, uint4 a) {
            float v = round_to<T>(acc);
            const int c = t - conv0;
            if (c >= 0 && c < C) v = round_to<T>(conv_finish(L, C, W, c, v, a));
            if (lane == 0) {
                ll_put(p.act + t, v, epoch);
                if (!p.mamba2 && t < p.e) xc[(t - r.gw) / r.nw * 16 + threadIdx.x / 32] = v;
            }
        });
        if (!p.mamba2) {
            __syncthreads();
            x_proj_partials<T>(p, wx, xc);
            m1_scan<T>(p, L, sbc, xs, dtr, epoch);
        } else {
            m2_ssd<T>(p, L, sbc, red, epoch);
        }
        epoch++;
        // out_proj, added to the residual stream.
        r = make_rows(L.out_proj, p.d_model, p.e, V);
        g = prefetch(r, ring, no_aux);
        __syncthreads();  // every warp is done with xs (the in_proj input) and red
        if (p.mamba2) gated_norm_into<T>(xs, p, L, red, epoch);
        else load_into(xs, p.y, nullptr, p.e, epoch);
        epoch++;
        run_rows<T>(r, g, xs, no_aux, [&](int t, float acc, uint4) {
            if (lane == 0) ll_put(p.resid + t, res[t] + round_to<T>(acc), epoch);
        });
        if (more) ((unsigned long long*)&sl[(l + 1) & 1])[threadIdx.x] = nxt;
    }
    // LM head: logits and each warp's best index below `limit` (ties to the lowest index).
    Rows r = make_rows(p.head, p.head_rows, p.d_model, V);
    Ring g = prefetch(r, ring, no_aux);
    if (threadIdx.x == 0) sbest = 0;
    __syncthreads();  // every warp is done with xs (out_proj's input)
    norm_into<T>(xs, res, p, p.normf_w, p.normf_b, p.normf_eps, nullptr, epoch);
    unsigned long long best = 0;
    run_rows<T>(r, g, xs, no_aux, [&](int t, float acc, uint4) {
        if (lane == 0) {
            p.logits[t] = acc;
            if (t < p.limit && acc == acc) {
                const unsigned long long k = ((unsigned long long)order_key(acc) << 32) | (0xffffffffu - (unsigned)t);
                best = k > best ? k : best;
            }
        }
    });
    if (lane == 0 && best) atomicMax(&sbest, best);
    __syncthreads();
    if (threadIdx.x == 0 && sbest) atomicMax(p.best, sbest);
    grid_arrive(p, ++epoch);
    grid_wait(p, epoch);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const unsigned long long k = *(volatile unsigned long long*)p.best;
        const unsigned id = k ? 0xffffffffu - (unsigned)k : 0u;
        *p.ids = id;
        *p.next_token = id;
        *p.best = 0;
        *base += STEP_EPOCHS;  // every block read it at its start, before the barrier
    }
}

// One instance per compilation (the loader appends STEP_KERNEL(type)): a model compiles only its
// own type of this large kernel.
#define STEP_KERNEL(T) \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, 1) decode_step_##T(const StepParams p) { decode_step<T>(p); }
