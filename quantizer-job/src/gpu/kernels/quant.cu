// quantops quantization kernels, compiled at run time by NVRTC.
//
// Each kernel is the device twin of a CPU function in quantizer-job/src/quant/
// and follows its arithmetic operation for operation (IEEE division, rounding
// half to even, scales rounded to the checkpoint's dtype before codes are
// taken), so RTN, INT8 and FP8 codes equal the CPU's bit for bit. No headers:
// NVRTC has no system include path where the binary runs.

#define FULL_MASK 0xffffffffu
#define GPTQ_BLOCK 128
#define F32_INF __int_as_float(0x7f800000)

// Scale dtypes, as FloatDtype: 0 = F16, 1 = BF16, 2 = F32.
__device__ __forceinline__ float round_to_dtype(float v, int dtype) {
    if (dtype == 0) {
        unsigned short h;
        float r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
        return r;
    }
    if (dtype == 1) {
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return __uint_as_float(((unsigned int)h) << 16);
    }
    return v;
}

struct GridParams {
    float scale;
    int zero;
};

// grid::params_from_range
__device__ __forceinline__ GridParams params_from_range(float mn, float mx, int bits, int symmetric,
                                                        int dtype, float eps) {
    const int qmin = -(1 << (bits - 1));
    const int qmax = (1 << (bits - 1)) - 1;
    mn = fminf(mn, 0.0f);
    mx = fmaxf(mx, 0.0f);
    const float levels = (float)((1u << bits) - 1u);
    float raw;
    if (symmetric) {
        raw = fmaxf(-mn, mx) / (levels / 2.0f);
    } else {
        raw = round_to_dtype(mx - mn, dtype) / levels;
    }
    float scale = round_to_dtype(raw, dtype);
    if (scale == 0.0f) {
        scale = eps;
    }
    int zero = 0;
    if (!symmetric) {
        float z = round_to_dtype((float)qmin - round_to_dtype(mn / scale, dtype), dtype);
        z = fminf(fmaxf(z, (float)qmin), (float)qmax);
        zero = (int)rintf(z);
    }
    GridParams p;
    p.scale = scale;
    p.zero = zero;
    return p;
}

// grid::quantize
__device__ __forceinline__ int quantize_code(float x, GridParams p, int bits) {
    const int qmin = -(1 << (bits - 1));
    const int qmax = (1 << (bits - 1)) - 1;
    int q = (int)rintf(x / p.scale) + p.zero;
    return min(max(q, qmin), qmax);
}

// grid::dequantize
__device__ __forceinline__ float dequantize_code(int q, GridParams p) {
    return (float)(q - p.zero) * p.scale;
}

__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float pow2(int e) {
    // 2^e for e in the normal f32 range, exactly.
    return __int_as_float((e + 127) << 23);
}

// fp8::f32_to_e4m3
__device__ __forceinline__ unsigned char f32_to_e4m3(float x) {
    if (x != x) return 0x7F;
    const unsigned char sign = (__float_as_uint(x) >> 31) ? 0x80 : 0;
    const float a = fabsf(x);
    if (a >= 448.0f) return sign | 0x7E;
    if (a < 0.015625f) {
        return sign | (unsigned char)rintf(a * 512.0f);
    }
    int e = (int)(__float_as_uint(a) >> 23) - 127;
    int q = (int)rintf(a * pow2(3 - e));
    if (q == 16) {
        q = 8;
        e += 1;
    }
    return sign | (unsigned char)((e + 7) << 3) | (unsigned char)(q - 8);
}

// fp8::e4m3_to_f32
__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    const float sign = (b & 0x80) ? -1.0f : 1.0f;
    const int exp = (b >> 3) & 0x0F;
    const float mant = (float)(b & 0x07);
    if (exp == 0x0F && (b & 0x07) == 0x07) return __int_as_float(0x7fc00000);
    if (exp == 0) return sign * mant * pow2(-9);
    return sign * (8.0f + mant) * pow2(exp - 10);
}

// Items (a group of a row, or a row) are handled by a team of threads: a
// warp for short items (several per block), the whole block for long ones,
// so that per-channel rows of thousands of weights keep enough loads in
// flight. `team_size` is 32 or blockDim.x; the launcher picks it.
struct Team {
    long long item;
    int rank;
    int size;
};

