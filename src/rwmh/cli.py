"""The ``rwmh`` command line.

``rwmh regress [CSV] [--x COL --y COL] [--chains N --samples N --warmup N] [--min-ess N
--max-rhat R | --fixed] [--out FILE.nc] [--plot FILE.png]`` fits
:func:`rwmh.models.linear_regression` with random-walk Metropolis-Hastings, sampling until bulk
and tail ESS reach ``--min-ess`` and R-hat is at most ``--max-rhat`` (``--samples`` is then the
cap; ``--fixed`` draws exactly ``--samples``), and prints ArviZ's summary. NumPyro's
``initialize_model`` gives the potential on the unconstrained space (``log sigma`` instead of
``sigma``) and the map back, so the sampler sees an unbounded target and the output holds
``intercept``, ``slope`` and ``sigma``.

Bad input (a missing file, a missing or non-numeric column, too few rows, a bad count) ends
with exit status 2 and one line on stderr naming the file, column or option, never a traceback:
this is a tool for people, and a traceback hides the one thing they need to fix.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

__all__ = ["main", "read_xy", "fit_regression", "InputError", "build_parser"]

#: Variables reported by ``rwmh regress``, in the order of the model.
REGRESSION_VARIABLES = ("intercept", "slope", "sigma")
#: The regression has three parameters; with fewer points than that the data cannot pin them.
MIN_ROWS = 3
#: The built-in data: ``simulate_linear_regression(PRNGKey(SIMULATION_SEED), SIMULATION_SIZE)``.
SIMULATION_SEED = 0
SIMULATION_SIZE = 100
#: Largest ``--seed``: ``jax.random.PRNGKey`` takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1
#: Rows of the CSV file held as text at once by :func:`read_xy`.
CSV_CHUNK_ROWS = 65536
#: Largest float32; JAX's default precision.
FLOAT32_MAX = 3.4028234663852886e38
#: ``rwmh regress`` warns when a variable's R-hat is above this (Vehtari et al. 2021).
RHAT_WARNING = 1.01
#: ``rwmh regress`` samples until bulk and tail ESS reach this (Vehtari et al. 2021: 100 per
#: chain, for the 4 default chains) and R-hat is at most RHAT_WARNING, at most this many draws.
MIN_ESS = 400
MAX_SAMPLES = 100_000
#: Draws per chain with --fixed.
FIXED_SAMPLES = 5000
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


PROG = "rwmh"


class InputError(Exception):
    """Bad input from the user; its message is one line naming the file, column or option."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage block) on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _count(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``), with a message argparse
    prefixes with the option's name."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}; got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}; got {value}"
            )
        return value

    return parse


