"""Multi-process (multi-host) JAX: one node as N cooperating processes.

A train node runs as N JAX processes when its devices span more than one host (a TPU slice,
several GPU machines) or, for testing, as N processes on one machine. Every process runs the
same `train()`; JAX's multi-controller runtime makes the mesh global, and Orbax saves and
restores the checkpoints from all of them.

How a process learns its place, in order:

1. `DEEPFUSION_COORDINATOR`, `DEEPFUSION_NUM_PROCESSES`, `DEEPFUSION_PROCESS_ID`: set by
   `launch_local` (`deepfusion train --processes N`), or by hand.
2. `DEEPFUSION_DISTRIBUTED=auto`: `jax.distributed.initialize()` with no arguments, so JAX
   reads the cluster itself (Cloud TPU VMs, SLURM, Open MPI, Kubernetes indexed jobs).
3. Neither: a single process.

On one machine the CPU devices are split between the processes (`launch_local` gives each
`--xla_force_host_platform_device_count` / N) and collectives go through gloo, so
2 processes x 4 devices form the same 8-device mesh as 1 process x 8.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import hashlib
import json
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from deepfusion_core.cache import cache_dir, keep
from deepfusion_core.processes import spawn

ENV_COORDINATOR = "DEEPFUSION_COORDINATOR"
ENV_NUM_PROCESSES = "DEEPFUSION_NUM_PROCESSES"
ENV_PROCESS_ID = "DEEPFUSION_PROCESS_ID"
ENV_AUTO = "DEEPFUSION_DISTRIBUTED"
ENV_TIMEOUT = "DEEPFUSION_COORDINATOR_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


class DistributedError(ValueError):
    """The processes of a node cannot form: counts that do not divide, a silent coordinator."""


def initialize_from_env() -> bool:
    """Join the node's process group if the environment says so; True if distributed.

    Must run before anything touches a JAX backend. A coordinator that does not answer within
    `DEEPFUSION_COORDINATOR_TIMEOUT_S` (default 120) raises `DistributedError`.
    """
    timeout = int(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    if os.environ.get(ENV_COORDINATOR):
        coordinator = os.environ[ENV_COORDINATOR]
        n, pid = int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
        if os.environ.get("JAX_PLATFORMS") == "cpu":  # set by launch_local
            import jax  # here, not at the top: planning counts devices without JAX (below)

            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            _keep_stdout_for_python()
        if pid != 0:  # process 0 hosts the coordinator; the others must reach it
            _wait_for_coordinator(coordinator, timeout)
        _initialize(coordinator, timeout, coordinator_address=coordinator, num_processes=n,
                    process_id=pid, initialization_timeout=timeout)
        return True
    if os.environ.get(ENV_AUTO) == "auto":
        _initialize("detected from the environment", timeout, initialization_timeout=timeout)
        return True
    return False


def _keep_stdout_for_python() -> None:
    # Gloo prints its connection chatter to file descriptor 1 from C++, which would mix it into
    # the command's machine-readable output. Point fd 1 at stderr; Python keeps the real stdout.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real_stdout, "w", buffering=1)


def _wait_for_coordinator(address: str, timeout: float) -> None:
    # JAX aborts the whole process (a C++ fatal error, no exception) when its coordinator
    # never answers; probing the port first turns that into a clear error.
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise DistributedError(f"coordinator {address} did not answer within "
                                       f"{timeout:g} s ({ENV_TIMEOUT})") from None
            time.sleep(0.5)


def _initialize(coordinator: str, timeout: int, **kwargs) -> None:
    import jax

    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises XlaRuntimeError/ValueError variants
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DistributedError(f"could not join the process group at coordinator {coordinator} "
                               f"within {timeout} s: {first}") from None


def local_cpu_device_count(env: dict[str, str]) -> int:
    """CPU devices this machine is set to expose (XLA_FLAGS), 1 by default."""
    m = _DEVICE_COUNT_FLAG.search(env.get("XLA_FLAGS", ""))
    return int(m[1]) if m else 1


def devices_here(processes: int) -> int | None:
    """The devices a train node of `processes` JAX processes gets when started on this
    machine; None where they cannot be counted before its processes join their group (a
    cluster host, DEEPFUSION_DISTRIBUTED=auto).

    One process: what JAX counts here, kept per boot and environment (`_counted_once`).
    Several: `launch_local` splits this machine's CPU devices between them, counted from the
    environment, since a process that is to join a group must not start its backend first.
    """
    env = dict(os.environ)
    if env.get(ENV_AUTO) and processes > 1:
        return None
    if env.get(ENV_COORDINATOR):  # one of the launched processes, before joining
        return processes * local_cpu_device_count(env)
    if processes > 1:
        return local_cpu_device_count(env)
    return _counted_once()


# Besides the hardware of this boot, what decides the devices a JAX process sees.
_DEVICE_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_PLATFORM_NAME", "CUDA_VISIBLE_DEVICES",
               "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
               "TPU_VISIBLE_CHIPS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_PROCESS_BOUNDS")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _counted_once() -> int:
    """`jax.device_count()`, kept in the cache per boot, jax version and `_DEVICE_ENV`.

    Counting imports JAX and starts its backend: 2 of a `deepfusion plan`'s 3 s, on every call.
    A process that has imported JAX counts and keeps its count. A count that went stale without
    a reboot (a device lost) misleads only the plan's checks: a train node checks its mesh
    against the devices it starts with. Without a boot id (not Linux) nothing is kept; an
    unreadable cache file is counted again.
    """
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = None
    key = json.dumps([boot, metadata.version("jax"), [os.environ.get(k) for k in _DEVICE_ENV]])
    path = cache_dir() / f"devices-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if boot is not None and "jax" not in sys.modules:  # with JAX here, counting is cheap
        try:
            devices = json.loads(path.read_text())["devices"]
            if type(devices) is int and devices > 0:
                return devices
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not counted yet, or unreadable: count again
    import jax

    devices = jax.device_count()
    if boot is not None:
        keep(path, lambda partial: partial.write_text(json.dumps({"devices": devices})))
    return devices


def check_processes(processes: int, devices: int, batch_size: int) -> None:
    """Raise `DistributedError` if `processes` does not divide the devices or the batch."""
    if processes < 1:
        raise DistributedError(f"--processes must be >= 1, not {processes}")
    if devices < processes:
        raise DistributedError(
            f"{processes} processes need at least {processes} CPU devices, this machine is set "
            f"to {devices}: set XLA_FLAGS=--xla_force_host_platform_device_count=D for local "
            f"CPU processes, or {ENV_AUTO}=auto on every host of a cluster")
    if devices % processes:
        raise DistributedError(f"--processes {processes} does not divide the {devices} devices "
                               f"of this machine (XLA_FLAGS device count)")
    if batch_size % processes:
        raise DistributedError(f"--processes {processes} does not divide the batch size "
                               f"{batch_size}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: Sequence[str], processes: int, devices: int,
                 poll_s: float = 0.2) -> int:
    """Run `argv` as `processes` cooperating JAX processes on this machine; their exit code.

    Each gets devices / processes CPU devices and the coordinator's address in its
    environment. If one process dies, the others are stopped at once (they would otherwise
    wait in a collective forever) and its exit code is returned. SIGTERM/SIGINT to the launcher are
    forwarded, so every process checkpoints before exiting.
    """
    port = _free_port()
    base = dict(os.environ, JAX_PLATFORMS="cpu")  # CPU processes; accelerators need a cluster
    flags = _DEVICE_COUNT_FLAG.sub("", base.get("XLA_FLAGS", "")).strip()
    base["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices // processes}"
    base.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes)})
    forwarded: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A launcher killed outright (OOM, a flow's timeout) must not leave its processes training.
        procs.extend(spawn(argv, signal.SIGKILL, env={**base, ENV_PROCESS_ID: str(i)})
                     for i in range(processes))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if all(c is not None for c in codes) or (failed and not forwarded):
                break  # after a forwarded signal, every process gets to save its checkpoint
            time.sleep(poll_s)
        if failed:
            # The others wait on the dead one inside a collective, where no Python handler
            # runs, and a save needs every process: a short grace, then SIGKILL (the last
            # complete checkpoint stands).
            _stop(procs, grace_s=1.0)
            return failed[0] if failed[0] > 0 else 128 - failed[0]  # -9 -> 137, as a shell
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _stop(procs)


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

