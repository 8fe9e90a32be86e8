// The batch-1 decode step: weight-streaming matrix-vector products with their neighbours fused
// in, so a token is a short chain of kernels (captured in one CUDA graph) whose time approaches
// that of reading every weight once.
//
// gemv: y = W·x for one row x. The block first builds x in shared memory (f32), from one of:
//   PRO_PLAIN  x as given (activation type);
//   PRO_NORM   RMSNorm / LayerNorm of the f32 residual stream — the block norm that opens a layer
//              and the final norm before the LM head, recomputed by every block (d values, cheap);
//   PRO_GATED  Mamba-2's grouped RMSNorm of y·silu(z) before out_proj.
// Then each warp takes rows: every lane streams 16-byte pieces of the row (8 bf16/f16 values or 4
// f32), several in flight, and a warp reduction gives the dot product. Epilogues: store in the
// activation type, store f32 (logits), or add to the residual stream (out_proj; rounded to the
// activation type first, as the unfused path does). Bytes: the matrix once (2·out·in in 16-bit
// types) plus ~in per block; FLOPs: 2·out·in. Bandwidth-bound by design.
//
// Every kernel here waits for its predecessor with pdl_wait() (the decode graph launches them with
// programmatic dependent launch); gemv first issues its weight loads, which depend on nothing.
//
// conv_step: the causal conv for one new time step, one thread per channel; each thread shifts
// its own channel's state, so no other thread reads what it writes.
//
// m1_step: Mamba-1's softplus(δ + bias), the scan update of the channel's N states, D skip and
// SiLU(z) gate, one thread per channel (δ comes from a gemv of dt_proj; B, C are staged in
// shared memory by the block). m2_step: Mamba-2's step, one block per head (see there).

#define PRO_PLAIN 0
#define PRO_NORM 1
#define PRO_GATED 2
#define EPI_STORE 0
#define EPI_F32 1
#define EPI_RESID 2
#define GEMV_ROWS_PER_WARP 2

struct GemvParams {
    const void* w;        // (out, inp) in T
    const void* x;        // PRO_PLAIN: x (T); PRO_GATED: y (T)
    const void* z;        // PRO_GATED: z (T)
    const float* resid;   // PRO_NORM: input; EPI_RESID: output (added to)
    const float* norm_w;
    const float* norm_b;  // PRO_NORM with a bias: LayerNorm
    void* y;              // EPI_STORE (T) / EPI_F32 (float)
    int out, inp, pro, epi, gsize;
    float eps;
};

template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// 16-byte pieces of each of its rows that a lane loads before the prologue: the weight stream
// starts at once instead of waiting for x (the rest of the row follows in the main loop).
#define GEMV_PREFETCH 4

// x is read as float4: lanes read 32 (or 16) bytes apart, and scalar reads at that stride would
// fall into a few shared-memory banks.
template <typename T> __device__ __forceinline__ float dot_piece(const uint4& q, const float* x) {
    const T* e = (const T*)&q;
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(T)); k += 4) {
        const float4 v = *(const float4*)(x + k);
        acc += to_f32(e[k]) * v.x + to_f32(e[k + 1]) * v.y + to_f32(e[k + 2]) * v.z + to_f32(e[k + 3]) * v.w;
    }
    return acc;
}

