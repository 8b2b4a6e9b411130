"""``num_warmup="auto"``: warmup that goes on, window by window, until the chains say it is done.

The windows are Stan's (:func:`rwmh.tuning.build_schedule`): a 75-step initial buffer where
only the step size adapts, slow windows of 25, 50, 100, ... steps that estimate the covariance
from the pooled draws, and a 50-step final buffer. A fixed warmup knows its last window in
advance; here every slow window doubles the one before until, at the end of a window, the
adaptation has *settled*:

* **The proposal has stopped changing.** With ``L`` the Cholesky factor of the covariance
  adapted at the previous window end and ``lambda`` the eigenvalues of ``L^-1 S L^-T`` for the
  covariance ``S`` adapted now, the sub-optimality factor of Roberts and Rosenthal (2001),
  ``b = mean(1 / lambda) / mean(lambda^(-1/2))^2`` (1 when the two agree up to scale), is at
  most ``MAX_SUBOPTIMALITY`` both ways: random-walk Metropolis tuned to either covariance
  would sample the other's target at most that factor slower. It is scale-free, so the step
  size, adapted separately, does not enter.
* **The chains agree.** The rank-normalised split R-hat (ArviZ's ``rhat(method="rank")``) of
  every component of the chains' states and of their log density, taken every 25 steps over
  the window just ended, is at most ``MAX_WINDOW_RHAT`` (it needs four states per chain, so
  windows of 100 steps or more).
* **No chain was stranded.** No chain restarted at this window end (:mod:`rwmh.stragglers`).

Then the 50-step final buffer follows and warmup ends (longer when fewer than four chains pool
their acceptance, as in a fixed warmup: :func:`rwmh.tuning.final_buffer_extension`). A window
that would run past the cap (``max_warmup``, less the final buffer) is cut there and is the
last one, and the result says that the cap ended warmup. Every chunk is ``CHUNK`` (25) steps
long, so warmup compiles one program whatever its length; the windows are data
(:class:`rwmh.tuning.Schedule` rows made here on the host), and a window end waits for its
chunk before the next chunk is dispatched, so that the decision is made first.

References
----------
Roberts, G. O. and Rosenthal, J. S. (2001). Optimal scaling for various Metropolis-Hastings
algorithms. Statistical Science 16, 351-367 (sec. 6, inhomogeneous targets).
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np

from rwmh import tuning

__all__ = [
    "CHUNK",
    "INITIAL_BUFFER",
    "FINAL_BUFFER",
    "MAX_SUBOPTIMALITY",
    "MAX_WINDOW_RHAT",
    "AutoWarmup",
    "suboptimality",
]

#: Steps per compiled warmup chunk (every window boundary falls on one).
CHUNK = tuning.REFRESH_INTERVAL
INITIAL_BUFFER = 75
FIRST_WINDOW = 25
FINAL_BUFFER = 50
#: Largest Roberts-Rosenthal factor between consecutive window covariances.
MAX_SUBOPTIMALITY = 1.2
#: Largest R-hat over the states of a window's chains.
MAX_WINDOW_RHAT = 1.1
#: Least ``max_warmup``: the initial buffer, one window and the final buffer.
MIN_STEPS = INITIAL_BUFFER + FIRST_WINDOW + FINAL_BUFFER
#: Default ``max_warmup``.
DEFAULT_MAX_STEPS = 100_000


def suboptimality(previous, current) -> float:
    """The larger of the Roberts-Rosenthal factors ``b`` of ``current`` against ``previous``
    and back; covariances as ``(d, d)`` matrices or ``(d,)`` variances."""
    previous = np.asarray(previous, np.float64)
    current = np.asarray(current, np.float64)
    if previous.ndim == 1:
        ratios = current / previous
    else:
        factor = np.linalg.cholesky(previous)
        whitened = np.linalg.solve(factor, np.linalg.solve(factor, current).T)
        ratios = np.linalg.eigvalsh((whitened + whitened.T) / 2)
    if not np.all(np.isfinite(ratios)) or not np.all(ratios > 0):
        return math.inf

    def factor_b(lam):
        return float(np.mean(1.0 / lam) / np.mean(lam**-0.5) ** 2)

    return max(factor_b(ratios), factor_b(1.0 / ratios))


def _window_rhat(positions: np.ndarray, lp: np.ndarray) -> float:
    """Largest rank R-hat of ``(chain, draw, component)`` states and their log density."""
    import xarray as xr

    from rwmh.arviz import import_stats

    if positions.shape[1] < 4:
        return math.inf  # split R-hat needs two halves of two states at least
    az = import_stats()
    values = np.concatenate([positions, lp[..., None]], axis=-1).astype(np.float64)
    data = xr.Dataset({"x": (("chain", "draw", "component"), values)})
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat = np.asarray(az.rhat(data, method="rank")["x"].values)
    return math.inf if np.isnan(rhat).any() else float(rhat.max())


def flat_states(positions, num_chains: int) -> np.ndarray:
    """Chain states (a PyTree of ``(chain, ...)`` host arrays) as one ``(chain, component)``
    array, leaves in PyTree order."""
    leaves = [
        np.asarray(leaf).reshape(num_chains, -1) for leaf in jax.tree_util.tree_leaves(positions)
    ]
    return np.concatenate(leaves, axis=-1)


class AutoWarmup:
    """The windows of a ``num_warmup="auto"`` warmup, decided one window end at a time.

    Parameters
    ----------
    max_steps
        The cap on warmup steps (a multiple of :data:`CHUNK`, at least :data:`MIN_STEPS`).
    restart_stranded
        Whether stranded chains restart at window ends (:mod:`rwmh.stragglers`).
    report
        The report of a run resumed from a checkpoint (``run.warmup_report``), written at a
        window end; None for a fresh run.
    num_chains
        The run's number of chains: with fewer than four the final buffer is longer, as in
        a fixed warmup (:func:`rwmh.tuning.final_buffer_extension`, rounded up to whole
        chunks); None keeps :data:`FINAL_BUFFER`.
    """

    def __init__(
        self,
        max_steps: int,
        restart_stranded: bool,
        report: dict | None = None,
        num_chains: int | None = None,
    ):
        self.max_steps = max_steps
        self.restart_stranded = restart_stranded
        extension = -(-tuning.final_buffer_extension(max_steps, num_chains) // CHUNK) * CHUNK
        #: The final buffer's length: a multiple of CHUNK that leaves MIN_STEPS - FINAL_BUFFER
        #: steps to the initial buffer and the first window under the cap.
        self.final_buffer = FINAL_BUFFER + min(extension, max_steps - MIN_STEPS)
        self.windows = [] if report is None else [list(w) for w in report["windows"]]
        self.end = None if report is None else report.get("steps")
        self.reason = None if report is None else report.get("reason")
        self.previous_cov = None
        self.trace_positions: list = []
        self.trace_lp: list = []
        self._columns = np.zeros((4, 0), bool)
        self._planned = 0
        # The windows so far, then one more if undecided.
        self._plan_from_report()

    # -- the plan --------------------------------------------------------------------------

    def _window(self, number: int) -> tuple[int, int]:
        start = INITIAL_BUFFER + FIRST_WINDOW * (2**number - 1)
        end = start + FIRST_WINDOW * 2**number
        return start, min(end, self.max_steps - self.final_buffer)

    def _plan_from_report(self) -> None:
        self._extend(INITIAL_BUFFER)
        for number in range(len(self.windows)):
            self._add_window(number)
        if self.end is not None:
            self._extend(self.end)
        else:
            self._add_window(len(self.windows))

    def _extend(self, steps: int) -> None:
        if steps > self._columns.shape[1]:
            grown = np.zeros((4, steps), bool)
            grown[:, : self._columns.shape[1]] = self._columns
            self._columns = grown

    def _add_window(self, number: int) -> None:
        start, end = self._window(number)
        self._extend(end)
        slow_window, window_end, refresh, restart = self._columns
        slow_window[start:end] = True
        window_end[end - 1] = True
        refresh[start + CHUNK - 1 : end - 1 : CHUNK] = True
        # Cut by the cap, a window is the last one: no restart before the final buffer.
        restart[end - 1] = self.restart_stranded and end < self.max_steps - self.final_buffer
        self._planned = end

    def steps(self, first: int, length: int) -> tuning.Schedule:
        """The :class:`rwmh.tuning.Schedule` rows of steps ``first, ..., first + length - 1``
        (planned already: :meth:`pieces` dispatches only planned steps)."""
        return tuning.Schedule(*(column[first : first + length] for column in self._columns))

    def pieces(self, start: int, in_flight):
        """``(first, CHUNK)`` chunks from ``start`` to the end of warmup. Before the chunk after
        a window end, the chunk in flight (which ends the window) is recorded, so that its
        decision plans what follows."""
        step = start
        while self.end is None or step < self.end:
            if self.end is None and step == self._planned:
                in_flight.finish()
                if self.end is not None and step >= self.end:
                    return
            yield step, CHUNK
            step += CHUNK

    # -- the decisions ---------------------------------------------------------------------

    def at_window_end(self, next_step: int) -> bool:
        """Whether ``next_step`` ends the window being decided (its covariance is needed)."""
        return self.end is None and next_step == self._planned

    def record(self, next_step: int, positions, lp, covariance, num_restarted) -> bool:
        """Take the chain states after a chunk (host arrays, ``(chain, ...)``); at a window
        end, decide. Returns whether a checkpoint may be written now (at window ends and at
        the end, where the plan is all the state there is)."""
        if self.end is not None:
            return next_step >= self.end
        self.trace_positions.append(flat_states(positions, np.shape(lp)[0]))
        self.trace_lp.append(np.asarray(lp))
        if next_step != self._planned:
            return False
        number = len(self.windows)
        start, end = self._window(number)
        b = math.inf if self.previous_cov is None else suboptimality(self.previous_cov, covariance)
        positions = np.stack(self.trace_positions, axis=1)
        rhat = _window_rhat(positions, np.stack(self.trace_lp, axis=1))
        restarted = int(np.sum(num_restarted[start:end]))
        settled = b <= MAX_SUBOPTIMALITY and rhat <= MAX_WINDOW_RHAT and restarted == 0
        self.windows.append([start, end, b, rhat, restarted])
        self.previous_cov = np.asarray(covariance)
        self.trace_positions, self.trace_lp = [], []
        if settled or end >= self.max_steps - self.final_buffer:
            self.reason = "settled" if settled else "cap"
            self.end = end + self.final_buffer
            self._extend(self.end)
        else:
            self._add_window(number + 1)
        return True

    def report(self) -> dict:
        """``{"steps", "reason", "windows"}``: the warmup length once known (None before),
        ``"settled"`` or ``"cap"``, and per slow window ``[start, end, b, R-hat, restarted
        chains]``."""
        return {
            "steps": self.end,
            "reason": self.reason,
            "windows": [list(w) for w in self.windows],
        }
