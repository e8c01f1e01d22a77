// CUDA kernels of the trainer (feature `cuda`), compiled to PTX by build.rs
// with the CUDA toolkit's nvcc and loaded by src/qlora/cuda.rs.
//
// - nf4_dequant_*: NF4 codes and block scales to a dense weight, bit for bit
//   what the CPU codec (src/qlora/nf4.rs) computes: code value times block
//   scale, in f32, rounded to the output type once. Double-quantized scales
//   are code * step + mean with the product and the sum rounded separately
//   (no fused multiply-add), as the CPU computes them.
// - token_nll / token_nll_grad: the loss op of src/qlora/loss.rs on f32
//   logits, one thread block per row of the logits.

#include <cuda_bf16.h>
#include <stdint.h>

// The 16 NF4 code values, passed by value from Rust's NF4_CODE (one source
// of truth for both codecs).
struct Nf4Table {
    float v[16];
};

#define NF4_BLOCK 64
#define DQ_BLOCK 256

__device__ __forceinline__ void store(float *out, size_t i, float x) { out[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *out, size_t i, float x) {
    out[i] = __float2bfloat16_rn(x);
}

// One thread per packed byte: elements 2i (low nibble) and 2i + 1 (high).
template <typename T>
__device__ void dequant(const uint8_t *packed, float scale_of_first, const Nf4Table &table,
                        T *out, size_t numel, size_t byte) {
    size_t e = 2 * byte;
    uint8_t b = packed[byte];
    store(out, e, __fmul_rn(table.v[b & 0x0f], scale_of_first));
    if (e + 1 < numel) {
        store(out, e + 1, __fmul_rn(table.v[b >> 4], scale_of_first));
    }
}

// Scales: one f32 absmax per block of 64 weights.
template <typename T>
__device__ void dequant_f32_scales(const uint8_t *packed, const float *scales, Nf4Table table,
                                   T *out, size_t numel) {
    size_t bytes = (numel + 1) / 2;
    for (size_t byte = blockIdx.x * (size_t)blockDim.x + threadIdx.x; byte < bytes;
         byte += (size_t)gridDim.x * blockDim.x) {
        // Both elements of a byte lie in one block (blocks are 64 wide).
        float scale = scales[(2 * byte) / NF4_BLOCK];
        dequant(packed, scale, table, out, numel, byte);
    }
}

// Double quantization: the scale of block b is codes[b] * steps[b / 256] +
// mean, codes signed 8-bit.
template <typename T>
__device__ void dequant_dq_scales(const uint8_t *packed, const int8_t *codes, const float *steps,
                                  float mean, Nf4Table table, T *out, size_t numel) {
    size_t bytes = (numel + 1) / 2;
    for (size_t byte = blockIdx.x * (size_t)blockDim.x + threadIdx.x; byte < bytes;
         byte += (size_t)gridDim.x * blockDim.x) {
        size_t b = (2 * byte) / NF4_BLOCK;
        float scale = __fadd_rn(__fmul_rn((float)codes[b], steps[b / DQ_BLOCK]), mean);
        dequant(packed, scale, table, out, numel, byte);
    }
}

extern "C" __global__ void nf4_dequant_f32(const uint8_t *packed, const float *scales,
                                           Nf4Table table, float *out, size_t numel) {
    dequant_f32_scales(packed, scales, table, out, numel);
}

extern "C" __global__ void nf4_dequant_bf16(const uint8_t *packed, const float *scales,
                                            Nf4Table table, __nv_bfloat16 *out, size_t numel) {
    dequant_f32_scales(packed, scales, table, out, numel);
}

extern "C" __global__ void nf4_dequant_dq_f32(const uint8_t *packed, const int8_t *codes,
                                              const float *steps, float mean, Nf4Table table,
                                              float *out, size_t numel) {
    dequant_dq_scales(packed, codes, steps, mean, table, out, numel);
}

extern "C" __global__ void nf4_dequant_dq_bf16(const uint8_t *packed, const int8_t *codes,
                                               const float *steps, float mean, Nf4Table table,
                                               __nv_bfloat16 *out, size_t numel) {
    dequant_dq_scales(packed, codes, steps, mean, table, out, numel);
}

// ------------------------------------------------------------------ the loss

#define NLL_THREADS 256

// Block-wide reduction of one float per thread (max or sum); every thread
// gets the result.
template <bool MAX>
__device__ float block_reduce(float x, float *shared) {
    for (int o = 16; o > 0; o /= 2) {
        float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    int warps = blockDim.x / 32;
    x = lane < warps ? shared[lane] : (MAX ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o /= 2) {
        float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    __syncthreads();
    return x;
}

// log(sum(exp(row))) of one row, by the whole block.
__device__ float row_lse(const float *row, size_t v, float *shared) {
    float m = -INFINITY;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_reduce<true>(m, shared);
    float s = 0.0f;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) s += expf(row[j] - m);
    s = block_reduce<false>(s, shared);
    return m + logf(s);
}

// nll[r] = logsumexp(x[r]) - x[r][targets[r]]; grid: one block per row.
extern "C" __global__ void token_nll(const float *x, const uint32_t *targets, float *nll,
                                     size_t v) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const float *row = x + r * v;
    float lse = row_lse(row, v, shared);
    if (threadIdx.x == 0) nll[r] = lse - row[targets[r]];
}

// dx[r][j] = (softmax(x[r])[j] - [j == targets[r]]) * g[r]; zeros where
// g[r] = 0 (masked-out rows).
extern "C" __global__ void token_nll_grad(const float *x, const uint32_t *targets,
                                          const float *g, float *dx, size_t v) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const float *row = x + r * v;
    float *out = dx + r * v;
    float gr = g[r];
    if (gr == 0.0f) {
        for (size_t j = threadIdx.x; j < v; j += blockDim.x) out[j] = 0.0f;
        return;
    }
    float lse = row_lse(row, v, shared);
    uint32_t t = targets[r];
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
        float d = expf(row[j] - lse) * gr;
        out[j] = j == t ? d - gr : d;
    }
}

