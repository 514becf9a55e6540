"""Shared pytest fixtures."""

from pathlib import Path

import pytest
import torch

from caffelayers.sphereface import sphereface_prototxt as make_sphereface_prototxt

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny tensors, where torch's thread pool only adds contention: on a shared
    2-core machine one float64 gradcheck took 12 s with threads and 0.05 s without."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cases_dir() -> Path:
    """The Caffe reference cases (fixtures/caffe)."""
    return ROOT / "fixtures" / "caffe"


@pytest.fixture
def sphereface_prototxt():
    """The generator of SphereFace prototxts (:func:`caffelayers.sphereface.sphereface_prototxt`)."""
    return make_sphereface_prototxt


def _peak_allocation(step) -> int:
    """Most CPU memory allocated at once during ``step()``, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.fixture
def peak_allocation():
    """``peak_allocation(step) -> bytes``: the memory high-water mark of one call."""
    return _peak_allocation
