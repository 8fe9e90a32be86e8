// to_bf16: an f32 matrix (rows of `cols`, `ld` apart) packed as bf16 (rounded to nearest even):
// the bf16 mode's product operands — the weights' bf16 copy after each update, and each
// activation or gradient on its way into a product (f32 everywhere else, as autocast does).
// Bandwidth-bound (6 bytes an element): a thread takes 4 elements at a time, 16 bytes read and
// 8 written in one access each when the rows start on 16 bytes and hold whole fours (every
// operand of the trainer but x_proj's narrow outputs), else one by one.

struct ToBf16Params {
    const float* src;
    bf16* dst;
    long rows, cols, ld;
};

extern "C" __global__ void to_bf16(const ToBf16Params p) {
    const long step = (long)gridDim.x * blockDim.x, first = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (p.cols % 4 == 0 && p.ld % 4 == 0 && (unsigned long)p.src % 16 == 0) {
        const long quads = p.cols / 4, n = p.rows * quads;
        for (long i = first; i < n; i += step) {
            const long r = i / quads, c = 4 * (i - r * quads);
            const float4 v = *(const float4*)(p.src + r * p.ld + c);
            const unsigned lo = from_f32<bf16>(v.x).bits | (unsigned)from_f32<bf16>(v.y).bits << 16;
            const unsigned hi = from_f32<bf16>(v.z).bits | (unsigned)from_f32<bf16>(v.w).bits << 16;
            *(uint2*)(p.dst + r * p.cols + c) = make_uint2(lo, hi);
        }
        return;
    }
    const long n = p.rows * p.cols;
    for (long k = first; k < n; k += step) {
        const long r = k / p.cols;
        p.dst[k] = from_f32<bf16>(p.src[r * p.ld + k - r * p.cols]);
    }
}
