"""Run length from the chains: :class:`Converged`, the stopping rule of ``rwmh.sample(until=...)``.

With ``until=Converged(...)`` the sampling phase of :func:`rwmh.sample` runs in chunks of one
length and, at some chunk boundaries (the *checks*), asks ArviZ about all draws so far: the
rank-normalised split R-hat of every scalar component (``arviz.rhat(..., method="rank")``), and
its bulk and tail effective sample sizes (``arviz.ess(..., method="bulk" | "tail")``), the
functions behind ``arviz.summary`` (Vehtari et al. 2021). The run stops at the first check
where every component has R-hat at most ``max_rhat`` and both ESS at least ``min_ess`` (and,
with ``max_nested_rhat``, nested R-hat at most that, as ``arviz_stats.rhat_nested`` computes it
over superchains; Margossian et al. 2025), or at ``num_samples``, the cap.

The checks follow a geometric schedule in draws (:func:`check_points`): the first after
``first_check`` draws per chain, each later one ``check_growth`` times further on, rounded up
to a chunk boundary, and one at the cap. A check costs about as much as a pass over the draws
so far, so all checks together cost ``growth / (growth - 1)`` passes over the final draws (3
for the default 1.5), and the run stops at most a factor ``growth`` (plus a chunk) after the
first draw at which it could have stopped. The schedule depends on the settings alone and each
decision on the draws up to its check alone, so chunking does not move a decision off the
schedule, and a run resumed from a checkpoint stops at the draw the uninterrupted run stops at.

References
----------
Vehtari, A., Gelman, A., Simpson, D., Carpenter, B. and Buerkner, P.-C. (2021).
Rank-normalization, folding, and localization: an improved R-hat for assessing convergence of
MCMC. Bayesian Analysis 16, 667-718.

Margossian, C. C., Hoffman, M. D., Sountsov, P., Riou-Durand, L., Vehtari, A. and Gelman, A.
(2025). Nested R-hat: assessing the convergence of Markov chain Monte Carlo when running many
short chains. Bayesian Analysis. https://doi.org/10.1214/24-BA1453
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass

import jax
import numpy as np

from rwmh import checks

__all__ = [
    "Converged",
    "ConvergenceWarning",
    "check",
    "check_points",
    "component_names",
    "flat_draws",
    "superchain_ids",
    "superchain_positions",
    "warn_unconverged",
]

#: Draws per chunk of a run with ``until`` when ``chunk_size`` is None.
DEFAULT_CHUNK = 100
#: ``num_samples`` (the cap) of a run with ``until`` when it is not given.
DEFAULT_CAP = 100_000


class ConvergenceWarning(RuntimeWarning):
    """``rwmh.sample(until=...)`` reached its cap (``num_samples``) before converging."""


@dataclass(frozen=True)
class Converged:
    """Stop sampling once the chains have converged (``rwmh.sample(..., until=Converged())``).

    Parameters
    ----------
    min_ess
        Least bulk and tail effective sample size of every scalar component (ArviZ's
        ``ess(method="bulk")`` and ``ess(method="tail")``). Vehtari et al. (2021) ask for 100
        per chain; 400 is that for 4 chains.
    max_rhat
        Largest rank-normalised split R-hat of every component (ArviZ's ``rhat(method=
        "rank")``); 1.01 as Vehtari et al. (2021) recommend. None: not checked (for instance
        when ``max_nested_rhat`` judges many short chains instead).
    max_nested_rhat
        None, or the largest nested R-hat (``arviz_stats.rhat_nested``, Margossian et al. 2025)
        of every component over superchains: groups of chains that started from one point
        (:func:`superchain_positions` makes such starts). Prefer it to ``max_rhat`` with many
        chains and short runs, where the classic R-hat needs each chain to be long. See
        ``superchains`` for the grouping.
    superchains
        Which superchain each chain belongs to (a sequence of ``num_chains`` integers, equal
        numbers of chains per superchain). None: chains whose initial positions are equal
        form a superchain. Used only with ``max_nested_rhat``.
    first_check
        Draws per chain at the first check (rounded up to a whole chunk).
    check_growth
        Each check comes at least this many times as many draws after the previous one.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> result = rwmh.sample(jax.random.key(0), logdensity, jnp.ones((4, 2)), num_samples=20_000,
    ...                      until=rwmh.Converged(min_ess=400), progress_bar=False)
    >>> result.extra["stop"]["reason"], result.num_draws == result.extra["stop"]["draw"]
    ('converged', True)
    """

    min_ess: float = 400
    max_rhat: float | None = 1.01
    max_nested_rhat: float | None = None
    superchains: tuple | None = None
    first_check: int = 100
    check_growth: float = 1.5

    def __post_init__(self):
        if isinstance(self.min_ess, bool) or not isinstance(self.min_ess, (int, float)):
            raise TypeError(f"Converged: min_ess must be a number; got {self.min_ess!r}.")
        if not self.min_ess >= 0 or not math.isfinite(self.min_ess):
            raise ValueError(f"Converged: min_ess must be finite and >= 0; got {self.min_ess}.")
        for name in ("max_rhat", "max_nested_rhat"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Converged: {name} must be a number or None; got {value!r}.")
            if not (value > 1 and math.isfinite(value)):
                raise ValueError(f"Converged: {name} must be finite and > 1; got {value}.")
        if self.max_rhat is None and self.max_nested_rhat is None and self.min_ess == 0:
            raise ValueError("Converged: nothing to check (no R-hat bound and min_ess=0).")
        checks.check_int(self.first_check, "Converged: first_check", 4)
        growth = self.check_growth
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 1:
            raise ValueError(f"Converged: check_growth must be a number > 1; got {growth!r}.")
        if self.superchains is not None:
            ids = np.asarray(self.superchains)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(
                    "Converged: superchains must be a sequence of integers, one per chain; "
                    f"got {self.superchains!r}."
                )
            object.__setattr__(self, "superchains", tuple(int(i) for i in ids))

    def to_dict(self) -> dict:
        """JSON-ready fields (a checkpoint's ``settings["until"]``)."""
        values = asdict(self)
        if values["superchains"] is not None:
            values["superchains"] = list(values["superchains"])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> Converged:
        values = dict(values)
        if values.get("superchains") is not None:
            values["superchains"] = tuple(values["superchains"])
        return cls(**values)


def check_points(first_check: int, growth: float, chunk: int, cap: int) -> list[int]:
    """Draw counts at which a run checks: ``first_check`` rounded up to a multiple of
    ``chunk``, then each at least ``growth`` times the previous, also on chunk boundaries,
    and ``cap`` last.

    Examples
    --------
    >>> from rwmh.convergence import check_points
    >>> check_points(100, 1.5, 100, 2000)
    [100, 200, 300, 500, 800, 1200, 1800, 2000]
    """
    points = []
    target = first_check
    while True:
        point = chunk * math.ceil(target / chunk)
        if point >= cap:
            break
        points.append(point)
        target = max(point + 1, math.ceil(point * growth))
    points.append(cap)
    return points


def component_names(positions) -> list[str]:
    """Names of the scalar components of a batched position PyTree, in the order of
    :func:`flat_draws`, named as :func:`rwmh.to_inference_data` and ArviZ's summary name them:
    ``x[0]``, ``x[1]`` for an array, ``a[2]`` for a dict entry ``"a"``."""
    names = []
    leaves = jax.tree_util.tree_flatten_with_path(positions)[0]
    for path, leaf in leaves:
        parts = []
        for key in path:
            if isinstance(key, jax.tree_util.DictKey):
                parts.append(str(key.key))
            elif isinstance(key, jax.tree_util.SequenceKey):
                parts.append(f"x_{key.idx}" if not parts else str(key.idx))
            else:
                parts.append(str(key))
        prefix = ".".join(parts) or "x"
        shape = np.shape(leaf)[1:]
        if not shape:
            names.append(prefix)
            continue
        for index in np.ndindex(*shape):
            names.append(f"{prefix}[{', '.join(str(i) for i in index)}]")
    return names


def flat_draws(draws) -> np.ndarray:
    """Draws ``(chain, draw, ...)`` (a PyTree) as one ``(chain, draw, component)`` array."""
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(draws)]
    num_chains, num_draws = leaves[0].shape[:2]
    return np.concatenate([leaf.reshape(num_chains, num_draws, -1) for leaf in leaves], axis=-1)


