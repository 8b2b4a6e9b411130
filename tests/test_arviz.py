"""Tests of rwmh.to_inference_data and rwmh.arviz.plot_trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwmh
from rwmh import arviz as rwmh_arviz

SRC = str(Path(__file__).resolve().parents[1] / "src")
CHAINS, DRAWS = 3, 50


def draws(*event_shape, seed=0):
    return np.random.default_rng(seed).normal(size=(CHAINS, DRAWS, *event_shape))


def stats():
    rng = np.random.default_rng(1)
    return {
        "acceptance_rate": rng.uniform(size=(CHAINS, DRAWS)),
        "is_accepted": rng.uniform(size=(CHAINS, DRAWS)) < 0.3,
        "lp": rng.normal(size=(CHAINS, DRAWS)),
        "step_size": np.float32(0.7),
    }


def test_dict_pytree_with_stats_has_names_shapes_and_dims():
    positions = {"mu": draws(), "theta": draws(4, seed=2), "L": draws(2, 3, seed=3)}
    coords = {"school": ["a", "b", "c", "d"]}
    idata = rwmh.to_inference_data(positions, stats(), coords=coords, dims={"theta": ["school"]})
    posterior = idata.posterior
    assert set(posterior.data_vars) == {"mu", "theta", "L"}
    assert posterior["mu"].dims == ("chain", "draw")
    assert posterior["theta"].dims == ("chain", "draw", "school")
    assert list(posterior["theta"]["school"].values) == coords["school"]
    # Unnamed extra dimensions get ArviZ's default names.
    assert posterior["L"].dims == ("chain", "draw", "L_dim_0", "L_dim_1")
    assert posterior["L"].shape == (CHAINS, DRAWS, 2, 3)
    np.testing.assert_array_equal(posterior["theta"].values, positions["theta"])

    sample_stats = idata.sample_stats
    assert set(sample_stats.data_vars) == {"acceptance_rate", "is_accepted", "lp", "step_size"}
    for name in sample_stats.data_vars:
        assert sample_stats[name].dims == ("chain", "draw")
    # A scalar step size is repeated for every draw, as ArviZ stores it.
    np.testing.assert_allclose(sample_stats["step_size"].values, 0.7)
    assert sample_stats["is_accepted"].dtype == bool
    assert posterior.attrs["inference_library"] == "rwmh"


def test_jax_arrays_and_bare_array_are_named():
    idata = rwmh.to_inference_data(jnp.asarray(draws(2)))
    assert list(idata.posterior.data_vars) == ["x"]
    assert idata.posterior["x"].shape == (CHAINS, DRAWS, 2)
    idata = rwmh.to_inference_data(draws(), var_name="beta")
    assert list(idata.posterior.data_vars) == ["beta"]


def test_tuples_lists_namedtuples_and_nested_dicts_get_names():
    idata = rwmh.to_inference_data((draws(), draws(2)))
    assert set(idata.posterior.data_vars) == {"x_0", "x_1"}
    idata = rwmh.to_inference_data([draws(), draws()], var_name="z")
    assert set(idata.posterior.data_vars) == {"z_0", "z_1"}

    class Params(NamedTuple):
        loc: np.ndarray
        scale: np.ndarray

    idata = rwmh.to_inference_data(Params(draws(), draws()))
    assert set(idata.posterior.data_vars) == {"loc", "scale"}
    idata = rwmh.to_inference_data({"w": {"a": draws(), "b": (draws(), draws())}})
    assert set(idata.posterior.data_vars) == {"w.a", "w.b_0", "w.b_1"}
    idata = rwmh.to_inference_data((draws(), draws()), var_names=["alpha", "beta"])
    assert set(idata.posterior.data_vars) == {"alpha", "beta"}


def test_other_samplers_stat_names_are_mapped_to_arviz_names():
    potential = np.random.default_rng(0).normal(size=(CHAINS, DRAWS))
    idata = rwmh.to_inference_data(
        {"a": draws()},
        {"accept_prob": np.full((CHAINS, DRAWS), 0.25), "potential_energy": potential},
    )
    assert set(idata.sample_stats.data_vars) == {"acceptance_rate", "lp"}
    np.testing.assert_allclose(idata.sample_stats["lp"].values, -potential)


@pytest.mark.parametrize(
    ("positions", "stats_", "kwargs", "match"),
    [
        ({"a": np.zeros(5)}, None, {}, "'a' must have leading \\(chain, draw\\)"),
        ({"a": draws(), "b": np.zeros((2, DRAWS))}, None, {}, "same \\(chain, draw\\)"),
        ({}, None, {}, "at least one array"),
        ({"a": draws()}, {"lp": np.zeros((CHAINS, 7))}, {}, "stats entry 'lp'"),
        (
            {"a": draws()},
            {"lp": np.zeros((CHAINS, DRAWS)), "logdensity": np.zeros((CHAINS, DRAWS))},
            {},
            "both map to ArviZ's 'lp'",
        ),
        ((draws(), draws()), None, {"var_names": ["only_one"]}, "var_names must be"),
        ((draws(), draws()), None, {"var_names": ["same", "same"]}, "unique"),
        (draws(), None, {"var_name": ""}, "var_name"),
    ],
)
def test_bad_input_names_the_argument(positions, stats_, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rwmh.to_inference_data(positions, stats_, **kwargs)


def test_sample_result_to_inference_data():
    result = rwmh.sample(
        jax.random.key(0),
        lambda p: -0.5 * (p["a"] ** 2 + jnp.sum(p["b"] ** 2)),
        {"a": jnp.zeros(2), "b": jnp.ones((2, 3))},
        num_samples=20,
        num_warmup=20,
        progress_bar=False,
    )
    idata = result.to_inference_data(dims={"b": ["k"]})
    assert idata.posterior["a"].shape == (2, 20)
    assert idata.posterior["b"].dims == ("chain", "draw", "k")
    assert set(idata.sample_stats.data_vars) == {
        "acceptance_rate",
        "is_accepted",
        "lp",
        "step_size",
    }
    np.testing.assert_allclose(idata.sample_stats["lp"].values, result.stats["lp"])


def test_import_rwmh_does_not_import_arviz():
    code = "import sys, rwmh; rwmh.to_inference_data; print('arviz' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": SRC, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


class _FakeArviz:
    """Records how the adapter calls ``from_dict``."""

    def __init__(self, version, has_inference_data):
        self.__version__ = version
        if has_inference_data:
            self.InferenceData = object
        self.calls = []

    def from_dict(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "converted"


@pytest.mark.parametrize("version", ["1.0.0", "1.3.0"])
def test_adapter_uses_the_one_mapping_signature_for_arviz_1(version):
    fake = _FakeArviz(version, has_inference_data=False)
    groups = {"posterior": {"a": draws()}, "sample_stats": {"lp": draws()}}
    attrs = {"inference_library": "rwmh"}
    out = rwmh_arviz._from_dict(groups, coords=None, dims=None, attrs=attrs, arviz_module=fake)
    assert out == "converted"
    ((args, kwargs),) = fake.calls
    assert args == (groups,)
    assert "posterior" not in kwargs
    assert kwargs["attrs"]["posterior"]["inference_library"] == "rwmh"


def test_adapter_uses_one_keyword_per_group_for_arviz_0():
    fake = _FakeArviz("0.23.4", has_inference_data=True)
    groups = {"posterior": {"a": draws()}, "sample_stats": {"lp": draws()}}
    rwmh_arviz._from_dict(groups, coords=None, dims=None, attrs={"k": 1}, arviz_module=fake)
    ((args, kwargs),) = fake.calls
    assert args == ()
    assert kwargs["posterior"] is groups["posterior"]
    assert kwargs["sample_stats"] is groups["sample_stats"]
    assert kwargs["posterior_attrs"] == {"k": 1}


def _arviz_1_module():
    """ArviZ >= 1 if installed, else ``arviz_base`` (the package ArviZ 1.x re-exports, which
    also installs on Python 3.11 and is in the test extra, so this path always runs)."""
    try:
        import arviz

        if rwmh_arviz.arviz_major_version(arviz) >= 1:
            return arviz
    except ImportError:
        pass
    import arviz_base

    return arviz_base


@pytest.mark.filterwarnings("error::UserWarning")
def test_real_arviz_1_path(monkeypatch):
    module = _arviz_1_module()
    monkeypatch.setattr(rwmh_arviz, "import_arviz", lambda: module)
    idata = rwmh.to_inference_data(
        {"mu": draws(), "theta": draws(4)}, stats(), dims={"theta": ["school"]}
    )
    import xarray as xr

    assert isinstance(idata, xr.DataTree)
    assert idata["posterior"]["theta"].dims == ("chain", "draw", "school")
    assert idata["posterior"]["mu"].shape == (CHAINS, DRAWS)
    assert idata["posterior"].attrs["inference_library"] == "rwmh"
    assert idata.attrs["inference_library"] == "rwmh"
    assert set(idata["sample_stats"].data_vars) == {
        "acceptance_rate",
        "is_accepted",
        "lp",
        "step_size",
    }


def test_plot_trace_writes_a_png_and_checks_names(tmp_path):
    idata = rwmh.to_inference_data({"mu": draws(), "theta": draws(2)})
    path = tmp_path / "trace.png"
    rwmh_arviz.plot_trace(idata, str(path), title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'nope' is not in the posterior"):
        rwmh_arviz.plot_trace(idata, str(path), var_names=["nope"])


@pytest.mark.parametrize(
    "names, culprit",
    [(["draw", "mu"], "draw"), (["chain", "mu"], "chain"), (["x_dim_0", "x"], "x_dim_0")],
)
def test_variables_named_like_dimensions_are_refused_not_dropped(names, culprit):
    """Before the fix ArviZ (0.x and 1.x alike) turned them into coordinates: the variable
    vanished from the posterior without a word."""
    draws = {
        name: np.zeros((2, 5, 3)) if name in ("mu", "x") else np.ones((2, 5)) for name in names
    }
    with pytest.raises(ValueError, match=f"variable '{culprit}' has the name of"):
        rwmh.to_inference_data(draws)


def test_naming_the_dimensions_keeps_a_variable_called_like_a_default_dimension():
    draws = {"x_dim_0": np.ones((2, 5)), "x": np.zeros((2, 5, 3))}
    idata = rwmh.to_inference_data(draws, dims={"x": ["component"]})
    assert sorted(idata.posterior.data_vars) == ["x", "x_dim_0"]


def test_sample_with_a_parameter_named_chain_does_not_lose_it():
    positions = {"chain": jnp.zeros(4), "mu": jnp.zeros(4)}
    result = rwmh.sample(
        jax.random.key(0),
        lambda p: -0.5 * (p["chain"] ** 2 + p["mu"] ** 2),
        positions,
        20,
        20,
        progress_bar=False,
    )
    assert result.positions["chain"].shape == (4, 20)
    with pytest.raises(ValueError, match="variable 'chain' has the name of the chain axis"):
        result.to_inference_data()
    idata = result.to_inference_data(var_names=["c", "mu"])
    assert sorted(idata.posterior.data_vars) == ["c", "mu"]