__device__ __forceinline__ Team team_of(int team_size) {
    Team t;
    t.size = team_size;
    t.item = (long long)blockIdx.x * (blockDim.x / team_size) + threadIdx.x / team_size;
    t.rank = threadIdx.x % team_size;
    return t;
}

// Reduces over the team; for a block-wide team every thread must call it.
__device__ __forceinline__ float team_reduce(float v, bool is_max, int team_size) {
    v = is_max ? warp_max(v) : warp_min(v);
    if (team_size == 32) return v;
    __shared__ float partial[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float x = lane < (int)(blockDim.x >> 5) ? partial[lane] : (is_max ? -F32_INF : F32_INF);
        x = is_max ? warp_max(x) : warp_min(x);
        if (lane == 0) partial[0] = x;
    }
    __syncthreads();
    return partial[0];
}

// A team reads its item once when it can: each thread keeps its share (up
// to CACHE float4s) in registers between the range pass and the rounding
// pass. Read twice, a per-channel row of ten thousand weights comes back
// from DRAM the second time, since the whole grid's first pass has pushed
// it out of L2; that cost such rows a quarter of their bandwidth. A large
// cache costs occupancy, which shorter items need more, so each kernel
// comes in two builds: CACHE = 1 (a warp's group of 128, or a re-read row)
// and CACHE = LONG_ITEM_CACHE for rows the launcher deems long.
#define LONG_ITEM_CACHE 16

// Reads the item's float4s `src[0..n4)`, calling `f` on each; returns whether
// they stayed in `cache` for `for_each_cached`.
template <int CACHE, typename F>
__device__ __forceinline__ bool read_item(const float4* __restrict__ src, int n4, const Team& t,
                                          float4 (&cache)[CACHE], F f) {
    const bool cached = n4 <= CACHE * t.size;
    if (cached) {
#pragma unroll
        for (int i = 0; i < CACHE; ++i) {
            const int c = t.rank + i * t.size;
            if (c < n4) {
                cache[i] = src[c];
                f(cache[i]);
            }
        }
    } else {
        for (int c = t.rank; c < n4; c += t.size) f(src[c]);
    }
    return cached;
}

// The second pass over the item: `f(c, value)` for each float4 index `c`.
template <int CACHE, typename F>
__device__ __forceinline__ void for_each_cached(const float4* __restrict__ src, int n4, const Team& t,
                                                const float4 (&cache)[CACHE], bool cached, F f) {
    if (cached) {
#pragma unroll
        for (int i = 0; i < CACHE; ++i) {
            const int c = t.rank + i * t.size;
            if (c < n4) f(c, cache[i]);
        }
    } else {
        for (int c = t.rank; c < n4; c += t.size) f(c, src[c]);
    }
}

