"""Tests of the progress bar (rwmh.progress) and its use in rwmh.sample."""

from __future__ import annotations

import fcntl
import io
import os
import select
import struct
import sys
import termios

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwmh
from rwmh import progress
from rwmh.sampling import _chunks


def textbook_split_rhat(draws):
    """Split R-hat of ``(draw, chain, component)`` draws, straight from Gelman et al. (2013)."""
    n = draws.shape[0] // 2
    halves = np.concatenate([draws[:n], draws[n : 2 * n]], axis=1)  # (n, 2 * chain, comp)
    means = halves.mean(axis=0)
    within = halves.var(axis=0, ddof=1).mean(axis=0)
    between = n * means.var(axis=0, ddof=1)
    return np.sqrt(((n - 1) / n * within + between / n) / within).max()


def test_split_rhat_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(400, 4, 3)) + np.array([0.0, 0.1, 0.5, 0.0])[:, None]
    assert progress.split_rhat(draws) == pytest.approx(textbook_split_rhat(draws), rel=1e-10)


def test_bar_rhat_is_split_rhat_of_its_thinned_draws():
    # Chunks of up to RHAT_DRAWS_PER_CHUNK draws are kept whole; longer ones are thinned, and
    # beyond RHAT_MAX_DRAWS every other draw is dropped. R-hat is that of the draws kept.
    rng = np.random.default_rng(1)
    draws = rng.normal(size=(600, 3, 2)) * np.array([1.0, 2.0]) + np.array([0.0, 5.0])
    bar = progress.ProgressBar(file=io.StringIO())
    bar.start("sampling", 600)
    for chunk in np.split(draws, 6):
        bar.update(100, np.full((100, 3), 0.3), chunk)
    assert bar.rhat == pytest.approx(textbook_split_rhat(draws), rel=1e-9)
    long = rng.normal(size=(1200 * progress.RHAT_DRAWS_PER_CHUNK, 3, 2))
    bar.start("sampling", long.shape[0])
    for chunk in np.split(long, 12):
        bar.update(chunk.shape[0], np.full((chunk.shape[0], 3), 0.3), chunk)
    kept = long[:: 100 * 2]  # 100 evenly spaced per chunk, then every other one
    assert bar.rhat == pytest.approx(progress.split_rhat(kept), rel=1e-9)
    bar.close()


def test_split_rhat_flags_disagreeing_and_drifting_chains():
    rng = np.random.default_rng(2)
    mixed = rng.normal(size=(500, 4, 2))
    assert progress.split_rhat(mixed) < 1.02
    apart = mixed + np.array([0.0, 0.0, 0.0, 3.0])[:, None]
    assert progress.split_rhat(apart) > 1.5
    drifting = mixed + np.linspace(0.0, 5.0, 500)[:, None, None]  # caught by the split
    assert progress.split_rhat(drifting) > 1.5
    # A PyTree of draws counts every component of every leaf.
    tree = {"ok": mixed, "bad": apart[..., 0]}
    assert progress.split_rhat(tree) == pytest.approx(progress.split_rhat(apart[..., :1]))


def test_split_rhat_undefined_is_nan():
    assert np.isnan(progress.split_rhat(np.zeros((2, 4, 1))))
    assert np.isnan(progress.split_rhat(np.ones((100, 4, 1))))  # no chain moves


def test_bar_shows_phase_acceptance_and_rhat():
    out = io.StringIO()
    bar = progress.ProgressBar(file=out)
    bar.start("warmup", 10)
    bar.update(10, np.array([[0.2, 0.4]] * 10))
    assert bar.mean_acceptance_rate == pytest.approx(0.3)
    bar.start("sampling", 200)
    rng = np.random.default_rng(3)
    bar.update(100, np.full((100, 4), 0.5), {"a": rng.normal(size=(100, 4))})
    assert bar.mean_acceptance_rate == pytest.approx(0.5)  # a new phase starts afresh
    assert np.isnan(bar.rhat)  # one chunk: no two halves yet
    bar.update(100, np.full((100, 4), 0.1), {"a": rng.normal(size=(100, 4))})
    assert bar.mean_acceptance_rate == pytest.approx(0.3)
    assert 0.95 < bar.rhat < 1.05
    bar.close()
    text = out.getvalue()
    assert "warmup: 100%" in text and "sampling: 100%" in text
    assert f"acc=0.300 max_rhat={bar.rhat:.3f}]" in text


