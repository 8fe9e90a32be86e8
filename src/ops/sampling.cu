// Greedy sampling on the GPU: the index of the largest logit of each row, so a decode step hands
// back 4 bytes instead of the vocabulary's logits. One block of 1024 threads per row; each thread
// scans a strided slice, then a warp-shuffle and shared-memory reduction. Ties go to the lowest
// index, as on the CPU. Reads 4·V bytes per row.

struct ArgmaxParams {
    const float* logits;   // (rows, stride)
    unsigned* out;         // (rows)
    int stride;
    int limit;             // only ids below this are considered
};

__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i) || (v != v && v2 == v2)) {  // NaN loses
        v = v2;
        i = i2;
    }
}

extern "C" __global__ void __launch_bounds__(1024) argmax(const ArgmaxParams p) {
    const float* x = p.logits + (long)blockIdx.x * p.stride;
    const float neg_inf = __int_as_float(0xff800000);
    float v = neg_inf;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < p.limit; i += blockDim.x) better(v, idx, x[i], i);
    for (int o = 16; o > 0; o >>= 1) better(v, idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
    __shared__ float sv[32];
    __shared__ int si[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? sv[lane] : neg_inf;
        idx = lane < blockDim.x / 32 ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) better(v, idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
        if (lane == 0) p.out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

// Sampling on the GPU with temperature and min-p, by the CPU's rules (src/sampling.rs, top-k 0,
// no top-p): weights w = exp((l − max)/T), tokens with w ≥ min-p kept; the pick is the first
// token, in id order, where the cumulative kept weight reaches u·Σw for the row's uniform
// number u (drawn by the host, as the CPU draws it), so both make the same pick up to rounding.
// (Top-k and top-p stay on the host: radix selects over the vocabulary in one block per row
// measured slower than copying the logits out.) One block of 1024 threads per row; reads the
// row's logits 3 times (from L2), hands the host 4 bytes.

struct SampleParams {
    const float* logits;   // (rows, stride)
    unsigned* out;         // (rows)
    const float* u;        // (rows) uniform in [0, 1)
    int stride;
    int limit;             // only ids below this are considered
    float inv_t_log2e;     // log2(e) / temperature
    float min_p;           // 0: off
};

__device__ __forceinline__ float block_max(float v) {
    return block_reduce(v, __int_as_float(0xff800000), [](float x, float y) { return fmaxf(x, y); });
}

extern "C" __global__ void __launch_bounds__(1024) sample_rows(const SampleParams p) {
    const float* x = p.logits + (long)blockIdx.x * p.stride;
    const int n = p.limit;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m);
    const float s = p.inv_t_log2e;
    auto kept = [&](int i) {
        const float w = exp2f((x[i] - m) * s);
        return w >= p.min_p ? w : 0.0f;
    };
    // Each thread takes a contiguous run of ids, so a prefix sum over threads orders the mass
    // by id; the thread whose run crosses u·Σw walks it.
    const int run = (n + blockDim.x - 1) / blockDim.x, i0 = threadIdx.x * run, i1 = min(i0 + run, n);
    float mine = 0.0f;
    for (int i = i0; i < i1; i++) mine += kept(i);
    // Inclusive scan over the block: warps, then warp totals.
    __shared__ float wsum[32];
    __shared__ unsigned pick;
    float inc = mine;
    for (int o = 1; o < 32; o <<= 1) {
        const float v = __shfl_up_sync(0xffffffffu, inc, o);
        if (threadIdx.x % 32 >= o) inc += v;
    }
    if (threadIdx.x % 32 == 31) wsum[threadIdx.x / 32] = inc;
    if (threadIdx.x == 0) pick = 0xffffffffu;
    __syncthreads();
    float before = 0.0f, total = 0.0f;
    for (int w = 0; w < blockDim.x / 32; w++) {
        if (w < threadIdx.x / 32) before += wsum[w];
        total += wsum[w];
    }
    const float excl = before + inc - mine, target = p.u[blockIdx.x] * total;
    if (mine > 0.0f && excl <= target && target <= excl + mine) {
        float acc = excl;
        for (int i = i0; i < i1; i++) {
            const float w = kept(i);
            acc += w;
            if (w > 0.0f && acc >= target) {
                atomicMin(&pick, (unsigned)i);
                break;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (pick == 0xffffffffu) {  // rounding put the target past the last kept token
            for (int i = n - 1; i >= 0 && pick == 0xffffffffu; i--)
                if (kept(i) > 0.0f) pick = i;
        }
        p.out[blockIdx.x] = pick == 0xffffffffu ? 0 : pick;
    }
}
