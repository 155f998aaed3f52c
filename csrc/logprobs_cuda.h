// Launchers of the CUDA log-prob kernels (logprobs_cuda.cu). Plain C++ and the
// CUDA runtime only, so the .cu file compiles with nvcc without torch headers
// and the torch binding (logprobs_cuda.cpp) compiles with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dpo_ds {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Number of fp32 statistics per row and their order (see dpo_ds/ops/fused.py).
constexpr int kNumStats = 7;
enum Flag : int { kEntropy = 1, kTop1 = 2, kMean = 4, kLssp = 8 };

// A [n, w] block of raw logits with unit column stride; row i's label is
// labels[i], column j is vocabulary id vocab_start + j.
struct Block {
  const void* x;
  int64_t x_stride;
  int64_t n;
  int64_t w;
  const int64_t* labels;
  int64_t ignore_index;
  int64_t vocab_start;
  float inv_t;  // 1 / temperature
  float cap;    // softcap, 0 for none
};

// Fold every non-ignored row into state ([kNumStats, state_stride] fp32).
cudaError_t launch_fold(DType dtype, const Block& block, int flags, float* state, int64_t state_stride,
                        cudaStream_t stream);

// dst[i, j] = grad_logps[i] * d logp_i / d x[i, j] (zeros on ignored rows); dst may alias x.
cudaError_t launch_grad(DType dtype, const Block& block, const float* lse, const float* grad_logps, void* dst,
                        int64_t dst_stride, cudaStream_t stream);

}  // namespace dpo_ds
