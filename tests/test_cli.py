"""Tests of the ``rwmh`` command line (rwmh.cli)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rwmh import cli

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Small runs: the statistics are not under test here, the plumbing is.
FAST = ["--chains", "2", "--samples", "60", "--warmup", "60", "--no-progress"]


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def regression_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = -1.0 + 0.5 * x + 0.3 * rng.normal(size=40)
    lines = ["height,weight,other"] + [f"{a},{b},label" for a, b in zip(x, y, strict=True)]
    return write_csv(tmp_path_factory.mktemp("data") / "data.csv", "\n".join(lines) + "\n")


def run_main(argv, capsys):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


SUMMARY_COLUMNS = [
    "mean", "sd", "hdi_3%", "hdi_97%", "mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat"
]  # fmt: skip


def summary_table(out: str) -> dict[str, dict[str, float]]:
    """The printed summary, read by column name: ``{variable: {column: value}}``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == SUMMARY_COLUMNS)
    table = {}
    for line in lines[start + 1 :]:
        words = line.split()
        if not words or words[0] not in cli.REGRESSION_VARIABLES:
            break
        assert len(words) == 1 + len(SUMMARY_COLUMNS), line
        table[words[0]] = dict(zip(SUMMARY_COLUMNS, map(float, words[1:]), strict=True))
    return table


def test_regress_builtin_prints_the_summary(capsys):
    """The same columns, 94% HDI included, on ArviZ 0.x and 1.x (whose own default is 89%)."""
    status, out, err = run_main(["regress", *FAST], capsys)
    assert status == 0, err
    assert any(line.split() == SUMMARY_COLUMNS for line in out.splitlines()), out
    rows = summary_table(out)
    assert list(rows) == ["intercept", "slope", "sigma"]
    assert rows["sigma"]["mean"] > 0
    for row in rows.values():
        assert row["hdi_3%"] < row["mean"] < row["hdi_97%"]


def test_summary_columns_and_interval_are_the_same_on_both_arviz_majors():
    import rwmh
    from rwmh import arviz as rwmh_arviz

    draws = np.random.default_rng(0).normal(size=(4, 4000))
    idata = rwmh.to_inference_data({"mu": draws})
    table = rwmh_arviz.summary(idata)
    assert list(table.columns) == SUMMARY_COLUMNS
    # A 94% interval of a standard normal: about -1.88 to 1.88, not the 89% one (+-1.60).
    assert table.loc["mu", "hdi_3%"] == pytest.approx(-1.88, abs=0.1)
    assert table.loc["mu", "hdi_97%"] == pytest.approx(1.88, abs=0.1)
    wide = rwmh_arviz.summary(idata, hdi_prob=0.5)
    assert list(wide.columns[2:4]) == ["hdi_25%", "hdi_75%"]
    assert wide.loc["mu", "hdi_75%"] == pytest.approx(0.674, abs=0.06)


def test_regress_csv_writes_netcdf_and_png(regression_csv, tmp_path, capsys):
    import arviz as az

    out_nc, out_png = tmp_path / "fit.nc", tmp_path / "fit.png"
    argv = ["regress", regression_csv, "--x", "height", "--y", "weight", *FAST]
    status, out, err = run_main([*argv, "--out", str(out_nc), "--plot", str(out_png)], capsys)
    assert status == 0, err
    idata = az.from_netcdf(out_nc)
    assert set(idata.posterior.data_vars) == {"intercept", "slope", "sigma"}
    assert idata.posterior["slope"].shape == (2, 60)
    assert (idata.posterior["sigma"].values > 0).all()
    assert {"acceptance_rate", "lp", "is_accepted", "step_size"} <= set(
        idata.sample_stats.data_vars
    )
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out_nc}" in out and f"wrote {out_png}" in out


def test_regress_recovers_the_line_from_a_csv(regression_csv, capsys):
    # 40 points from intercept -1, slope 0.5, sigma 0.3: the posterior means land close.
    argv = ["regress", regression_csv, "--x", "height", "--y", "weight", "--no-progress"]
    status, out, err = run_main([*argv, "--samples", "400", "--warmup", "400"], capsys)
    assert status == 0, err
    rows = summary_table(out)
    assert rows["intercept"]["mean"] == pytest.approx(-1.0, abs=0.2)
    assert rows["slope"]["mean"] == pytest.approx(0.5, abs=0.2)
    assert rows["sigma"]["mean"] == pytest.approx(0.3, abs=0.15)


