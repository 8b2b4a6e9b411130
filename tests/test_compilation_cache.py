"""Tests of JAX's persistent compilation cache as the command line turns it on.

The command-line runs happen in subprocesses with a temporary ``HOME`` and
``XDG_CACHE_HOME``, so that they neither read nor write the real user's cache, and so that the
global JAX configuration of this test process stays untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from rwmh import compilation_cache

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Small runs: what is under test is which programs compile, not the statistics.
FAST = ["--chains", "2", "--samples", "40", "--warmup", "40", "--no-progress"]


def run_regress(home: Path, *args, **env_changes) -> subprocess.CompletedProcess:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("JAX_") and name != compilation_cache.DISABLE_ENV_VAR
    }
    env.update(PYTHONPATH=SRC, HOME=str(home), XDG_CACHE_HOME=str(home / "cache"))
    env.update(env_changes)
    return subprocess.run(
        [sys.executable, "-m", "rwmh.cli", "regress", *FAST, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    if sys.platform in ("win32", "darwin"):
        pytest.skip("XDG_CACHE_HOME is the convention of Linux and other Unixes")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache.default_cache_dir() == str(tmp_path / "rwmh" / "jax")
    # The XDG specification says to ignore a relative value.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compilation_cache.default_cache_dir() == str(tmp_path / ".cache" / "rwmh" / "jax")


def test_unwritable_directory_warns_and_leaves_jax_alone(tmp_path):
    # A directory below a regular file cannot be created, even by root.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(RuntimeWarning, match="cannot write to .*a_file"):
        assert compilation_cache.enable_compilation_cache(blocker / "jax") is None
    assert jax.config.jax_compilation_cache_dir == before


def test_command_line_fills_the_cache_and_the_second_run_loads_from_it(tmp_path):
    cache = tmp_path / "cache" / "rwmh" / "jax"
    first = run_regress(tmp_path)
    assert first.returncode == 0, first.stderr
    written = entries(cache)
    assert written, f"no cache entries in {cache}"

    second = run_regress(tmp_path, JAX_LOG_COMPILES="1")
    assert second.returncode == 0, second.stderr
    hits = [line for line in second.stderr.splitlines() if "compilation cache hit" in line]
    # The two programs that matter, the warmup and the sampling scans, come from the cache.
    for program in ("run_warmup", "run_sampling"):
        assert any(program in line for line in hits), f"{program} was compiled again"
    # Every program written by the first run was loaded (an identical program compiled at two
    # places in one run is loaded twice, so keys are compared, not counts).
    hit_keys = {re.search(r"with key '([^']+)'", line).group(1) for line in hits}
    assert hit_keys == {name.removesuffix("-cache") for name in written}
    # Nothing the first run cached was compiled and written again.
    assert entries(cache) == written
    # Same key, same data, same draws: the summaries agree.
    assert second.stdout == first.stdout


@pytest.mark.parametrize(
    "how", [("--no-compilation-cache",), {compilation_cache.DISABLE_ENV_VAR: "1"}]
)
def test_option_and_environment_variable_turn_it_off(tmp_path, how):
    if isinstance(how, dict):
        done = run_regress(tmp_path, "--warmup", "0", **how)
    else:
        done = run_regress(tmp_path, "--warmup", "0", *how)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "cache" / "rwmh").exists()


def test_environment_variable_zero_leaves_it_on(monkeypatch):
    monkeypatch.setenv(compilation_cache.DISABLE_ENV_VAR, "0")
    assert not compilation_cache.disabled_by_environment()
    monkeypatch.setenv(compilation_cache.DISABLE_ENV_VAR, "yes")
    assert compilation_cache.disabled_by_environment()


def test_unwritable_cache_is_one_warning_line_not_a_crash(tmp_path):
    # Only rwmh's directory is blocked: ArviZ itself fails on a cache directory it cannot use.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "rwmh").write_text("not a directory")
    done = run_regress(tmp_path, "--warmup", "0")
    assert done.returncode == 0, done.stderr
    # (Without warmup the chains have not mixed: an R-hat warning line comes too.)
    cache_lines = [line for line in done.stderr.splitlines() if "cache" in line]
    assert len(cache_lines) == 1, done.stderr
    assert cache_lines[0].startswith("rwmh regress: warning: JAX's compilation cache stays off")
    assert "rwmh/jax" in cache_lines[0]
    assert "Traceback" not in done.stderr
    assert "mean" in done.stdout


def test_library_call_enables_it_in_a_fresh_process(tmp_path):
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from rwmh.compilation_cache import enable_compilation_cache\n"
        "path = enable_compilation_cache(sys.argv[1])\n"
        "assert jax.config.jax_compilation_cache_dir == path, path\n"
        "f = jax.jit(lambda x: jnp.linalg.cholesky(x @ x.T + 3.0))\n"
        "f(jnp.ones((20, 20))).block_until_ready()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "jax")],
        env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert entries(tmp_path / "jax")
