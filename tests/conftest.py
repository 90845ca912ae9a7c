import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One built-in corpus for every test of the session (built by the first run that needs it)."""
    return tmp_path_factory.mktemp("rrwkv-cache")
