"""Multi-process sampling through ``jax.distributed``: two local processes, 2 CPU devices each.

Both processes run the same ``rwmh.sample(..., devices="all")`` over the 4 global devices;
process 0 gathers the draws and writes them. They must match the same run in one process.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
import scale_worker
from _scale_helpers import start_worker

import rwmh

TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_two_processes(role, out):
    """Run ``scale_worker.py ROLE OUT PORT ID`` as processes 0 and 1; fail with a process's
    stderr if it fails."""
    port = _free_port()
    processes = [start_worker(role, out, port, process_id, num_devices=2) for process_id in (0, 1)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        # Whatever happened (a hang in a collective, a timeout), no process outlives the test.
        for process in processes:
            if process.poll() is None:
                process.kill()
        errors = [process.communicate()[1] for process in processes]
    for process_id, (process, stderr) in enumerate(zip(processes, errors, strict=True)):
        assert process.returncode == 0, f"process {process_id} failed:\n{stderr[-3000:]}"


def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "distributed.npz"
    _run_two_processes("distributed", out)
    single = rwmh.sample(
        jax.random.key(7),
        scale_worker.regression_logdensity,
        scale_worker.initial_regression(8),
        **scale_worker.DISTRIBUTED_RUN,
    )
    with np.load(out) as distributed:
        assert int(distributed["state_devices"]) == 4
        assert distributed["positions"].shape == (8, 50, 3)
        np.testing.assert_allclose(distributed["step_size"], single.parameters["step_size"], 1e-5)
        np.testing.assert_allclose(distributed["positions"], single.positions, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(distributed["lp"], single.stats["lp"], rtol=1e-5)


def test_every_process_stops_at_the_same_draw(tmp_path):
    """``until=``: the processes decide from the same gathered draws (and process 0's decision
    is broadcast), so all stop at one draw, the one the single-process run stops at."""
    out = tmp_path / "until"
    _run_two_processes("distributed_until", out)
    single = scale_worker.until_run()
    stops = []
    for process_id in (0, 1):
        with np.load(f"{out}.{process_id}.npz") as run:
            stops.append((int(run["draw"]), int(run["num_draws"]), list(run["checks"])))
            np.testing.assert_allclose(run["positions"], single.positions, rtol=1e-5, atol=1e-5)
    expected = single.extra["stop"]["draw"]
    assert single.extra["stop"]["reason"] == "converged"
    assert stops[0] == stops[1]
    assert stops[0][:2] == (expected, expected)


def test_two_processes_write_and_resume_one_store(tmp_path):
    """``store=``: process 0 writes the store, the run stops after a few commits in both
    processes, and both resume from the store to the draws of the one-process run."""
    out = tmp_path / "store"
    _run_two_processes("distributed_store", out)
    single = rwmh.sample(
        jax.random.key(7),
        scale_worker.regression_logdensity,
        scale_worker.initial_regression(8),
        **scale_worker.DISTRIBUTED_RUN,
    )
    for process_id in (0, 1):
        with np.load(f"{out}.{process_id}.npz") as run:
            assert 0 < int(run["partial_draws"]) < 50
            np.testing.assert_allclose(run["positions"], single.positions, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(run["lp"], single.stats["lp"], rtol=1e-5)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".store")]
