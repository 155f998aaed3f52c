// Fused per-token log-prob statistics on CPU.
//
// Two kernels over a [n, w] block of raw logits: a whole logits matrix, or one
// [tokens, vocab] tile of hidden @ weight.T whose first column is vocabulary id
// `vocab_start`. `fold` streams each row once and folds it into running
// online-log-sum-exp statistics (state, fp32, layout in `Stat`); `grad` writes
// d logp(label) / d raw logit, reading each element once and writing it once.
// Rows run in parallel (ATen's OpenMP pool); the inner loops work on a small
// fp32 block in L1 and are written so the compiler vectorizes them, which is
// why exp and tanh are branch-free polynomials here rather than libm calls.
//
// The fused LM head (`linear_fold`, `linear_grad`) gives each thread its own
// tiles: it projects a cache-sized [rows, cols] tile with a single-threaded
// ATen matmul and folds or differentiates it while it is still in cache, so
// threads never wait on each other inside a matmul.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;
// State rows: running max m, sum e^(z-m), sum e^(z-m)(z-m), sum e^(2(z-m)),
// sum z, max z over ids before the label, z at the label.
enum Stat : int64_t { kM = 0, kS, kX, kSQ, kZS, kMBT, kZT, kNumStats };
enum Flag : int64_t { kEntropy = 1, kTop1 = 2, kMean = 4, kLssp = 8 };

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Cephes expf (about 2 ulp); clamped so the exponent bits never overflow.
[[gnu::always_inline]] inline float vexp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float round_magic = 12582912.f;  // 1.5 * 2^23: x + it - it rounds x
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// tanh(y) = 1 - 2 / (e^{2y} + 1): saturates to +-1 through the clamped exp.
[[gnu::always_inline]] inline float vtanh(float y) { return 1.f - 2.f / (vexp(2.f * y) + 1.f); }

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return from_bits(static_cast<uint32_t>(v.x) << 16); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

inline void store(float* dst, float v) { *dst = v; }
inline void store(c10::BFloat16* dst, float v) {
  const uint32_t u = to_bits(v);  // round to nearest even, NaN stays NaN
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  dst->x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
inline void store(c10::Half* dst, float v) { *dst = c10::Half(v); }

struct Params {
  float inv_t;    // 1 / temperature
  float cap;      // softcap (unused unless kCap)
  int64_t flags;  // Flag bits: optional statistics to accumulate
};

// z = (cap * tanh(x / cap)) / T, or x / T without softcap.
template <bool kCap>
inline float transform(float x, const Params& p) {
  return kCap ? p.cap * vtanh(x / p.cap) * p.inv_t : x * p.inv_t;
}

template <typename T, bool kCap>
void fold_row(const T* x, int64_t w, int64_t label, const Params& p, float* st, int64_t ss) {
  float m = st[kM * ss], s = st[kS * ss], xs = st[kX * ss], sq = st[kSQ * ss];
  float zs = st[kZS * ss], mbt = st[kMBT * ss], zt = st[kZT * ss];
  alignas(64) float z[kBlock];
  alignas(64) float e[kBlock];
  for (int64_t b0 = 0; b0 < w; b0 += kBlock) {
    const int64_t len = std::min(kBlock, w - b0);
    float bmax = -std::numeric_limits<float>::infinity();
    float bsum = 0.f;
#pragma omp simd reduction(max : bmax) reduction(+ : bsum)
    for (int64_t j = 0; j < len; ++j) {
      const float v = transform<kCap>(to_f32(x[b0 + j]), p);
      z[j] = v;
      bmax = v > bmax ? v : bmax;
      bsum += v;
    }
    zs += bsum;
    const int64_t t = label - b0;
    if (t >= 0 && t < len) {
      zt = z[t];
      if (p.flags & kTop1) {
        float before = mbt;
#pragma omp simd reduction(max : before)
        for (int64_t j = 0; j < t; ++j) before = z[j] > before ? z[j] : before;
        mbt = before;
      }
    } else if (t >= len && (p.flags & kTop1)) {
      mbt = std::max(mbt, bmax);
    }
    if (bmax > m) {  // rescale the running sums to the new max
      const float a = std::exp(m - bmax);
      xs = s > 0.f ? a * (xs + (m - bmax) * s) : 0.f;
      s *= a;
      sq *= a * a;
      m = bmax;
    }
    float es = 0.f;
#pragma omp simd reduction(+ : es)
    for (int64_t j = 0; j < len; ++j) {
      e[j] = vexp(z[j] - m);
      es += e[j];
    }
    s += es;
    if (p.flags & kEntropy) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < len; ++j) acc += e[j] * (z[j] - m);
      xs += acc;
    }
    if (p.flags & kLssp) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < len; ++j) acc += e[j] * e[j];
      sq += acc;
    }
  }
  st[kM * ss] = m;
  st[kS * ss] = s;
  st[kX * ss] = xs;
  st[kSQ * ss] = sq;
  st[kZS * ss] = zs;
  st[kMBT * ss] = mbt;
  st[kZT * ss] = zt;
}