def superchain_positions(starts, chains_per_superchain: int):
    """Initial positions for superchains: each of ``K`` starting points, ``M`` times.

    Parameters
    ----------
    starts
        A PyTree whose leaves carry a leading axis of the ``K`` starting points.
    chains_per_superchain
        ``M``, the chains that start from each point.

    Returns
    -------
    The positions of ``K * M`` chains, chain ``k * M + j`` starting from point ``k``: pass them
    to :func:`rwmh.sample` with ``until=Converged(max_nested_rhat=...)``, which finds the
    superchains from the equal starts.

    Examples
    --------
    >>> import numpy as np
    >>> from rwmh import superchain_positions
    >>> superchain_positions(np.array([[0.0], [5.0]]), 3)[:, 0]
    array([0., 0., 0., 5., 5., 5.])
    """
    count = checks.check_int(chains_per_superchain, "chains_per_superchain", 1)
    return jax.tree_util.tree_map(lambda x: np.repeat(np.asarray(x), count, axis=0), starts)


def superchain_ids(initial_positions, num_chains: int, until: Converged) -> tuple | None:
    """The superchain of every chain for ``until`` (None when nested R-hat is not asked for):
    ``until.superchains`` checked against ``num_chains``, or chains with equal initial
    positions grouped together. ``ValueError`` if the groups are unequal or every chain is
    alone."""
    if until.max_nested_rhat is None:
        return None
    if until.superchains is not None:
        ids = np.asarray(until.superchains)
        if ids.shape != (num_chains,):
            raise ValueError(
                f"Converged: superchains has {ids.size} entries for {num_chains} chains."
            )
    else:
        flat = flat_draws(
            jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], initial_positions)
        )[:, 0]
        _, ids = np.unique(flat, axis=0, return_inverse=True)
        ids = ids.reshape(-1)
        if np.unique(ids).size == num_chains:
            raise ValueError(
                "until: max_nested_rhat needs superchains, chains that start from one point, "
                "but every chain of initial_positions starts from its own; make them with "
                "rwmh.superchain_positions(starts, chains_per_superchain) or pass "
                "Converged(superchains=...)."
            )
    _, sizes = np.unique(ids, return_counts=True)
    if sizes.size < 2 or np.unique(sizes).size != 1:
        raise ValueError(
            "until: superchains must be at least 2 groups of equal size; got sizes "
            f"{sorted(sizes.tolist())}."
        )
    return tuple(int(i) for i in ids)