// Round-to-nearest onto each (row, group)'s min-max grid, one team per group.
// `codes`/`deq` may be null (then only the grid parameters are written, as
// GPTQ's static act order needs them from the original weight).
template <int CACHE>
__device__ __forceinline__ void rtn_int_body(const float* __restrict__ w, int rows, int cols,
                                             int group_size, int bits, int symmetric, int dtype,
                                             float eps, int team_size, signed char* __restrict__ codes,
                                             float* __restrict__ deq, float* __restrict__ scales,
                                             int* __restrict__ zeros) {
    const Team t = team_of(team_size);
    const int groups = cols / group_size;
    if (t.item >= (long long)rows * groups) return;
    const long long r = t.item / groups;
    const int g = (int)(t.item % groups);
    const long long base = r * cols + (long long)g * group_size;
    const bool vec = (group_size & 3) == 0;
    const float4* src = reinterpret_cast<const float4*>(w + base);
    float4 cache[CACHE];
    bool cached = false;
    float mn = F32_INF, mx = -F32_INF;
    if (vec) {
        cached = read_item(src, group_size / 4, t, cache, [&](float4 v) {
            mn = fminf(fminf(fminf(mn, v.x), fminf(v.y, v.z)), v.w);
            mx = fmaxf(fmaxf(fmaxf(mx, v.x), fmaxf(v.y, v.z)), v.w);
        });
    } else {
        for (int c = t.rank; c < group_size; c += t.size) {
            float v = w[base + c];
            mn = fminf(mn, v);
            mx = fmaxf(mx, v);
        }
    }
    mn = team_reduce(mn, false, t.size);
    mx = team_reduce(mx, true, t.size);
    const GridParams p = params_from_range(mn, mx, bits, symmetric, dtype, eps);
    if (t.rank == 0) {
        scales[t.item] = p.scale;
        zeros[t.item] = p.zero;
    }
    if (codes == nullptr) return;
    if (vec) {
        float4* dst = reinterpret_cast<float4*>(deq + base);
        char4* cdst = reinterpret_cast<char4*>(codes + base);
        for_each_cached(src, group_size / 4, t, cache, cached, [&](int c, float4 v) {
            int qx = quantize_code(v.x, p, bits), qy = quantize_code(v.y, p, bits);
            int qz = quantize_code(v.z, p, bits), qw = quantize_code(v.w, p, bits);
            cdst[c] = make_char4((signed char)qx, (signed char)qy, (signed char)qz, (signed char)qw);
            dst[c] = make_float4(dequantize_code(qx, p), dequantize_code(qy, p),
                                 dequantize_code(qz, p), dequantize_code(qw, p));
        });
    } else {
        for (int c = t.rank; c < group_size; c += t.size) {
            int q = quantize_code(w[base + c], p, bits);
            codes[base + c] = (signed char)q;
            deq[base + c] = dequantize_code(q, p);
        }
    }
}

#define RTN_INT_PARAMS                                                                              \
    const float *__restrict__ w, int rows, int cols, int group_size, int bits, int symmetric,     \
        int dtype, float eps, int team_size, signed char *__restrict__ codes,                      \
        float *__restrict__ deq, float *__restrict__ scales, int *__restrict__ zeros
#define RTN_INT_ARGS w, rows, cols, group_size, bits, symmetric, dtype, eps, team_size, codes, deq, scales, zeros
extern "C" __global__ void rtn_int(RTN_INT_PARAMS) { rtn_int_body<1>(RTN_INT_ARGS); }
extern "C" __global__ void rtn_int_long(RTN_INT_PARAMS) { rtn_int_body<LONG_ITEM_CACHE>(RTN_INT_ARGS); }

