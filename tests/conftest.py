import os
import tempfile

# librosa's numba functions cache compiled code next to the installed package; two pytest
# workers compiling at once on a fresh install can leave a corrupt cache that segfaults the
# next pyin call. Each worker (and the CLI subprocesses it starts) gets its own cache folder.
# Set before anything imports numba; workers must not inherit the controller's folder.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker or "NUMBA_CACHE_DIR" not in os.environ:
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"numba-{_worker or 'main'}-")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run tiny models: threads gain nothing, and on a busy machine OpenMP barriers cost
# dearly (a tiny step took 100x longer with 2 threads than with 1). Subprocesses (CLI tests)
# inherit the environment variable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
