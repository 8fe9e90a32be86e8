// Causal depthwise conv1d + SiLU over time, per channel, with the last W−1 inputs of each
// sequence carried in an f32 state (so prefill in pieces and the decode step share one kernel).
//
// conv1d_silu: one thread per (channel, run of RUN time steps); consecutive threads take
// consecutive channels, so every load and store is coalesced across the warp. The thread keeps
// its W-tap window in registers, so each input is read from memory about once (plus W−1 per
// run). Bytes: 2·(read + write) per element in 16-bit types; ~2W FLOPs per element.
//
// conv1d_state: afterwards, the new state is the last W−1 inputs of [old state, x]; one thread
// per channel, in place (it reads index L+j ≥ j before writing j).
//
// conv1d_step: the decode step (L = 1) as one kernel, both of the above for a single input: one
// thread per (channel, sequence), launched early (its taps load before the input is in). Bytes:
// 4(W−1) state read and written, x and y.


struct ConvParams {
    const void* x;        // input channel c of row (s·L + t) at x[row·x_rs + c], T
    int x_rs;
    const float* w;       // (W, C) tap-major
    const float* bias;    // (C) or null
    float* state;         // (S, W−1, C): the W−1 inputs before this call
    void* y;              // (S·L, C) T
    int L, C, W;
};

template <typename T> __device__ void conv1d_silu(const ConvParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.C) return;
    const int s = blockIdx.z, t0 = blockIdx.y * CONV_RUN, W = p.W;
    const T* x = (const T*)p.x + (long)s * p.L * p.x_rs + c;
    const float* st = p.state + (long)s * (W - 1) * p.C + c;
    float win[CONV_MAX_W];  // win[k]: input at time t − (W−1) + k
    float wt[CONV_MAX_W];
#pragma unroll
    for (int k = 0; k < CONV_MAX_W; k++) {
        wt[k] = k < W ? p.w[k * p.C + c] : 0.0f;
        const int t = t0 - (W - 1) + k;  // the window before the run's first step
        win[k] = k >= W - 1 ? 0.0f : (t >= 0 ? to_f32(x[(long)t * p.x_rs]) : st[(t + W - 1) * p.C]);
    }
    const float b = p.bias ? p.bias[c] : 0.0f;
    T* y = (T*)p.y + (long)s * p.L * p.C + c;
    const int t1 = min(t0 + CONV_RUN, p.L);
    for (int t = t0; t < t1; t++) {
        const float xt = to_f32(x[(long)t * p.x_rs]);
        float acc = b;
#pragma unroll
        for (int k = 0; k < CONV_MAX_W; k++)
            if (k == W - 1) win[k] = xt;  // constant indices keep `win` in registers
#pragma unroll
        for (int k = 0; k < CONV_MAX_W; k++)
            if (k < W) acc += wt[k] * win[k];
        y[(long)t * p.C] = from_f32<T>(silu(acc));
#pragma unroll
        for (int k = 0; k + 1 < CONV_MAX_W; k++)
            if (k + 1 < W) win[k] = win[k + 1];
    }
}
FOR_EACH_TYPE(conv1d_silu, ConvParams, 128)

template <typename T> __device__ void conv1d_state(const ConvParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.C) return;
    const int s = blockIdx.y, h = p.W - 1;
    const T* x = (const T*)p.x + (long)s * p.L * p.x_rs + c;
    float* st = p.state + (long)s * h * p.C + c;
    for (int j = 0; j < h; j++) {
        const int src = p.L + j;  // index into [old state (h), x (L)]
        st[j * p.C] = src < h ? st[src * p.C] : to_f32(x[(long)(src - h) * p.x_rs]);
    }
}
FOR_EACH_TYPE(conv1d_state, ConvParams, 128)

template <typename T> __device__ void conv1d_step(const ConvParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.C) return;
    const int s = blockIdx.y, W = p.W;
    float wt[CONV_MAX_W];
#pragma unroll
    for (int k = 0; k < CONV_MAX_W; k++) wt[k] = k < W ? p.w[k * p.C + c] : 0.0f;
    float acc = p.bias ? p.bias[c] : 0.0f;
    wait_inputs();
    float* st = p.state + (long)s * (W - 1) * p.C + c;
    float win[CONV_MAX_W];  // the W−1 inputs before this one, then the input
#pragma unroll
    for (int k = 0; k < CONV_MAX_W; k++) win[k] = k < W - 1 ? st[k * p.C] : 0.0f;
    const float xt = to_f32(((const T*)p.x)[(long)s * p.x_rs + c]);
#pragma unroll
    for (int k = 0; k < CONV_MAX_W; k++) {
        if (k == W - 1) win[k] = xt;
        if (k < W) acc += wt[k] * win[k];
    }
    ((T*)p.y)[(long)s * p.C + c] = from_f32<T>(silu(acc));
