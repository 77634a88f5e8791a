#!/usr/bin/env bash
# One lent-GPU call: install, then the ops tests on CUDA and/or the issue-3 benchmark, logs under $OUT.
#
#   make gpu-wheels                                        # here, once: Liger-Kernel and CCE as wheels in .whl/
#   benchmarks/gpu_session.sh tests                        # device call 1 (carry .whl)
#   BENCH_COMMIT=<hash> benchmarks/gpu_session.sh bench --tokens 4096   # call 2 (the copy there may lack .git)
#   BENCH_COMMIT=<hash> benchmarks/gpu_session.sh bench --tokens 16384 --ops logprobs ppo --ppo-chunks 256 1024 2048
#
# The machine has no network: the carried wheels go to a private target dir, the package is installed
# editable with the machine's own torch/triton (its CUDA extension built by nvcc on the spot).
set -euo pipefail
stage=${1:?usage: gpu_session.sh tests|bench [bench_ops.py args]}
shift
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The CUDA extension (csrc/) builds here with nvcc; should that fail, go on without it (the "cuda"/"cpp"
# backends then report n/a) rather than lose the call: the build log comes back in $OUT.
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    tail -20 "$out/install.log"
    echo "extension build failed: installing without it" >&2
    RLHF_FAST_NO_EXT=1 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$out/install.log" 2>&1 \
        || { tail -30 "$out/install.log"; exit 1; }
fi
python3 -c "import torch, triton, rlhf_fast.ops as o; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'torch', torch.__version__, 'triton', triton.__version__, 'backends', o.available_backends())"

case $stage in
tests)
    # Every op test is device-parametrized; the trainer tests need the CPU-side extras and stay on CI.
    python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_linear_ops.py tests/test_token_ops.py \
        tests/test_op_errors.py tests/test_bench_harness.py "$@" 2>&1 | tee "$out/tests.log"
    ;;
bench)
    python3 benchmarks/bench_ops.py --device cuda --out "$out/bench_ops_cuda.json" "$@" 2>"$out/bench.log"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
