"""Running :mod:`scale_worker` in a child process with the rwmh under test."""

from __future__ import annotations

import os
import subprocess
import sys

import rwmh

WORKER = os.path.join(os.path.dirname(__file__), "scale_worker.py")
SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(rwmh.__file__)))


def worker_env(num_devices: int | None = None) -> dict:
    """The environment of a child: this rwmh first on the path, and ``num_devices`` CPU
    devices (set before the child imports jax, the only time it is read)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE, env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if num_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def start_worker(*arguments, num_devices=None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, WORKER, *map(str, arguments)],
        env=worker_env(num_devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def run_worker(*arguments, num_devices=None, timeout=120) -> str:
    """Run a worker to completion; return its stdout, or fail with its stderr."""
    process = start_worker(*arguments, num_devices=num_devices)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    if process.returncode != 0:
        raise AssertionError(f"worker {arguments} failed ({process.returncode}):\n{stderr}")
    return stdout


def interrupt_on_call(monkeypatch, module, name, call):
    """Make the ``call``-th call of ``module.name`` raise KeyboardInterrupt, as Ctrl-C
    arriving while the driver dispatches that chunk."""
    original = getattr(module, name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
