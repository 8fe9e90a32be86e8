// Greedy sampling on the GPU: the index of the largest logit of each row, so a decode step hands
// back 4 bytes instead of the vocabulary's logits. One block of 1024 threads per row; each thread
// scans a strided slice, then a warp-shuffle and shared-memory reduction. Ties go to the lowest
// index, as on the CPU. Reads 4·V bytes per row.

struct ArgmaxParams {
    const float* logits;   // (rows, stride)
    unsigned* out;         // (rows)
    int stride;
    int limit;             // only ids below this are considered
};

__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
    if (v2 > v || (v2 == v && i2 < i) || (v != v && v2 == v2)) {  // NaN loses
        v = v2;
        i = i2;
    }
}

extern "C" __global__ void __launch_bounds__(1024) argmax(const ArgmaxParams p) {
    const float* x = p.logits + (long)blockIdx.x * p.stride;
    const float neg_inf = __int_as_float(0xff800000);
    float v = neg_inf;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < p.limit; i += blockDim.x) better(v, idx, x[i], i);
    for (int o = 16; o > 0; o >>= 1) better(v, idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
    __shared__ float sv[32];
    __shared__ int si[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / 32 ? sv[lane] : neg_inf;
        idx = lane < blockDim.x / 32 ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) better(v, idx, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, idx, o));
        if (lane == 0) p.out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
    }
}

// The other samplers, by the CPU's rules (src/sampling.rs), each row's pick drawn with the
// uniform number u the host drew for it (as the CPU draws it), so both make the same pick up to
// rounding. Both kernels below take PickParams, run one block of 1024 threads per row and hand
// the host 4 bytes a row. The repetition penalty reads a bitmask of the ids each row has seen,
// kept on the device: a pick first sets the bits of the ids fed since the last one.
// PICK_CAP, PICK_BINS, PICK_BINS_PER_UNIT and PICK_HOST are #defined by the host (src/cuda/pick.rs).

struct PickParams {
    const float* logits;      // (rows, stride)
    unsigned* out;            // (rows) the pick, or PICK_HOST: the host picks from the logits
    const float* u;           // (rows) uniform in [0, 1)
    unsigned* seen;           // (rows, seen_words) bit i: id i was seen (used with a penalty)
    const unsigned* new_ids;  // ids fed since the last pick: row r's at new_at[r] .. new_at[r + 1]
    const int* new_at;        // (rows + 1)
    int seen_words;
    int stride;
    int limit;                // only ids below this are considered
    float inv_t_log2e;        // log2(e) / temperature
    float min_p;              // with top-k 0; 0: off
    float top_p;              // 1: off
    float penalty;            // 1: off
    int top_k;                // 0: off
};

// Marks the row's newly fed ids as seen; returns its seen bits (null without a penalty).
__device__ __forceinline__ const unsigned* mark_seen(const PickParams& p) {
    if (p.penalty == 1.0f) return nullptr;
    unsigned* seen = p.seen + (long)blockIdx.x * p.seen_words;
    for (int j = p.new_at[blockIdx.x] + threadIdx.x; j < p.new_at[blockIdx.x + 1]; j += blockDim.x) {
        const unsigned id = p.new_ids[j];
        if (id < 32u * p.seen_words) atomicOr(&seen[id >> 5], 1u << (id & 31));
    }
    __syncthreads();  // the block's global writes are visible to it after the barrier
    return seen;
}

// Logit v of id i after the repetition penalty (CTRL rule); `bits` is seen[i / 32].
__device__ __forceinline__ float penalized(float v, unsigned bits, float penalty, int i) {
    if ((bits >> (i & 31)) & 1u) return v < 0.0f ? v * penalty : v / penalty;
    return v;
}

// Calls f(i, v) for the ids i < n of this thread's share (ids `first + k·step`, k = 0, 1, ...),
// v the penalised logit, in that order. Loads are issued PICK_LOADS at a time: one block walks
// a 200 KB row, so one load after another would leave each pass bound by L2 latency.
template <typename F>
__device__ __forceinline__ void each_logit(const float* x, const unsigned* seen, float penalty, int first, int step,
                                           int n, F f) {
    for (int i0 = first; i0 < n; i0 += PICK_LOADS * step) {
        float v[PICK_LOADS];
        unsigned bits[PICK_LOADS];
#pragma unroll
        for (int k = 0; k < PICK_LOADS; k++) {
            const int i = i0 + k * step;
            v[k] = i < n ? x[i] : 0.0f;
            bits[k] = seen && i < n ? seen[i >> 5] : 0u;
        }
#pragma unroll
        for (int k = 0; k < PICK_LOADS; k++) {
            const int i = i0 + k * step;
            if (i < n) f(i, penalized(v[k], bits[k], penalty, i));
        }
    }
}

