"""The one-step invariance test (tests/test_invariance.py) can fail: mutation tests.

Each test copies the installed ``rwmh`` package into ``tmp_path``, breaks one line of the
kernel with a plain string replace, and runs invariance cases in a subprocess whose
``PYTHONPATH`` puts the copy first. ``PYTHONPATH`` precedes site-packages, the ``.pth`` path of
an editable install and setuptools' editable finder (appended to ``sys.meta_path``, after the
path finder), so the copy wins in a development checkout and in a non-editable CI install
alike; the failure message names the kernel file that ran, and the control test checks the
import path directly.

Each mutation is a real Metropolis-Hastings bug. It runs one case that it breaks (every case
catches the first three; only the truncated target catches the last), and the control runs
those same cases on an unmutated copy, which must pass.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rwmh

INVARIANCE_TESTS = Path(__file__).with_name("test_invariance.py")
ACCEPTANCE_LINE = "is_accepted = admissible & (log_uniform < log_ratio)"

MUTATIONS = [
    # Accepts with probability min(1, r^2): the chain targets pi^2, too narrow.
    pytest.param(
        "log_uniform < log_ratio",
        "log_uniform < 2 * log_ratio",
        "gaussian-dense",
        id="ratio-squared",
    ),
    # Accepts with probability min(1, sqrt(r)): the chain targets sqrt(pi), too wide.
    pytest.param(
        "log_uniform < log_ratio",
        "log_uniform < 0.5 * log_ratio",
        "banana-diagonal",
        id="ratio-square-root",
    ),
    # An off-by-one index: the acceptance uniform reuses the first proposal normal, so the
    # accept decision depends on the direction of the move (each is uniform or normal alone).
    pytest.param(
        "extra = noise[dimension]",
        "extra = noise[0]",
        "banana-dense",
        id="uniform-reuses-proposal-noise",
    ),
    # "Sanitising" a non-finite ratio to 0 accepts every out-of-support (-inf) proposal.
    # Dropping only ``admissible &`` would not be a bug here: ``log u < -inf`` is False, and a
    # NaN comparison too, so only the truncated target's -inf proposals show this mutation.
    pytest.param(
        ACCEPTANCE_LINE,
        "is_accepted = log_uniform < jnp.nan_to_num(log_ratio, neginf=0.0)",
        "truncated-diagonal",
        id="accepts-off-support",
    ),
]
CONTROL_CASES = [mutation.values[2] for mutation in MUTATIONS]


def copy_package(tmp_path: Path, old: str | None = None, new: str | None = None) -> Path:
    """Copy the ``rwmh`` package under test into ``tmp_path`` (returned, the directory to put
    on ``PYTHONPATH``), replacing ``old`` by ``new`` in its kernel."""
    shutil.copytree(
        Path(rwmh.__file__).parent,
        tmp_path / "rwmh",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    if old is not None:
        kernel = tmp_path / "rwmh" / "kernel.py"
        source = kernel.read_text()
        # Exactly once, so that a refactor of the kernel cannot turn the mutation into a no-op.
        assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in the kernel"
        kernel.write_text(source.replace(old, new))
    return tmp_path


def subprocess_env(root: Path) -> dict:
    path = [str(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run_invariance(root: Path, cases: list[str]) -> tuple[int, str]:
    """Run the invariance tests named by ``cases`` (parametrize ids) against the package in
    ``root``; returns the exit status and the combined output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(INVARIANCE_TESTS),
            "-q",
            "-p",
            "no:cacheprovider",
            "-x",
            "-k",
            " or ".join(cases),
        ],
        env=subprocess_env(root),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize(("old", "new", "case"), MUTATIONS)
def test_invariance_test_fails_on_a_mutated_kernel(tmp_path, old, new, case):
    root = copy_package(tmp_path, old, new)
    returncode, output = run_invariance(root, [case])
    assert returncode == 1, output
    assert "1 failed" in output, output
    assert "ImportError" not in output and "ModuleNotFoundError" not in output, output
    # The failure is an invariance statistic, raised by the mutated copy of the kernel.
    assert f"not invariant: one step of {root / 'rwmh' / 'kernel.py'}" in output, output


def test_invariance_test_passes_on_an_unmutated_copy(tmp_path):
    root = copy_package(tmp_path)
    where = subprocess.run(
        [sys.executable, "-c", "import rwmh; print(rwmh.__file__)"],
        env=subprocess_env(root),
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == root / "rwmh" / "__init__.py", where.stdout
    returncode, output = run_invariance(root, CONTROL_CASES)
    assert returncode == 0, output
    assert f"{len(CONTROL_CASES)} passed" in output, output


def test_the_acceptance_line_is_where_the_mutations_expect_it():
    # The mutations above are string replacements; this names the line they rely on, so that
    # a refactor of the kernel fails here with a clear message rather than in a subprocess.
    source = (Path(rwmh.__file__).parent / "kernel.py").read_text()
    assert source.count(ACCEPTANCE_LINE) == 1
    assert source.count("extra = noise[dimension]") == 1
