// Mamba-2's SSD in its chunked matrix form on tensor cores (bf16 / f16 in, f32 accumulate), for
// prefill. It takes the selective scan's ScanParams (selective_scan.cu, compiled before this)
// with channel c = h·P + p, P = p_blk. Time is cut into chunks of Q = 64; with Λ the inclusive
// cumsum of δ·A (log2 units) over a chunk, per (sequence, chunk, head):
//   ssd_state   S_loc[n, p] = Σ_t B[t, n]·2^(Λ_end − Λ_t)·δ_t · x[t, p]        (N×Q · Q×P)
//               and Σδ, as scan_end writes them, so scan_carry passes the states between
//               chunks unchanged: S_in,k+1 = 2^(Λ_end,k)·S_in,k + S_loc,k, in f32;
//   ssd_out     y[t, p] = 2^Λ_t·Σ_n C[t, n]·S_in[n, p]                           (Q×N · N×P)
//                       + Σ_{j≤t} (C_t·B_j)·2^(Λ_t − Λ_j)·δ_j · x[j, p]           (Q×N · N×Q, Q×Q · Q×P)
//                       + D·x[t, p].
// As in the official kernels, B·2^(..)·δ, the masked C·Bᵀ weights and S_in are rounded to the
// input type for the products; all sums are f32. The recurrence form costs N multiply-adds per
// (t, channel) twice; here the state terms are 4·N·P and the intra-chunk ones ~Q·(N + P) MACs per
// (t, head), all on tensor cores: 0.5 GFLOP per layer of mamba2-130m at L = 512 (~1 µs of the
// H100's bf16 rate), so the kernels are bound by their bytes: x, B, C and y once each (~7 MB),
// and the f32 chunk states written, then read twice (N·P·4 bytes per chunk and head).
//
// Each block is one (head, chunk, sequence) of 4 warps. x, B and C rows are copied into shared
// memory as they lie in global memory (cp.async, 16 bytes a copy, issued before the chunk's
// decays are computed so the two overlap); operands whose reduction index is not contiguous
// there are read with ldmatrix.trans. Rows are padded by 8 elements so that fragment loads hit
// 32 different banks. Warp w of ssd_out owns rows 16w … 16w + 15 of the chunk: its C fragment
// feeds both C·S_in and C·Bᵀ, and the masked weights it writes are only read back by itself.
// Alignment: x, B, C rows start on 16 bytes because N and P are multiples of 16.

// SSD_Q, SSD_NMAX, SSD_PMAX: src/cuda/consts.rs.
#define SSD_NS (SSD_NMAX + 8)  // row stride of N-long rows (elements)
#define SSD_PS (SSD_PMAX + 8)  // of P-long rows
#define SSD_QS (SSD_Q + 8)     // of Q-long rows