// Inclusive scan of `v` over the block; sets `total` to the block's sum. Every thread calls it.
template <typename V> __device__ __forceinline__ V block_scan(V v, V& total) {
    __shared__ V wsum[32];
    for (int o = 1; o < 32; o <<= 1) {
        const V t = __shfl_up_sync(0xffffffffu, v, o);
        if (threadIdx.x % 32 >= o) v += t;
    }
    __syncthreads();  // `wsum` may still be read by a previous call
    if (threadIdx.x % 32 == 31) wsum[threadIdx.x / 32] = v;
    __syncthreads();
    V before = 0;
    total = 0;
    for (int w = 0; w < blockDim.x / 32; w++) {
        if (w < threadIdx.x / 32) before += wsum[w];
        total += wsum[w];
    }
    return before + v;
}

// Temperature and min-p with top-k 0 and no top-p: weights w = exp((l − max)/T), tokens with
// w ≥ min-p kept; the pick is the first token, in id order, where the cumulative kept weight
// reaches u·Σw. Reads the row's logits 3 times (from L2).
extern "C" __global__ void __launch_bounds__(1024) sample_rows(const PickParams p) {
    const float* x = p.logits + (long)blockIdx.x * p.stride;
    const unsigned* seen = mark_seen(p);
    const int n = p.limit;
    float m = __int_as_float(0xff800000);
    each_logit(x, seen, p.penalty, threadIdx.x, blockDim.x, n, [&](int, float v) { m = fmaxf(m, v); });
    m = block_max(m);
    const float s = p.inv_t_log2e;
    auto kept = [&](float v) {
        const float w = exp2f((v - m) * s);
        return w >= p.min_p ? w : 0.0f;
    };
    // Each thread takes a contiguous run of ids, so a prefix sum over threads orders the mass
    // by id; the thread whose run crosses u·Σw walks it. Sums across threads are in f64: over
    // a flat 50K vocabulary f32 would move the target by about a token's weight.
    const int run = (n + blockDim.x - 1) / blockDim.x, i0 = threadIdx.x * run, i1 = min(i0 + run, n);
    float mine = 0.0f;
    each_logit(x, seen, p.penalty, i0, 1, i1, [&](int, float v) { mine += kept(v); });
    __shared__ unsigned pick;
    if (threadIdx.x == 0) pick = 0xffffffffu;
    double total;
    const double inc = block_scan((double)mine, total);
    const double excl = inc - mine, target = p.u[blockIdx.x] * total;
    if (mine > 0.0f && excl <= target && target <= inc) {
        double acc = excl;
        bool found = false;
        each_logit(x, seen, p.penalty, i0, 1, i1, [&](int i, float v) {
            const float w = kept(v);
            acc += w;
            if (!found && w > 0.0f && acc >= target) {
                atomicMin(&pick, (unsigned)i);
                found = true;
            }
        });
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        if (pick == 0xffffffffu) {  // rounding put the target past the last kept token
            for (int i = n - 1; i >= 0 && pick == 0xffffffffu; i--) {
                const unsigned bits = seen ? seen[i >> 5] : 0u;
                if (kept(penalized(x[i], bits, p.penalty, i)) > 0.0f) pick = i;
            }
        }
        p.out[blockIdx.x] = pick == 0xffffffffu ? 0 : pick;
    }
}

// Kept sets too large for pick_top's sort (a flat distribution's nucleus, a large top-k) are cut
// and drawn by radix selection: top-k, top-p and the draw each ask for the first token, in
// candidate order, where a running count or weight reaches a goal. The logits' bits made
// order-preserving are the keys; 4 passes narrow the key 8 bits at a time by 256-bucket
// histograms of count and weight over the tokens that match so far, and a fifth finds the
// token among equal logits by id. Weights are fixed-point (units of 2^−32 of the most likely
// token's) so the histograms sum exactly in any order and the pick is deterministic. In the
// first pass a warp's lanes that hit one bucket add to it once: the top 8 bits (sign and
// exponent) put most tokens of a flat row in a few buckets, and same-address atomics serialize
// (4.6× slower on an H100); later passes spread over the mantissa, where matching lanes costs
// more than it saves (1.4×). Reads the row 5 times per selection (from L2).

#define WIDE_ONE 4294967296.0  // weight 1 in fixed point

