"""Live progress for :func:`rwmh.sample`: a tqdm bar per phase, updated from the host.

The driver runs warmup and sampling in compiled chunks and calls :meth:`ProgressBar.update`
between them, so the bar never reaches into compiled code (no callbacks inside ``vmap`` or
``scan``) and costs one host update per chunk. While sampling it shows the mean acceptance
rate and the largest split R-hat (Gelman et al. 2013, sec. 11.4) over all scalar components.

R-hat is kept cheap, so that the bar costs a few percent of sampling at most: for every chunk
and chain only the mean and the sum of squared deviations of each component are stored
(combined with Chan et al.'s pairwise formula), never the draws themselves, and a long chunk
is thinned to at most ``RHAT_DRAWS_PER_CHUNK`` evenly spaced draws first. An update then costs
a bounded pass over the new chunk, whatever the chunk length and the number of draws so far.
(Without the thinning, a pass over every draw costs about a sixth of a cheap target's sampling
time on a CPU.) Thinning leaves split R-hat's meaning intact; it only makes it noisier.
The two halves of each chain are made of whole chunks; with an odd number of chunks the oldest
one is left out, so that both halves have the same length. This is the classic split R-hat, a
live indicator; the rank-normalised R-hat that ArviZ reports at the end can differ slightly.

References
----------
Gelman, A., Carlin, J. B., Stern, H. S., Dunson, D. B., Vehtari, A. and Rubin, D. B. (2013).
Bayesian Data Analysis, 3rd ed., sec. 11.4.

Chan, T. F., Golub, G. H. and LeVeque, R. J. (1979). Updating formulae and a pairwise algorithm
for computing sample variances. Technical report STAN-CS-79-773, Stanford University.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import numpy as np

__all__ = [
    "ProgressBar",
    "NullProgress",
    "progress_bar",
    "split_rhat",
    "DEFAULT_UPDATES",
    "RHAT_DRAWS_PER_CHUNK",
]

#: How many times a phase's bar is updated when the driver chooses the chunk length.
DEFAULT_UPDATES = 20
#: Draws per chain and chunk that feed the live R-hat (evenly spaced); bounds the bar's cost.
RHAT_DRAWS_PER_CHUNK = 100
#: Seconds between two redraws of the bar at least.
MIN_REDRAW_INTERVAL = 0.1


class NullProgress:
    """A progress display that shows nothing and leaves the driver's chunking alone."""

    enabled = False

    def chunk_length(self, total: int) -> int:
        """Run the whole phase in one compiled call."""
        return max(total, 1)

    def start(self, phase: str, total: int) -> None:
        pass

    def update(self, num_steps: int, acceptance_rate, draws=None) -> None:
        pass

    def close(self) -> None:
        pass