// -------------------------------------------- attention's masked softmax

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// The mask row of score row r: scores (b, h, t, keys), mask (mask_rows, 1,
// t, keys) with mask_rows 1 (shared) or b.
__device__ __forceinline__ size_t mask_row(size_t r, size_t heads, size_t t, size_t mask_rows) {
    size_t bi = r / (heads * t);
    return (mask_rows == 1 ? 0 : bi) * t + r % t;
}

// y = softmax(scale * x + mask) over each row of `keys`, in f32; one block
// per row.
template <typename T>
__device__ void masked_softmax(const T *x, const T *mask, T *y, size_t keys, size_t heads,
                               size_t t, size_t mask_rows, float scale) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const T *row = x + r * keys;
    const T *m = mask + mask_row(r, heads, t, mask_rows) * keys;
    T *out = y + r * keys;
    float mx = -INFINITY;
    for (size_t j = threadIdx.x; j < keys; j += blockDim.x)
        mx = fmaxf(mx, scale * to_f(row[j]) + to_f(m[j]));
    mx = block_reduce<true>(mx, shared);
    float s = 0.0f;
    for (size_t j = threadIdx.x; j < keys; j += blockDim.x)
        s += expf(scale * to_f(row[j]) + to_f(m[j]) - mx);
    s = block_reduce<false>(s, shared);
    float inv = 1.0f / s;
    for (size_t j = threadIdx.x; j < keys; j += blockDim.x)
        store(out, j, expf(scale * to_f(row[j]) + to_f(m[j]) - mx) * inv);
}

extern "C" __global__ void masked_softmax_f32(const float *x, const float *mask, float *y,
                                              size_t keys, size_t heads, size_t t,
                                              size_t mask_rows, float scale) {
    masked_softmax(x, mask, y, keys, heads, t, mask_rows, scale);
}

extern "C" __global__ void masked_softmax_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *mask,
                                               __nv_bfloat16 *y, size_t keys, size_t heads,
                                               size_t t, size_t mask_rows, float scale) {
    masked_softmax(x, mask, y, keys, heads, t, mask_rows, scale);
}

// dx = scale * y * (g - sum(g * y)) over each row; one block per row.
template <typename T>
__device__ void softmax_grad(const T *y, const T *g, T *dx, size_t keys, float scale) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const T *yr = y + r * keys;
    const T *gr = g + r * keys;
    T *out = dx + r * keys;
    float dot = 0.0f;
    for (size_t j = threadIdx.x; j < keys; j += blockDim.x) dot += to_f(gr[j]) * to_f(yr[j]);
    dot = block_reduce<false>(dot, shared);
    for (size_t j = threadIdx.x; j < keys; j += blockDim.x)
        store(out, j, scale * to_f(yr[j]) * (to_f(gr[j]) - dot));
}

extern "C" __global__ void softmax_grad_f32(const float *y, const float *g, float *dx, size_t keys,
                                            float scale) {
    softmax_grad(y, g, dx, keys, scale);
}

extern "C" __global__ void softmax_grad_bf16(const __nv_bfloat16 *y, const __nv_bfloat16 *g,
                                             __nv_bfloat16 *dx, size_t keys, float scale) {
    softmax_grad(y, g, dx, keys, scale);
}

// ------------------------------- RMSNorm, the MLP gate and RoPE (fused.rs)

// y = x * rsqrt(mean(x^2) + eps) * w per row of d; one block per row.
template <typename T>
__device__ void rms_norm(const T *x, const T *w, T *y, size_t d, float eps) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const T *xr = x + r * d;
    T *yr = y + r * d;
    float ss = 0.0f;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) ss += to_f(xr[j]) * to_f(xr[j]);
    ss = block_reduce<false>(ss, shared);
    float inv = rsqrtf(ss / (float)d + eps);
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) store(yr, j, to_f(xr[j]) * inv * to_f(w[j]));
}