// d logp / dx_j = g * (1[j = label] - p_j) * dz/dx_j, p_j = exp(z_j - lse).
template <typename T, bool kCap>
void grad_row(const T* x, T* dst, int64_t w, int64_t label, float lse, float g, const Params& p) {
  const bool has_label = label >= 0 && label < w;
  const float x_label = has_label ? to_f32(x[label]) : 0.f;  // dst may alias x
  const float g_t = g * p.inv_t;
  alignas(64) float d[kBlock];
  for (int64_t b0 = 0; b0 < w; b0 += kBlock) {
    const int64_t len = std::min(kBlock, w - b0);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float v = to_f32(x[b0 + j]);
      const float th = kCap ? vtanh(v / p.cap) : 0.f;
      const float z = kCap ? p.cap * th * p.inv_t : v * p.inv_t;
      d[j] = -vexp(z - lse) * (kCap ? g_t * (1.f - th * th) : g_t);
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) store(dst + b0 + j, d[j]);
  }
  if (has_label) {
    const float th = kCap ? vtanh(x_label / p.cap) : 0.f;
    const float z = kCap ? p.cap * th * p.inv_t : x_label * p.inv_t;
    const float d = kCap ? g_t * (1.f - th * th) : g_t;
    store(dst + label, (1.f - vexp(z - lse)) * d);
  }
}

template <typename T>
void zero_row(T* dst, int64_t w) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) store(dst + j, 0.f);
}

void check_block(const at::Tensor& x, const at::Tensor& labels, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(), what, ": expects CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": logits must be 2-D with unit last stride");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              what, ": labels must be a contiguous int64 vector with one entry per row");
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", dtype, " (float32, bfloat16, float16)");
  }
}

void fold(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index, int64_t vocab_start,
          double inv_t, double cap, int64_t flags, at::Tensor& state) {
  check_block(x, labels, "fold");
  const int64_t n = x.size(0), w = x.size(1);
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 2 && state.size(0) == kNumStats &&
                  state.size(1) == n && state.stride(1) == 1,
              "fold: state must be float32 [", kNumStats, ", ", n, "] with unit last stride");
  const Params p{static_cast<float>(inv_t), static_cast<float>(cap), flags};
  const int64_t* lab = labels.data_ptr<int64_t>();
  float* st = state.data_ptr<float>();
  const int64_t ss = state.stride(0), xs = x.stride(0);
  dispatch_dtype(x.scalar_type(), "fold", [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(x.data_ptr());
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (lab[i] == ignore_index) continue;
        if (cap > 0) {
          fold_row<T, true>(base + i * xs, w, lab[i] - vocab_start, p, st + i, ss);
        } else {
          fold_row<T, false>(base + i * xs, w, lab[i] - vocab_start, p, st + i, ss);
        }
      }
    });
  });
}

