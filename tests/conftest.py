"""Shared test configuration: deterministic seeds and a modest, deadline-free hypothesis profile."""
from __future__ import annotations

import os
import random
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    # no GPU: nerofy's Triton kernels run under triton's interpreter on CPU tensors (tests/test_triton.py).
    # It must be set before triton is first imported (its own library functions read it then).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "nerofy",
    max_examples=25,
    deadline=None,
    derandomize=True,  # same examples every run: the suite is deterministic
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("nerofy"), max_examples=300, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nerofy"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state and the default dtype."""
    torch.manual_seed(0)
    random.seed(0)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def single_thread():
    """Long loops of tiny ops (training a small model): one intra-op thread is as fast on an idle
    machine and far faster on a loaded one (no spinning worker threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def quiet_single_thread(single_thread):
    """Building and checking zoo models: one thread (see single_thread), and the libraries'
    deprecation and config warnings silenced (a module asks for it with an autouse fixture)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
