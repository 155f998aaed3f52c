// Torch binding of the CUDA log-prob kernels (logprobs_cuda.cu). It takes the
// CUDA stream from Python as an integer handle, so it needs no c10/cuda
// headers and also compiles against a CPU-only torch (as CI checks).
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/utils/pybind.h>

#include "logprobs_cuda.h"

namespace {

dpo_ds::DType dtype_of(const at::Tensor& x, const char* what) {
  switch (x.scalar_type()) {
    case at::kFloat: return dpo_ds::DType::kFloat;
    case at::kBFloat16: return dpo_ds::DType::kBFloat16;
    case at::kHalf: return dpo_ds::DType::kHalf;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", x.scalar_type(), " (float32, bfloat16, float16)");
  }
}

dpo_ds::Block block_of(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index, int64_t vocab_start,
                       double inv_t, double cap, const char* what) {
  TORCH_CHECK(x.is_cuda() && labels.device() == x.device(), what, ": expects CUDA tensors on one device");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": logits must be 2-D with unit last stride");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              what, ": labels must be a contiguous int64 vector with one entry per row");
  return {x.data_ptr(), x.stride(0), x.size(0), x.size(1), labels.data_ptr<int64_t>(), ignore_index, vocab_start,
          static_cast<float>(inv_t), static_cast<float>(cap)};
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void fold(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index, int64_t vocab_start, double inv_t,
          double cap, int64_t flags, at::Tensor& state, int64_t stream) {
  const c10::DeviceGuard guard(x.device());
  const auto block = block_of(x, labels, ignore_index, vocab_start, inv_t, cap, "fold");
  TORCH_CHECK(state.device() == x.device() && state.scalar_type() == at::kFloat && state.dim() == 2 &&
                  state.size(0) == dpo_ds::kNumStats && state.size(1) == x.size(0) && state.stride(1) == 1,
              "fold: state must be float32 [", dpo_ds::kNumStats, ", ", x.size(0), "] with unit last stride");
  check(dpo_ds::launch_fold(dtype_of(x, "fold"), block, static_cast<int>(flags), state.data_ptr<float>(),
                            state.stride(0), reinterpret_cast<cudaStream_t>(stream)),
        "fold");
}

void grad(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index, int64_t vocab_start,
          const at::Tensor& lse, const at::Tensor& grad_logps, double inv_t, double cap, at::Tensor& dst,
          int64_t stream) {
  const c10::DeviceGuard guard(x.device());
  const auto block = block_of(x, labels, ignore_index, vocab_start, inv_t, cap, "grad");
  TORCH_CHECK(dst.device() == x.device() && dst.sizes() == x.sizes() && dst.stride(1) == 1 &&
                  dst.scalar_type() == x.scalar_type(),
              "grad: dst must match logits in device, shape and dtype with unit last stride");
  for (const auto* v : {&lse, &grad_logps}) {
    TORCH_CHECK(v->device() == x.device() && v->scalar_type() == at::kFloat && v->dim() == 1 &&
                    v->size(0) == x.size(0) && v->is_contiguous(),
                "grad: lse and grad_logps must be contiguous float32 vectors of length ", x.size(0));
  }
  check(dpo_ds::launch_grad(dtype_of(x, "grad"), block, lse.data_ptr<float>(), grad_logps.data_ptr<float>(),
                            dst.data_ptr(), dst.stride(0), reinterpret_cast<cudaStream_t>(stream)),
        "grad");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fold", &fold, "Fold a block of raw logits into per-row online-logsumexp statistics (CUDA)");
  m.def("grad", &grad, "Write d logp(label) / d raw logits for a block of raw logits (CUDA)");
}
