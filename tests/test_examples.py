"""Run the examples with small settings: they must work and their answers must be sensible."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blackjax_loop(tmp_path, capsys):
    example = load("blackjax_loop")
    plot = tmp_path / "loop.png"
    idata = example.main(
        ["--chains", "3", "--warmup", "300", "--samples", "600", "--plot", str(plot)]
    )
    assert plot.read_bytes()[:4] == b"\x89PNG"
    posterior = idata.posterior
    assert posterior["coef"].dims == ("chain", "draw", "coefficient")
    assert posterior["coef"].shape == (3, 600, 2)
    means = np.concatenate([[posterior["loc"].mean()], posterior["coef"].mean(("chain", "draw"))])
    # Loose: 1800 correlated RWMH draws have an effective size of a few hundred.
    np.testing.assert_allclose(means, example.MEAN, atol=0.6 * example.STD.max())
    assert "exact:" in capsys.readouterr().out


def test_blackbox_likelihood_one_host_call_per_step(tmp_path):
    example = load("blackbox_likelihood")
    plot = tmp_path / "blackbox.png"
    idata, calls = example.main(
        ["--chains", "3", "--warmup", "300", "--samples", "300", "--plot", str(plot)]
    )
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # One vectorised callback per step (plus one to initialise), whatever the number of chains.
    assert calls == 1 + 300 + 300
    assert idata.posterior["r"].shape == (3, 300)
    assert float(idata.posterior["r"].mean()) == pytest.approx(example.TRUE["r"], rel=0.2)
    assert float(idata.posterior["K"].mean()) == pytest.approx(example.TRUE["K"], rel=0.2)


def test_numpy_loglikelihood_broadcasts_over_chains():
    example = load("blackbox_likelihood")
    loglik = example.NumpyLogLikelihood(example.simulate())
    theta = np.log([[0.35, 500.0, 20.0], [0.2, 300.0, 5.0]])
    batched = loglik(theta)
    assert batched.shape == (2,)
    np.testing.assert_allclose(batched, [loglik(theta[0]), loglik(theta[1])])


def test_pseudo_marginal(capsys):
    example = load("pseudo_marginal")
    fits = example.main(
        ["--times", "30", "--particles", "16", "--chains", "4", "--warmup", "200"]
        + ["--samples", "200"]
    )
    exact = fits["exact"]
    assert exact.shape == (4, 200, 3)
    mean, sd = exact.mean(axis=(0, 1)), exact.std(axis=(0, 1))
    for correlation in (0.0, 0.99):
        assert fits[correlation].shape == (4, 200, 3)
        # Loose: 800 sticky pseudo-marginal draws have an effective size of a few dozen; the
        # statistical agreement is tests/test_pmmh.py's job.
        np.testing.assert_array_less(np.abs(fits[correlation].mean(axis=(0, 1)) - mean), sd)
    out = capsys.readouterr().out
    assert out.count("ESS per second") == 2
    assert "sd of the log-likelihood estimate" in out


def test_data_and_closures_shows_the_closure_rule(capsys):
    example = load("data_and_closures")
    first, stale, means = example.main()
    # The captured global was read once: changing it did not change the target.
    assert abs(first - 1.0) < 0.3 and abs(stale - 1.0) < 0.3
    # Data passed as arguments is seen by every call.
    assert abs(means[0] - 1.0) < 0.3 and abs(means[1] - 10.0) < 0.3
    out = capsys.readouterr().out
    assert "captured global" in out and "logdensity_args" in out
