"""A spawned child hears of its parent's death: real processes, a real kill -9."""

import subprocess
import sys
import time

# The parent spawns the child, then waits to be killed; the child records the signal it gets.
PARENT = """
import signal, sys, time
from deepfusion_core.processes import spawn
spawn([sys.executable, "-c", sys.argv[1], sys.argv[2]], signal.SIGTERM)
time.sleep(120)
"""
CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def heard(signum, _frame):
    out.write_text(str(signum))
    sys.exit(0)
signal.signal(signal.SIGTERM, heard)
out.with_suffix(".ready").touch()
time.sleep(120)
"""


def wait_for(path, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_child_gets_the_chosen_signal_when_its_parent_is_killed_outright(tmp_path):
    out = tmp_path / "signal"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(out)])
    try:
        wait_for(out.with_suffix(".ready"))
        assert not out.exists()  # nothing signals it while the parent lives
        parent.kill()
        parent.wait()
        wait_for(out, timeout_s=10.0)
        assert out.read_text() == "15"
    finally:
        parent.kill()
