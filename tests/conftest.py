"""Test-wide environment: quiet TF, no Prefect analytics, a private PREFECT_HOME and XLA cache
per run."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="deepfusion-prefect-home-"))
# One persistent XLA cache for this test process and the CLI subprocesses it starts: the crash
# and resume tests run the same program several times, and compiling it is most of their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="deepfusion-jax-cache-"))

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout: missing data fails under CI=true, skips locally."""
    if not (SHARED_DATA / "c4" / "en").is_dir():
        message = f"real test data not found at {SHARED_DATA} (expected ../shared/data)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


# The longest files first: with `--dist loadfile` each goes whole to one worker, and starting
# them last left one worker idle for minutes at the end of the suite.
LONGEST_FIRST = ("test_train.py", "test_pipeline.py", "test_flows.py", "test_glue_report.py",
                 "test_distributed.py",
                 "test_concurrency.py", "test_train_checkpoint.py", "test_disk_full.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)
