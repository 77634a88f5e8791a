"""Builds the optional C++/CUDA extension ``rlhf_fast._C``.

The C++ GAE is always built; the CUDA kernel is added only when the installed torch is a CUDA build and
nvcc is found, so the same ``pip install`` gives a CPU build here and a CUDA build on a GPU machine.
Set ``RLHF_FAST_NO_EXT=1`` to skip the extension entirely (the library falls back to PyTorch).
"""
import os

from setuptools import find_packages, setup

packages = find_packages(include=["rlhf_fast", "rlhf_fast.*"]) + ["rlhf_fast_kernels"]
package_dir = {"rlhf_fast_kernels": "kernels"}  # kernels/ installs under a collision-free name
ext_modules, cmdclass = [], {}

if os.environ.get("RLHF_FAST_NO_EXT") != "1":
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/bindings.cpp", "csrc/gae_cpu.cpp"]
    define_macros = []
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        sources.append("csrc/gae_cuda.cu")
        define_macros.append(("RLHF_FAST_WITH_CUDA", None))
        Ext = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]}
    else:
        Ext = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    ext_modules.append(
        Ext("rlhf_fast._C", sources, define_macros=define_macros, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    )
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"rlhf_fast": ["assets/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