void grad(const at::Tensor& x, const at::Tensor& labels, int64_t ignore_index, int64_t vocab_start,
          const at::Tensor& lse, const at::Tensor& grad_logps, double inv_t, double cap, at::Tensor& dst) {
  check_block(x, labels, "grad");
  const int64_t n = x.size(0), w = x.size(1);
  TORCH_CHECK(dst.sizes() == x.sizes() && dst.stride(1) == 1 && dst.scalar_type() == x.scalar_type(),
              "grad: dst must match logits in shape and dtype with unit last stride");
  for (const auto* v : {&lse, &grad_logps}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == n && v->is_contiguous(),
                "grad: lse and grad_logps must be contiguous float32 vectors of length ", n);
  }
  const Params p{static_cast<float>(inv_t), static_cast<float>(cap), 0};
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* g_p = grad_logps.data_ptr<float>();
  const int64_t xs = x.stride(0), ds = dst.stride(0);
  dispatch_dtype(x.scalar_type(), "grad", [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x.data_ptr());
    T* out = static_cast<T*>(dst.data_ptr());
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (lab[i] == ignore_index) {
          zero_row(out + i * ds, w);
        } else if (cap > 0) {
          grad_row<T, true>(src + i * xs, out + i * ds, w, lab[i] - vocab_start, lse_p[i], g_p[i], p);
        } else {
          grad_row<T, false>(src + i * xs, out + i * ds, w, lab[i] - vocab_start, lse_p[i], g_p[i], p);
        }
      }
    });
  });
}


void check_linear(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels, const char* what) {
  for (const at::Tensor* t : {&h, &w}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(),
                what, ": hidden and weight must be contiguous 2-D float32 CPU tensors");
  }
  TORCH_CHECK(h.size(1) == w.size(1), what, ": hidden and weight differ in H");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == w.size(0)),
              what, ": bias must be float32 [V]");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == h.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_contiguous(),
              what, ": labels must be a contiguous int64 vector with one entry per row");
}

// hidden[r0:r0+nr] @ weight[c0:c0+nc].T (+ bias) as a contiguous fp32 tile carved from buf.
at::Tensor project(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t r0,
                   int64_t nr, int64_t c0, int64_t nc, at::Tensor& buf) {
  at::Tensor tile = buf.narrow(0, 0, nr * nc).view({nr, nc});
  at::mm_out(tile, h.narrow(0, r0, nr), w.narrow(0, c0, nc).t());
  if (bias) tile.add_(bias->narrow(0, c0, nc));
  return tile;
}

// Threads own blocks of `rows` tokens and walk the whole vocabulary, `cols` ids at a time.
void linear_fold(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                 const at::Tensor& labels, double inv_t, double cap, int64_t flags, at::Tensor& state, int64_t rows,
                 int64_t cols) {
  check_linear(h, w, bias, labels, "linear_fold");
  const int64_t n = h.size(0), vocab = w.size(0);
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 2 && state.size(0) == kNumStats &&
                  state.size(1) == n && state.stride(1) == 1,
              "linear_fold: state must be float32 [", kNumStats, ", ", n, "] with unit last stride");
  const Params p{static_cast<float>(inv_t), static_cast<float>(cap), flags};
  const int64_t* lab = labels.data_ptr<int64_t>();
  float* st = state.data_ptr<float>();
  const int64_t ss = state.stride(0);
  at::parallel_for(0, (n + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = at::empty({rows * cols}, h.options());
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * rows, nr = std::min(rows, n - r0);
      for (int64_t c0 = 0; c0 < vocab; c0 += cols) {
        const int64_t nc = std::min(cols, vocab - c0);
        const float* t = project(h, w, bias, r0, nr, c0, nc, buf).data_ptr<float>();
        for (int64_t i = 0; i < nr; ++i) {
          if (cap > 0) {
            fold_row<float, true>(t + i * nc, nc, lab[r0 + i] - c0, p, st + r0 + i, ss);
          } else {
            fold_row<float, false>(t + i * nc, nc, lab[r0 + i] - c0, p, st + r0 + i, ss);
          }
        }
      }
    }
  });
}