template <typename T> __device__ void gemv(const GemvParams p) {
    extern __shared__ float xs[];
    constexpr int V = 16 / sizeof(T);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = (blockIdx.x * (blockDim.x / 32) + warp) * GEMV_ROWS_PER_WARP;
    const bool vec = p.inp % V == 0;
    const int nv = p.inp / V;
    uint4 q[GEMV_ROWS_PER_WARP][GEMV_PREFETCH];
#pragma unroll
    for (int j = 0; j < GEMV_ROWS_PER_WARP; j++)
#pragma unroll
        for (int k = 0; k < GEMV_PREFETCH; k++) {
            const int i = lane + 32 * k;
            if (vec && row0 + j < p.out && i < nv) q[j][k] = ((const uint4*)p.w)[(long)(row0 + j) * nv + i];
        }
    // Weights never change: they were read above, before waiting for the previous kernel.
    pdl_launch();
    pdl_wait();
    if (p.pro == PRO_PLAIN) {
#pragma unroll 4
        for (int i = threadIdx.x; i < p.inp; i += blockDim.x) xs[i] = to_f32(((const T*)p.x)[i]);
    } else if (p.pro == PRO_NORM) {
        float s = 0.0f, s2 = 0.0f;
#pragma unroll 4
        for (int i = threadIdx.x; i < p.inp; i += blockDim.x) {
            const float v = p.resid[i];
            xs[i] = v;
            s += v;
            s2 += v * v;
        }
        float mean;
        const float inv = norm_scale(s, s2, p.inp, p.norm_b != nullptr, p.eps, mean);
#pragma unroll 4
        for (int i = threadIdx.x; i < p.inp; i += blockDim.x)
            xs[i] = round_to<T>((xs[i] - mean) * inv * p.norm_w[i] + (p.norm_b ? p.norm_b[i] : 0.0f));
    } else {
        for (int g0 = 0; g0 < p.inp; g0 += p.gsize) {
            float s2 = 0.0f;
            for (int i = g0 + threadIdx.x; i < g0 + p.gsize; i += blockDim.x) {
                const float v = to_f32(((const T*)p.x)[i]) * silu(to_f32(((const T*)p.z)[i]));
                xs[i] = v;
                s2 += v * v;
            }
            const float inv = rsqrtf(block_sum(s2) / p.gsize + p.eps);
            for (int i = g0 + threadIdx.x; i < g0 + p.gsize; i += blockDim.x) xs[i] = round_to<T>(xs[i] * inv * p.norm_w[i]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < GEMV_ROWS_PER_WARP; j++) {
        const int o = row0 + j;
        if (o >= p.out) break;
        float acc = 0.0f;
        if (vec) {
#pragma unroll
            for (int k = 0; k < GEMV_PREFETCH; k++) {
                const int i = lane + 32 * k;
                if (i < nv) acc += dot_piece<T>(q[j][k], xs + i * V);
            }
            const uint4* w4 = (const uint4*)p.w + (long)o * nv;
#pragma unroll 4
            for (int i = lane + 32 * GEMV_PREFETCH; i < nv; i += 32) acc += dot_piece<T>(w4[i], xs + i * V);
        } else {
            const T* w = (const T*)p.w + (long)o * p.inp;
            for (int i = lane; i < p.inp; i += 32) acc += to_f32(w[i]) * xs[i];
        }
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane == 0) {
            if (p.epi == EPI_STORE) ((T*)p.y)[o] = from_f32<T>(acc);
            else if (p.epi == EPI_F32) ((float*)p.y)[o] = acc;
            else ((float*)p.resid)[o] += round_to<T>(acc);
        }
    }
}
FOR_EACH_TYPE(gemv, GemvParams, 256)

struct ConvStepParams {
    const void* x;        // this step's input of channel c at x[c], T
    const float* w;       // (W, C) tap-major
    const float* bias;    // or null
    float* state;         // (W−1, C)
    void* y;              // (C) T
    int C, W;
};

#define STEP_MAX_W 8

template <typename T> __device__ void conv_step(const ConvStepParams p) {
    pdl_launch();
    pdl_wait();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.C) return;
    // Every load first (constant indices keep them in registers and in flight together).
    float s[STEP_MAX_W], w[STEP_MAX_W];
#pragma unroll
    for (int k = 0; k < STEP_MAX_W; k++) {
        s[k] = k < p.W - 1 ? p.state[k * p.C + c] : 0.0f;
        w[k] = k < p.W ? p.w[k * p.C + c] : 0.0f;
    }
    const float x = to_f32(((const T*)p.x)[c]);
    float acc = p.bias ? p.bias[c] : 0.0f;
#pragma unroll
    for (int k = 0; k < STEP_MAX_W; k++) {
        if (k < p.W - 1) acc += w[k] * s[k];
        if (k == p.W - 1) acc += w[k] * x;
        if (k > 0 && k < p.W - 1) p.state[(k - 1) * p.C + c] = s[k];
    }
    if (p.W > 1) p.state[(p.W - 2) * p.C + c] = x;
    ((T*)p.y)[c] = from_f32<T>(silu(acc));
}
FOR_EACH_TYPE(conv_step, ConvStepParams, 128)

struct M1StepParams {
    const void* u;        // conv output (E), T
    const void* dt;       // dt_proj output (E), T: δ before bias and softplus
    const void* bc;       // B (N) then C (N), T
    const float* dt_bias;
    const float* a2;      // A·log2(e), (N, E)
    const float* d;
    const void* z;        // gate (E), T
    float* state;         // (N, E)
    void* y;              // (E), T
    int E, N;
};

