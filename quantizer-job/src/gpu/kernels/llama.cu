// quantops Llama forward kernels, compiled at run time by NVRTC.
//
// The device twin of quantizer-job/src/model/mod.rs (f32 throughout): each
// kernel follows the CPU's arithmetic operation for operation (RMSNorm
// divides by sqrt(mean(x^2) + eps) and then multiplies by the weight, RoPE is
// the rotate-half layout of transformers, softmax subtracts the row maximum,
// SiLU is x / (1 + exp(-x))). The matrix products run in cuBLAS; only their
// summation order differs from the CPU's, so results agree to f32 rounding,
// not bit for bit. No headers: NVRTC has no system include path where the
// binary runs.
//
// Launch shapes (see gpu/llama.rs): the row kernels run one block of
// ROW_BLOCK threads per row; the element-wise kernels use grid-stride loops,
// so any grid size is correct.

#define FULL_MASK 0xffffffffu
#define F32_INF __int_as_float(0x7f800000)
#define NO_INDEX 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple
// of 32 and at most 1024. The leading barrier lets consecutive calls reuse
// the shared slots.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? partial[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) {
            partial[0] = v;
        }
    }
    __syncthreads();
    return partial[0];
}

// Maximum over the block (NaN-ignoring, as fmaxf), returned to every thread.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? partial[lane] : -F32_INF;
        v = warp_max(v);
        if (lane == 0) {
            partial[0] = v;
        }
    }
    __syncthreads();
    return partial[0];
}

__device__ __forceinline__ long long grid_start() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
    return (long long)gridDim.x * blockDim.x;
}

// out[t, :] = table[tokens[t], :]. Token ids are checked against the
// vocabulary on the host.
extern "C" __global__ void embed_gather(const unsigned int* __restrict__ tokens,
                                        const float* __restrict__ table,
                                        float* __restrict__ out, int n_tokens, int hidden) {
    const long long total = (long long)n_tokens * hidden;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        const long long t = i / hidden;
        const long long j = i - t * hidden;
        out[i] = table[(long long)tokens[t] * hidden + j];
    }
}

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * (w + offset). One block
// per row. The mean is sum * inv_cols and each step is rounded on its own (no
// fused multiply-add), as candle computes mean_keepdim and the affine `+ eps`.
// offset is 1 for Gemma's `1 + weight` norms, else 0 (w + 0 is w).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int cols, float inv_cols, float eps,
                                    float offset) {
    const long long row = blockIdx.x;
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float squares = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = xr[j];
        squares += v * v;
    }
    squares = block_sum(squares);
    const float denom = sqrtf(__fadd_rn(__fmul_rn(squares, inv_cols), eps));
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        yr[j] = xr[j] / denom * __fadd_rn(w[j], offset);
    }
}

// Rotary embedding in place on x [tokens, heads * head_dim]; token r sits at
// position offset + r % seq (the sequences of a batch are laid end to end).
// Rotate-half layout, as transformers' default RoPE: element i pairs with
// i + head_dim / 2, rotated by the angle of table row `position`, column i.
// cos_table and sin_table [positions, head_dim / 2] are computed on the host
// exactly as the CPU's tables, and the products are rounded before the sum
// (no fused multiply-add), so the rotation equals the CPU's bit for bit.
extern "C" __global__ void rope_inplace(float* __restrict__ x,
                                        const float* __restrict__ cos_table,
                                        const float* __restrict__ sin_table, int tokens,
                                        int heads, int head_dim, int seq, int offset) {
    const int half = head_dim / 2;
    const long long total = (long long)tokens * heads * half;
    for (long long idx = grid_start(); idx < total; idx += grid_stride()) {
        const int i = (int)(idx % half);
        const long long pair_row = idx / half;
        const int head = (int)(pair_row % heads);
        const long long token = pair_row / heads;
        const long long position = offset + token % seq;
        const float c = cos_table[position * half + i];
        const float s = sin_table[position * half + i];
        float* p = x + token * heads * head_dim + (long long)head * head_dim;
        const float x1 = p[i];
        const float x2 = p[i + half];
        p[i] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(-x2, s));
        p[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
}

// Softmax in place over rows of attention scores [rows, kv_len] (already
// scaled by 1/sqrt(head_dim)). Row r is query r % t of its head, at position
// past + r % t; key j is visible when j <= past + r % t (and, with a sliding
// window w > 0, j > past + r % t - w), the others get
// probability 0 (the CPU adds -inf to them). One block per row.
extern "C" __global__ void causal_softmax(float* __restrict__ scores, int t, int kv_len,
                                          int past, int window) {
    const long long row = blockIdx.x;
    float* p = scores + row * kv_len;
    const int last = past + (int)(row % t);
    const int visible = last + 1 < kv_len ? last + 1 : kv_len;
    // A sliding window (window > 0) hides keys at or before last - window.
    const int first = window > 0 && last + 1 > window ? last + 1 - window : 0;
    float mx = -F32_INF;
    for (int j = first + threadIdx.x; j < visible; j += blockDim.x) {
        mx = fmaxf(mx, p[j]);
    }
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = first + threadIdx.x; j < visible; j += blockDim.x) {
        sum += expf(p[j] - mx);
    }
    sum = block_sum(sum);
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        p[j] = j >= first && j < visible ? expf(p[j] - mx) / sum : 0.0f;
    }
}

