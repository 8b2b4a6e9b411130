"""ArviZ output: PyTree draws and sampler statistics as ``InferenceData``.

:func:`to_inference_data` names the leaves of a PyTree of draws (leaves shaped
``(chain, draw, ...)``), renames sampler statistics to ArviZ's conventions and hands both to
``arviz.from_dict``. ArviZ changed that function's signature in 1.0 (one mapping of groups,
returning an ``xarray.DataTree``, instead of one keyword per group, returning an
``InferenceData``); :func:`_from_dict` is the only place that knows, so everything else here is
the same for both major versions. ArviZ is imported only when a conversion is made, because
importing it costs about a second and ``import rwmh`` should not pay that.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "to_inference_data",
    "leaf_names",
    "from_numpyro",
    "group_names",
    "bind_numpyro_submodules",
    "plot_trace",
    "plot_format",
    "import_arviz",
    "import_base",
    "import_stats",
    "summary",
    "STAT_NAMES",
    "SUMMARY_HDI_PROB",
]

#: Names other samplers (and older rwmh code) give to statistics, mapped to ArviZ's names.
#: NumPyro's ``potential_energy`` is the negative log density, so it is negated on the way.
STAT_NAMES = {
    "accept_prob": "acceptance_rate",
    "mean_accept_prob": "acceptance_rate",
    "logdensity": "lp",
    "accepted": "is_accepted",
}
_NEGATED_STATS = {"potential_energy": "lp"}


def import_arviz():
    """Import ArviZ without its 0.2x banner (a ``FutureWarning`` about the 1.0 refactor),
    which would otherwise be printed in the middle of every command-line run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"arviz(\.|$)")
        import arviz

    return arviz


def arviz_major_version(arviz_module=None) -> int:
    """The major version of ArviZ (0 or 1): ``arviz_module.__version__``'s, or without a module
    the installed ``arviz``'s, read from its package metadata, so that ArviZ is not imported
    to find out (without metadata, as in a source tree on ``sys.path``, it is)."""
    if arviz_module is None:
        try:
            return _installed_arviz_major()
        except importlib.metadata.PackageNotFoundError:
            arviz_module = import_arviz()
    return int(str(arviz_module.__version__).split(".")[0])


@functools.cache
def _installed_arviz_major() -> int:
    return int(importlib.metadata.version("arviz").split(".")[0])


def import_stats():
    """The module whose ``rhat``, ``ess``, ``summary`` and ``rhat_nested`` ArviZ exports.

    On ArviZ 1.x that is ``arviz_stats``: ``arviz`` re-exports its functions as they are, but
    ``import arviz`` also loads ``arviz_plots`` and matplotlib, which the diagnostics and the
    summary do not use (``import jax, arviz`` 2.8-3.4 s against ``import jax, arviz_stats``
    2.4-2.5 s on Python 3.13, ArviZ 1.3). On ArviZ 0.x it is ``arviz``.
    """
    return _arviz_part("arviz_stats")


def import_base():
    """The module whose ``from_dict`` ArviZ exports: ``arviz_base`` on ArviZ 1.x (see
    :func:`import_stats` for why not ``arviz``), ``arviz`` on 0.x."""
    return _arviz_part("arviz_base")


def _arviz_part(name: str):
    if arviz_major_version() >= 1:
        return importlib.import_module(name)
    return import_arviz()


def bind_numpyro_submodules() -> None:
    """Make every loaded ``numpyro`` submodule an attribute of its parent again.

    ArviZ 1.x (``arviz_base``) registers ``numpyro`` as a lazy module (``lazy_loader``) when
    ``arviz`` is imported. If NumPyro's first real import after that is of a submodule
    (``import arviz`` and then ``from numpyro.infer import MCMC``, as isort orders them),
    Python loads ``numpyro.infer`` twice: once while running NumPyro's ``__init__``, which
    reading the lazy parent's ``__path__`` starts, and once more for the import itself. The
    second copy wins but lacks the submodules the first one loaded, so
    ``arviz.from_numpyro`` fails with "module 'numpyro.infer' has no attribute
    'initialization'". This restores the binding Python's import system normally guarantees;
    ``import rwmh.numpyro`` calls it, so any import order works. It does nothing when nothing
    is missing (ArviZ 0.x, or NumPyro imported first).
    """
    for name, module in list(sys.modules.items()):
        parent_name, _, child = name.rpartition(".")
        if module is None or not name.startswith("numpyro.") or parent_name not in sys.modules:
            continue
        parent = sys.modules[parent_name]
        if type(parent).__name__ != "_LazyModule" and not hasattr(parent, child):
            setattr(parent, child, module)


