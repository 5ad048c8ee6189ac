import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """In-process tests on one thread, as the CLI runs (OMP_NUM_THREADS=1): with tiny matrices,
    OpenMP spin-waiting makes two threads up to 40x slower on a busy 2-core machine. A module opts
    in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
