import os

import pytest
import torch

# The tests run tiny models: threads gain nothing, and on a busy machine OpenMP barriers cost
# dearly (a tiny step took 100x longer with 2 threads than with 1). Subprocesses (CLI tests)
# inherit the environment variable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
