#include "gae.h"

#include <ATen/Parallel.h>

#include <algorithm>

std::vector<torch::Tensor> gae_cpu(torch::Tensor rewards, torch::Tensor values, torch::Tensor mask, double gamma, double lam) {
  TORCH_CHECK(rewards.device().is_cpu(), "gae_cpu: rewards must be on the CPU");
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat, "gae_cpu: rewards/values must be float32");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae_cpu: mask must be bool");
  TORCH_CHECK(rewards.dim() == 2 && values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(), "gae_cpu: shapes must be equal [B, T]");
  auto r = rewards.contiguous(), v = values.contiguous(), m = mask.contiguous();
  auto adv = torch::zeros_like(r), ret = torch::zeros_like(r);
  const int64_t B = r.size(0), T = r.size(1);
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  const float *rp = r.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool *mp = m.data_ptr<bool>();
  float *ap = adv.data_ptr<float>(), *tp = ret.data_ptr<float>();
  // Rows are independent: split them across threads, each row one backward sweep. A thread gets at least
  // ~256k elements: below that, waking threads costs more than the sweep itself (~1 ns per element).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(T, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      float next_v = 0.f, next_a = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        if (!mp[o + t]) continue;  // skipped position: carry passes through untouched
        const float val = vp[o + t];
        next_a = rp[o + t] + g * next_v - val + gl * next_a;
        next_v = val;
        ap[o + t] = next_a;
        tp[o + t] = next_a + val;
      }
    }
  });
  return {adv, ret};
}
