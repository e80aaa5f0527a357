"""Shared test setup (helpers live in tests/helpers.py).

Without CUDA, Triton kernels run on the CPU through the interpreter: TRITON_INTERPRET must be set before
any @triton.jit function is created, so it is set here, before the tests import flashmaps.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _torch_global_state_restored():
    """A test must leave torch's process-wide switches as it found them: deterministic mode also decides
    flashmaps' ``deterministic=None`` (the atomic-dQ backward or not), so a leak would silently move every
    later test in the worker onto the other backward."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    yield
    after = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    assert after == before, f"torch's (deterministic mode, threads) went from {before} to {after} in this test"
