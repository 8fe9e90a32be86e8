// Normalisations on the GPU, one block per row.
//
// add_norm: the fused residual-add + RMSNorm (LayerNorm when a bias is given) that opens every
// block: resid += delta (f32 stream), out = norm(resid) · w (+ b) in the activation type. It
// moves 2·d (delta, T) + 8·d (resid read and written) + 2·d (out) bytes per row and does ~5 d
// FLOPs. A thread holds NORM_VALUES of the row in registers (blockDim.x = d / NORM_VALUES
// rounded up to a warp) and issues all its loads, the weights' too, before it uses any: in a
// decode step (a row per sequence) the kernel is bound by memory latency, and this makes it one
// round trip instead of one per value; launched early, it has the weights in before the kernel
// that writes `delta` ends. It also gathers the embedding rows into the residual
// stream for the first layer (`tokens` set), and can select the last `nsel` rows of each
// sequence (the final norm only runs on positions that give logits).
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
    const int r = blockIdx.x, d = p.d;
    float v[NORM_VALUES], w[NORM_VALUES], b[NORM_VALUES];
#pragma unroll
    for (int j = 0; j < NORM_VALUES; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        w[j] = i < d ? p.w[i] : 0.0f;
        b[j] = i < d && p.b ? p.b[i] : 0.0f;
    }
    wait_inputs();
    const long in_row = (long)(r / p.nsel) * p.l + (p.l - p.nsel) + r % p.nsel;
    float* x = p.resid + in_row * d;
    const T* dl = (const T*)p.delta + in_row * d;
    const T* emb = p.tokens ? (const T*)p.table + (long)p.tokens[in_row] * d : nullptr;
#pragma unroll
    for (int j = 0; j < NORM_VALUES; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = i >= d ? 0.0f : emb ? to_f32(emb[i]) : x[i] + (p.delta ? to_f32(dl[i]) : 0.0f);
    }
    float s = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_VALUES; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < d) x[i] = v[j];
        s += v[j];
        s2 += v[j] * v[j];
    }
    float mean;
    const float inv = norm_scale(s, s2, d, p.b != nullptr, p.eps, mean);
    T* o = (T*)p.out + (long)r * d;
#pragma unroll
    for (int j = 0; j < NORM_VALUES; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < d) o[i] = from_f32<T>((v[j] - mean) * inv * w[j] + b[j]);
    }
}
FOR_EACH_TYPE(add_norm, AddNormParams, 1024)

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

// ---- Training (f32) --------------------------------------------------------------------------
// rms_norm_train: out = x·rstd·w per row (one block per row); rms_norm_backward recomputes rstd,
// keeps it in `rstd` for the weight's gradient and adds the input's:
//   ∂x += rstd·(gy ⊙ w) − x·rstd³/d · Σ(gy ⊙ w ⊙ x).
// rms_norm_weight_grad: ∂w's partial sums Σ gy·x·rstd over a slice of rows (blockIdx.y), one
// thread per column, for sum_parts. Each reads the rows once: 8·d bytes a row (12·d backward).

struct NormTrainParams {
    const float* x;    // (rows, d)
    const float* w;    // (d)
    float* out;        // (rows, d) rms_norm_train
    float* rstd;       // (rows)
    const float* gy;   // (rows, d) ∂/∂out
    float* gx;         // (rows, d) added to
    float* parts;      // (slices, d) rms_norm_weight_grad
    int d, rows;
    float eps;
};

__device__ __forceinline__ float row_rstd(const float* x, int d, float eps) {
    float s2 = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s2 += x[i] * x[i];
    return rsqrtf(block_sum(s2) / d + eps);
}

extern "C" __global__ void rms_norm_train(const NormTrainParams p) {
    const float* x = p.x + (long)blockIdx.x * p.d;
    const float inv = row_rstd(x, p.d, p.eps);
    float* o = p.out + (long)blockIdx.x * p.d;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) o[i] = x[i] * inv * p.w[i];
}

