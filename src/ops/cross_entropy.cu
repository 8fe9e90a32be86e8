// Cross-entropy of logit rows against target ids (cross_entropy.rs's `nll_rows` on the GPU):
// nll[r] = log Σ_v exp(x[r, v]) − x[r, target[r]] over the padded vocabulary, so scoring hands
// the host 8 bytes a position instead of the row. One block of 1024 threads per row: a pass for
// the maximum, a pass for Σ exp(x − max) (f32 within a thread, ~50 terms; f64 across threads),
// the second from L2. Bytes: 4·V read twice per row, 8 written; FLOPs: ~4·V.

struct NllParams {
    const float* logits;     // (rows, stride)
    const unsigned* targets; // (rows)
    double* nll;             // (rows)
    int stride;
    int v;                   // entries per row taken into the sum
};

extern "C" __global__ void __launch_bounds__(1024) nll_rows(const NllParams p) {
    const float* x = p.logits + (long)blockIdx.x * p.stride;
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < p.v; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < p.v; i += blockDim.x) s += expf(x[i] - m);
    const double t = block_reduce((double)s, 0.0, [](double a, double b) { return a + b; });
    if (threadIdx.x == 0) p.nll[blockIdx.x] = (double)m + log(t) - (double)x[p.targets[blockIdx.x]];
}

// ce_grad_rows: the LM head's loss and its gradient for training, in place over a chunk of
// logit rows: nll[r] as nll_rows (0 for a row whose target is IGNORE), then, when `grad`,
// x ← scale·(softmax(x) − onehot(target)) (zeros for an IGNORE row), which the head's two
// gradient GEMMs read. Bytes: 4·V read three times (max, sum, update) and written once.

#define CE_IGNORE 0xffffffffu

struct CeGradParams {
    float* logits;            // (rows, stride), replaced by their gradient when `grad`
    const unsigned* targets;  // (rows)
    double* nll;              // (rows)
    int stride, v, grad;
    float scale;
};

extern "C" __global__ void __launch_bounds__(1024) ce_grad_rows(const CeGradParams p) {
    float* x = p.logits + (long)blockIdx.x * p.stride;
    const unsigned tg = p.targets[blockIdx.x];
    if (tg == CE_IGNORE) {
        if (threadIdx.x == 0) p.nll[blockIdx.x] = 0.0;
        if (p.grad)
            for (int i = threadIdx.x; i < p.v; i += blockDim.x) x[i] = 0.0f;
        return;
    }
    const float xt = x[tg];  // read by every thread before the reductions' barriers
    float m = __int_as_float(0xff800000);
    for (int i = threadIdx.x; i < p.v; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < p.v; i += blockDim.x) s += expf(x[i] - m);
    const double t = block_reduce((double)s, 0.0, [](double a, double b) { return a + b; });
    const double lse = (double)m + log(t);
    if (threadIdx.x == 0) p.nll[blockIdx.x] = lse - (double)xt;
    if (!p.grad) return;
    const float lsef = (float)lse;
    for (int i = threadIdx.x; i < p.v; i += blockDim.x) x[i] = p.scale * (expf(x[i] - lsef) - (i == (int)tg ? 1.0f : 0.0f));
}
