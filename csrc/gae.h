#pragma once
#include <torch/extension.h>

// Masked GAE (Schulman et al. 2016, eq. 11-16) over [B, T] rows. Positions with mask == 0 are skipped:
// the recursion runs on each row's valid positions only, the value after a row's last valid position is 0,
// and advantages/returns are 0 at masked positions. Inputs: float32, contiguous; mask: bool.
std::vector<torch::Tensor> gae_cpu(torch::Tensor rewards, torch::Tensor values, torch::Tensor mask, double gamma, double lam);
#ifdef RLHF_FAST_WITH_CUDA
std::vector<torch::Tensor> gae_cuda(torch::Tensor rewards, torch::Tensor values, torch::Tensor mask, double gamma, double lam);
#endif
