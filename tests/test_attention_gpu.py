"""GPU-only (skipped elsewhere): the fused kernels (cuDNN, Pallas Triton, Pallas Mosaic) match the fp32 reference
in bf16, forward and, where the kernel has one, backward, through the bench's own measurement. Run first by
bench/gpu_attention.sh."""

import jax
import pytest

from mgr.methods import attention as A

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", A.FUSED)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("grad", [False, True])
def test_fused_kernel_matches_reference_in_bf16(name, causal, grad):
    problem = A.Problem(B=2, T=256, H=4, G=2, K=128, causal=causal, window=None, dtype="bfloat16")
    args = A.make_inputs(problem, seed=0)
    row = A.measure_kernel(name, problem, args, A.reference(problem, args), grad=grad, iters=2, warmup=1)
    if not row["available"] and row["reason"].startswith(("needs a Hopper", "JAX's Mosaic kernel has no causal")):
        pytest.skip(row["reason"])
    assert row["available"], row["reason"]
    assert row["rel_err"] <= A.DEFAULT_TOL["bfloat16"], row
    assert row["flops_source"] == "analytic (custom call)" and row["executed_flops"] > 0


def test_cudnn_sliding_window_matches_reference():
    problem = A.Problem(B=1, T=512, H=4, G=4, K=64, causal=True, window=128, dtype="bfloat16")
    args = A.make_inputs(problem, seed=1)
    row = A.measure_kernel("cudnn", problem, args, A.reference(problem, args), grad=True, iters=2, warmup=1)
    assert row["available"], row["reason"]
    assert row["rel_err"] <= A.DEFAULT_TOL["bfloat16"], row