__device__ __forceinline__ unsigned order_key(float v) {
    const unsigned u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

struct Reached {
    int id;                    // the token
    unsigned long long weight; // the fixed-point weight of the tokens up to and including it
};

// The first token (candidate order) where the running count (`by_count`) reaches `want`, or
// the running weight reaches `want` times `base` (0: the row's total weight). `weight(v)` is
// a logit's fixed-point weight. Every thread calls it.
template <typename W>
__device__ Reached first_reaching(const PickParams& p, const float* x, const unsigned* seen, W weight, bool by_count,
                                  double want, unsigned long long base) {
    const int n = p.limit, tid = threadIdx.x, nt = blockDim.x, lane = tid % 32;
    __shared__ unsigned hc[256];
    __shared__ unsigned long long hw[256];
    __shared__ unsigned long long goal, bc, bw;  // goal; count and weight before the bucket
    __shared__ unsigned prefix;                  // the key's bits fixed so far
    __shared__ int bucket, found;
    for (int level = 0; level < 4; level++) {
        const int shift = 24 - 8 * level;
        for (int b = tid; b < 256; b += nt) {
            hc[b] = 0;
            hw[b] = 0;
        }
        __syncthreads();
        const unsigned pre = prefix;
        for (int i0 = tid - lane; i0 < n; i0 += PICK_LOADS * nt) {  // warp-uniform bounds
            float v[PICK_LOADS];
#pragma unroll
            for (int k = 0; k < PICK_LOADS; k++) {
                const int i = i0 + k * nt + lane;
                v[k] = i < n ? penalized(x[i], seen ? seen[i >> 5] : 0u, p.penalty, i) : 0.0f;
            }
#pragma unroll
            for (int k = 0; k < PICK_LOADS; k++) {
                const unsigned key = order_key(v[k]);
                const bool in = i0 + k * nt + lane < n && (level == 0 || key >> (shift + 8) == pre);
                const int b = in ? (key >> shift) & 255 : 256;
                if (level == 0) {
                    const unsigned group = __match_any_sync(0xffffffffu, b);
                    if (b < 256) {
                        const unsigned long long w = weight(v[k]);
                        const unsigned hi = __reduce_add_sync(group, (unsigned)(w >> 16));
                        const unsigned lo = __reduce_add_sync(group, (unsigned)(w & 0xffff));
                        if (lane == __ffs(group) - 1) {
                            atomicAdd(&hc[b], __popc(group));
                            atomicAdd(&hw[b], ((unsigned long long)hi << 16) + lo);
                        }
                    }
                } else if (b < 256) {
                    atomicAdd(&hc[b], 1u);
                    atomicAdd(&hw[b], weight(v[k]));
                }
            }
        }
        __syncthreads();
        if (tid < 32) {
            // Lane l holds buckets 255 − 8l down to 248 − 8l: scanned from the largest keys.
            unsigned long long c = 0, w = 0;
            for (int k = 0; k < 8; k++) {
                c += hc[255 - 8 * lane - k];
                w += hw[255 - 8 * lane - k];
            }
            unsigned long long ci = c, wi = w;
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned long long c2 = __shfl_up_sync(0xffffffffu, ci, o), w2 = __shfl_up_sync(0xffffffffu, wi, o);
                if (lane >= o) {
                    ci += c2;
                    wi += w2;
                }
            }
            if (level == 0) {
                // Goals past the total (rounding, a top-k over the vocabulary) stop at the last token.
                const unsigned long long all_c = __shfl_sync(0xffffffffu, ci, 31), all_w = __shfl_sync(0xffffffffu, wi, 31);
                const unsigned long long of = base ? base : all_w;
                if (lane == 0) {
                    goal = by_count ? min((unsigned long long)want, all_c) : min((unsigned long long)ceil(want * of), of);
                    bc = bw = 0;
                }
                __syncwarp();
            }
            const unsigned long long g = goal, c0 = bc, w0 = bw;
            const unsigned reached = __ballot_sync(0xffffffffu, ci > 0 && (by_count ? c0 + ci : w0 + wi) >= g);
            if (lane == __ffs(reached) - 1) {
                unsigned long long cc = c0 + ci - c, ww = w0 + wi - w;
                for (int k = 0; k < 8; k++) {
                    const int b = 255 - 8 * lane - k;
                    if (hc[b] > 0 && (by_count ? cc + hc[b] : ww + hw[b]) >= g) {
                        bucket = b;
                        bc = cc;
                        bw = ww;
                        prefix = level == 0 ? b : prefix << 8 | b;
                        break;
                    }
                    cc += hc[b];
                    ww += hw[b];
                }
            }
        }
        __syncthreads();
    }
    // The tokens of key `prefix` share one weight; the goal falls on the j-th of them by id.
    const unsigned key = prefix, ties = hc[bucket];
    const unsigned long long wt = hw[bucket] / ties, g = goal;
    unsigned long long j = by_count ? g - bc : (g <= bw || wt == 0 ? 1 : (g - bw + wt - 1) / wt);
    j = max(1ull, min(j, (unsigned long long)ties));
    const int run = (n + nt - 1) / nt, i0 = tid * run, i1 = min(i0 + run, n);
    unsigned mine = 0;
    each_logit(x, seen, p.penalty, i0, 1, i1, [&](int, float v) { mine += order_key(v) == key; });
    unsigned total;
    const unsigned inc = block_scan(mine, total);
    if (mine > 0 && inc - mine < j && j <= inc) {
        unsigned left = j - (inc - mine);
        each_logit(x, seen, p.penalty, i0, 1, i1, [&](int i, float v) {
            if (order_key(v) == key && left-- == 1) found = i;
        });
    }
    __syncthreads();
    const Reached r{found, bw + j * wt};
    __syncthreads();  // the shared state may be reused by the next call
    return r;
}

