"""Test-wide environment: quiet TF, no Prefect analytics, a private PREFECT_HOME per run."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="deepfusion-prefect-home-"))

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