#define M1_MAX_N 64

template <typename T> __device__ void m1_step(const M1StepParams p) {
    pdl_launch();
    pdl_wait();
    __shared__ float sbc[2 * M1_MAX_N];
    for (int i = threadIdx.x; i < 2 * p.N; i += blockDim.x) sbc[i] = to_f32(((const T*)p.bc)[i]);
    __syncthreads();
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.E) return;
    const float dt = softplus(to_f32(((const T*)p.dt)[c]) + p.dt_bias[c]);
    const float u = to_f32(((const T*)p.u)[c]);
    const float du = dt * u;
    float acc = 0.0f;
    // States in groups of 16: each group's loads are issued together before any is used.
    for (int n0 = 0; n0 < p.N; n0 += 16) {
        float h[16], a[16];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            if (n0 + j < p.N) {
                h[j] = p.state[(long)(n0 + j) * p.E + c];
                a[j] = p.a2[(long)(n0 + j) * p.E + c];
            }
        }
#pragma unroll
        for (int j = 0; j < 16; j++) {
            if (n0 + j < p.N) {
                const float v = exp2f(dt * a[j]) * h[j] + du * sbc[n0 + j];
                p.state[(long)(n0 + j) * p.E + c] = v;
                acc += sbc[p.N + n0 + j] * v;
            }
        }
    }
    const float y = (acc + p.d[c] * u) * silu(to_f32(((const T*)p.z)[c]));
    ((T*)p.y)[c] = from_f32<T>(y);
}
FOR_EACH_TYPE(m1_step, M1StepParams, 128)

struct M2StepParams {
    const void* x;        // conv output: x (H·P) then B (G·N) then C (G·N), T
    const void* dt;       // raw δ per head (H), T
    const float* dt_bias;
    const float* a2;      // A·log2(e) per head
    const float* d;       // D per head, or per channel when d_per_channel
    float* state;         // (H, N, P)
    void* y;              // (H·P), T
    int H, P, N, G, d_per_channel;
    float dt_min, dt_max;
};

#define M2_THREADS 256
#define M2_MAX_N 256

// Mamba-2's step, one block per head: thread (p, n-slice) updates N/slices states of column p,
// the partial readouts are summed in shared memory.
template <typename T> __device__ void m2_step(const M2StepParams p) {
    pdl_launch();
    pdl_wait();
    __shared__ float sb[M2_MAX_N], sc[M2_MAX_N], part[M2_THREADS];
    const int hd = blockIdx.x, g = hd / (p.H / p.G);
    const T* x = (const T*)p.x;
    const T* b = x + p.H * p.P + g * p.N;
    const T* cm = x + p.H * p.P + p.G * p.N + g * p.N;
    for (int i = threadIdx.x; i < p.N; i += blockDim.x) {
        sb[i] = to_f32(b[i]);
        sc[i] = to_f32(cm[i]);
    }
    __syncthreads();
    const float dt = fminf(fmaxf(softplus(to_f32(((const T*)p.dt)[hd]) + p.dt_bias[hd]), p.dt_min), p.dt_max);
    const float decay = exp2f(dt * p.a2[hd]);
    const int slices = blockDim.x / p.P;  // P divides the block (launcher's check)
    const int col = threadIdx.x % p.P, sl = threadIdx.x / p.P;
    const float xv = to_f32(x[hd * p.P + col]);
    float* st = p.state + (long)hd * p.N * p.P + col;
    float acc = 0.0f;
    // This thread's states in groups of 8, loads first.
    for (int n0 = sl; n0 < p.N; n0 += 8 * slices) {
        float h[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int n = n0 + j * slices;
            if (n < p.N) h[j] = st[n * p.P];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int n = n0 + j * slices;
            if (n < p.N) {
                const float v = decay * h[j] + dt * xv * sb[n];
                st[n * p.P] = v;
                acc += sc[n] * v;
            }
        }
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (sl == 0) {
        for (int k = 1; k < slices; k++) acc += part[k * p.P + col];
        const float dskip = p.d[p.d_per_channel ? hd * p.P + col : hd];
        ((T*)p.y)[hd * p.P + col] = from_f32<T>(acc + dskip * xv);
    }
}
FOR_EACH_TYPE(m2_step, M2StepParams, 256)