def _bound(minimum: float, what: str, strict: bool = False):
    """An argparse type: a finite number above ``minimum`` (or at it, unless ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {what}; got {text}")
        return value

    return parse


def read_xy(path: str, x_column: str = "x", y_column: str = "y"):
    """Read two numeric columns of a CSV file with a header row.

    Parameters
    ----------
    path
        The CSV file (comma-separated, UTF-8, first row holds the column names).
    x_column, y_column
        Names of the predictor and response columns.

    Returns
    -------
    ``(x, y)``, two float64 numpy arrays.

    Raises
    ------
    InputError
        If the file cannot be read, a column is missing, a value is empty, non-numeric or not
        finite, or there are fewer than ``MIN_ROWS`` rows; the message names the file, the
        column and the line.

    Examples
    --------
    >>> import tempfile, os
    >>> from rwmh.cli import read_xy
    >>> path = os.path.join(tempfile.mkdtemp(), "d.csv")
    >>> _ = open(path, "w").write("x,y\\n0,1\\n1,3\\n2,5\\n")
    >>> read_xy(path)[1]
    array([1., 3., 5.])
    """
    import numpy as np
    import pandas as pd

    if not os.path.exists(path):
        raise InputError(f"CSV file {path!r} does not exist")
    if os.path.isdir(path):
        raise InputError(f"CSV file {path!r} is a directory")
    # pandas parses; this function only turns its failures and the values into one-line
    # messages. Every cell is read as text, the header row included (as row 0, so that pandas
    # does not rename blank or repeated names) and blank lines kept, so that row i of the file
    # is line i + 1 and a message can name the line. utf-8-sig: spreadsheets often start a CSV
    # with a byte-order mark. The text is read CSV_CHUNK_ROWS rows at a time and each chunk's
    # two columns become floats at once, so that memory holds one chunk of text (Python
    # strings take tens of bytes each) and the floats, not the whole file as text.
    values = {x_column: [], y_column: []}
    header = None
    num_rows = 0
    try:
        reader = pd.read_csv(
            path,
            header=None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
            chunksize=CSV_CHUNK_ROWS,
        )
        with reader:
            for chunk in reader:
                cells = chunk.fillna("").apply(lambda column: column.str.strip())
                if header is None:
                    header = _check_header(list(cells.iloc[0]), path, x_column, y_column)
                    cells = cells.iloc[1:]
                # Blank lines carry no data; skipping them keeps a trailing newline from being
                # an error.
                cells = cells[(cells != "").any(axis=1)]
                num_rows += len(cells)
                for name in (x_column, y_column):
                    column = cells.iloc[:, header.index(name)]
                    parsed = (_parse_cell(cell, name, path, i + 1) for i, cell in column.items())
                    values[name].append(np.fromiter(parsed, float, count=len(column)))
    except pd.errors.EmptyDataError:
        pass
    except OSError as error:
        raise InputError(f"cannot read CSV file {path!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"CSV file {path!r} is not UTF-8 text") from None
    except pd.errors.ParserError as error:
        message = str(error).strip().splitlines()[-1]
        raise InputError(f"CSV file {path!r} is not valid CSV: {message}") from None
    if header is None:
        _check_header([], path, x_column, y_column)
    if num_rows < MIN_ROWS:
        raise InputError(
            f"CSV file {path!r} has {num_rows} data row(s); at least {MIN_ROWS} are "
            "needed to fit intercept, slope and sigma"
        )
    return np.concatenate(values[x_column]), np.concatenate(values[y_column])


def _check_header(header: list, path: str, x_column: str, y_column: str) -> list:
    """The header row, once it is known to name both columns; ``InputError`` otherwise."""
    if not any(header):
        raise InputError(f"CSV file {path!r} is empty; it needs a header row naming the columns")
    for option, name in (("--x", x_column), ("--y", y_column)):
        if name not in header:
            raise InputError(
                f"column {name!r} ({option}) not found in {path!r}; columns are: "
                + ", ".join(repr(h) for h in header)
            )
    return header


def _parse_cell(cell: str, name: str, path: str, line: int) -> float:
    """A CSV cell as a finite number within float32 range; ``InputError`` naming the line."""
    if not cell:
        raise InputError(f"column {name!r} in {path!r} has an empty value on line {line}")
    try:
        value = float(cell)
    except ValueError:
        raise InputError(
            f"column {name!r} in {path!r} is not numeric: {cell!r} on line {line}"
        ) from None
    if not math.isfinite(value):
        raise InputError(
            f"column {name!r} in {path!r} has a non-finite value {cell!r} on line {line}"
        )
    if abs(value) > FLOAT32_MAX:
        # JAX computes in float32 by default, where this value would become infinite.
        raise InputError(
            f"column {name!r} in {path!r} has a value beyond float32 range {cell!r} on "
            f"line {line}; rescale the column"
        )
    return value


def fit_regression(
    x,
    y,
    *,
    num_chains: int = 4,
    num_samples: int = 5000,
    num_warmup: int = 1000,
    seed: int = 0,
    progress_bar: bool = True,
    until=None,
):
    """Fit :func:`rwmh.models.linear_regression` to ``(x, y)`` with :func:`rwmh.sample`.

    With ``until`` (an :class:`rwmh.Converged`) ``num_samples`` is the cap and the run stops
    when the chains have converged; ``idata.attrs["rwmh_stop"]`` then says where and why.

    The chains start from NumPyro's ``init_to_uniform`` (uniform on ``(-2, 2)`` in the
    unconstrained space), one draw per chain, so they start apart as R-hat needs.

    Returns
    -------
    ArviZ data whose ``posterior`` holds ``intercept``, ``slope`` and ``sigma`` (constrained,
    ``sigma > 0``) and whose ``sample_stats`` holds the sampler's statistics.

    Raises
    ------
    KeyboardInterrupt
        On Ctrl-C, saying how many draws were made: a partial run is not returned as a fit.

    Examples
    --------
    >>> import numpy as np
    >>> from rwmh.cli import fit_regression
    >>> x = np.linspace(-1, 1, 20); y = 1 + 2 * x
    >>> idata = fit_regression(x, y, num_chains=2, num_samples=100, num_warmup=100,
    ...                        progress_bar=False)
    >>> idata.posterior["sigma"].shape
    (2, 100)
    """
    import jax
    import jax.numpy as jnp

    import rwmh
    from rwmh import _ctrl_c
    from rwmh.models import linear_regression
    from rwmh.numpyro import initialize

    x, y = jnp.asarray(x, dtype=float), jnp.asarray(y, dtype=float)
    rng_key = jax.random.PRNGKey(seed)
    init_key, sample_key = jax.random.split(rng_key)
    try:
        # A batch of keys gives a batch of initial points, one per chain.
        init_params, potential_fn_gen, postprocess_fn_gen = initialize(
            jax.random.split(init_key, num_chains), linear_regression, (x, y)
        )
    except (RuntimeError, ValueError) as error:
        # NumPyro raises these when no starting point has a finite log density, which with
        # finite data means values so large that float32 arithmetic overflows.
        raise InputError(
            "the model's log density is not finite at any starting point; rescale x and y "
            f"(NumPyro: {str(error).splitlines()[0]})"
        ) from None

    if _ctrl_c.presses():  # held while NumPyro compiled (rwmh regress)
        raise KeyboardInterrupt
    potential_fn = potential_fn_gen(x, y)
    postprocess_fn = postprocess_fn_gen(x, y)

    def logdensity(position):
        return -potential_fn(position)

    with warnings.catch_warnings():
        # Said below, in the command line's own words.
        warnings.filterwarnings("ignore", "rwmh.sample was interrupted", RuntimeWarning)
        result = rwmh.sample(
            sample_key,
            logdensity,
            init_params.z,
            num_samples=num_samples,
            num_warmup=num_warmup,
            progress_bar=progress_bar,
            until=until,
        )
    if result.extra.get("interrupted") or _ctrl_c.presses():
        # A part of the run is no fit: never summarise or save it as one.
        raise KeyboardInterrupt(
            f"after {result.num_draws} of {num_samples} draws per chain; nothing was written"
        )
    constrained = jax.vmap(jax.vmap(postprocess_fn))(result.positions)
    if _ctrl_c.presses():
        raise KeyboardInterrupt(f"after the {num_samples} draws per chain; nothing was written")
    constrained = {name: constrained[name] for name in REGRESSION_VARIABLES}
    stats = dict(result.stats)
    stats["step_size"] = result.parameters["step_size"]
    idata = rwmh.to_inference_data(constrained, stats)
    if "stop" in result.extra:
        stop = result.extra["stop"]
        # netCDF attributes hold numbers and strings: the essentials of the stop.
        idata.attrs["rwmh_stop"] = (
            f"{stop['reason']} at draw {stop['draw']} per chain, after "
            f"{len(result.extra['checks'])} checks"
        )
        idata.attrs["rwmh_stop_draw"] = stop["draw"]
    return idata


def _summary(idata):
    """ArviZ's summary (mean, sd, 94% HDI, MCSE, ESS, R-hat): the same columns on ArviZ 0.x
    and 1.x."""
    from rwmh.arviz import summary

    return summary(idata, REGRESSION_VARIABLES)


def _check_output(path: str | None, option: str) -> None:
    """Fail before sampling, not after, when an output file cannot be written."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InputError(f"{option} {path!r} is a directory")
    if not os.path.isdir(directory):
        raise InputError(f"{option} {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{option} {path!r}: directory {directory!r} is not writable")