def test_main_job_with_its_defaults_ends_converged(capsys):
    """The README's first command, ``rwmh regress`` with its defaults on the built-in data,
    ends without a warning: every R-hat is at most 1.01 (with 2000 draws per chain, the
    former default, the intercept's was 1.013 on this seed)."""
    status, out, err = run_main(["regress", "--no-progress"], capsys)
    assert status == 0, err
    assert "warning" not in err, err
    rows = summary_table(out)
    assert max(row["r_hat"] for row in rows.values()) <= cli.RHAT_WARNING
    assert min(row["ess_bulk"] for row in rows.values()) >= 400


def test_read_xy_reads_columns_by_name(tmp_path):
    path = write_csv(tmp_path / "d.csv", "\ufeffy, x\n1, 0\n3, 1\n\n  \n5 ,2\n")
    x, y = cli.read_xy(path)
    np.testing.assert_array_equal(x, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(y, [1.0, 3.0, 5.0])


BAD_CSVS = {
    "non_numeric": ("x,y\n1,2\n2,abc\n3,4\n", [], "column 'y' .* not numeric: 'abc' on line 3"),
    "empty_cell": ("x,y\n1,2\n,3\n3,4\n", [], "column 'x' .* empty value on line 3"),
    "short_row": ("x,y\n1,2\n2\n3,4\n", [], "column 'y' .* empty value on line 3"),
    "infinite": ("x,y\n1,2\n2,inf\n3,4\n", [], "column 'y' .* non-finite value 'inf'"),
    "missing_x": ("a,y\n1,2\n2,3\n3,4\n", [], "column 'x' \\(--x\\) not found .* 'a', 'y'"),
    "missing_named": ("x,y\n1,2\n2,3\n3,4\n", ["--y", "w"], "column 'w' \\(--y\\) not found"),
    "too_few_rows": ("x,y\n1,2\n2,3\n", [], "has 2 data row\\(s\\); at least 3"),
    "header_only": ("x,y\n", [], "has 0 data row\\(s\\)"),
    "empty_file": ("", [], "is empty"),
    "beyond_float32": ("x,y\n1,2\n2,3e39\n3,4\n", [], "column 'y' .* beyond float32 range"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_is_one_line_naming_the_problem(case, tmp_path, capsys):
    text, extra, pattern = BAD_CSVS[case]
    path = write_csv(tmp_path / f"{case}.csv", text)
    status, out, err = run_main(["regress", path, *extra, *FAST], capsys)
    assert status == 2
    assert out == ""  # failed before sampling or printing anything
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rwmh regress: error: ")
    assert path in lines[0] or case.startswith("missing")
    assert re.search(pattern, lines[0]), lines[0]


def test_missing_file_and_directory(tmp_path, capsys):
    missing = str(tmp_path / "nope.csv")
    status, _, err = run_main(["regress", missing], capsys)
    assert status == 2
    assert err == f"rwmh regress: error: CSV file {missing!r} does not exist\n"
    status, _, err = run_main(["regress", str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "is a directory" in err


def test_non_utf8_file(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"x,y\n1,\xe9\n")
    status, _, err = run_main(["regress", str(path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "not UTF-8" in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--chains", "1", "argument --chains: must be an integer >= 2; got 1"),
        ("--chains", "0", "argument --chains: must be an integer >= 2; got 0"),
        ("--chains", "-3", "argument --chains: must be an integer >= 2; got -3"),
        ("--chains", "two", "argument --chains: must be an integer >= 2; got 'two'"),
        ("--chains", "2.5", "argument --chains: must be an integer >= 2; got '2.5'"),
        ("--seed", "-1", "argument --seed: must be an integer >= 0; got -1"),
        ("--samples", "0", "argument --samples: must be an integer >= 4; got 0"),
        ("--samples", "many", "argument --samples: must be an integer >= 4; got 'many'"),
        ("--warmup", "-1", "argument --warmup: must be an integer >= 0; got -1"),
        ("--min-ess", "-3", "argument --min-ess: must be a number >= 0; got -3"),
        ("--min-ess", "nan", "argument --min-ess: must be a number >= 0; got nan"),
        ("--max-rhat", "1", "argument --max-rhat: must be a number > 1; got 1"),
        ("--max-rhat", "x", "argument --max-rhat: must be a number > 1; got 'x'"),
    ],
)
def test_bad_counts_name_the_option(option, value, message, capsys):
    status, out, err = run_main(["regress", f"{option}={value}"], capsys)
    assert status == 2
    assert err == f"rwmh regress: error: {message}\n"


def test_bad_output_paths_fail_before_sampling(tmp_path, capsys):
    nowhere = str(tmp_path / "missing_dir" / "fit.nc")
    status, out, err = run_main(["regress", "--out", nowhere], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"rwmh regress: error: --out {nowhere!r}: directory")
    status, out, err = run_main(["regress", "--plot", str(tmp_path)], capsys)
    assert status == 2 and out == "" and "--plot" in err and "is a directory" in err


def test_missing_subcommand_and_unknown_option(capsys):
    status, _, err = run_main([], capsys)
    assert status == 2 and err.count("\n") == 1 and "COMMAND" in err
    status, _, err = run_main(["regress", "--chainz", "3"], capsys)
    assert status == 2 and err.count("\n") == 1 and "--chainz" in err


def test_module_entry_point_exits_nonzero_without_traceback(tmp_path):
    path = write_csv(tmp_path / "d.csv", "x,y\n1,2\n")
    env = dict(os.environ, PYTHONPATH=SRC)
    done = subprocess.run(
        [sys.executable, "-m", "rwmh.cli", "regress", path],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"rwmh regress: error: CSV file {path!r} has 1 data row(s); at least 3 are needed to "
        "fit intercept, slope and sigma"
    ]


def test_overflowing_data_is_one_line_not_a_traceback(tmp_path, capsys):
    # Finite in float32, but the squared residuals overflow: no starting point is finite.
    path = write_csv(tmp_path / "big.csv", "x,y\n1e30,1\n2e30,2\n3e30,3\n")
    status, _, err = run_main(["regress", path, *FAST], capsys)
    assert status == 2
    assert err.splitlines() == [err.strip()]
    assert "log density is not finite at any starting point; rescale x and y" in err


def test_rhat_warning_matches_the_summary(capsys):
    # Four draws per chain after no warmup: the chains cannot agree yet.
    argv = ["regress", "--chains", "2", "--samples", "4", "--warmup", "0", "--no-progress"]
    status, out, err = run_main(argv, capsys)
    assert status == 0
    rhat = {name: row["r_hat"] for name, row in summary_table(out).items()}
    high = [name for name in cli.REGRESSION_VARIABLES if not rhat[name] <= cli.RHAT_WARNING]
    assert high, rhat
    assert err == (
        f"rwmh regress: warning: R-hat above 1.01 or undefined for {', '.join(high)}: the "
        "chains have not mixed; run longer (--warmup, --samples) or rescale the data\n"
    )


# --- Ctrl-C: a subprocess and SIGINT ---------------------------------------------------------

#: A run that cannot end before the signals below: sampling never converges (ESS 1e9), so it
#: goes on to the cap of 10**6 draws per chain, and the convergence checks keep its chunks short.
CTRL_C_SAMPLES = 10**6
CTRL_C_ARGV = ["regress", "--warmup", "100000", "--samples", str(CTRL_C_SAMPLES)]
CTRL_C_ARGV += ["--min-ess", "1e9", "--no-compilation-cache"]
#: What the bar shows once sampling has recorded a chunk: "sampling:   3%|...| 3400/1000000".
SAMPLING_BAR = re.compile(r"sampling:[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/")
INTERRUPTED = re.compile(
    r"rwmh regress: interrupted( after (\d+) of \d+ draws per chain; nothing was written)?"
)


def _interrupt_regress(tmp_path, terminal: bool, moment):
    """Run ``rwmh regress`` in a subprocess and send it SIGINT at ``moment``: ``"header"`` (as
    soon as the "RWMH:" line arrives, before the fit), ``"sampling"`` (once the bar shows a
    sampling chunk), or a number of seconds after the start.

    Returns ``(report, seen)``: what the process did, and ``{"started": seconds from the start
    to the signal, "sampling": the bar's draws before it (None: not in sampling yet)}``.
    """
    import signal
    import threading
    import time

    out = tmp_path / "fit.nc"
    argv = [sys.executable, "-m", "rwmh.cli", *CTRL_C_ARGV, "--out", str(out)]
    # Without PYTHONUNBUFFERED: on a pipe stdout is block-buffered, as for every user.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=SRC, JAX_PLATFORMS="cpu")
    if terminal:
        import fcntl
        import pty
        import struct
        import termios

        controller, stderr = pty.openpty()  # stderr a terminal: the progress bar is on
        # A new terminal is 0 columns wide, where tqdm draws nothing: give it a width.
        fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    else:
        controller, stderr = None, subprocess.PIPE
    began = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=stderr)
    if terminal:
        os.close(stderr)
    stdout, errors = [], []
    header, sampling = threading.Event(), threading.Event()

    def read_stdout():
        for line in iter(process.stdout.readline, b""):
            stdout.append(line.decode())
            if line.startswith(b"RWMH:"):
                header.set()

    def read_errors():
        # A reader at all times: a terminal or pipe nobody reads fills and blocks the child.
        source = controller if terminal else process.stderr.fileno()
        while True:
            try:
                chunk = os.read(source, 65536)
            except OSError:  # the terminal's other side closed
                break
            if not chunk:
                break
            errors.append(chunk.decode(errors="replace"))
            if any(int(n) > 0 for n in SAMPLING_BAR.findall("".join(errors[-2:]))):
                sampling.set()

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=read_errors)]
    for reader in readers:
        reader.start()
    try:
        if moment == "header":
            assert header.wait(120), "no RWMH: line"
        elif moment == "sampling":
            assert sampling.wait(300), "sampling never began"
        else:
            time.sleep(max(0.0, moment - (time.monotonic() - began)))
        started = time.monotonic() - began
        bar = SAMPLING_BAR.findall("".join(errors))
        assert process.poll() is None, "the run ended before the signal"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for reader in readers:
            reader.join(timeout=30)
        if controller is not None:
            os.close(controller)
    report = {
        "returncode": process.returncode,
        "stdout": "".join(stdout),
        "stderr": "".join(errors),
        "wrote": out.exists() or (tmp_path / "fit.nc.partial").exists(),
    }
    return report, {"started": started, "sampling": int(bar[-1]) if bar else None}


def _assert_interrupted(report, seen):
    """Exit 130 with one line saying "interrupted", after every draw made before the signal."""
    assert report["returncode"] == 130, (seen, report)
    err = report["stderr"]
    assert "Traceback" not in err and "Fatal Python error" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    # With the count of draws when the signal came once sampling had begun, the bare word
    # when it came before the sampler began (importing, compiling).
    said = INTERRUPTED.fullmatch(lines[0].strip())
    assert said, lines
    if seen["sampling"] is not None:
        # Every draw shown before the signal was computed, and is counted.
        assert said.group(2) is not None and int(said.group(2)) >= seen["sampling"], (seen, said)
    assert not report["wrote"]
    assert "wrote" not in report["stdout"] and "r_hat" not in report["stdout"]


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_ctrl_c_exits_130_saying_interrupted_and_writes_nothing(terminal, tmp_path):
    """SIGINT while ``rwmh regress`` runs. Before the fix it exited 0 and wrote ``fit.nc`` with
    a fraction of the draws as if complete (terminal), or crashed in ArviZ's summary of a run
    with no draws (no terminal). The "RWMH:" line is flushed: on a pipe it used to arrive only
    when the process ended, after the run."""
    report, seen = _interrupt_regress(tmp_path, terminal, "header")
    _assert_interrupted(report, seen)


def _interrupt_at_random_moments(tmp_path, count: int, seed: int):
    """``count`` runs, each interrupted at a random moment from the start (importing) to
    well into sampling, half with a terminal, half on pipes. The first run measures when
    sampling begins; the run goes on long after it, so every moment falls inside the run."""
    rng = np.random.default_rng(seed)
    report, seen = _interrupt_regress(tmp_path / "0", True, "sampling")
    _assert_interrupted(report, seen)
    assert seen["sampling"] > 0
    horizon = 2.0 * seen["started"]
    moments = [seen]
    for index in range(1, count):
        path = tmp_path / str(index)
        path.mkdir()
        report, seen = _interrupt_regress(path, index % 2 == 0, float(rng.uniform(0, horizon)))
        _assert_interrupted(report, seen)
        moments.append(seen)
    return moments, horizon


def test_ctrl_c_at_random_moments_of_regress(tmp_path):
    """Before the fix a SIGINT while JAX compiled (here during NumPyro's initialisation) printed
    "interrupted" and then died of SIGSEGV: the interpreter's exit freed the JAX client under
    the compilation that went on in a thread of jaxlib's pool."""
    (tmp_path / "0").mkdir()
    _interrupt_at_random_moments(tmp_path, 3, seed=0)


@pytest.mark.slow
def test_ctrl_c_at_20_random_moments_of_regress(tmp_path):
    (tmp_path / "0").mkdir()
    moments, horizon = _interrupt_at_random_moments(tmp_path, 20, seed=1)
    # Before sampling (importing, compiling, warming up) and in it were both hit.
    in_sampling = [m["sampling"] is not None for m in moments[2::2]]  # the terminal runs
    assert any(in_sampling) and not all(in_sampling), (horizon, moments)


def test_ctrl_c_while_importing_rwmh_is_a_keyboard_interrupt():
    """Before the fix a SIGINT while ``import rwmh`` imported jaxlib became ``ImportError:
    Encountered an error while initializing the extension``, or was lost and the program went
    on (``rwmh regress`` then ran to the end and exited 0)."""
    import signal
    import time

    code = "import rwmh; print('imported', flush=True); import time; time.sleep(60)"
    env = dict(os.environ, PYTHONPATH=SRC, JAX_PLATFORMS="cpu")
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(0.2)  # importing JAX alone takes longer
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    err = err.decode()
    assert out == b"", "the signal came after the import"
    assert process.returncode == -signal.SIGINT, err
    assert err.rstrip().splitlines()[-1] == "KeyboardInterrupt", err
    assert "ImportError" not in err
