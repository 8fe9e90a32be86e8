// Shared by every kernel (prepended to each .cu before NVRTC compiles it). Element types are
// defined here rather than taken from cuda_bf16.h / cuda_fp16.h, which NVRTC only finds with a
// toolkit installed: bf16 is the top half of an f32, and PTX converts both 16-bit types.
typedef unsigned short u16;
typedef float f32;
struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}
// v as T would store it (rounded to nearest even), back in f32.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

// Asynchronous copies global → shared (cp.async): 16 bytes (L2 only) or 4 bytes.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}
__device__ __forceinline__ void cp16(void* s, const void* g) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(s)), "l"(g) : "memory");
}
// 16 bytes, or zeros when !full (nothing is read then; `g` must still be an address).
__device__ __forceinline__ void cp16_or_zero(void* s, const void* g, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(s)), "l"(g), "r"(full ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp4(void* s, const void* g) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(s)), "l"(g) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// A kernel that Gpu::launch_early starts may run while the kernels before it finish: it reads
// only the model's weights (never written after loading) before calling this, which returns
// once the kernel before has completed and its writes are visible (a no-op for other launches).
__device__ __forceinline__ void wait_inputs() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// 2^x on the special-function unit alone (exp2f adds a range fix-up around it); results below
// 2^−126 flush to zero, which decays may.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Both without branches, so the scheduler can interleave them with other work (a branch ends
// the stretch of code it reorders). SiLU divides as the official kernels do under fast math
// (approximately, 2 ulp).
__device__ __forceinline__ float silu(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

// log(1 + w) for finite w ≥ 0, within 3 ulp: 1 + w = 2^k·m with m in [0.75, 1.5), then
// log1p(m − 1) = 2·atanh(s), s = (m − 1)/(m + 1) in [−1/7, 1/5], by its odd series to s^11
// (the next term is below 2^−30 relatively); s gets one correction step for the rounding of
// its denominator and of the reciprocal, the result the rounding error of 1 + w to first order.
__device__ __forceinline__ float log1p_pos(float w) {
    const float u = 1.0f + w;
    const int k = (__float_as_int(u) - 0x3f400000) >> 23;  // 0x3f400000 = 0.75
    const float m = __int_as_float(__float_as_int(u) - (k << 23));
    const float fix = (w - (u - 1.0f)) * rcp_approx(u);
    const float f = m - 1.0f, d = 2.0f + f, e = f - (d - 2.0f), rd = rcp_approx(d), r = f * rd;
    const float s = fmaf(fmaf(-r, d, f) - r * e, rd, r), s2 = s * s;
    const float tail = s2 * fmaf(s2, fmaf(s2, fmaf(s2, fmaf(s2, 2.0f / 11, 2.0f / 9), 2.0f / 7), 2.0f / 5), 2.0f / 3);
    return fmaf((float)k, 0.693147182f, fmaf(s, tail, fmaf(2.0f, s, fix)));
}

// log(1 + e^x), linear above 20 as in the official kernels.
__device__ __forceinline__ float softplus(float x) {
    const float l = log1p_pos(__expf(fminf(x, 20.0f)));
    return x > 20.0f ? x : l;
}

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ float2 shfl_xor(float2 v, int o) { return make_float2(shfl_xor(v.x, o), shfl_xor(v.y, o)); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// `op` (with identity `id`) over a block of `blockDim.x` threads (a multiple of 32, at most
// 1024), warps first; every thread gets the result. V: float, float2 or double.
template <typename V, typename Op> __device__ __forceinline__ V block_reduce(V v, V id, Op op) {
    __shared__ V part[32];
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    __syncthreads();  // `part` may still be read by a previous call
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < nwarps ? part[lane] : id;
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    return v;
}

// Sums of two values over a block, in one pass.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
    const auto add = [](float2 x, float2 y) { return make_float2(x.x + y.x, x.y + y.y); };
    return block_reduce(make_float2(a, b), make_float2(0.0f, 0.0f), add);
}

__device__ __forceinline__ float block_sum(float v) { return block_sum2(v, 0.0f).x; }

__device__ __forceinline__ float block_max(float v) {
    return block_reduce(v, __int_as_float(0xff800000), [](float x, float y) { return fmaxf(x, y); });
}

// The normalisation of a row from its per-thread partial sums of x and x²: returns 1/σ and sets
// the mean (zero for RMSNorm; LayerNorm when `with_mean`). Every thread of the block calls it.
__device__ __forceinline__ float norm_scale(float s, float s2, int d, bool with_mean, float eps, float& mean) {
    const float2 t = block_sum2(s, s2);
    mean = with_mean ? t.x / d : 0.0f;
    const float var = with_mean ? fmaxf(t.y / d - mean * mean, 0.0f) : t.y / d;
    return rsqrtf(var + eps);
}

// A 16-byte piece of a row (8 bf16/f16 or 4 f32) against x (f32, 16-byte aligned, usually in
// shared memory).
template <typename T> __device__ __forceinline__ float dot_piece(const uint4& q, const float* x) {
    const T* e = (const T*)&q;
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(T)); k += 4) {
        const float4 v = *(const float4*)(x + k);
        acc += to_f32(e[k]) * v.x + to_f32(e[k + 1]) * v.y + to_f32(e[k + 2]) * v.z + to_f32(e[k + 3]) * v.w;
    }
    return acc;
}

// One extern "C" entry point per element type, named KERNEL_f32 / _bf16 / _f16, each taking the
// kernel's parameter struct by value.
#define FOR_EACH_TYPE(KERNEL, PARAMS, THREADS)                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) KERNEL##_f32(const PARAMS p) { KERNEL<f32>(p); } \
    extern "C" __global__ void __launch_bounds__(THREADS) KERNEL##_bf16(const PARAMS p) { KERNEL<bf16>(p); } \
    extern "C" __global__ void __launch_bounds__(THREADS) KERNEL##_f16(const PARAMS p) { KERNEL<f16>(p); }