// FP8 E4M3 with one scale per output channel: one team per row.
template <int CACHE>
__device__ __forceinline__ void fp8_rows_body(const float* __restrict__ w, int rows, int cols,
                                              int dtype, float eps, int team_size,
                                              unsigned char* __restrict__ codes,
                                              float* __restrict__ deq, float* __restrict__ scales) {
    const Team t = team_of(team_size);
    if (t.item >= rows) return;
    const long long base = t.item * cols;
    const bool vec = (cols & 3) == 0;
    const float4* src = reinterpret_cast<const float4*>(w + base);
    float4 cache[CACHE];
    bool cached = false;
    float absmax = 0.0f;
    if (vec) {
        cached = read_item(src, cols / 4, t, cache, [&](float4 v) {
            absmax = fmaxf(fmaxf(absmax, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
        });
    } else {
        for (int c = t.rank; c < cols; c += t.size) absmax = fmaxf(absmax, fabsf(w[base + c]));
    }
    absmax = team_reduce(absmax, true, t.size);
    float scale = round_to_dtype(absmax / 448.0f, dtype);
    if (scale == 0.0f) scale = eps;
    if (t.rank == 0) scales[t.item] = scale;
    if (vec) {
        float4* dst = reinterpret_cast<float4*>(deq + base);
        uchar4* cdst = reinterpret_cast<uchar4*>(codes + base);
        for_each_cached(src, cols / 4, t, cache, cached, [&](int c, float4 v) {
            uchar4 b = make_uchar4(f32_to_e4m3(v.x / scale), f32_to_e4m3(v.y / scale),
                                   f32_to_e4m3(v.z / scale), f32_to_e4m3(v.w / scale));
            cdst[c] = b;
            dst[c] = make_float4(e4m3_to_f32(b.x) * scale, e4m3_to_f32(b.y) * scale,
                                 e4m3_to_f32(b.z) * scale, e4m3_to_f32(b.w) * scale);
        });
    } else {
        for (int c = t.rank; c < cols; c += t.size) {
            unsigned char b = f32_to_e4m3(w[base + c] / scale);
            codes[base + c] = b;
            deq[base + c] = e4m3_to_f32(b) * scale;
        }
    }
}

#define FP8_ROWS_PARAMS                                                                        \
    const float *__restrict__ w, int rows, int cols, int dtype, float eps, int team_size,     \
        unsigned char *__restrict__ codes, float *__restrict__ deq, float *__restrict__ scales
#define FP8_ROWS_ARGS w, rows, cols, dtype, eps, team_size, codes, deq, scales
extern "C" __global__ void fp8_rows(FP8_ROWS_PARAMS) { fp8_rows_body<1>(FP8_ROWS_ARGS); }
extern "C" __global__ void fp8_rows_long(FP8_ROWS_PARAMS) { fp8_rows_body<LONG_ITEM_CACHE>(FP8_ROWS_ARGS); }

// compressed-tensors' pack-quantized words (format/pack.rs is the host
// twin): `32 / bits` codes per int32 along each row, the first in the lowest
// bits, each stored as q + 2^(bits-1); a row's last word zero-padded. One
// thread per word.
extern "C" __global__ void pack_words(const signed char* __restrict__ codes, long long rows,
                                      int cols, int bits, unsigned int* __restrict__ words) {
    const int per_word = 32 / bits;
    const int row_words = (cols + per_word - 1) / per_word;
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= rows * row_words) return;
    const long long r = k / row_words;
    const int first = (int)(k % row_words) * per_word;
    const int n = min(per_word, cols - first);
    const signed char* src = codes + r * cols + first;
    const unsigned int offset = 1u << (bits - 1), mask = (1u << bits) - 1;
    unsigned int w = 0;
    for (int i = 0; i < n; ++i) w |= ((unsigned int)((int)src[i] + (int)offset) & mask) << (bits * i);
    words[k] = w;
}

// The weight recomputed from integer codes: `(q - zp) * scale`, with the
// column's group from `g_idx` when given (GPTQ's group act order).
extern "C" __global__ void dequantize_int(const signed char* __restrict__ codes, long long rows,
                                          int cols, int groups, const float* __restrict__ scales,
                                          const int* __restrict__ zeros,
                                          const int* __restrict__ g_idx, float* __restrict__ out) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= rows * cols) return;
    const long long r = k / cols;
    const int c = (int)(k % cols);
    const int g = g_idx ? g_idx[c] : c / (cols / groups);
    const long long pk = r * groups + g;
    const int zp = zeros ? zeros[pk] : 0;
    out[k] = (float)((int)codes[k] - zp) * scales[pk];
}

extern "C" __global__ void dequantize_fp8(const unsigned char* __restrict__ codes, long long rows,
                                          int cols, const float* __restrict__ scales,
                                          float* __restrict__ out) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= rows * cols) return;
    out[k] = e4m3_to_f32(codes[k]) * scales[k / cols];
}

// --- GPTQ -------------------------------------------------------------------

// H (f32 running sum of XᵀX, [n, n]) → finalized f64 `2/samples · sum`.
extern "C" __global__ void hessian_finalize(const float* __restrict__ sum, long long count,
                                            double factor, double* __restrict__ out) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k < count) out[k] = (double)sum[k] * factor;
}

// Dead inputs (H_ii = 0): H_ii = 1 and the weight column zeroed, as GPTQ does.
// One thread per column.
extern "C" __global__ void gptq_dead_columns(double* __restrict__ h, float* __restrict__ w, int rows,
                                             int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (h[(long long)i * n + i] == 0.0) {
        h[(long long)i * n + i] = 1.0;
        for (int r = 0; r < rows; ++r) w[(long long)r * n + i] = 0.0f;
    }
}

// hp[a, b] = h[perm[a], perm[b]] + (a == b ? damp : 0).
extern "C" __global__ void gptq_permute_damp(const double* __restrict__ h, const int* __restrict__ perm,
                                             int n, double damp, double* __restrict__ hp) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)n * n) return;
    const int a = (int)(k / n), b = (int)(k % n);
    double v = h[(long long)perm[a] * n + perm[b]];
    if (a == b) v += damp;
    hp[k] = v;
}

