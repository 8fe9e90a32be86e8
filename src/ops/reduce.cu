// Deterministic reductions for training: sums in a fixed order, no atomics, so a step gives the
// same bits every run.
//
// sum_parts: out (+)= Σ_k parts[k] element-wise, over the per-block or per-sequence partial sums
// the backward kernels write (∂B/∂C per channel block, ∂A_log per sequence, norm and conv
// weight gradients per row slice). One thread per element, the parts in order; reads
// nparts·n·4 bytes, writes n·4.
//
// sum_squares: Σ x² over a flat buffer (the gradient norm for clipping): each block sums a fixed
// share of it in f64 and writes one value; the host adds the blocks' values in order.
//
// embed_rows / embed_backward: the embedding's gather (a row per position) and its transpose,
// a block per distinct token summing its positions' gradient rows in order (the host lists
// them), so repeated tokens need no atomics.

struct SumPartsParams {
    const float* parts;  // part k of item i of group g (blockIdx.y): parts[g·group_stride + k·part_stride + i]
    float* out;          // item i of group g: out[g·out_group + (i / width)·out_rs + i % width]
    long group_stride, part_stride, out_group;
    int nparts, n, width, out_rs, add;
};

extern "C" __global__ void sum_parts(const SumPartsParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float* x = p.parts + blockIdx.y * p.group_stride + i;
    float v = 0.0f;
    for (int k = 0; k < p.nparts; k++) v += x[k * p.part_stride];
    float* o = p.out + blockIdx.y * p.out_group + (long)(i / p.width) * p.out_rs + i % p.width;
    *o = p.add ? *o + v : v;
}

struct SumSquaresParams {
    const float* x;
    long n;
    double* out;  // (gridDim.x)
};

extern "C" __global__ void __launch_bounds__(1024) sum_squares(const SumSquaresParams p) {
    const long per = (p.n + gridDim.x - 1) / gridDim.x, i0 = blockIdx.x * per, i1 = min(p.n, i0 + per);
    double s = 0.0;
    for (long i = i0 + threadIdx.x; i < i1; i += blockDim.x) s += (double)p.x[i] * p.x[i];
    s = block_reduce(s, 0.0, [](double a, double b) { return a + b; });
    if (threadIdx.x == 0) p.out[blockIdx.x] = s;
}

struct EmbedParams {
    float* table;            // (vocab, d): read by embed_rows, its gradient added to by embed_backward
    const unsigned* tokens;  // embed_rows: (rows); embed_backward: the distinct tokens
    const int* starts;       // embed_backward: token k's positions are pos[starts[k] .. starts[k+1]]
    const int* pos;
    float* rows;             // (rows, d): embed_rows writes, embed_backward reads
    int d;
};

extern "C" __global__ void embed_rows(const EmbedParams p) {
    const float* src = p.table + (long)p.tokens[blockIdx.x] * p.d;
    float* dst = p.rows + (long)blockIdx.x * p.d;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void embed_backward(const EmbedParams p) {
    const int k = blockIdx.x;
    float* dst = p.table + (long)p.tokens[k] * p.d;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
        float v = 0.0f;
        for (int j = p.starts[k]; j < p.starts[k + 1]; j++) v += p.rows[(long)p.pos[j] * p.d + i];
        dst[i] += v;
    }
}