def from_numpyro(mcmc, **kwargs):
    """``arviz.from_numpyro(mcmc, log_likelihood=True, **kwargs)`` on ArviZ 0.x and 1.x.

    ArviZ 0.x includes the pointwise log likelihood (what ``arviz.loo`` needs) by default,
    ArviZ 1.x only when asked; this asks on both, after :func:`bind_numpyro_submodules`.

    Examples
    --------
    >>> idata = rwmh.arviz.from_numpyro(mcmc)  # doctest: +SKIP
    >>> arviz.loo(idata)  # doctest: +SKIP
    """
    bind_numpyro_submodules()
    kwargs.setdefault("log_likelihood", True)
    return import_arviz().from_numpyro(mcmc, **kwargs)


def group_names(data) -> list[str]:
    """The groups of ArviZ data: ``InferenceData.groups()`` (ArviZ 0.x) or the children of an
    ``xarray.DataTree`` (ArviZ 1.x)."""
    if hasattr(data, "children"):
        return list(data.children)
    return list(data.groups())


def _from_dict(groups: dict, *, coords, dims, attrs, arviz_module=None):
    """Call ``from_dict`` of whichever ArviZ is installed.

    ``arviz_module`` is any module exposing ArviZ's ``from_dict`` and ``__version__`` (``arviz``
    itself, or ``arviz_base``, which is what ArviZ 1.x re-exports); None: :func:`import_base`.
    """
    az = arviz_module or import_base()
    if arviz_major_version(az) >= 1 or not hasattr(az, "InferenceData"):
        # ArviZ >= 1 (arviz_base): groups in one mapping, attrs per group ("/" is the root),
        # result is an xarray.DataTree.
        group_attrs = {group: dict(attrs) for group in ("/", *groups)}
        return az.from_dict(groups, coords=coords, dims=dims, attrs=group_attrs)
    # ArviZ 0.x: one keyword per group, result is an arviz.InferenceData; its ``attrs`` only
    # reach the top level, so the groups get theirs through ``<group>_attrs``.
    group_attrs = {f"{group}_attrs": dict(attrs) for group in groups}
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=dict(attrs), **group_attrs)


def leaf_names(positions, var_name: str) -> tuple[list[str], list]:
    """Names and leaves of a PyTree of draws, in ``jax.tree_util`` order.

    A bare array is ``var_name``; dict keys and NamedTuple fields are used as they are, nested
    ones joined with ``"."``; tuple and list items are numbered, ``f"{var_name}_{i}"`` at the
    top level and ``f"{parent}_{i}"`` below a named node.
    """
    # Each key's own name is jax's (``keystr(..., simple=True)``); joining them is ours, because
    # ``keystr`` numbers sequence items as path parts ("x.0") where ArviZ variables read "x_0".
    with_paths, _ = jax.tree_util.tree_flatten_with_path(positions)
    names, leaves = [], []
    for path, leaf in with_paths:
        name = ""
        for key in path:
            part = jax.tree_util.keystr((key,), simple=True)
            if isinstance(key, jax.tree_util.SequenceKey):
                name = f"{name or var_name}_{part}"
            else:
                name = f"{name}.{part}" if name else part
        names.append(name or var_name)
        leaves.append(leaf)
    return names, leaves


