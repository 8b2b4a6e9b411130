"""Live progress for :func:`rwmh.sample`: a tqdm bar per phase, updated from the host.

The driver runs warmup and sampling in compiled chunks and calls :meth:`ProgressBar.update`
between them, so the bar never reaches into compiled code (no callbacks inside ``vmap`` or
``scan``) and costs one host update per chunk. While sampling it shows the mean acceptance
rate and the largest split R-hat (Gelman et al. 2013, sec. 11.4) over all scalar components.

R-hat is NumPyro's (``numpyro.diagnostics.split_gelman_rubin``) on the draws so far, kept
cheap so that the bar costs a few percent of sampling at most: each chunk is thinned to at most
``RHAT_DRAWS_PER_CHUNK`` evenly spaced draws, and when more than ``RHAT_MAX_DRAWS`` per chain
(or ``RHAT_MAX_VALUES`` numbers in all) have gathered every other one is dropped (and later
chunks are thinned alike), so a computation costs a bounded pass whatever the chunk length and
the number of draws so far; it is redone at most every ``RHAT_INTERVAL`` seconds (and at the
end of a phase). Thinning leaves split R-hat's meaning intact; it only makes it noisier. This
is the classic split R-hat, a live indicator; the rank-normalised R-hat that ArviZ reports at
the end can differ slightly.

References
----------
Gelman, A., Carlin, J. B., Stern, H. S., Dunson, D. B., Vehtari, A. and Rubin, D. B. (2013).
Bayesian Data Analysis, 3rd ed., sec. 11.4.
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
    "RHAT_MAX_DRAWS",
    "RHAT_MAX_VALUES",
    "RHAT_INTERVAL",
]

#: How many times a phase's bar is updated when the driver chooses the chunk length.
DEFAULT_UPDATES = 20
#: Draws per chain and chunk that feed the live R-hat (evenly spaced); bounds the bar's cost.
RHAT_DRAWS_PER_CHUNK = 100
#: Draws per chain kept for the live R-hat; beyond, every other one is dropped.
RHAT_MAX_DRAWS = 1000
#: Numbers (draws x chains x components) kept for the live R-hat, when more than 8 draws.
RHAT_MAX_VALUES = 2_000_000
#: Seconds between two computations of the live R-hat at least (it costs milliseconds).
RHAT_INTERVAL = 1.0
#: Seconds between two redraws of the bar at least.
MIN_REDRAW_INTERVAL = 0.1


class NullProgress:
    """A progress display that shows nothing and leaves the driver's chunking alone."""

    def chunk_length(self, total: int) -> int:
        """Run the whole phase in one compiled call."""
        return max(total, 1)

    def start(self, phase: str, total: int) -> None:
        pass

    def update(self, num_steps: int, acceptance_rate, draws=None) -> None:
        pass

    def goal(self, report: dict, until) -> None:
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


def _max_split_rhat(flat: np.ndarray) -> float:
    """Largest split R-hat over the components of ``(draw, chain, component)`` draws; NaN when
    it is undefined (fewer than four draws, or a component that no chain has moved)."""
    from numpyro.diagnostics import split_gelman_rubin

    if flat.shape[0] < 4:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = split_gelman_rubin(np.swapaxes(flat, 0, 1).astype(np.float64))
    finite = rhat[np.isfinite(rhat)]
    return float(finite.max()) if finite.size else math.nan


def split_rhat(draws) -> float:
    """Largest split R-hat over all components of ``draws``, from NumPyro's
    ``split_gelman_rubin``.

    Parameters
    ----------
    draws
        A PyTree with leaves ``(draw, chain, ...)``.

    Returns
    -------
    The largest R-hat, NaN when it is undefined (fewer than four draws, or a component that no
    chain has moved).

    Examples
    --------
    >>> import numpy as np
    >>> from rwmh.progress import split_rhat
    >>> draws = np.random.default_rng(0).normal(size=(1000, 4, 3))
    >>> round(split_rhat(draws), 2)
    1.0
    """
    return _max_split_rhat(_flat_draws(draws))


class _RhatDraws:
    """The thinned draws ``(draw, chain, component)`` that feed the live R-hat; R-hat is shown
    from the second chunk on, so that its two halves never come from one chunk alone."""

    def __init__(self):
        self.draws = None
        self.stride = 1
        self.num_chunks = 0

    def add(self, flat: np.ndarray) -> None:
        flat = flat[:: self.stride]
        if flat.shape[0] == 0:
            return
        self.num_chunks += 1
        self.draws = flat if self.draws is None else np.concatenate([self.draws, flat])
        num_draws = self.draws.shape[0]
        while num_draws > RHAT_MAX_DRAWS or (self.draws.size > RHAT_MAX_VALUES and num_draws > 8):
            self.draws, self.stride = self.draws[::2], 2 * self.stride
            num_draws = self.draws.shape[0]

    def value(self) -> float:
        return math.nan if self.num_chunks < 2 else _max_split_rhat(self.draws)


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
        self._rhat = _RhatDraws()
        self._with_rhat = False
        self._goal = None
        self._shown_rhat = math.nan
        self._rhat_time = -math.inf
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
        # At most ~10 redraws a second: a terminal write costs about half a millisecond, which
        # adds up when chunks are short. close() draws the end.
        if time.monotonic() - self._last_redraw >= MIN_REDRAW_INTERVAL:
            self._redraw()

    def goal(self, report: dict, until) -> None:
        """Show how far the last check of ``rwmh.sample(until=...)`` is from its goal: the
        worst ESS against ``min_ess`` and the worst R-hat (ArviZ's, on all draws so far)."""
        ess = min(report["min_ess_bulk"], report["min_ess_tail"])
        goal = f"ess={ess:.0f}/{until.min_ess:g}"
        if until.max_rhat is not None:
            goal += f" rhat={report['max_rhat']:.3f}/{until.max_rhat:g}"
        if until.max_nested_rhat is not None:
            goal += f" nrhat={report['max_nested_rhat']:.3f}/{until.max_nested_rhat:g}"
        self._goal = goal
        self._redraw()

    def _redraw(self, final: bool = False) -> None:
        if self._bar is None:
            return
        postfix = f"acc={self.mean_acceptance_rate:.3f}"
        if self._goal is not None:
            # ArviZ's figures at the last check replace the live split R-hat.
            postfix += f" {self._goal}"
        elif self._with_rhat:
            now = time.monotonic()
            stale = now - self._rhat_time >= RHAT_INTERVAL or not math.isfinite(self._shown_rhat)
            if final or stale:
                self._shown_rhat, self._rhat_time = self.rhat, now
            postfix += f" max_rhat={self._shown_rhat:.3f}"
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
            self._redraw(final=True)
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
    >>> type(progress_bar(True, file=io.StringIO())).__name__
    'NullProgress'
    """
    file = file if file is not None else sys.stderr
    if show and _is_terminal(file):
        return ProgressBar(file)
    return NullProgress()