// dx = r * g - x * r^3 * mean(g * x), g = dy * w, r = rsqrt(mean(x^2) + eps).
template <typename T>
__device__ void rms_norm_grad(const T *x, const T *w, const T *dy, T *dx, size_t d, float eps) {
    __shared__ float shared[32];
    size_t r = blockIdx.x;
    const T *xr = x + r * d;
    const T *gr = dy + r * d;
    T *out = dx + r * d;
    float ss = 0.0f, gx = 0.0f;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x) {
        float xv = to_f(xr[j]);
        ss += xv * xv;
        gx += to_f(gr[j]) * to_f(w[j]) * xv;
    }
    ss = block_reduce<false>(ss, shared);
    gx = block_reduce<false>(gx, shared);
    float inv = rsqrtf(ss / (float)d + eps);
    float c = inv * inv * inv * gx / (float)d;
    for (size_t j = threadIdx.x; j < d; j += blockDim.x)
        store(out, j, inv * to_f(gr[j]) * to_f(w[j]) - to_f(xr[j]) * c);
}

extern "C" __global__ void rms_norm_f32(const float *x, const float *w, float *y, size_t d, float eps) {
    rms_norm(x, w, y, d, eps);
}
extern "C" __global__ void rms_norm_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                                         __nv_bfloat16 *y, size_t d, float eps) {
    rms_norm(x, w, y, d, eps);
}
extern "C" __global__ void rms_norm_grad_f32(const float *x, const float *w, const float *dy,
                                             float *dx, size_t d, float eps) {
    rms_norm_grad(x, w, dy, dx, d, eps);
}
extern "C" __global__ void rms_norm_grad_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                                              const __nv_bfloat16 *dy, __nv_bfloat16 *dx, size_t d,
                                              float eps) {
    rms_norm_grad(x, w, dy, dx, d, eps);
}

// The gate's activation and its derivative: act 0 SiLU, 1 GELU (tanh).
__device__ __forceinline__ float act_f(float x, int act, float *deriv) {
    if (act == 0) {
        float s = 1.0f / (1.0f + expf(-x));
        *deriv = s * (1.0f + x * (1.0f - s));
        return x * s;
    }
    const float c = 0.7978845608028654f;
    float th = tanhf(c * x * (1.0f + 0.044715f * x * x));
    float dk = c * (1.0f + 3.0f * 0.044715f * x * x);
    *deriv = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * dk;
    return 0.5f * x * (1.0f + th);
}

// y = act(g) * u, element-wise.
template <typename T>
__device__ void gate(const T *g, const T *u, T *y, size_t n, int act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float d;
        store(y, i, act_f(to_f(g[i]), act, &d) * to_f(u[i]));
    }
}

// out[0..n) = dy * u * act'(g) (dg), out[n..2n) = dy * act(g) (du).
template <typename T>
__device__ void gate_grad(const T *g, const T *u, const T *dy, T *out, size_t n, int act) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float d;
        float a = act_f(to_f(g[i]), act, &d);
        float gy = to_f(dy[i]);
        store(out, i, gy * to_f(u[i]) * d);
        store(out, n + i, gy * a);
    }
}

extern "C" __global__ void gate_f32(const float *g, const float *u, float *y, size_t n, int act) {
    gate(g, u, y, n, act);
}
extern "C" __global__ void gate_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *u,
                                     __nv_bfloat16 *y, size_t n, int act) {
    gate(g, u, y, n, act);
}
extern "C" __global__ void gate_grad_f32(const float *g, const float *u, const float *dy,
                                         float *out, size_t n, int act) {
    gate_grad(g, u, dy, out, n, act);
}
extern "C" __global__ void gate_grad_bf16(const __nv_bfloat16 *g, const __nv_bfloat16 *u,
                                          const __nv_bfloat16 *dy, __nv_bfloat16 *out, size_t n,
                                          int act) {
    gate_grad(g, u, dy, out, n, act);
}

// RoPE, "rotate_half" layout, on x (rows of d; row r is position r % t):
// the first 2 * half features turn by the tables' angle (sign -1: the
// opposite angle, for the backward), the rest pass. One thread per pair
// or passed feature.
template <typename T>
__device__ void rope(const T *x, const T *cos, const T *sin, T *y, size_t rows, size_t t, size_t d,
                     size_t half, float sign) {
    size_t per_row = half + (d - 2 * half);
    size_t total = rows * per_row;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / per_row, j = i % per_row;
        const T *xr = x + r * d;
        T *yr = y + r * d;
        if (j < half) {
            size_t p = r % t;
            float c = to_f(cos[p * half + j]), s = sign * to_f(sin[p * half + j]);
            float a = to_f(xr[j]), b = to_f(xr[j + half]);
            store(yr, j, a * c - b * s);
            store(yr, j + half, b * c + a * s);
        } else {
            size_t k = 2 * half + (j - half);
            store(yr, k, to_f(xr[k]));
        }
    }
}

extern "C" __global__ void rope_f32(const float *x, const float *cos, const float *sin, float *y,
                                    size_t rows, size_t t, size_t d, size_t half, float sign) {
    rope(x, cos, sin, y, rows, t, d, half, sign);
}
extern "C" __global__ void rope_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *cos,
                                     const __nv_bfloat16 *sin, __nv_bfloat16 *y, size_t rows,
                                     size_t t, size_t d, size_t half, float sign) {
    rope(x, cos, sin, y, rows, t, d, half, sign);
}