// fp32 gradients {hidden, weight, bias} (undefined where not wanted). Threads own blocks of `cols`
// vocabulary ids, so the weight and bias gradients need no reduction; each thread adds its share of
// the hidden gradient into its own accumulator (thread 0: the gradient itself), summed at the end of
// each token chunk. Chunks are as long as the accumulators of all threads fit in `acc_bytes`.
std::vector<at::Tensor> linear_grad(const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& grad_logps,
                                    double inv_t, double cap, bool want_h, bool want_w, bool want_b, int64_t rows,
                                    int64_t cols, int64_t acc_bytes) {
  check_linear(h, w, bias, labels, "linear_grad");
  const int64_t n = h.size(0), hid = h.size(1), vocab = w.size(0);
  for (const auto* v : {&lse, &grad_logps}) {
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->dim() == 1 && v->size(0) == n && v->is_contiguous(),
                "linear_grad: lse and grad_logps must be contiguous float32 vectors of length ", n);
  }
  const Params p{static_cast<float>(inv_t), static_cast<float>(cap), 0};
  const int64_t* lab = labels.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* g_p = grad_logps.data_ptr<float>();
  const auto f32 = h.options();
  at::Tensor gh = want_h ? at::zeros({n, hid}, f32) : at::Tensor();
  at::Tensor gw = want_w ? at::zeros({vocab, hid}, f32) : at::Tensor();
  at::Tensor gb = want_b ? at::zeros({vocab}, f32) : at::Tensor();
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max(rows, acc_bytes / (threads * std::max<int64_t>(hid, 1) * 4) / rows * rows);
  for (int64_t t0 = 0; t0 < n; t0 += chunk) {
    const int64_t nt = std::min(chunk, n - t0);
    at::Tensor rows_of_gh = want_h ? gh.narrow(0, t0, nt) : at::Tensor();
    // Thread 0 adds into the gradient itself, the others into their own accumulators.
    at::Tensor acc = want_h && threads > 1 ? at::zeros({threads - 1, nt, hid}, f32) : at::Tensor();
    at::parallel_for(0, (vocab + cols - 1) / cols, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buf = at::empty({rows * cols}, f32);
      const int64_t tid = at::get_thread_num();
      at::Tensor mine = !want_h ? at::Tensor() : tid == 0 ? rows_of_gh : acc.select(0, tid - 1);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t c0 = block * cols, nc = std::min(cols, vocab - c0);
        for (int64_t r0 = t0; r0 < t0 + nt; r0 += rows) {
          const int64_t nr = std::min(rows, t0 + nt - r0);
          at::Tensor tile = project(h, w, bias, r0, nr, c0, nc, buf);
          float* t = tile.data_ptr<float>();
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = r0 + i;
            if (cap > 0) {
              grad_row<float, true>(t + i * nc, t + i * nc, nc, lab[r] - c0, lse_p[r], g_p[r], p);
            } else {
              grad_row<float, false>(t + i * nc, t + i * nc, nc, lab[r] - c0, lse_p[r], g_p[r], p);
            }
          }
          if (want_w) gw.narrow(0, c0, nc).addmm_(tile.t(), h.narrow(0, r0, nr));
          if (want_b) gb.narrow(0, c0, nc).add_(tile.sum(0));
          if (want_h) mine.narrow(0, r0 - t0, nr).addmm_(tile, w.narrow(0, c0, nc));
        }
      }
    });
    if (acc.defined()) rows_of_gh.add_(acc.sum(0));
  }
  return {gh, gw, gb};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fold", &fold, "Fold a block of raw logits into per-row online-logsumexp statistics");
  m.def("grad", &grad, "Write d logp(label) / d raw logits for a block of raw logits");
  m.def("linear_fold", &linear_fold, "Fold hidden @ weight.T (+ bias) into the statistics, tile by tile");
  m.def("linear_grad", &linear_grad, "fp32 gradients of sum(grad_logps * logps) for hidden, weight, bias");
}
