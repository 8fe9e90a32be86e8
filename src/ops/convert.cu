// to_bf16 / to_f16: an f32 matrix (rows of `cols`, `ld` apart) packed as a 16-bit type (rounded
// to nearest even): the 16-bit modes' product operands — the weights' copy after each update,
// and each activation or gradient on its way into a product (f32 everywhere else, as autocast
// does). Bandwidth-bound (6 bytes an element): a thread takes 4 elements at a time, 16 bytes
// read and 8 written in one access each when the rows start on 16 bytes and hold whole fours
// (every operand of the trainer but x_proj's narrow outputs), else one by one.

struct ToHalfParams {
    const float* src;
    void* dst;
    long rows, cols, ld;
};

template <typename T> __device__ void to_half(const ToHalfParams p) {
    T* dst = (T*)p.dst;
    const long step = (long)gridDim.x * blockDim.x, first = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (p.cols % 4 == 0 && p.ld % 4 == 0 && (unsigned long)p.src % 16 == 0) {
        const long quads = p.cols / 4, n = p.rows * quads;
        for (long i = first; i < n; i += step) {
            const long r = i / quads, c = 4 * (i - r * quads);
            const float4 v = *(const float4*)(p.src + r * p.ld + c);
            const unsigned lo = from_f32<T>(v.x).bits | (unsigned)from_f32<T>(v.y).bits << 16;
            const unsigned hi = from_f32<T>(v.z).bits | (unsigned)from_f32<T>(v.w).bits << 16;
            *(uint2*)(dst + r * p.cols + c) = make_uint2(lo, hi);
        }
        return;
    }
    const long n = p.rows * p.cols;
    for (long k = first; k < n; k += step) {
        const long r = k / p.cols;
        dst[k] = from_f32<T>(p.src[r * p.ld + k - r * p.cols]);
    }
}

extern "C" __global__ void to_bf16(const ToHalfParams p) { to_half<bf16>(p); }
extern "C" __global__ void to_f16(const ToHalfParams p) { to_half<f16>(p); }