def _flat_draws(draws, max_draws: int | None = None) -> np.ndarray:
    """A chunk's draws ``(draw, chain, component)``, thinned to at most ``max_draws`` evenly
    spaced draws; float32 stays float32 (the sums are accumulated in float64)."""
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(draws)]
    num_draws = leaves[0].shape[0]
    stride = 1 if max_draws is None else max(1, math.ceil(num_draws / max_draws))
    return np.concatenate(
        [leaf[::stride].reshape(-(-num_draws // stride), leaf.shape[1], -1) for leaf in leaves],
        axis=-1,
    )


def _combine(a, b):
    """Pool two ``(count, mean, m2)`` summaries (Chan, Golub & LeVeque 1979)."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta**2 * (count_a * count_b / count)
    return count, mean, m2


def _rhat_from_halves(first, second) -> np.ndarray:
    """Split R-hat per component from the summaries of each chain's two halves."""
    count = min(first[0], second[0])
    means = np.concatenate([first[1], second[1]], axis=0)  # (2 * chain, component)
    variances = np.concatenate([first[2] / (first[0] - 1), second[2] / (second[0] - 1)], axis=0)
    within = variances.mean(axis=0)
    between_over_n = means.var(axis=0, ddof=1)
    pooled = (count - 1) / count * within + between_over_n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(pooled / within)


def split_rhat(draws, num_chunks: int = 2) -> float:
    """Largest split R-hat over all components of ``draws``, halves made of whole chunks.

    Parameters
    ----------
    draws
        A PyTree with leaves ``(draw, chain, ...)``.
    num_chunks
        Cut the draws into this many equal chunks first, as the progress bar sees them
        (2, the default, is the textbook split R-hat).

    Returns
    -------
    The largest R-hat, NaN when it is undefined (fewer than two draws per half, or a component
    that no chain has moved).

    Examples
    --------
    >>> import numpy as np
    >>> from rwmh.progress import split_rhat
    >>> draws = np.random.default_rng(0).normal(size=(1000, 4, 3))
    >>> round(split_rhat(draws), 2)
    1.0
    """
    flat = _flat_draws(draws)
    tracker = _RhatTracker()
    for part in np.array_split(flat, num_chunks, axis=0):
        tracker.add(part)
    return tracker.value()


class _RhatTracker:
    """Per-chunk ``(count, mean, m2)`` of every chain and component."""

    def __init__(self):
        self.chunks = []

    def add(self, flat: np.ndarray) -> None:
        if flat.shape[0] == 0:
            return
        mean = flat.mean(axis=0, dtype=np.float64)
        m2 = np.square(flat - mean).sum(axis=0)
        self.chunks.append((flat.shape[0], mean, m2))

    def value(self) -> float:
        half = len(self.chunks) // 2
        if half == 0:
            return math.nan
        used = self.chunks[len(self.chunks) - 2 * half :]
        first, second = used[0], used[half]
        for summary in used[1:half]:
            first = _combine(first, summary)
        for summary in used[half + 1 :]:
            second = _combine(second, summary)
        if min(first[0], second[0]) < 2:
            return math.nan
        rhat = _rhat_from_halves(first, second)
        finite = rhat[np.isfinite(rhat)]
        return float(finite.max()) if finite.size else math.nan


class ProgressBar:
    """A tqdm bar per phase with the running acceptance rate and, while sampling, split R-hat.

    Parameters
    ----------
    file
        Where the bar is written; default ``sys.stderr``.
    updates
        How many updates a phase gets when the driver picks the chunk length
        (:meth:`chunk_length`).

    Examples
    --------
    >>> import io, numpy as np
    >>> from rwmh.progress import ProgressBar
    >>> bar = ProgressBar(file=io.StringIO())
    >>> bar.start("sampling", 200)
    >>> bar.update(100, np.full((100, 4), 0.3), np.zeros((100, 4, 2)))
    >>> round(bar.mean_acceptance_rate, 3)
    0.3
    >>> bar.close()
    """

    enabled = True

    def __init__(self, file=None, updates: int = DEFAULT_UPDATES):
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
            raise ValueError(f"updates must be a positive integer; got {updates!r}.")
        self.file = file if file is not None else sys.stderr
        self.updates = updates
        self._bar = None
        self._phase = None
        self._pending = None

    def chunk_length(self, total: int) -> int:
        """Chunk length giving about ``updates`` updates: all chunks share one length but the
        last, so a phase compiles at most two shapes."""
        return max(1, math.ceil(total / self.updates))

    def start(self, phase: str, total: int) -> None:
        """Open the bar of a phase (``"warmup"`` or ``"sampling"``) of ``total`` steps."""
        from tqdm.auto import tqdm

        self.close()
        self._phase = phase
        self._acceptance_sum = 0.0
        self._acceptance_count = 0
        self._rhat = _RhatTracker()
        self._with_rhat = False
        self._steps_not_shown = 0
        self._last_redraw = time.monotonic()
        # The bar redraws when _apply says so (mininterval=0), never on tqdm's own clock.
        self._bar = tqdm(total=total, desc=phase, unit="step", file=self.file, mininterval=0)

    @property
    def mean_acceptance_rate(self) -> float:
        """Mean acceptance rate over all chains and steps of the current phase so far."""
        if not self._acceptance_count:
            return math.nan
        return self._acceptance_sum / self._acceptance_count

    @property
    def rhat(self) -> float:
        """Largest split R-hat of the draws of the current phase so far (NaN while undefined)."""
        return self._rhat.value()

    def update(self, num_steps: int, acceptance_rate, draws=None) -> None:
        """Advance by ``num_steps``.

        Parameters
        ----------
        num_steps
            Transitions taken since the last update.
        acceptance_rate
            Their acceptance rates, any shape (e.g. ``(step, chain)``).
        draws
            The draws kept in this chunk, leaves ``(draw, chain, ...)``; given while sampling,
            they feed the split R-hat.

        Notes
        -----
        A JAX array that the device is still computing is summarised at the next update (or
        at :meth:`close`) instead, when the driver has queued the following chunk: reading it
        now would leave the device idle while the host draws the bar.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply(*pending)
        if isinstance(acceptance_rate, jax.Array) and not acceptance_rate.is_ready():
            self._pending = (num_steps, acceptance_rate, draws)
        else:
            self._apply(num_steps, acceptance_rate, draws)

    def _apply(self, num_steps: int, acceptance_rate, draws) -> None:
        acceptance_rate = np.asarray(acceptance_rate)
        self._acceptance_sum += float(acceptance_rate.sum(dtype=np.float64))
        self._acceptance_count += acceptance_rate.size
        if draws is not None:
            self._rhat.add(_flat_draws(draws, RHAT_DRAWS_PER_CHUNK))
            self._with_rhat = True
        self._steps_not_shown += num_steps
        # At most ~10 redraws a second: a terminal write costs about half a millisecond and
        # R-hat a fraction of one, which adds up when chunks are short. close() draws the end.
        if time.monotonic() - self._last_redraw >= MIN_REDRAW_INTERVAL:
            self._redraw()

    def _redraw(self) -> None:
        if self._bar is None:
            return
        postfix = f"acc={self.mean_acceptance_rate:.3f}"
        if self._with_rhat:
            postfix += f" max_rhat={self.rhat:.3f}"
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(self._steps_not_shown)
        self._steps_not_shown = 0
        self._last_redraw = time.monotonic()

    def close(self) -> None:
        """Close the bar of the current phase, leaving its last line on the terminal."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply(*pending)
        if self._bar is not None:
            self._redraw()
            self._bar.close()
            self._bar = None


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def progress_bar(show: bool, file=None) -> ProgressBar | NullProgress:
    """The display :func:`rwmh.sample` uses: a :class:`ProgressBar` when ``show`` is true and
    ``file`` (default ``sys.stderr``) is a terminal, otherwise a :class:`NullProgress`, so that
    logs and pipes stay clean.

    Examples
    --------
    >>> import io
    >>> from rwmh.progress import progress_bar
    >>> progress_bar(True, file=io.StringIO()).enabled
    False
    """
    file = file if file is not None else sys.stderr
    if show and _is_terminal(file):
        return ProgressBar(file)
    return NullProgress()