// wp[r, k] = w[r, perm[k]].
extern "C" __global__ void permute_columns(const float* __restrict__ w, const int* __restrict__ perm,
                                           long long rows, int n, float* __restrict__ wp) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= rows * n) return;
    const long long r = k / n;
    const int c = (int)(k % n);
    wp[k] = w[r * n + perm[c]];
}

// Column-major lower triangle → full symmetric (cuSOLVER's potri fills one side).
extern "C" __global__ void symmetrize_lower(double* __restrict__ a, int n) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)n * n) return;
    const int col = (int)(k / n), row = (int)(k % n);
    if (row < col) a[k] = a[(long long)row * n + col];
}

// Column-major upper Cholesky factor (f64) → row-major upper f32 with zeros
// below the diagonal: `u[i * n + j] = U[i][j]`.
extern "C" __global__ void upper_to_row_major(const double* __restrict__ a, int n,
                                              float* __restrict__ u) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)n * n) return;
    const int i = (int)(k / n), j = (int)(k % n);
    u[k] = j >= i ? (float)a[(long long)j * n + i] : 0.0f;
}

// One lazy-update block of GPTQ, columns [i1, i2) of the permuted weight
// (at most GPTQ_BLOCK), one warp per output row: lane l holds columns
// i1 + 32k + l (k = 0..3) in registers. Column by column: fix the group's
// grid when a group starts (min-max of the row's current values, in-block
// ones from registers, later ones from memory), quantize, and push the scaled
// error onto the block's later columns. The block's errors go to `err` for
// the trailing update, done by cuBLAS after the launch.
// act_order: 0 none, 1 static (grid from the original weight, natural
// groups: static_scales/static_zeros), 2 group (groups along the order).
extern "C" __global__ void gptq_block(float* __restrict__ w, int rows, int n, int i1, int i2,
                                      const float* __restrict__ u, const int* __restrict__ perm,
                                      int act_order, int group_size, int bits, int symmetric,
                                      int dtype, float eps, const float* __restrict__ static_scales,
                                      const int* __restrict__ static_zeros,
                                      float* __restrict__ scales, int* __restrict__ zeros,
                                      int* __restrict__ qperm, float* __restrict__ err) {
    const long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const int groups = n / group_size;
    float* row = w + r * n;
    float v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int c = i1 + k * 32 + lane;
        v[k] = c < i2 ? row[c] : 0.0f;
    }
    GridParams p;
    p.scale = 1.0f;
    p.zero = 0;
    if (act_order != 1 && i1 % group_size != 0) {
        // A group that began in an earlier block.
        const int g = i1 / group_size;
        p.scale = scales[r * groups + g];
        p.zero = zeros[r * groups + g];
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 32; ++l) {
            const int j = k * 32 + l;
            const int i = i1 + j;
            if (i >= i2) break;
            if (act_order == 1) {
                const int g = perm[i] / group_size;
                p.scale = static_scales[r * groups + g];
                p.zero = static_zeros[r * groups + g];
            } else if (i % group_size == 0) {
                const int end = i + group_size;
                float mn = F32_INF, mx = -F32_INF;
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    const int c = i1 + kk * 32 + lane;
                    if (c >= i && c < end && c < i2) {
                        mn = fminf(mn, v[kk]);
                        mx = fmaxf(mx, v[kk]);
                    }
                }
                for (int c = i2 + lane; c < end; c += 32) {
                    const float x = row[c];
                    mn = fminf(mn, x);
                    mx = fmaxf(mx, x);
                }
                mn = warp_min(mn);
                mx = warp_max(mx);
                p = params_from_range(mn, mx, bits, symmetric, dtype, eps);
                if (lane == 0) {
                    scales[r * groups + i / group_size] = p.scale;
                    zeros[r * groups + i / group_size] = p.zero;
                }
            }
            const float x = __shfl_sync(FULL_MASK, v[k], l);
            const int q = quantize_code(x, p, bits);
            const float e = (x - dequantize_code(q, p)) / u[(long long)i * n + i];
            if (lane == 0) {
                qperm[r * n + i] = q;
                err[r * GPTQ_BLOCK + j] = e;
            }
            const float* urow = u + (long long)i * n + i1;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const int c = kk * 32 + lane;
                if (c > j && i1 + c < i2) v[kk] -= e * urow[c];
            }
        }
    }
}