def _check_draws(name: str, values: np.ndarray, what: str, sample_shape=None):
    if values.ndim < 2:
        raise ValueError(
            f"{what} {name!r} must have leading (chain, draw) axes; got shape {values.shape}."
        )
    if sample_shape is not None and values.shape[:2] != sample_shape:
        raise ValueError(
            f"{what} {name!r} has (chain, draw) = {values.shape[:2]}, but the draws have "
            f"{sample_shape}."
        )


def _posterior_dict(positions, var_name: str, var_names) -> dict[str, np.ndarray]:
    names, leaves = leaf_names(positions, var_name)
    if not leaves:
        raise ValueError("positions must hold at least one array of draws; got an empty PyTree.")
    if var_names is not None:
        if isinstance(var_names, str) or len(var_names) != len(leaves):
            raise ValueError(
                f"var_names must be a sequence of {len(leaves)} names, one per leaf of "
                f"positions; got {var_names!r}."
            )
        names = [str(name) for name in var_names]
    if len(set(names)) != len(names):
        raise ValueError(f"variable names must be unique; got {names}. Pass var_names.")
    posterior = {}
    for name, leaf in zip(names, leaves, strict=True):
        values = np.asarray(leaf)
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
            raise TypeError(
                f"positions leaf {name!r} must be a numeric array of draws; got dtype "
                f"{values.dtype}."
            )
        _check_draws(name, values, "positions leaf", None)
        posterior[name] = values
    shapes = {values.shape[:2] for values in posterior.values()}
    if len(shapes) != 1:
        raise ValueError(
            "every leaf of positions must share the same (chain, draw) axes; got "
            + ", ".join(f"{n}: {v.shape[:2]}" for n, v in posterior.items())
            + "."
        )
    return posterior