extern "C" __global__ void rms_norm_backward(const NormTrainParams p) {
    const long r = blockIdx.x;
    const float *x = p.x + r * p.d, *gy = p.gy + r * p.d;
    const float inv = row_rstd(x, p.d, p.eps);
    float dot = 0.0f;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) dot += gy[i] * p.w[i] * x[i];
    const float k = inv * inv * inv * block_sum(dot) / p.d;
    float* gx = p.gx + r * p.d;
    for (int i = threadIdx.x; i < p.d; i += blockDim.x) gx[i] += inv * gy[i] * p.w[i] - x[i] * k;
    if (threadIdx.x == 0) p.rstd[r] = inv;
}

extern "C" __global__ void rms_norm_weight_grad(const NormTrainParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.d) return;
    const int per = (p.rows + gridDim.y - 1) / gridDim.y, r0 = blockIdx.y * per, r1 = min(p.rows, r0 + per);
    float v = 0.0f;
    for (long r = r0; r < r1; r++) v += p.gy[r * p.d + i] * p.x[r * p.d + i] * p.rstd[r];
    p.parts[(long)blockIdx.y * p.d + i] = v;
}

// gated_norm_backward: the backward of gated_norm (f32, out = v·rstd·w with v = y·silu(z), per
// (row, group) of `gsize` channels; one block per (row, group)):
//   ∂v = rstd·(gy ⊙ w) − v·rstd³/gsize · Σ(gy ⊙ w ⊙ v),  ∂y = ∂v·silu(z),
//   ∂z = ∂v·y·σ(z)·(1 + z·(1 − σ(z))),
// writing ∂y, ∂z and rstd (for the weight's gradient). gated_norm_weight_grad: ∂w's partial
// sums Σ gy·v·rstd over a slice of rows (blockIdx.y), one thread per column, for sum_parts.
// Each reads y, z and gy once (12 bytes a value) and writes 8.

struct GatedNormTrainParams {
    const float* y;    // (rows, groups·gsize) the SSD output
    const float* z;    // gate z[row·z_rs + i]
    const float* w;    // (groups·gsize)
    const float* gy;   // (rows, groups·gsize) ∂/∂out
    float* gx;         // (rows, groups·gsize) ∂y, written
    float* gz;         // gz[row·z_rs + i], written
    float* rstd;       // (rows, groups)
    float* parts;      // (slices, groups·gsize)
    int z_rs, gsize, groups, rows;
    float eps;
};

extern "C" __global__ void gated_norm_backward(const GatedNormTrainParams p) {
    const int g = blockIdx.y, width = p.groups * p.gsize;
    const long r = blockIdx.x, o = r * width + g * p.gsize, oz = r * p.z_rs + g * p.gsize;
    const float *y = p.y + o, *z = p.z + oz, *gy = p.gy + o, *w = p.w + g * p.gsize;
    float s2 = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < p.gsize; i += blockDim.x) {
        const float v = y[i] * (z[i] / (1.0f + expf(-z[i])));
        s2 += v * v;
        dot += gy[i] * w[i] * v;
    }
    const float2 s = block_sum2(s2, dot);
    const float inv = rsqrtf(s.x / p.gsize + p.eps), k = inv * inv * inv * s.y / p.gsize;
    for (int i = threadIdx.x; i < p.gsize; i += blockDim.x) {
        const float sg = 1.0f / (1.0f + expf(-z[i])), v = y[i] * (z[i] / (1.0f + expf(-z[i])));
        const float gv = inv * gy[i] * w[i] - v * k;
        p.gx[o + i] = gv * z[i] * sg;
        p.gz[oz + i] = gv * y[i] * sg * (1.0f + z[i] * (1.0f - sg));
    }
    if (threadIdx.x == 0) p.rstd[r * p.groups + g] = inv;
}

extern "C" __global__ void gated_norm_weight_grad(const GatedNormTrainParams p) {
    const int width = p.groups * p.gsize, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width) return;
    const int per = (p.rows + gridDim.y - 1) / gridDim.y, r0 = blockIdx.y * per, r1 = min(p.rows, r0 + per);
    float acc = 0.0f;
    for (long r = r0; r < r1; r++) {
        const float zi = p.z[r * p.z_rs + i], v = p.y[r * width + i] * (zi / (1.0f + expf(-zi)));
        acc += p.gy[r * width + i] * v * p.rstd[r * p.groups + i / p.gsize];
    }
    p.parts[(long)blockIdx.y * width + i] = acc;
}
