import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One built-in corpus for every test of the session (built by the first run that needs it)."""
    return tmp_path_factory.mktemp("rrwkv-cache")


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models: on the CI machine's two busy cores, torch's thread pool
    costs more than it gives."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