def _check_labels(groups: dict, coords, dims, attrs) -> None:
    """Errors naming ``coords``, ``dims`` or ``attrs`` for labels that do not fit the draws,
    before ArviZ or xarray report them in their own terms."""
    for name, value in (("coords", coords), ("dims", dims), ("attrs", attrs)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping; got {type(value).__name__}.")
    variables = {}
    for group in groups.values():
        variables.update(group)
    sizes: dict[str, int] = {}
    for var, var_dims in (dims or {}).items():
        if var not in variables:
            raise ValueError(
                f"dims names variable {var!r}, which is not in the draws; variables are "
                f"{sorted(variables)}."
            )
        if isinstance(var_dims, str) or not all(isinstance(d, str) for d in var_dims):
            raise TypeError(
                f"dims[{var!r}] must be a sequence of dimension names (strings); got {var_dims!r}."
            )
        event_shape = variables[var].shape[2:]
        if len(var_dims) > len(event_shape):
            raise ValueError(
                f"dims[{var!r}] names {len(var_dims)} dimensions, but {var!r} has event shape "
                f"{event_shape} after (chain, draw)."
            )
        for dim, size in zip(var_dims, event_shape, strict=False):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(f"dims: dimension {dim!r} has sizes {sizes[dim]} and {size}.")
    for dim, labels in (coords or {}).items():
        if dim in sizes and np.size(labels) != sizes[dim]:
            raise ValueError(
                f"coords[{dim!r}] has {np.size(labels)} labels, but dimension {dim!r} has size "
                f"{sizes[dim]}."
            )


def _check_names_are_not_dimensions(groups: dict, dims) -> None:
    """A variable named like a dimension (``chain``, ``draw``, ``x_dim_0``, a name in
    ``dims``) becomes that dimension's coordinate in xarray and vanishes from the variables,
    without a word, in ArviZ 0.x and 1.x alike: refuse it, naming it."""
    dims = dims or {}
    dimensions = {"chain": "the chain axis", "draw": "the draw axis"}
    for group in groups.values():
        for var, values in group.items():
            given = list(dims.get(var, ()))
            event_ndim = np.ndim(values) - 2
            names = given + [f"{var}_dim_{i}" for i in range(len(given), event_ndim)]
            for dim in names[:event_ndim]:
                dimensions.setdefault(dim, f"a dimension of {var!r}")
    for group_name, group in groups.items():
        for var in group:
            if var in dimensions:
                raise ValueError(
                    f"{group_name} variable {var!r} has the name of {dimensions[var]}; ArviZ "
                    "would turn it into that dimension's coordinate and drop it. Rename it "
                    "(var_names=) or name the dimensions (dims=)."
                )


def _sample_stats_dict(stats: Mapping, sample_shape) -> dict[str, np.ndarray]:
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping of name to array; got {type(stats).__name__}.")
    sample_stats = {}
    for name, value in stats.items():
        values = np.asarray(value)
        if name in _NEGATED_STATS:
            name, values = _NEGATED_STATS[name], -values
        else:
            name = STAT_NAMES.get(name, name)
        if values.ndim == 0:
            # A constant over the run (the step size after warmup) becomes one per draw,
            # which is how ArviZ stores it.
            values = np.broadcast_to(values, sample_shape)
        _check_draws(name, values, "stats entry", sample_shape)
        if name in sample_stats:
            raise ValueError(f"stats holds two entries that both map to ArviZ's {name!r}.")
        sample_stats[name] = values
    return sample_stats


def to_inference_data(
    positions,
    stats: Mapping | None = None,
    *,
    var_name: str = "x",
    var_names: Sequence[str] | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    attrs: Mapping[str, Any] | None = None,
):
    """Convert draws and sampler statistics to ArviZ data.

    Parameters
    ----------
    positions
        The draws, a PyTree (dict, tuple, list, NamedTuple, bare array) whose leaves are shaped
        ``(chain, draw, ...)``. Dict keys (and NamedTuple fields) become variable names, nested
        ones joined by ``"."``; a bare array is called ``var_name``; tuple and list items are
        called ``f"{var_name}_{i}"``.
    stats
        Optional mapping of sampler statistics, each ``(chain, draw)`` (or a scalar, repeated
        for every draw). They go to the ``sample_stats`` group under ArviZ's names: rwmh's
        ``acceptance_rate``, ``is_accepted``, ``lp`` and ``step_size`` are already those;
        NumPyro's ``accept_prob`` becomes ``acceptance_rate`` and ``potential_energy`` becomes
        ``lp`` (negated).
    var_name
        Name of a bare array of draws, and the prefix of tuple and list items.
    var_names
        Names for the leaves in ``jax.tree_util`` order, replacing the derived ones.
    coords, dims
        As in ArviZ: ``dims`` maps a variable name to the names of its dimensions after
        ``(chain, draw)``; ``coords`` maps a dimension name to its labels. Dimensions not named
        get ArviZ's defaults (``f"{name}_dim_{i}"``).
    attrs
        Extra attributes for every group; ``inference_library`` is set to ``"rwmh"``.

    Returns
    -------
    ``arviz.InferenceData`` with ArviZ 0.x, ``xarray.DataTree`` with ArviZ 1.x; both have a
    ``posterior`` group and, when ``stats`` is given, a ``sample_stats`` group.

    Raises
    ------
    ValueError
        If a leaf lacks the ``(chain, draw)`` axes, leaves disagree on them, names collide, or
        ``var_names`` does not have one name per leaf.

    Examples
    --------
    >>> import numpy as np, rwmh
    >>> draws = {"mu": np.zeros((4, 100)), "theta": np.zeros((4, 100, 3))}
    >>> stats = {"acceptance_rate": np.full((4, 100), 0.3), "lp": np.zeros((4, 100))}
    >>> idata = rwmh.to_inference_data(draws, stats, dims={"theta": ["school"]})
    >>> idata.posterior["theta"].dims
    ('chain', 'draw', 'school')
    >>> sorted(idata.sample_stats.data_vars)
    ['acceptance_rate', 'lp']
    """
    if not isinstance(var_name, str) or not var_name:
        raise ValueError(f"var_name must be a non-empty string; got {var_name!r}.")
    posterior = _posterior_dict(positions, var_name, var_names)
    sample_shape = next(iter(posterior.values())).shape[:2]
    groups = {"posterior": posterior}
    if stats is not None:
        groups["sample_stats"] = _sample_stats_dict(stats, sample_shape)
    from rwmh import __version__

    _check_labels(groups, coords, dims, attrs)
    _check_names_are_not_dimensions(groups, dims)
    all_attrs = {"inference_library": "rwmh", "inference_library_version": __version__}
    all_attrs.update(attrs or {})
    return _from_dict(
        groups,
        coords=dict(coords) if coords else None,
        dims={k: list(v) for k, v in dims.items()} if dims else None,
        attrs=all_attrs,
    )


#: The probability of the interval in :func:`summary`: ArviZ 0.x's default (``hdi_3%`` to
#: ``hdi_97%``); ArviZ 1.x defaults to 89%.
SUMMARY_HDI_PROB = 0.94


def _interval_names(hdi_prob: float) -> tuple[str, str]:
    """ArviZ 0.x's names of the HDI bounds, by their tail probabilities: ``hdi_3%``, ``hdi_97%``
    for 94%."""
    tail = 100 * (1 - hdi_prob) / 2
    return f"hdi_{tail:g}%", f"hdi_{100 - tail:g}%"


def summary(data, var_names: Sequence[str] | None = None, hdi_prob: float = SUMMARY_HDI_PROB):
    """ArviZ's summary with the same columns, interval and order on ArviZ 0.x and 1.x.

    The columns are ``mean``, ``sd``, the bounds of the ``hdi_prob`` highest-density interval
    (named as ArviZ 0.x names them: ``hdi_3%`` and ``hdi_97%`` for 94%), ``mcse_mean``,
    ``mcse_sd``, ``ess_bulk``, ``ess_tail`` and ``r_hat``, unrounded. ArviZ 1.x computes them
    with ``ci_kind="hdi", ci_prob=hdi_prob`` (its defaults are an 89% interval, bounds named
    ``eti89_lb`` / ``eti89_ub`` or ``hdi89_lb`` / ``hdi89_ub``, and another column order); read
    columns by name, never by position. The numbers come from whichever ArviZ is installed
    (their tail-ESS estimators differ slightly).

    Examples
    --------
    >>> import numpy as np, rwmh
    >>> idata = rwmh.to_inference_data({"mu": np.random.default_rng(0).normal(size=(4, 500))})
    >>> list(rwmh.arviz.summary(idata).columns)  # doctest: +NORMALIZE_WHITESPACE
    ['mean', 'sd', 'hdi_3%', 'hdi_97%', 'mcse_mean', 'mcse_sd', 'ess_bulk', 'ess_tail',
     'r_hat']
    """
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must be in (0, 1); got {hdi_prob!r}.")
    az = import_stats()
    names = None if var_names is None else list(var_names)
    lower, upper = _interval_names(hdi_prob)
    if arviz_major_version() >= 1:
        table = az.summary(data, var_names=names, ci_kind="hdi", ci_prob=hdi_prob, round_to="none")
        bounds = [c for c in table.columns if c.startswith("hdi") and c.endswith(("_lb", "_ub"))]
        if len(bounds) != 2:
            found = f"{az.__name__} {az.__version__}"
            raise RuntimeError(f"{found}: unexpected summary columns {bounds}.")
        table = table.rename(columns={b: lower if b.endswith("_lb") else upper for b in bounds})
    else:
        table = az.summary(data, var_names=names, hdi_prob=hdi_prob, round_to="none")
    columns = ["mean", "sd", lower, upper, "mcse_mean", "mcse_sd", "ess_bulk", "ess_tail"]
    return table[[*columns, "r_hat"]]


#: At most this many components are drawn by :func:`plot_trace`, as ArviZ's
#: ``rcParams["plot.max_subplots"]`` (40) bounds its own plots: a figure's drawing time and
#: size grow with every row, and 300 rows took minutes and a 72040-pixel-tall image.
MAX_TRACE_ROWS = 40


def plot_format(path: str) -> str:
    """The image format that ``path``'s extension names (``"png"``, ``"jpg"``, ``"pdf"``,
    ``"svg"``, ...), as matplotlib writes them; a ``ValueError`` naming ``path`` when it names
    none matplotlib can write, so that a wrong name fails before any sampling."""
    from matplotlib.backend_bases import FigureCanvasBase

    extension = os.path.splitext(path)[1].lower().lstrip(".")
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise ValueError(
            f"path {path!r}: the extension must name an image format matplotlib writes; got "
            f"{extension or 'none'!r}, expected one of {', '.join(sorted(supported))}."
        )
    return extension


def plot_trace(data, path: str, var_names: Sequence[str] | None = None, title: str = "") -> None:
    """Write an image with, for every scalar component, its posterior and its trace, per chain.

    Drawn with matplotlib (Agg, no window) from the ``posterior`` group rather than with
    ``arviz.plot_trace``, which ArviZ 1.x replaced by ``plot_trace_dist`` with another return
    type: the same picture then comes out of both major versions.

    Parameters
    ----------
    data
        ArviZ data with a ``posterior`` group (what :func:`to_inference_data` returns).
    path
        The file to write; its extension gives the format (``.png``, ``.jpg``, ``.pdf``,
        ``.svg``, ... see :func:`plot_format`).
    var_names
        A variable name or a list of them, default all; a variable with extra dimensions gets
        one row per component, labelled ``name[i]`` in C order. At most ``MAX_TRACE_ROWS``
        components are drawn (the first ones, with a ``UserWarning`` naming how many are left
        out), as ArviZ bounds its own plots.
    title
        A title over the figure.

    Raises
    ------
    ValueError
        If ``var_names`` is empty or names a variable the posterior lacks, the posterior has
        no draws, or ``path`` names no image format.

    Examples
    --------
    >>> import numpy as np, os, tempfile, rwmh
    >>> from rwmh.arviz import plot_trace
    >>> idata = rwmh.to_inference_data({"mu": np.random.default_rng(0).normal(size=(2, 100))})
    >>> path = os.path.join(tempfile.mkdtemp(), "trace.png")
    >>> plot_trace(idata, path)
    >>> os.path.getsize(path) > 0
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    image_format = plot_format(path)
    posterior = data.posterior
    if var_names is None:
        names = list(posterior.data_vars)
    else:
        # One name, as ArviZ takes it, not a sequence of its letters.
        names = [var_names] if isinstance(var_names, str) else list(var_names)
        if not names:
            raise ValueError("var_names is empty; give at least one variable, or None for all.")
    rows = []
    total = 0
    for name in names:
        if name not in posterior.data_vars:
            raise ValueError(
                f"var_names: {name!r} is not in the posterior; it has {list(posterior.data_vars)}."
            )
        values = np.asarray(posterior[name].values)
        if values.shape[1] == 0:
            raise ValueError(f"the posterior has no draws of {name!r} to plot.")
        flat = values.reshape(values.shape[0], values.shape[1], -1)
        total += flat.shape[-1]
        for index in range(min(flat.shape[-1], MAX_TRACE_ROWS - len(rows))):
            label = name if values.ndim == 2 else f"{name}[{index}]"
            rows.append((label, flat[:, :, index]))
    if total > len(rows):
        warnings.warn(
            f"plot_trace draws the first {len(rows)} of {total} components (MAX_TRACE_ROWS); "
            "choose the others with var_names.",
            UserWarning,
            stacklevel=2,
        )
    figure = Figure(figsize=(10, 2.4 * len(rows) + 0.4), layout="constrained")
    axes = figure.subplots(len(rows), 2, squeeze=False)
    for (label, values), (density, trace) in zip(rows, axes, strict=True):
        bins = min(40, max(10, values.shape[1] // 30))
        for chain, chain_values in enumerate(values):
            colour = f"C{chain % 10}"
            density.hist(chain_values, bins=bins, density=True, histtype="step", color=colour)
            trace.plot(chain_values, color=colour, linewidth=0.5, alpha=0.8)
        density.set_title(f"{label}: posterior, one line per chain")
        density.set_ylabel("density")
        trace.set_title(f"{label}: trace")
        trace.set_xlabel("draw")
    if title:
        figure.suptitle(title)
    figure.savefig(path, format=image_format, dpi=100)