// mma.sync m16n8k16: D (16×8, f32) += A (16×16, row-major) · B (16×8, column-major).
template <typename T> __device__ __forceinline__ void mma_16816(float* d, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void mma_16816<bf16>(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<f16>(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Fragments from shared memory. frag_a: the 16×16 A tile at (row0, k0) of m[row·ld + k];
// frag_b: the 16×8 B tile at (k0, col0) of m[col·ld + k] (its transpose). The _trans forms read
// matrices stored the other way round, m[k·ld + row] and m[k·ld + col], through ldmatrix.trans;
// frag_b2_trans gives the B tiles at col0 and col0 + 8.
__device__ __forceinline__ void frag_a(unsigned* a, const u16* m, int ld, int row0, int k0) {
    const int g = threadIdx.x % 32 / 4, c = threadIdx.x % 4 * 2;
    const u16* p = m + (row0 + g) * ld + k0 + c;
    a[0] = *(const unsigned*)p;
    a[1] = *(const unsigned*)(p + 8 * ld);
    a[2] = *(const unsigned*)(p + 8);
    a[3] = *(const unsigned*)(p + 8 * ld + 8);
}
__device__ __forceinline__ void frag_b(unsigned* b, const u16* m, int ld, int col0, int k0) {
    const int g = threadIdx.x % 32 / 4, c = threadIdx.x % 4 * 2;
    const u16* p = m + (col0 + g) * ld + k0 + c;
    b[0] = *(const unsigned*)p;
    b[1] = *(const unsigned*)(p + 8);
}
// ldmatrix x4: lanes 8i … 8i + 7 give the row addresses of 8×8 matrix i, lane j receives its
// (transposed) pieces in register i.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const u16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}
__device__ __forceinline__ void frag_a_trans(unsigned* a, const u16* m, int ld, int row0, int k0) {
    const int mat = threadIdx.x % 32 / 8, r = threadIdx.x % 8;
    ldmatrix_x4_trans(a, m + (k0 + r + (mat >> 1) * 8) * ld + row0 + (mat & 1) * 8);
}
__device__ __forceinline__ void frag_b2_trans(unsigned* b, const u16* m, int ld, int k0, int col0) {
    const int mat = threadIdx.x % 32 / 8, r = threadIdx.x % 8;
    ldmatrix_x4_trans(b, m + (k0 + r + (mat & 1) * 8) * ld + col0 + (mat >> 1) * 8);
}

// acc[nt], the 16×8 tiles of a 16×P block of rows, += the A fragment `a` times the 16×P slice
// at rows kk … kk + 15 of m[k·ld + col].
template <typename T> __device__ __forceinline__ void mma_rows(float (*acc)[4], const unsigned* a, const u16* m, int ld, int kk, int P) {
#pragma unroll
    for (int nt = 0; nt < SSD_PMAX / 8; nt += 2) {
        if (nt * 8 >= P) continue;
        unsigned b[4];
        frag_b2_trans(b, m, ld, kk, nt * 8);
        mma_16816<T>(acc[nt], a, b);
        mma_16816<T>(acc[nt + 1], a, b + 2);
    }
}

template <typename T> __device__ __forceinline__ u16 bits(float v) { return from_f32<T>(v).bits; }

// The chunk's δ (softplus, clamped; 0 past the sequence's end, which makes those steps inert)
// and the inclusive cumsum Λ of δ·A in log2 units, into shared memory; returns Σδ to every
// thread.
template <typename T> __device__ float chunk_decay(const ScanParams& p, int h, long r0, int q, float* cs, float* dts) {
    __shared__ float total;
    const int t = threadIdx.x;
    if (t < SSD_Q) {
        float d = 0.0f;
        if (t < q) {
            const float raw = to_f32(((const T*)p.dt)[(r0 + t) * p.dt_rs + h]);
            d = fminf(fmaxf(softplus(raw + p.dt_bias[h]), p.dt_min), p.dt_max);
        }
        dts[t] = d;
    }
    __syncthreads();
    if (t < 32) {  // lane l holds steps 2l and 2l + 1
        const float a2 = p.a2[h];
        const float d0 = dts[2 * t], d1 = dts[2 * t + 1];
        const float l0 = d0 * a2, pair = l0 + d1 * a2;
        float inc = pair, sum = d0 + d1;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float v = __shfl_up_sync(0xffffffffu, inc, o);
            if (t >= o) inc += v;
            sum += __shfl_xor_sync(0xffffffffu, sum, o);
        }
        cs[2 * t] = inc - pair + l0;
        cs[2 * t + 1] = inc;
        if (t == 0) total = sum;
    }
    __syncthreads();
    return total;
}

// Rows t < q of a (q, cols) slice at `src` (row stride `rs` elements) into shared memory as
// they are, dst[t·ld + col], by cp.async (committed by the caller); rows q … Q − 1 are zeroed so
// the padded steps stay finite.
template <typename T> __device__ void stage_rows(u16* dst, int ld, const T* src, long rs, int q, int cols) {
    const int pieces = cols / 8;
    for (int i = threadIdx.x; i < SSD_Q * pieces; i += blockDim.x) {
        const int t = i / pieces, c8 = i % pieces * 8;
        u16* d = dst + t * ld + c8;
        if (t < q) cp16(d, src + t * rs + c8);
        else *(uint4*)d = make_uint4(0, 0, 0, 0);
    }
}

// The block's head, chunk, chunk count, sequence, steps in its chunk and the chunk's first row.
struct SsdBlock {
    int h, k, K, s, q;
    long r0;
};
__device__ __forceinline__ SsdBlock ssd_block(const ScanParams& p) {
    const int k = blockIdx.y, t0 = k * SSD_Q;
    return {(int)blockIdx.x, k, (int)gridDim.y, (int)blockIdx.z, min(SSD_Q, p.L - t0), (long)blockIdx.z * p.L + t0};
}

template <typename T> __device__ void ssd_state(const ScanParams& p) {
    extern __shared__ __align__(16) unsigned char smem[];
    const auto [h, k, K, s, q, r0] = ssd_block(p);
    const int P = p.p_blk, N = p.N, E = p.E;
    float* cs = (float*)smem;
    float* dts = cs + SSD_Q;
    float* w = dts + SSD_Q;                  // 2^(Λ_end − Λ_t)·δ_t
    u16* bm = (u16*)(w + SSD_Q);             // [Q][NS]: B
    u16* xm = bm + SSD_Q * SSD_NS;           // [Q][PS]: x, then x·w
    const long g = (long)(h * P / p.g_ch) * N;
    stage_rows<T>(bm, SSD_NS, (const T*)p.b + r0 * p.bc_rs + g, p.bc_rs, q, N);
    stage_rows<T>(xm, SSD_PS, (const T*)p.u + r0 * p.u_rs + h * P, p.u_rs, q, P);
    cp_commit();
    const float dsum = chunk_decay<T>(p, h, r0, q, cs, dts);
    if (threadIdx.x < SSD_Q) w[threadIdx.x] = exp2f(fminf(cs[SSD_Q - 1] - cs[threadIdx.x], 0.0f)) * dts[threadIdx.x];
    cp_wait<0>();
    __syncthreads();
    for (int i = threadIdx.x; i < SSD_Q * P / 2; i += blockDim.x) {
        const int t = i / (P / 2), c2 = i % (P / 2) * 2;
        unsigned* v = (unsigned*)&xm[t * SSD_PS + c2];
        const float x0 = to_f32(T{(u16)(*v & 0xffff)}), x1 = to_f32(T{(u16)(*v >> 16)});
        *v = bits<T>(x0 * w[t]) | (unsigned)bits<T>(x1 * w[t]) << 16;
    }
    __syncthreads();
    // Warp w takes row tiles w, w + 4 of the N×P result.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[SSD_NMAX / 64][SSD_PMAX / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < SSD_Q; kk += 16) {
#pragma unroll
        for (int m = 0; m < SSD_NMAX / 64; m++) {
            const int row0 = (warp + 4 * m) * 16;
            if (row0 >= N) continue;
            unsigned a[4];
            frag_a_trans(a, bm, SSD_NS, row0, kk);
            mma_rows<T>(acc[m], a, xm, SSD_PS, kk, P);
        }
    }
    float* out = p.chunk_h + (long)(s * K + k) * N * E + h * P;
#pragma unroll
    for (int m = 0; m < SSD_NMAX / 64; m++) {
        const int row0 = (warp + 4 * m) * 16;
        if (row0 >= N) continue;
#pragma unroll
        for (int nt = 0; nt < SSD_PMAX / 8; nt++) {
            if (nt * 8 >= P) continue;
            const int n = row0 + lane / 4, col = nt * 8 + lane % 4 * 2;
            *(float2*)&out[(long)n * E + col] = make_float2(acc[m][nt][0], acc[m][nt][1]);
            *(float2*)&out[(long)(n + 8) * E + col] = make_float2(acc[m][nt][2], acc[m][nt][3]);
        }
    }
    if (threadIdx.x < P) p.chunk_dt[(long)(s * K + k) * E + h * P + threadIdx.x] = dsum;
}

template <typename T> __device__ void ssd_out(const ScanParams& p) {
    extern __shared__ __align__(16) unsigned char smem[];
    const auto [h, k, K, s, q, r0] = ssd_block(p);
    const int P = p.p_blk, N = p.N, E = p.E;
    float* cs = (float*)smem;
    float* dts = cs + SSD_Q;
    u16* cm = (u16*)(dts + SSD_Q);           // [Q][NS]: C
    u16* bm = cm + SSD_Q * SSD_NS;           // [Q][NS]: B
    u16* sm = bm + SSD_Q * SSD_NS;           // [N][PS]: S_in
    u16* xm = sm + SSD_NMAX * SSD_PS;        // [Q][PS]: x
    u16* wm = xm + SSD_Q * SSD_PS;           // [Q][QS]: masked weights
    const long g = (long)(h * P / p.g_ch) * N;
    stage_rows<T>(cm, SSD_NS, (const T*)p.cm + r0 * p.bc_rs + g, p.bc_rs, q, N);
    stage_rows<T>(bm, SSD_NS, (const T*)p.b + r0 * p.bc_rs + g, p.bc_rs, q, N);
    stage_rows<T>(xm, SSD_PS, (const T*)p.u + r0 * p.u_rs + h * P, p.u_rs, q, P);
    cp_commit();
    const float* sin = p.chunk_h + (long)(s * K + k) * N * E + h * P;
#pragma unroll 4
    for (int i = threadIdx.x; i < N * P / 4; i += blockDim.x) {
        const int n = i / (P / 4), c4 = i % (P / 4) * 4;
        const float4 v = *(const float4*)&sin[(long)n * E + c4];
        *(uint2*)&sm[n * SSD_PS + c4] = make_uint2(bits<T>(v.x) | (unsigned)bits<T>(v.y) << 16, bits<T>(v.z) | (unsigned)bits<T>(v.w) << 16);
    }
    chunk_decay<T>(p, h, r0, q, cs, dts);
    cp_wait<0>();
    __syncthreads();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = warp * 16;
    const int gr = lane / 4, gc = lane % 4 * 2;
    float acc[SSD_PMAX / 8][4] = {};      // y, this warp's 16 rows
    float cb[SSD_Q / 8][4] = {};          // C·Bᵀ, columns j ≤ the warp's last row
    for (int kk = 0; kk < N; kk += 16) {
        unsigned a[4];
        frag_a(a, cm, SSD_NS, row0, kk);
        mma_rows<T>(acc, a, sm, SSD_PS, kk, P);
#pragma unroll
        for (int jt = 0; jt < SSD_Q / 8; jt++) {
            if (jt * 8 >= row0 + 16) continue;
            unsigned b[2];
            frag_b(b, bm, SSD_NS, jt * 8, kk);
            mma_16816<T>(cb[jt], a, b);
        }
    }
    // The carried-in term decays by 2^Λ_t to row t.
    const float e0 = exp2f(cs[row0 + gr]), e1 = exp2f(cs[row0 + gr + 8]);
#pragma unroll
    for (int nt = 0; nt < SSD_PMAX / 8; nt++) {
        acc[nt][0] *= e0;
        acc[nt][1] *= e0;
        acc[nt][2] *= e1;
        acc[nt][3] *= e1;
    }
    // Masked weights (C_t·B_j)·2^(Λ_t − Λ_j)·δ_j for j ≤ t, in the input type.
#pragma unroll
    for (int jt = 0; jt < SSD_Q / 8; jt++) {
        if (jt * 8 >= row0 + 16) continue;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int t = row0 + gr + 8 * half;
            float v[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const int j = jt * 8 + gc + i;
                v[i] = j <= t ? cb[jt][2 * half + i] * exp2f(fminf(cs[t] - cs[j], 0.0f)) * dts[j] : 0.0f;
            }
            *(unsigned*)&wm[t * SSD_QS + jt * 8 + gc] = bits<T>(v[0]) | (unsigned)bits<T>(v[1]) << 16;
        }
    }
    __syncwarp();
    for (int kk = 0; kk < row0 + 16; kk += 16) {
        unsigned a[4];
        frag_a(a, wm, SSD_QS, row0, kk);
        mma_rows<T>(acc, a, xm, SSD_PS, kk, P);
    }
    T* y = (T*)p.y + r0 * p.y_rs + h * P;
#pragma unroll
    for (int nt = 0; nt < SSD_PMAX / 8; nt++) {
        if (nt * 8 >= P) continue;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int t = row0 + gr + 8 * half, col = nt * 8 + gc;
            if (t >= q) continue;
            float v[2];
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const float dskip = p.d ? p.d[(h * P + col + i) / p.d_div] : 0.0f;
                v[i] = acc[nt][2 * half + i] + dskip * to_f32(T{xm[t * SSD_PS + col + i]});
            }
            *(unsigned*)&y[t * p.y_rs + col] = bits<T>(v[0]) | (unsigned)bits<T>(v[1]) << 16;
        }
    }
}

// Dynamic shared memory of each kernel (bytes).
#define SSD_STATE_SMEM (3 * SSD_Q * 4 + SSD_Q * (SSD_NS + SSD_PS) * 2)
#define SSD_OUT_SMEM (2 * SSD_Q * 4 + (2 * SSD_Q * SSD_NS + (SSD_NMAX + SSD_Q) * SSD_PS + SSD_Q * SSD_QS) * 2)

#define SSD_KERNELS(T)                                                                               \
    extern "C" __global__ void __launch_bounds__(128) ssd_state_##T(const ScanParams p) { ssd_state<T>(p); } \
    extern "C" __global__ void __launch_bounds__(128) ssd_out_##T(const ScanParams p) { ssd_out<T>(p); }
// Instances are made by the loader: SSD_KERNELS(bf16), SSD_KERNELS(f16).
