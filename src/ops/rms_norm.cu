// Normalisations on the GPU, one block of 256 threads per row.
//
// add_norm: the fused residual-add + RMSNorm (LayerNorm when a bias is given) that opens every
// block: resid += delta (f32 stream), out = norm(resid) · w (+ b) in the activation type. It
// moves 4·d (delta, T) + 8·d (resid read and written) + 2·d (out) bytes per row and does ~5 d
// FLOPs: bandwidth-bound; the second pass re-reads resid from L1/L2, not HBM. It also gathers the
// embedding rows into the residual stream for the first layer (`tokens` set), and can select the
// last `nsel` rows of each sequence (the final norm only runs on positions that give logits).
//
// gated_norm: Mamba-2's y ← rmsnorm(y · silu(z)) · w per group, in place; one block per
// (row, group). Reads y and z once, writes y once.

struct AddNormParams {
    float* resid;          // (rows_in, d) f32 residual stream, updated in place
    const void* delta;     // (rows_in, d) T added first, or null
    const void* table;     // (vocab, d) T embedding, with tokens: resid = table[token] instead
    const unsigned* tokens;
    const float* w;
    const float* b;        // null: RMSNorm
    void* out;             // (rows_out, d) T
    int d;
    int l;                 // rows per sequence in the input
    int nsel;              // last rows of each sequence to process (l for all)
    float eps;
};

template <typename T> __device__ void add_norm(const AddNormParams p) {
    const int r = blockIdx.x;
    const long in_row = (long)(r / p.nsel) * p.l + (p.l - p.nsel) + r % p.nsel;
    float* x = p.resid + in_row * p.d;
    const T* dl = (const T*)p.delta + in_row * p.d;
    float s = 0.0f, s2 = 0.0f;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
        float v;
        if (p.tokens) v = to_f32(((const T*)p.table)[(long)p.tokens[in_row] * p.d + i]);
        else v = x[i] + (p.delta ? to_f32(dl[i]) : 0.0f);
        x[i] = v;
        s += v;
        s2 += v * v;
    }
    float mean;
    const float inv = norm_scale(s, s2, p.d, p.b != nullptr, p.eps, mean);
    T* o = (T*)p.out + (long)r * p.d;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) {
        float v = (x[i] - mean) * inv * p.w[i];
        if (p.b) v += p.b[i];
        o[i] = from_f32<T>(v);
    }
}
FOR_EACH_TYPE(add_norm, AddNormParams, 256)

struct GatedNormParams {
    void* y;               // (rows, groups·gsize) T, normalised in place
    const void* z;         // gate, z[row·z_rs + i]
    int z_rs;
    const float* w;        // (groups·gsize)
    int gsize;
    float eps;
};

template <typename T> __device__ void gated_norm(const GatedNormParams p) {
    const int r = blockIdx.x, g = blockIdx.y, width = gridDim.y * p.gsize;
    T* y = (T*)p.y + (long)r * width + g * p.gsize;
    const T* z = (const T*)p.z + (long)r * p.z_rs + g * p.gsize;
    float s2 = 0.0f;
    for (int i = threadIdx.x; i < p.gsize; i += blockDim.x) {
        const float v = to_f32(y[i]) * silu(to_f32(z[i]));
        s2 += v * v;
    }
    const float inv = rsqrtf(block_sum(s2) / p.gsize + p.eps);
    for (int i = threadIdx.x; i < p.gsize; i += blockDim.x) {
        const float v = to_f32(y[i]) * silu(to_f32(z[i]));
        y[i] = from_f32<T>(v * inv * p.w[g * p.gsize + i]);
    }
}
FOR_EACH_TYPE(gated_norm, GatedNormParams, 256)