def _fit(args):
    """The data, the fit and what was said about them: ``(source, x, y, until, idata)``."""
    if args.csv is None:
        import jax

        from rwmh.models import simulate_linear_regression

        x, y = simulate_linear_regression(jax.random.PRNGKey(SIMULATION_SEED), SIMULATION_SIZE)
        source = (
            f"built-in data: {SIMULATION_SIZE} points simulated with intercept=1, slope=2, "
            "sigma=0.5"
        )
    else:
        x, y = read_xy(args.csv, args.x, args.y)
        source = f"{args.csv}: {len(x)} rows, x={args.x!r}, y={args.y!r}"
    # Flushed: on a pipe stdout is block-buffered, and these lines say what the run (which
    # can take long) is doing while it runs, not after it ends.
    print(f"rwmh regress: {source}", flush=True)
    until = None
    if args.fixed:
        samples = FIXED_SAMPLES if args.samples is None else args.samples
        length = f"{samples} draws per chain"
    else:
        import rwmh

        samples = MAX_SAMPLES if args.samples is None else args.samples
        until = rwmh.Converged(min_ess=args.min_ess, max_rhat=args.max_rhat)
        length = (
            f"until bulk and tail ESS >= {args.min_ess:g} and R-hat <= {args.max_rhat:g} (at "
            f"most {samples} draws per chain)"
        )
    print(f"RWMH: {args.chains} chains, {args.warmup} warmup steps, {length}", flush=True)
    from rwmh.convergence import ConvergenceWarning

    with warnings.catch_warnings():
        # Reaching the cap unconverged is reported below, in this tool's own words.
        warnings.simplefilter("ignore", ConvergenceWarning)
        idata = fit_regression(
            x,
            y,
            num_chains=args.chains,
            num_samples=samples,
            num_warmup=args.warmup,
            seed=args.seed,
            progress_bar=not args.no_progress,
            until=until,
        )
    return source, x, y, until, idata


