// AdamW over one stretch of the flat parameter buffer (optim.rs's AdamW::step on the GPU), in
// PyTorch's order, the gradient first scaled by the clipping factor (torch's clip_grad_norm_):
//   g ← g·clip,  p ← p·decay,  m ← m + (g − m)(1 − β1),  v ← β2·v + (1 − β2)·g²,
//   p ← p − step_size · m / (√v / √(1 − β2^t) + ε).
// One thread per element (grid-stride); reads p, g, m, v and writes p, m, v: 28 bytes an element.

struct AdamWParams {
    float* p;
    const float* g;
    float* m;
    float* v;
    long n;
    float clip, decay, beta1, beta2, step_size, bc2_sqrt, eps;
};

extern "C" __global__ void adamw(const AdamWParams a) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < a.n; i += (long)gridDim.x * blockDim.x) {
        const float g = a.g[i] * a.clip;
        float p = a.p[i] * a.decay, m = a.m[i], v = a.v[i];
        m += (g - m) * (1.0f - a.beta1);
        v = v * a.beta2 + (1.0f - a.beta2) * g * g;
        p -= a.step_size * m / (sqrtf(v) / a.bc2_sqrt + a.eps);
        a.p[i] = p;
        a.m[i] = m;
        a.v[i] = v;
    }
}
