"""Shared test fixtures.

Eight fake CPU devices are configured before JAX is imported so that sharding tests can
build a real mesh; single-device code simply runs on device 0.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    """`../shared/data` beside the repository, or $FISAO_SHARED_DATA."""
    return pathlib.Path(os.environ.get("FISAO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared resource data not found at {path} (set FISAO_SHARED_DATA)")
    return path