def _regress(args) -> int:
    _check_output(args.out, "--out")
    _check_output(args.plot, "--plot")
    if args.plot is not None:
        from rwmh.arviz import plot_format

        try:
            plot_format(args.plot)
        except ValueError as error:
            raise InputError(f"--plot: {error}") from None
    from rwmh import _ctrl_c

    # Ctrl-C is held while JAX works (it would land inside a compilation), and acted on where
    # nothing is in flight: before and after NumPyro's initialisation, at rwmh.sample's chunk
    # boundaries, and here once the fit is done.
    with _ctrl_c.deferring():
        source, x, y, until, idata = _fit(args)
        if _ctrl_c.presses():
            raise KeyboardInterrupt
    if until is not None:
        print(f"sampling stopped: {idata.attrs['rwmh_stop']}")
    acceptance = float(idata.sample_stats["acceptance_rate"].mean())
    print(f"mean acceptance rate: {acceptance:.3f}")
    summary = _summary(idata)
    # Every column on one line, whatever the terminal's width; ESS as whole draws.
    decimals = {column: 0 if column.startswith("ess") else 3 for column in summary.columns}
    print(summary.round(decimals).to_string(line_width=None))
    rhat = summary["r_hat"].to_dict()
    unconverged = [name for name, value in rhat.items() if not value <= RHAT_WARNING]
    if unconverged:
        # A warning, not an error: the results are printed and saved, but should not be trusted.
        print(
            f"{PROG} regress: warning: R-hat above {RHAT_WARNING} or undefined for "
            f"{', '.join(unconverged)}: the chains have not mixed; run longer (--warmup, "
            "--samples) or rescale the data",
            file=sys.stderr,
        )
    if args.out is not None:
        # Written next to it and renamed, so that Ctrl-C or a full disk never leaves a torn
        # file under the name of a complete fit.
        partial = f"{args.out}.partial"
        try:
            idata.to_netcdf(partial)
            os.replace(partial, args.out)
        except OSError as error:
            raise InputError(f"--out {args.out!r}: cannot write: {error}") from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        print(f"wrote {args.out}")
    if args.plot is not None:
        try:
            from rwmh.arviz import plot_trace

            plot_trace(idata, args.plot, REGRESSION_VARIABLES, title=f"rwmh regress ({source})")
        except OSError as error:
            raise InputError(f"--plot {args.plot!r}: cannot write: {error}") from None
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``rwmh`` argument parser, one subcommand per task."""
    parser = _Parser(prog=PROG, description="Random-walk Metropolis-Hastings in JAX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    regress = commands.add_parser(
        "regress",
        help="fit a Bayesian linear regression y ~ Normal(intercept + slope x, sigma)",
        description=(
            "Fit y ~ Normal(intercept + slope * x, sigma) with random-walk Metropolis-Hastings "
            "and print ArviZ's summary (mean, sd, HDI, R-hat, ESS). Without CSV, uses "
            f"{SIMULATION_SIZE} simulated points (intercept 1, slope 2, sigma 0.5)."
        ),
    )
    regress.add_argument("csv", nargs="?", metavar="CSV", help="CSV file with a header row")
    regress.add_argument("--x", default="x", metavar="COL", help="predictor column (default x)")
    regress.add_argument("--y", default="y", metavar="COL", help="response column (default y)")
    regress.add_argument(
        "--chains", type=_count(2), default=4, metavar="N", help="at least 2, for R-hat (4)"
    )
    regress.add_argument(
        "--samples",
        type=_count(4),
        default=None,
        metavar="N",
        help=f"most draws per chain ({MAX_SAMPLES}); with --fixed, the draws per chain "
        f"({FIXED_SAMPLES})",
    )
    regress.add_argument(
        "--min-ess",
        type=_bound(0.0, "a number >= 0"),
        default=MIN_ESS,
        metavar="N",
        help=f"sample until bulk and tail ESS reach N for every variable ({MIN_ESS})",
    )
    regress.add_argument(
        "--max-rhat",
        type=_bound(1.0, "a number > 1", strict=True),
        default=RHAT_WARNING,
        metavar="R",
        help=f"... and R-hat is at most R ({RHAT_WARNING})",
    )
    regress.add_argument(
        "--fixed",
        action="store_true",
        help="draw exactly --samples draws per chain, without convergence checks",
    )
    regress.add_argument(
        "--warmup", type=_count(0), default=1000, metavar="N", help="warmup steps (1000)"
    )
    regress.add_argument(
        "--seed", type=_count(0, MAX_SEED), default=0, metavar="N", help="default 0"
    )
    regress.add_argument("--out", metavar="FILE.nc", help="write the ArviZ data as netCDF")
    regress.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write trace and posterior plots (.png, .jpg, .pdf, .svg)",
    )
    regress.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    regress.add_argument(
        "--no-compilation-cache",
        action="store_true",
        help="do not keep compiled code in the user's cache directory (also: "
        "RWMH_NO_COMPILATION_CACHE=1)",
    )
    regress.set_defaults(run=_regress)
    return parser


def main(argv=None) -> int:
    """Run the ``rwmh`` command line; returns the exit status.

    Examples
    --------
    >>> from rwmh.cli import main
    >>> main(["regress", "--chains", "2", "--samples", "100", "--warmup", "100",
    ...       "--no-progress"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors and --help; argparse has printed the line
        return int(exit_.code or 0)
    if not getattr(args, "no_compilation_cache", False):
        from rwmh.compilation_cache import enable_for_command_line

        enable_for_command_line(f"{parser.prog} {args.command}")
    try:
        return args.run(args)
    except InputError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C is an answer, not a crash: no traceback
        detail = f" {interrupt}" if str(interrupt) else ""
        print(f"{parser.prog} {args.command}: interrupted{detail}", file=sys.stderr)
        return INTERRUPTED


def command_line() -> None:
    """The ``rwmh`` program: :func:`main` on ``sys.argv``, exiting with its status.

    After Ctrl-C the process ends with ``os._exit`` once the output is flushed, without the
    interpreter's finalisation: Ctrl-C interrupts the wait for an XLA compilation, not the
    compilation, which goes on in a thread of jaxlib's pool, and finalisation frees the JAX
    client under it (seen as SIGSEGV after "interrupted"). Nothing else is pending then: the
    command's own clean-up (a partial ``--out`` file) ran before :func:`main` returned.
    """
    status = main()
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    command_line()
