"""Fixtures for every test file. The shared helpers are in ``support.py``.

No fixture resets Dynamo: a compiled model must compress the same way whatever the process compiled before,
so the tests run one after another in one process, as a user's notebook does."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: two workers share the CI's two cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def quiet_known_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eos_token_id.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield
