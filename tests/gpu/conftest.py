"""The device the CUDA-variant tests compare against the CPU.

Every test in this folder runs a computation on the CPU and on an accelerator and compares the two
(the CPU results are checked against independent references in the tests one level up). Without CUDA
the tests skip; ``LBO_GPU_TEST_DEVICE=cpu`` runs them against the CPU instead, which exercises the
test code itself (``benchmarks/gpu_check.py --device cpu --smoke`` does this).
"""

from __future__ import annotations

import os

import pytest
import torch

# cuBLAS is deterministic only with a fixed workspace; set before the first CUDA call of the process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICE_ENV = "LBO_GPU_TEST_DEVICE"


def accelerator_device() -> torch.device | None:
    """``$LBO_GPU_TEST_DEVICE`` if set, else ``cuda`` when available, else None."""
    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture
def device():
    """The accelerator under test, with fp32 math on it (no TF32) and deterministic kernels."""
    dev = accelerator_device()
    if dev is None:
        pytest.skip(f"no CUDA device (set {DEVICE_ENV}=cpu to run the comparison code against the CPU)")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # TF32 rounds fp32 matmuls/convolutions to 10 mantissa bits: the comparison is of fp32 against fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield dev
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """``||actual - expected|| <= rel * ||expected||`` (Frobenius), on the CPU in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err, scale = (a - e).norm().item(), e.norm().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: relative error {err / max(scale, 1e-30):.3g} > {rel:g}"