// pick_top's pick when the kept set holds more than PICK_CAP tokens (m: the row's maximum).
__device__ void pick_wide(const PickParams& p, const float* x, const unsigned* seen, float m) {
    const float s = p.inv_t_log2e;
    auto weight = [&](float v) {
        const float w = exp2f((v - m) * s);
        return w >= p.min_p ? (unsigned long long)((double)w * WIDE_ONE + 0.5) : 0ull;
    };
    unsigned long long kept = 0;
    if (p.top_k > 0) kept = first_reaching(p, x, seen, weight, true, p.top_k, 0).weight;
    if (p.top_p < 1.0f) kept = first_reaching(p, x, seen, weight, false, p.top_p, kept).weight;
    const Reached r = first_reaching(p, x, seen, weight, false, p.u[blockIdx.x], kept);
    if (threadIdx.x == 0) p.out[blockIdx.x] = r.id;
}

// Top-k and/or top-p (and greedy with a penalty, as top-k 1): the kept tokens walked from the
// most likely down (larger logit first, lower id among equals), the pick the first where the
// cumulative weight reaches u times the kept total.
// 1. The row's maximum m.
// 2. A histogram of d = (m − l)·log2(e)/T, the token's weight exponent (w = 2^−d), in
//    PICK_BINS bins of 1/PICK_BINS_PER_UNIT; tokens past the last bin (w < 2^−32) count as
//    weight 0. Integer counts, so the pass is deterministic; also Σw (and Σw over min-p) by a
//    fixed-order reduction.
// 3. Warp 0 finds the first bin B whose bins ≤ B surely hold the kept set: k tokens (top-k), or
//    a lower bound of their weight (count × the bin's smallest weight) reaching top-p's goal.
// 4. The tokens of bins ≤ B (at most PICK_CAP, else pick_wide) are gathered into shared
//    memory and bitonic-sorted; top-k, top-p and the draw are exact over that sorted list.
// Reads the row 3 times (from L2); the sort is over a few hundred entries for usual settings.
extern "C" __global__ void __launch_bounds__(1024) pick_top(const PickParams p) {
    const float* x = p.logits + (long)blockIdx.x * p.stride;
    const unsigned* seen = mark_seen(p);
    const int n = p.limit, tid = threadIdx.x, nt = blockDim.x;
    const float neg_inf = __int_as_float(0xff800000);
    __shared__ unsigned hist[PICK_BINS];
    __shared__ float key[PICK_CAP];
    __shared__ double cum[PICK_CAP];
    __shared__ int idx[PICK_CAP];
    __shared__ int cut_bin, count, filled, cut, pick;
    for (int b = tid; b < PICK_BINS; b += nt) hist[b] = 0;
    float m = neg_inf;
    each_logit(x, seen, p.penalty, tid, nt, n, [&](int, float v) { m = fmaxf(m, v); });
    m = block_max(m);
    const float s = p.inv_t_log2e;
    auto bin_of = [&](float v) {
        const float d = (m - v) * s * PICK_BINS_PER_UNIT;
        return d < PICK_BINS ? (int)d : PICK_BINS;  // NaN and −inf land past the end
    };
    float tot = 0.0f, tot_min = 0.0f;
    each_logit(x, seen, p.penalty, tid, nt, n, [&](int, float v) {
        const float w = exp2f((v - m) * s);
        tot += w;
        tot_min += w >= p.min_p ? w : 0.0f;
        const int b = bin_of(v);
        if (b < PICK_BINS) atomicAdd(&hist[b], 1u);
    });
    const float2 sums = block_sum2(tot, tot_min);  // its barriers also complete the histogram
    const bool by_count = p.top_k > 0, top_p = p.top_p < 1.0f;
    const float goal = p.top_p * (p.min_p > 0.0f ? sums.y : sums.x);
    if (tid < 32) {
        constexpr int per = PICK_BINS / 32;
        auto low = [](int b) { return exp2f(-(float)(b + 1) / PICK_BINS_PER_UNIT); };
        unsigned c = 0;
        float w = 0.0f;
        for (int b = tid * per; b < (tid + 1) * per; b++) {
            c += hist[b];
            w += hist[b] * low(b);
        }
        unsigned ci = c;
        float wi = w;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned c2 = __shfl_up_sync(0xffffffffu, ci, o);
            const float w2 = __shfl_up_sync(0xffffffffu, wi, o);
            if (tid >= o) {
                ci += c2;
                wi += w2;
            }
        }
        const unsigned reached = __ballot_sync(0xffffffffu, by_count ? ci >= (unsigned)p.top_k : wi >= goal);
        if (reached == 0 && tid == 31) {
            cut_bin = PICK_BINS - 1;
            count = ci;
        }
        if (reached != 0 && tid == __ffs(reached) - 1) {
            unsigned c2 = ci - c;
            float w2 = wi - w;
            int b = tid * per;
            for (; b < (tid + 1) * per - 1; b++) {
                c2 += hist[b];
                w2 += hist[b] * low(b);
                if (by_count ? c2 >= (unsigned)p.top_k : w2 >= goal) break;
            }
            if (b == (tid + 1) * per - 1) c2 += hist[b];
            cut_bin = b;
            count = c2;
        }
    }
    if (tid == 0) filled = 0;
    __syncthreads();
    if (count > PICK_CAP) {
        pick_wide(p, x, seen, m);
        return;
    }
    if (count == 0) {  // no finite logit
        if (tid == 0) p.out[blockIdx.x] = PICK_HOST;
        return;
    }
    each_logit(x, seen, p.penalty, tid, nt, n, [&](int i, float v) {
        if (bin_of(v) <= cut_bin) {
            const int j = atomicAdd(&filled, 1);
            key[j] = v;
            idx[j] = i;
        }
    });
    int size = 1;
    while (size < count) size <<= 1;
    for (int j = count + tid; j < size; j += nt) {
        key[j] = neg_inf;
        idx[j] = 0x7fffffff;
    }
    __syncthreads();
    // Bitonic sort, the entry that goes first (larger logit, then lower id) at the front.
    for (int k = 2; k <= size; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int t = tid; t < size / 2; t += nt) {
                const int a = 2 * j * (t / j) + t % j, b = a + j;
                const bool b_first = key[b] > key[a] || (key[b] == key[a] && idx[b] < idx[a]);
                if (b_first == ((a & k) == 0)) {
                    const float kt = key[a];
                    key[a] = key[b];
                    key[b] = kt;
                    const int it = idx[a];
                    idx[a] = idx[b];
                    idx[b] = it;
                }
            }
            __syncthreads();
        }
    }
    // Weights in that order (min-p zeroes some with top-k 0) and their running sum, in f64.
    const int kk = by_count ? min(p.top_k, count) : count;
    const int run = (kk + nt - 1) / nt, j0 = min(tid * run, kk), j1 = min(j0 + run, kk);
    double mine = 0.0;
    for (int j = j0; j < j1; j++) {
        float w = exp2f((key[j] - m) * s);
        if (!by_count && w < p.min_p) w = 0.0f;
        cum[j] = w;
        mine += w;
    }
    double total;
    double acc = block_scan(mine, total) - mine;
    for (int j = j0; j < j1; j++) {
        acc += cum[j];
        cum[j] = acc;
    }
    if (tid == 0) cut = kk - 1;
    __syncthreads();
    if (top_p) {
        // The smallest prefix whose weight reaches top-p of the total (over the top-k with top-k).
        const double g = by_count ? p.top_p * cum[kk - 1] : (double)goal;
        for (int j = tid; j < kk; j += nt)
            if (cum[j] >= g && (j == 0 || cum[j - 1] < g)) cut = j;
        __syncthreads();
    }
    const double target = p.u[blockIdx.x] * cum[cut];
    if (tid == 0) pick = cut;
    __syncthreads();
    for (int j = tid; j <= cut; j += nt)
        if (cum[j] >= target && (j == 0 || cum[j - 1] < target)) pick = j;
    __syncthreads();
    if (tid == 0) p.out[blockIdx.x] = idx[pick];
}
