#include "gae.h"

// c10's stream/guard headers rather than ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack (and this kernel does not use).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// One thread per row: the time recursion is sequential, rows are independent. Coalescing across
// threads is poor (stride T), but the kernel is bandwidth-trivial next to the model; the Triton
// backend adds a time-parallel scan for few long rows.
__global__ void gae_kernel(const float* __restrict__ r, const float* __restrict__ v, const bool* __restrict__ m,
                           float* __restrict__ adv, float* __restrict__ ret, int64_t B, int64_t T, float g, float gl) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t o = b * T;
  float next_v = 0.f, next_a = 0.f;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (!m[o + t]) { adv[o + t] = 0.f; ret[o + t] = 0.f; continue; }
    const float val = v[o + t];
    next_a = r[o + t] + g * next_v - val + gl * next_a;
    next_v = val;
    adv[o + t] = next_a;
    ret[o + t] = next_a + val;
  }
}

std::vector<torch::Tensor> gae_cuda(torch::Tensor rewards, torch::Tensor values, torch::Tensor mask, double gamma, double lam) {
  TORCH_CHECK(rewards.is_cuda(), "gae_cuda: rewards must be a CUDA tensor");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat, "gae_cuda: rewards/values must be float32");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae_cuda: mask must be bool");
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(), "gae_cuda: shapes must be equal [B, T]");
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  auto adv = torch::empty_like(r), ret = torch::empty_like(r);
  const int64_t B = r.size(0), T = r.size(1);
  if (B == 0 || T == 0) return {adv, ret};
  const int threads = 128;
  const int blocks = static_cast<int>((B + threads - 1) / threads);
  gae_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      r.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<bool>(), adv.data_ptr<float>(), ret.data_ptr<float>(), B, T,
      static_cast<float>(gamma), static_cast<float>(gamma * lam));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}
