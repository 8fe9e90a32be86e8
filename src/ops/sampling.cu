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
