// CUDA kernels for fused per-token log-probs: one thread block per row.
//
// fold: each thread streams 16-byte vectors of its row (one read of the
// logits), keeps online-log-sum-exp statistics in registers, and the block
// merges them with warp shuffles, then merges the result into the row's state
// (rows may arrive in several vocabulary tiles). grad: one read and one write
// per element, d logp / dx = g (1[label] - p) dz/dx.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "logprobs_cuda.h"

namespace dpo_ds {
namespace {

constexpr int kThreads = 256;
constexpr float kNegInf = -__builtin_huge_valf();

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// z = cap * tanh(x / cap) / T (or x / T); th = tanh(x / cap) for the chain rule.
template <bool kCap>
__device__ __forceinline__ float transform(float x, float inv_t, float cap, float& th) {
  if (kCap) {
    th = tanhf(x / cap);
    return cap * th * inv_t;
  }
  th = 0.f;
  return x * inv_t;
}

struct Stats {
  float m, s, x, sq, zs, mbt, zt;  // see kNumStats in logprobs_cuda.h

  __device__ static Stats empty() { return {kNegInf, 0.f, 0.f, 0.f, 0.f, kNegInf, 0.f}; }

  // Re-centre the sums on a new, larger max (an empty sum stays empty).
  __device__ __forceinline__ void rescale(float new_m) {
    if (s > 0.f) {
      const float a = __expf(m - new_m);
      x = a * (x + (m - new_m) * s);
      s *= a;
      sq *= a * a;
    }
    m = new_m;
  }

  __device__ __forceinline__ void merge(Stats o) {
    const float new_m = fmaxf(m, o.m);
    rescale(new_m);
    o.rescale(new_m);
    s += o.s;
    x += o.x;
    sq += o.sq;
    zs += o.zs;
    mbt = fmaxf(mbt, o.mbt);
    zt += o.zt;
  }

  __device__ __forceinline__ Stats shuffle(int lane_mask) const {
    const unsigned all = 0xffffffffu;
    return {__shfl_xor_sync(all, m, lane_mask),   __shfl_xor_sync(all, s, lane_mask),
            __shfl_xor_sync(all, x, lane_mask),   __shfl_xor_sync(all, sq, lane_mask),
            __shfl_xor_sync(all, zs, lane_mask),  __shfl_xor_sync(all, mbt, lane_mask),
            __shfl_xor_sync(all, zt, lane_mask)};
  }
};

// Fold up to kSize consecutive processed logits z[0..count) at column j0.
template <int kSize>
__device__ __forceinline__ void fold_values(Stats& st, const float (&z)[kSize], int count, int64_t j0, int64_t t,
                                            int flags) {
  float vmax = kNegInf;
#pragma unroll
  for (int k = 0; k < kSize; ++k) {
    if (k < count) {
      vmax = fmaxf(vmax, z[k]);
      st.zs += z[k];
      if (j0 + k < t) st.mbt = fmaxf(st.mbt, z[k]);
      if (j0 + k == t) st.zt = z[k];
    }
  }
  if (vmax > st.m) st.rescale(vmax);
#pragma unroll
  for (int k = 0; k < kSize; ++k) {
    if (k < count) {
      const float e = __expf(z[k] - st.m);
      st.s += e;
      if (flags & kEntropy) st.x += e * (z[k] - st.m);
      if (flags & kLssp) st.sq += e * e;
    }
  }
}

__device__ Stats block_reduce(Stats st) {
  __shared__ Stats warp_stats[kThreads / 32];
  for (int mask = 16; mask > 0; mask >>= 1) st.merge(st.shuffle(mask));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? warp_stats[lane] : Stats::empty();
    for (int mask = 16; mask > 0; mask >>= 1) st.merge(st.shuffle(mask));
  }
  return st;  // complete in thread 0
}

template <typename T, bool kCap, bool kVec>
__global__ void __launch_bounds__(kThreads) fold_kernel(Block b, int flags, float* state, int64_t ss) {
  const int64_t row = blockIdx.x;
  const int64_t label = b.labels[row];
  if (label == b.ignore_index) return;
  const int64_t t = label - b.vocab_start;
  const T* x = static_cast<const T*>(b.x) + row * b.x_stride;
  constexpr int kVecSize = Pack<T>::kSize;
  Stats st = Stats::empty();
  int64_t tail = 0;
  if (kVec) {
    tail = b.w - b.w % kVecSize;
    for (int64_t j0 = int64_t(threadIdx.x) * kVecSize; j0 < tail; j0 += int64_t(kThreads) * kVecSize) {
      const Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + j0);
      float z[kVecSize];
      float th;
#pragma unroll
      for (int k = 0; k < kVecSize; ++k) z[k] = transform<kCap>(to_f32(p.v[k]), b.inv_t, b.cap, th);
      fold_values(st, z, kVecSize, j0, t, flags);
    }
  }
  for (int64_t j = tail + threadIdx.x; j < b.w; j += kThreads) {
    float th;
    const float z[1] = {transform<kCap>(to_f32(x[j]), b.inv_t, b.cap, th)};
    fold_values(st, z, 1, j, t, flags);
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    Stats old{state[row], state[ss + row], state[2 * ss + row], state[3 * ss + row],
              state[4 * ss + row], state[5 * ss + row], state[6 * ss + row]};
    old.merge(st);
    const float values[kNumStats] = {old.m, old.s, old.x, old.sq, old.zs, old.mbt, old.zt};
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) state[k * ss + row] = values[k];
  }
}