// codes[r, perm[k]] = qperm[r, k].
extern "C" __global__ void unpermute_codes(const int* __restrict__ qperm, const int* __restrict__ perm,
                                           long long rows, int n, signed char* __restrict__ codes) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= rows * n) return;
    const long long r = k / n;
    const int c = (int)(k % n);
    codes[r * n + perm[c]] = (signed char)qperm[k];
}

// d[i] = a[i, i] of an n × n matrix.
extern "C" __global__ void diagonal(const double* __restrict__ a, int n, double* __restrict__ d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = a[(long long)i * n + i];
}

// Stored F16 (dtype 0) or BF16 (dtype 1) values widened to f32 on the device,
// so checkpoints upload at their stored size.
extern "C" __global__ void widen_to_f32(const unsigned short* __restrict__ src, int dtype,
                                        long long n, float* __restrict__ dst) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    const unsigned short h = src[k];
    if (dtype == 1) {
        dst[k] = __uint_as_float(((unsigned int)h) << 16);
    } else {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        dst[k] = f;
    }
}

// out[t, :] = table[ids[t], :]: the embedding of each calibration token.
extern "C" __global__ void gather_rows(const float* __restrict__ table, const unsigned int* __restrict__ ids,
                                       long long tokens, int width, float* __restrict__ out) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= tokens * width) return;
    const long long t = k / width;
    const int c = (int)(k % width);
    out[k] = table[(long long)ids[t] * width + c];
}

// ---- AWQ (quant/awq.rs) ----

// acc[c] += Σ_r |x[r, c]|, one thread per column, rows in order: the same
// f64 additions in the same order as the CPU twin's mean, so the means (and
// the scales built from them) are bit-identical.
extern "C" __global__ void column_abs_sum(const float* __restrict__ x, long long rows, int cols,
                                          double* __restrict__ acc) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double a = acc[c];
    for (long long r = 0; r < rows; ++r) a += (double)fabsf(x[r * cols + c]);
    acc[c] = a;
}

// |w| divided by its (row, group)'s max |w| + 1e-6, one team per group.
extern "C" __global__ void group_normalized_abs(const float* __restrict__ w, int rows, int cols,
                                                int group_size, int team_size,
                                                float* __restrict__ out) {
    const Team t = team_of(team_size);
    const int groups = cols / group_size;
    if (t.item >= (long long)rows * groups) return;
    const long long base = (t.item / groups) * cols + (long long)(t.item % groups) * group_size;
    float mx = 0.0f;
    for (int c = t.rank; c < group_size; c += t.size) mx = fmaxf(mx, fabsf(w[base + c]));
    mx = team_reduce(mx, true, t.size) + 1e-6f;
    for (int c = t.rank; c < group_size; c += t.size) out[base + c] = fabsf(w[base + c]) / mx;
}

// x[r, c] · s[c], or x[r, c] / s[c] when `divide` (AWQ's scaled weights and
// inputs), one thread per element.
extern "C" __global__ void scale_columns(const float* __restrict__ x, long long n, int cols,
                                         const float* __restrict__ s, int divide,
                                         float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float f = s[i % cols];
    out[i] = divide ? x[i] / f : x[i] * f;
}

// x[r, c] · s[r], or x[r, c] / s[r] when `divide` (AWQ's fold of 1/s into the
// output rows of the Linear before a group: fold_into_linear), one thread per
// element.
extern "C" __global__ void scale_rows(const float* __restrict__ x, long long n, int cols,
                                      const float* __restrict__ s, int divide,
                                      float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float f = s[i / cols];
    out[i] = divide ? x[i] / f : x[i] * f;
}