// gate = silu(gate) * up, element-wise over n values; silu(x) = x / (1 + exp(-x)).
extern "C" __global__ void silu_mul(float* __restrict__ gate, const float* __restrict__ up,
                                    long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// x += y, element-wise over n values (the residual connections).
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ y,
                                       long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        x[i] += y[i];
    }
}

// y[r, c] += bias[c] for y [rows, cols] (the q/k/v/o biases of Qwen2 and of
// Llama checkpoints with attention_bias).
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias,
                                    int rows, int cols) {
    const long long total = (long long)rows * cols;
    for (long long i = grid_start(); i < total; i += grid_stride()) {
        y[i] += bias[i % cols];
    }
}

// out[r] = log_softmax(logits[r, :])[targets[r]], computed as the CPU does:
// (x[t] - max) - log(sum(exp(x - max))). A target >= vocab marks a row
// without a prediction to score; its out is 0. One block per row.
extern "C" __global__ void target_logprob(const float* __restrict__ logits,
                                          const unsigned int* __restrict__ targets,
                                          float* __restrict__ out, int vocab) {
    const long long row = blockIdx.x;
    const float* p = logits + row * vocab;
    float mx = -F32_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        mx = fmaxf(mx, p[j]);
    }
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        sum += expf(p[j] - mx);
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const unsigned int target = targets[row];
        out[row] = target < (unsigned int)vocab ? (p[target] - mx) - logf(sum) : 0.0f;
    }
}

// The better of two (value, index) candidates: the larger value, the lower
// index on ties (the first maximum, as candle's and torch's argmax). NaN
// values never win.
__device__ __forceinline__ void keep_best(float* best, unsigned int* best_index, float v,
                                          unsigned int index) {
    if (v > *best || (v == *best && index < *best_index)) {
        *best = v;
        *best_index = index;
    }
}

// out[r] = the index of the largest value of row r of x [rows, cols]
// (greedy decoding). One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ x,
                                       unsigned int* __restrict__ out, int cols) {
    __shared__ float best_values[32];
    __shared__ unsigned int best_indices[32];
    const long long row = blockIdx.x;
    const float* p = x + row * cols;
    float best = -F32_INF;
    unsigned int best_index = NO_INDEX;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        keep_best(&best, &best_index, p[j], (unsigned int)j);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float v = __shfl_xor_sync(FULL_MASK, best, offset);
        const unsigned int index = __shfl_xor_sync(FULL_MASK, best_index, offset);
        keep_best(&best, &best_index, v, index);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_values[warp] = best;
        best_indices[warp] = best_index;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        best = lane < warps ? best_values[lane] : -F32_INF;
        best_index = lane < warps ? best_indices[lane] : NO_INDEX;
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float v = __shfl_xor_sync(FULL_MASK, best, offset);
            const unsigned int index = __shfl_xor_sync(FULL_MASK, best_index, offset);
            keep_best(&best, &best_index, v, index);
        }
        if (lane == 0) {
            // Only NaN values: index 0, as the CPU's argmax.
            out[row] = best_index == NO_INDEX ? 0u : best_index;
        }
    }
}