template <typename T, bool kCap>
__device__ __forceinline__ T dlogit(T raw, int64_t j, int64_t t, float lse, float g, const Block& b) {
  float th;
  const float z = transform<kCap>(to_f32(raw), b.inv_t, b.cap, th);
  float d = g * b.inv_t * ((j == t ? 1.f : 0.f) - __expf(z - lse));
  if (kCap) d *= 1.f - th * th;
  return from_f32<T>(d);
}

template <typename T, bool kCap, bool kVec>
__global__ void __launch_bounds__(kThreads) grad_kernel(Block b, const float* lse_p, const float* g_p, T* dst,
                                                        int64_t ds) {
  const int64_t row = blockIdx.x;
  const int64_t label = b.labels[row];
  const bool ignored = label == b.ignore_index;
  const int64_t t = label - b.vocab_start;
  const float lse = ignored ? 0.f : lse_p[row];
  const float g = ignored ? 0.f : g_p[row];
  const T zero = from_f32<T>(0.f);  // ignored rows: exact zeros, whatever exp(z) would give
  const T* x = static_cast<const T*>(b.x) + row * b.x_stride;
  T* out = dst + row * ds;
  constexpr int kVecSize = Pack<T>::kSize;
  int64_t tail = 0;
  if (kVec) {
    tail = b.w - b.w % kVecSize;
    for (int64_t j0 = int64_t(threadIdx.x) * kVecSize; j0 < tail; j0 += int64_t(kThreads) * kVecSize) {
      const Pack<T> p = *reinterpret_cast<const Pack<T>*>(x + j0);
      Pack<T> q;
#pragma unroll
      for (int k = 0; k < kVecSize; ++k) q.v[k] = ignored ? zero : dlogit<T, kCap>(p.v[k], j0 + k, t, lse, g, b);
      *reinterpret_cast<Pack<T>*>(out + j0) = q;
    }
  }
  for (int64_t j = tail + threadIdx.x; j < b.w; j += kThreads) {
    out[j] = ignored ? zero : dlogit<T, kCap>(x[j], j, t, lse, g, b);
  }
}

// 16-byte vectors need 16-byte aligned rows.
template <typename T>
bool vectorizable(const void* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * sizeof(T)) % 16 == 0;
}

template <typename T>
cudaError_t fold_typed(const Block& b, int flags, float* state, int64_t ss, cudaStream_t stream) {
  const bool vec = vectorizable<T>(b.x, b.x_stride);
  const dim3 grid(static_cast<unsigned>(b.n));
  if (b.cap > 0.f) {
    if (vec) fold_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(b, flags, state, ss);
    else fold_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(b, flags, state, ss);
  } else {
    if (vec) fold_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(b, flags, state, ss);
    else fold_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(b, flags, state, ss);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_typed(const Block& b, const float* lse, const float* g, void* dst, int64_t ds,
                       cudaStream_t stream) {
  const bool vec = vectorizable<T>(b.x, b.x_stride) && vectorizable<T>(dst, ds);
  const dim3 grid(static_cast<unsigned>(b.n));
  T* out = static_cast<T*>(dst);
  if (b.cap > 0.f) {
    if (vec) grad_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(b, lse, g, out, ds);
    else grad_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(b, lse, g, out, ds);
  } else {
    if (vec) grad_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(b, lse, g, out, ds);
    else grad_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(b, lse, g, out, ds);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fold(DType dtype, const Block& block, int flags, float* state, int64_t state_stride,
                        cudaStream_t stream) {
  if (block.n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: return fold_typed<float>(block, flags, state, state_stride, stream);
    case DType::kBFloat16: return fold_typed<__nv_bfloat16>(block, flags, state, state_stride, stream);
    case DType::kHalf: return fold_typed<__half>(block, flags, state, state_stride, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad(DType dtype, const Block& block, const float* lse, const float* grad_logps, void* dst,
                        int64_t dst_stride, cudaStream_t stream) {
  if (block.n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: return grad_typed<float>(block, lse, grad_logps, dst, dst_stride, stream);
    case DType::kBFloat16: return grad_typed<__nv_bfloat16>(block, lse, grad_logps, dst, dst_stride, stream);
    case DType::kHalf: return grad_typed<__half>(block, lse, grad_logps, dst, dst_stride, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dpo_ds