def _dataset(flat: np.ndarray):
    import xarray as xr

    return xr.Dataset({"x": (("chain", "draw", "component"), flat)})


def _arviz_diagnostics(flat: np.ndarray, superchains) -> dict:
    """ArviZ's bulk and tail ESS and rank R-hat per component (and arviz-stats' nested R-hat
    when ``superchains`` is given), as float64 arrays."""
    from rwmh.arviz import import_stats

    az = import_stats()
    data = _dataset(flat)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # Constant components (a chain that never moved) give NaN with a RuntimeWarning; NaN
        # fails every bound below, which is the answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        values = {
            "rhat": az.rhat(data, method="rank")["x"].values,
            "ess_bulk": az.ess(data, method="bulk")["x"].values,
            "ess_tail": az.ess(data, method="tail")["x"].values,
        }
        if superchains is not None:
            from arviz_stats import rhat_nested

            values["nested_rhat"] = rhat_nested(
                data, superchain_ids=list(superchains), method="rank"
            )["x"].values
    return {name: np.asarray(value, np.float64).reshape(-1) for name, value in values.items()}


def _badness(values: dict, until: Converged) -> np.ndarray:
    """How far each component is from its bounds (1 at a bound, larger is worse, inf for
    NaN)."""
    scores = []
    if until.max_rhat is not None:
        scores.append((values["rhat"] - 1.0) / (until.max_rhat - 1.0))
    if until.max_nested_rhat is not None:
        scores.append((values["nested_rhat"] - 1.0) / (until.max_nested_rhat - 1.0))
    if until.min_ess > 0:
        scores.append(until.min_ess / values["ess_bulk"])
        scores.append(until.min_ess / values["ess_tail"])
    score = np.max(scores, axis=0)
    return np.where(np.isnan(score), np.inf, score)


