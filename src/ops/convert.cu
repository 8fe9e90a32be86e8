// to_bf16: an f32 matrix (rows of `cols`, `ld` apart) packed as bf16 (rounded to nearest even):
// the bf16 mode's product operands — the weights' bf16 copy after each update, and each
// activation or gradient on its way into a product (f32 everywhere else, as autocast does).
// A thread per 4 elements: 16 bytes read, 8 written.

struct ToBf16Params {
    const float* src;
    bf16* dst;
    long rows, cols, ld;
};

extern "C" __global__ void to_bf16(const ToBf16Params p) {
    const long n = p.rows * p.cols;
    for (long i = 4 * (blockIdx.x * (long)blockDim.x + threadIdx.x); i < n; i += 4 * (long)gridDim.x * blockDim.x) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const long k = i + j;
            if (k < n) p.dst[k] = from_f32<bf16>(p.src[(k / p.cols) * p.ld + k % p.cols]);
        }
    }
}
