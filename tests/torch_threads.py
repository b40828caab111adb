"""A fixture that runs a test with one torch thread, as the preprocessing tasks do; import it into a test module
(with autouse it then applies to every test there)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Multi-threaded small ops stall on a loaded shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