#pragma unroll
    for (int k = 0; k + 1 < CONV_MAX_W; k++)
        if (k + 1 < W) st[k * p.C] = win[k + 1];
}
FOR_EACH_TYPE(conv1d_step, ConvParams, 128)

// ---- Training backward (f32, each sequence from a zero state) ---------------------------------
// conv1d_silu_grad_pre: per (channel, run) as conv1d_silu, recomputes the pre-activation a and
// turns the output's gradient into the pre-activation's in place (∂a = ∂y·silu'(a)), summing the
// run's weight and bias gradients (Σ ∂a·window) into `parts` for sum_parts.
// conv1d_grad_x: ∂x_t = Σ_k w_k·∂a_{t+W−1−k}, a thread per (channel, run).
// Bytes: x read and ∂y read and written, then ∂a read and ∂x written: 20 bytes a (t, c).

struct ConvBwdParams {
    const float* x;     // conv input channel c of row r at x[r·x_rs + c]
    int x_rs;
    const float* w;     // (W, C) tap-major
    const float* bias;  // (C) or null
    float* g;           // (S·L, C): ∂/∂output in, ∂/∂pre-activation out
    float* gx;          // ∂x at gx[r·gx_rs + c], written
    int gx_rs;
    float* parts;       // (S·runs, (W+1)·C): Σ ∂a·x_{t−W+1+k} at [c·W + k], Σ ∂a at [W·C + c]
    int L, C, W;
};

extern "C" __global__ void __launch_bounds__(128) conv1d_silu_grad_pre(const ConvBwdParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.C) return;
    const int s = blockIdx.z, t0 = blockIdx.y * CONV_RUN, W = p.W;
    const float* x = p.x + (long)s * p.L * p.x_rs + c;
    float* g = p.g + (long)s * p.L * p.C + c;
    float win[CONV_MAX_W], wt[CONV_MAX_W], gw[CONV_MAX_W];
#pragma unroll
    for (int k = 0; k < CONV_MAX_W; k++) {
        wt[k] = k < W ? p.w[k * p.C + c] : 0.0f;
        const int t = t0 - (W - 1) + k;
        win[k] = k < W - 1 && t >= 0 ? x[(long)t * p.x_rs] : 0.0f;
        gw[k] = 0.0f;
    }
    float gb = 0.0f;
    const float b = p.bias ? p.bias[c] : 0.0f;
    const int t1 = min(t0 + CONV_RUN, p.L);
    for (int t = t0; t < t1; t++) {
        const float xt = x[(long)t * p.x_rs];
        float a = b;
#pragma unroll
        for (int k = 0; k < CONV_MAX_W; k++)
            if (k == W - 1) win[k] = xt;
#pragma unroll
        for (int k = 0; k < CONV_MAX_W; k++)
            if (k < W) a += wt[k] * win[k];
        const float sg = 1.0f / (1.0f + expf(-a)), ga = g[(long)t * p.C] * sg * (1.0f + a * (1.0f - sg));
        g[(long)t * p.C] = ga;
        gb += ga;
#pragma unroll
        for (int k = 0; k < CONV_MAX_W; k++)
            if (k < W) gw[k] += ga * win[k];
#pragma unroll
        for (int k = 0; k + 1 < CONV_MAX_W; k++)
            if (k + 1 < W) win[k] = win[k + 1];
    }
    float* part = p.parts + ((long)s * gridDim.y + blockIdx.y) * (W + 1) * p.C;
    for (int k = 0; k < W; k++) part[c * W + k] = gw[k];
    part[W * p.C + c] = gb;
}

extern "C" __global__ void __launch_bounds__(128) conv1d_grad_x(const ConvBwdParams p) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.C) return;
    const int s = blockIdx.z, t0 = blockIdx.y * CONV_RUN, W = p.W;
    const float* g = p.g + (long)s * p.L * p.C + c;
    float wt[CONV_MAX_W];
#pragma unroll
    for (int k = 0; k < CONV_MAX_W; k++) wt[k] = k < W ? p.w[k * p.C + c] : 0.0f;
    const int t1 = min(t0 + CONV_RUN, p.L);
    for (int t = t0; t < t1; t++) {
        float v = 0.0f;
#pragma unroll
        for (int k = 0; k < CONV_MAX_W; k++)
            if (k < W && t + W - 1 - k < p.L) v += wt[k] * g[(long)(t + W - 1 - k) * p.C];
        p.gx[((long)s * p.L + t) * p.gx_rs + c] = v;
    }
}

// conv_taps: the checkpoint's (C, 1, W) weight as the kernels' tap-major (W, C), after each
// update (C·W values).
struct ConvTapsParams {
    const float* w;  // (C, W)
    float* taps;     // (W, C)
    int C, W;
};

extern "C" __global__ void conv_taps(const ConvTapsParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.C * p.W) p.taps[(i % p.W) * p.C + i / p.W] = p.w[i];
}