def test_chunk_length_gives_about_twenty_updates_and_two_shapes():
    bar = progress.ProgressBar(file=io.StringIO())
    for total in (1, 7, 20, 999, 1000, 12345):
        lengths = [length for _, length in _chunks(total, bar.chunk_length(total))]
        assert sum(lengths) == total
        assert len(lengths) <= progress.DEFAULT_UPDATES
        assert len(set(lengths)) <= 2
    assert progress.NullProgress().chunk_length(1000) == 1000


class Pty:
    """A pseudo-terminal standing in for ``sys.stderr``, read back afterwards."""

    def __enter__(self):
        self.master, slave = os.openpty()
        # A real terminal has a size; tqdm draws nothing on a 0-column one.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.file = os.fdopen(slave, "w")
        self.saved, sys.stderr = sys.stderr, self.file
        self.chunks = []
        return self

    def drain(self):
        while select.select([self.master], [], [], 0)[0]:
            self.chunks.append(os.read(self.master, 65536))

    def __exit__(self, *exc):
        sys.stderr = self.saved
        self.file.flush()
        self.drain()
        self.file.close()
        os.close(self.master)

    @property
    def text(self):
        return b"".join(self.chunks).decode()


def logdensity(x):
    return -0.5 * jnp.sum(x**2)


def test_progress_bar_chooses_display_from_terminal():
    assert isinstance(progress.progress_bar(True, io.StringIO()), progress.NullProgress)
    with Pty() as pty:
        assert isinstance(progress.progress_bar(True), progress.ProgressBar)
        assert isinstance(progress.progress_bar(False), progress.NullProgress)
        assert isinstance(progress.progress_bar(True, pty.file), progress.ProgressBar)


def test_sample_shows_bar_on_terminal_and_keeps_draws(capfd, monkeypatch):
    kwargs = dict(num_samples=200, num_warmup=100)
    start = jnp.zeros((3, 2))
    quiet = rwmh.sample(jax.random.key(0), logdensity, start, progress_bar=False, **kwargs)
    updates = []
    update = progress.ProgressBar.update

    def spy(self, num_steps, acceptance_rate, draws=None):
        updates.append((self._phase, num_steps, draws is not None))
        return update(self, num_steps, acceptance_rate, draws)

    monkeypatch.setattr(progress.ProgressBar, "update", spy)
    with Pty() as pty:
        shown = rwmh.sample(jax.random.key(0), logdensity, start, progress_bar=True, **kwargs)
    text = pty.text
    assert "warmup: 100%" in text and "sampling: 100%" in text
    assert "max_rhat=" in text and "acc=" in text
    # The last sampling line reports the acceptance rate of all draws.
    accept = float(np.mean(shown.stats["acceptance_rate"]))
    assert f"acc={accept:.3f}" in text.replace("\r", "\n").split("sampling: 100%")[-1]
    # Warmup chunks may be summarised one update late; all are counted by the end.
    warmup_accept = float(np.mean(shown.warmup_info.acceptance_rate))
    warmup_end = text.replace("\r", "\n").split("warmup: 100%")[-1].split("\n")[0]
    assert f"acc={warmup_accept:.3f}" in warmup_end
    # 20 updates per phase, R-hat fed while sampling; chunking does not change the draws.
    assert updates == [("warmup", 5, False)] * 20 + [("sampling", 10, True)] * 20
    np.testing.assert_array_equal(quiet.positions, shown.positions)
    assert capfd.readouterr().err == ""


def test_sample_is_quiet_off_a_terminal(capfd):
    rwmh.sample(jax.random.key(1), logdensity, jnp.zeros((2, 1)), 50, 50, progress_bar=True)
    assert capfd.readouterr().err == ""