// delta = w − Q(w·s)/s per (row, group): the weight error of one AWQ
// candidate, whose product with the inputs is the candidate's output error.
extern "C" __global__ void awq_delta(const float* __restrict__ w, const float* __restrict__ s,
                                     int rows, int cols, int group_size, int bits, int symmetric,
                                     int dtype, float eps, int team_size,
                                     float* __restrict__ delta) {
    const Team t = team_of(team_size);
    const int groups = cols / group_size;
    if (t.item >= (long long)rows * groups) return;
    const int g0 = (int)(t.item % groups) * group_size;
    const long long base = (t.item / groups) * cols + g0;
    float mn = F32_INF, mx = -F32_INF;
    for (int c = t.rank; c < group_size; c += t.size) {
        const float v = w[base + c] * s[g0 + c];
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
    mn = team_reduce(mn, false, t.size);
    mx = team_reduce(mx, true, t.size);
    const GridParams p = params_from_range(mn, mx, bits, symmetric, dtype, eps);
    for (int c = t.rank; c < group_size; c += t.size) {
        const float f = s[g0 + c];
        const float v = w[base + c];
        delta[base + c] = v - dequantize_code(quantize_code(v * f, p, bits), p) / f;
    }
}

__device__ __forceinline__ double block_sum_double(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __shared__ double partial[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double x = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
        if (lane == 0) partial[0] = x;
    }
    __syncthreads();
    return partial[0];
}

// *out += Σ y², in f64 (grid-stride, one atomic per block).
extern "C" __global__ void sum_squares(const float* __restrict__ y, long long n,
                                       double* __restrict__ out) {
    double a = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double v = (double)y[i];
        a += v * v;
    }
    a = block_sum_double(a);
    if (threadIdx.x == 0) atomicAdd(out, a);
}

// AWQ's clipping search, one block per (row, group): for each shrink ratio
// 1 − i/clip_grid (i < steps) clamp the group to ±ratio·max|w|, round it,
// and score the error d = w − Q(clamp(w)) by dᵀ G d, where G = Σ_t x_t x_tᵀ
// over the group's input columns (the CPU twin sums (x_t·d)² over the rows
// t: the same quantity). Writes the group clamped at the best ratio (the
// first one on ties). Shared memory: 2 · group_size floats.
extern "C" __global__ void awq_clip(const float* __restrict__ w, const float* __restrict__ gram,
                                    int rows, int cols, int group_size, int steps, int clip_grid,
                                    int bits, int symmetric, int dtype, float eps,
                                    float* __restrict__ out) {
    extern __shared__ float buffer[];
    float* orig = buffer;
    float* diff = buffer + group_size;
    const int groups = cols / group_size;
    const long long item = blockIdx.x;
    if (item >= (long long)rows * groups) return;
    const int g = (int)(item % groups);
    const long long base = (item / groups) * cols + (long long)g * group_size;
    const float* G = gram + (long long)g * group_size * group_size;
    const int team = blockDim.x;
    float amax = 0.0f;
    for (int c = threadIdx.x; c < group_size; c += team) {
        orig[c] = w[base + c];
        amax = fmaxf(amax, fabsf(orig[c]));
    }
    const float max_val = team_reduce(amax, true, team);
    double best_err = 1.0 / 0.0;
    float best_m = max_val;
    for (int i = 0; i < steps; ++i) {
        const float m = max_val * (1.0f - (float)i / (float)clip_grid);
        float mn = F32_INF, mx = -F32_INF;
        for (int c = threadIdx.x; c < group_size; c += team) {
            const float v = fminf(fmaxf(orig[c], -m), m);
            mn = fminf(mn, v);
            mx = fmaxf(mx, v);
        }
        mn = team_reduce(mn, false, team);
        mx = team_reduce(mx, true, team);
        const GridParams p = params_from_range(mn, mx, bits, symmetric, dtype, eps);
        for (int c = threadIdx.x; c < group_size; c += team) {
            const float v = fminf(fmaxf(orig[c], -m), m);
            diff[c] = orig[c] - dequantize_code(quantize_code(v, p, bits), p);
        }
        __syncthreads();
        double e = 0.0;
        for (int k = threadIdx.x; k < group_size; k += team) {
            float gd = 0.0f;
            for (int j = 0; j < group_size; ++j) gd += G[(long long)j * group_size + k] * diff[j];
            e += (double)gd * (double)diff[k];
        }
        e = block_sum_double(e);
        if (e < best_err) {
            best_err = e;
            best_m = m;
        }
    }
    for (int c = threadIdx.x; c < group_size; c += team) {
        out[base + c] = fminf(fmaxf(orig[c], -best_m), best_m);
    }
}