def check(draws, until: Converged, superchains=None, names=None) -> dict:
    """Judge the draws so far against ``until``.

    Parameters
    ----------
    draws
        A PyTree of draws with leaves ``(chain, draw, ...)``, all draws so far.
    until
        The :class:`Converged` bounds.
    superchains
        The superchain of every chain (:func:`superchain_ids`), needed with
        ``until.max_nested_rhat``.
    names
        Component names (:func:`component_names`), for the report.

    Returns
    -------
    ``{"draw", "converged", "max_rhat", "min_ess_bulk", "min_ess_tail", "max_nested_rhat",
    "worst", "worst_rhat", "worst_ess_bulk", "worst_ess_tail", "worst_nested_rhat",
    "seconds"}``: the figures over all components, the worst component (by distance to its
    bounds) with its own figures, and how long the check took.
    """
    start = time.perf_counter()
    flat = flat_draws(draws)
    if flat.shape[1] < 4:
        # Split R-hat needs two halves of two draws; ArviZ answers NaN (and logs why).
        nan = np.full(flat.shape[-1], np.nan)
        values = {"rhat": nan, "ess_bulk": nan, "ess_tail": nan}
        if superchains is not None:
            values["nested_rhat"] = nan
    else:
        values = _arviz_diagnostics(flat, superchains)
    badness = _badness(values, until)
    worst = int(np.argmax(badness))
    names = names if names is not None else [f"x[{i}]" for i in range(flat.shape[-1])]

    def extreme(name, reduce):
        if name not in values:
            return None
        column = values[name]
        return math.nan if np.isnan(column).any() else float(reduce(column))

    def at_worst(name):
        return float(values[name][worst]) if name in values else None

    return {
        "draw": int(flat.shape[1]),
        "converged": bool(np.all(badness <= 1.0)),
        "max_rhat": extreme("rhat", np.max),
        "min_ess_bulk": extreme("ess_bulk", np.min),
        "min_ess_tail": extreme("ess_tail", np.min),
        "max_nested_rhat": extreme("nested_rhat", np.max),
        "worst": names[worst],
        "worst_rhat": at_worst("rhat"),
        "worst_ess_bulk": at_worst("ess_bulk"),
        "worst_ess_tail": at_worst("ess_tail"),
        "worst_nested_rhat": at_worst("nested_rhat"),
        "seconds": time.perf_counter() - start,
    }


def warn_unconverged(stop: dict, until: Converged, stacklevel: int) -> None:
    """The :class:`ConvergenceWarning` of a run that reached its cap unconverged;
    ``stacklevel`` counts from the caller to the user's call."""
    figures = [f"R-hat {stop['worst_rhat']:.4f}"]
    if stop["worst_nested_rhat"] is not None:
        figures.append(f"nested R-hat {stop['worst_nested_rhat']:.4f}")
    figures.append(f"bulk ESS {stop['worst_ess_bulk']:.0f}")
    figures.append(f"tail ESS {stop['worst_ess_tail']:.0f}")
    bounds = [f"min_ess={until.min_ess:g}"]
    if until.max_rhat is not None:
        bounds.insert(0, f"max_rhat={until.max_rhat:g}")
    if until.max_nested_rhat is not None:
        bounds.insert(0, f"max_nested_rhat={until.max_nested_rhat:g}")
    warnings.warn(
        f"rwmh.sample reached num_samples={stop['draw']} draws per chain without converging "
        f"({', '.join(bounds)}): the worst component, {stop['worst']}, has "
        f"{', '.join(figures)}. Raise num_samples, or look at the chains (a multimodal "
        "target, a bad parametrisation).",
        ConvergenceWarning,
        stacklevel=stacklevel + 1,  # counted from the caller
    )
