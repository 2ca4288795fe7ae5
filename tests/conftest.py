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
TEST_DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
    """tests/data: the reference fixtures (sources in tests/data/README.md).

    They are part of the repository, so a missing folder or file is a failure, never a skip.
    """
    if not TEST_DATA.is_dir():
        pytest.fail(f"test fixtures folder {TEST_DATA} is missing (it is part of the repository)")
    return TEST_DATA
