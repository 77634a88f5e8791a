#include "gae.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_fast C++/CUDA ops";
  m.def("gae_cpu", &gae_cpu, "masked GAE on CPU (rows in parallel)");
#ifdef RLHF_FAST_WITH_CUDA
  m.def("gae_cuda", &gae_cuda, "masked GAE on CUDA (one thread per row)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
