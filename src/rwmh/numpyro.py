"""Random-walk Metropolis-Hastings as a NumPyro ``MCMCKernel``.

:class:`RWMH` runs the one Metropolis-Hastings step of :func:`rwmh.build_kernel` on the
*unconstrained* latent space of a NumPyro model (NumPyro's ``initialize_model`` provides the
bijections and the potential energy :math:`U(z) = -\\log \\pi(z)`, Jacobians included), so
``numpyro.infer.MCMC`` can drive it like any of its own kernels. The proposal is

.. math::

    z' = z + s \\, L \\epsilon, \\qquad \\epsilon \\sim \\mathcal{N}(0, I_d),
    \\qquad L L^\\top = \\Sigma,

accepted with probability :math:`\\min(1, \\exp(U(z) - U(z')))` (Metropolis et al. 1953;
Hastings 1970). During the ``num_warmup`` first iterations the step size :math:`s` and the
proposal covariance :math:`\\Sigma` are tuned by :mod:`rwmh.tuning` (Stan-style windows,
Robbins-Monro on :math:`\\log s`); afterwards both are frozen, so the chain is a
time-homogeneous Markov chain.

With ``chain_method="vectorized"`` the kernel receives the whole batch of chains and updates
them together: the adaptation statistics are then *pooled* across chains (one step size and
one covariance for all of them, estimated from every chain's draws), as :func:`rwmh.sample`
does. With the other chain methods (``"sequential"``, ``"parallel"``, or a callable such as
``jax.vmap``) each chain adapts on its own draws.

As in NumPyro's own ``sa.py``, the work is done by two pure functions, :func:`init_kernel`
and :func:`sample_kernel`, that take everything they use as arguments; the class :class:`RWMH`
only checks options, sets up the model and calls them.

References
----------
Metropolis, N., Rosenbluth, A. W., Rosenbluth, M. N., Teller, A. H. and Teller, E. (1953).
Equation of state calculations by fast computing machines. J. Chem. Phys. 21, 1087.

Hastings, W. K. (1970). Monte Carlo sampling methods using Markov chains and their
applications. Biometrika 57, 97-109.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to
from numpyro.infer.gibbs import GIBBS_SITES_KWARG
from numpyro.infer.initialization import init_to_uniform, init_to_value
from numpyro.infer.mcmc import MCMCKernel
from numpyro.infer.util import initialize_model, transform_fn
from numpyro.util import identity, is_prng_key

from rwmh import checks, tuning
from rwmh.arviz import bind_numpyro_submodules
from rwmh.kernel import RWMHState, build_kernel, check_step_size, proposal_scale

# ``import arviz`` (1.x) before NumPyro can leave numpyro.infer without its submodules.
bind_numpyro_submodules()

__all__ = [
    "RWMH",
    "RWMHKernelState",
    "KernelSettings",
    "init_kernel",
    "sample_kernel",
    "initialize",
]

Array = jax.Array


class RWMHKernelState(NamedTuple):
    """State of :class:`RWMH` between two calls of ``sample``.

    In vectorized mode (``chain_method="vectorized"``) every field but ``adapt_state`` carries
    a leading chain axis, so that ``MCMC`` can collect it per chain (the pooled step size is
    then the same for all chains); ``adapt_state`` is shared by all chains and held once, so
    that the state does not grow as chains x d^2, but for its ``step_size``, repeated per
    chain like the field ``step_size``, so that ``extra_fields=("adapt_state.step_size",)``
    collects it as it does for NumPyro's HMC and NUTS.

    i
        Iteration counter, starting at 0. Iterations ``i < num_warmup`` adapt; it is *not*
        reset after warmup, so a state from ``MCMC.post_warmup_state`` samples without
        adapting.
    z
        The current position in the unconstrained space (a dict of sites for a model, or
        whatever PyTree ``init_params`` was for a ``potential_fn``).
    potential_energy
        Potential energy (negative unnormalised log density) at ``z``.
    accept_prob
        Metropolis-Hastings acceptance probability of the last proposal, accepted or not
        (0 for a proposal whose potential energy is NaN or infinite).
    mean_accept_prob
        Mean of ``accept_prob`` since the start of the current phase (warmup or sampling).
    step_size
        The step size the next transition uses. During warmup it follows the adaptation;
        from the last warmup iteration on it is the adapted (averaged) value.
    adapt_state
        The :class:`rwmh.tuning.AdaptationState`; its ``proposal`` is the proposal covariance
        (with its factor) that the next transition uses, and its ``step_size`` equals
        ``step_size`` (one per chain in vectorized mode, as that is).
    rng_key
        The chain's key. It does not change from one transition to the next: transition ``i``
        draws from ``jax.random.fold_in(rng_key, i)``, so a state continued from
        ``MCMC.post_warmup_state`` with its own ``rng_key`` continues the same chain.
    """

    i: Array
    z: Any
    potential_energy: Array
    accept_prob: Array
    mean_accept_prob: Array
    step_size: Array
    adapt_state: tuning.AdaptationState
    rng_key: Array


class KernelSettings(NamedTuple):
    """What :func:`sample_kernel` needs besides the state, fixed by ``RWMH.init``.

    num_warmup
        Iterations ``i < num_warmup`` adapt.
    schedule
        The :class:`rwmh.tuning.Schedule` of warmup, with one spare row of no adaptation at
        the end, so that the row ``min(i, num_warmup)`` always exists.
    target_accept_prob
        Acceptance probability the step size is tuned toward.
    adapt_step_size, adapt_proposal_cov
        Which parameters adapt.
    """

    num_warmup: int
    schedule: tuning.Schedule
    target_accept_prob: float
    adapt_step_size: bool
    adapt_proposal_cov: bool


def _as_float(tree):
    """Integer or boolean initial values would make the random walk fail; move them to floats."""

    def cast(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(jnp.result_type(float))

    return jax.tree_util.tree_map(cast, tree)


def _first(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def _repeat(tree, num_chains: int):
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), tree)


def initialize(rng_key, model, model_args=(), model_kwargs=None, init_strategy=init_to_uniform):
    """NumPyro's ``initialize_model`` as RWMH uses it: ``(param_info, potential_fn_gen,
    postprocess_fn)`` on the unconstrained space, for a key or a batch of keys (one initial
    point per key), without the gradient check that a random walk does not need."""
    return _initialize_model(rng_key, model, model_args, model_kwargs, init_strategy)[:3]


def _initialize_model(rng_key, model, model_args, model_kwargs, init_strategy):
    return initialize_model(
        rng_key,
        model,
        init_strategy=init_strategy,
        dynamic_args=True,
        model_args=model_args,
        model_kwargs={} if model_kwargs is None else model_kwargs,
        validate_grad=False,
    )


def _inverse_transforms(model_trace) -> dict:
    """Unconstrained-to-constrained bijection of every latent continuous sample site."""
    return {
        name: biject_to(site["fn"].support)
        for name, site in model_trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["fn"].support.is_discrete
    }


def _check_potential_shape(potential_energy, batch_shape: tuple) -> None:
    if jnp.shape(potential_energy) != batch_shape:
        raise ValueError(
            "potential_fn must return a scalar potential energy for one position; got shape "
            f"{jnp.shape(potential_energy)[len(batch_shape) :]}. Reduce it, e.g. with jnp.sum."
        )


def init_kernel(init_params, potential_fn, adapt_state, rng_key) -> RWMHKernelState:
    """The first :class:`RWMHKernelState` at ``init_params``.

    ``rng_key`` is one key, or a batch of ``num_chains`` keys in vectorized mode: then
    ``init_params`` carry a leading chain axis and the state is batched, but for the shared
    ``adapt_state``.
    """
    vectorized = not is_prng_key(rng_key)
    dtype = adapt_state.step_size.dtype
    if vectorized:
        # From the keys: a model without continuous latent sites has no leaves to count.
        num_chains = jnp.shape(rng_key)[0]
        potential_energy = jax.vmap(potential_fn, axis_size=num_chains)(init_params)
        _check_potential_shape(potential_energy, (num_chains,))
        potential_energy = potential_energy.astype(dtype)
        checks.check_finite_logdensity(potential_energy, "init_params", what="the potential energy")
        zeros = jnp.zeros((num_chains,), dtype)
        return RWMHKernelState(
            i=jnp.zeros((num_chains,), jnp.int32),
            z=init_params,
            potential_energy=potential_energy,
            accept_prob=zeros,
            mean_accept_prob=zeros,
            step_size=_repeat(adapt_state.step_size, num_chains),
            adapt_state=adapt_state._replace(step_size=_repeat(adapt_state.step_size, num_chains)),
            rng_key=rng_key,
        )
    potential_energy = jnp.asarray(potential_fn(init_params))
    _check_potential_shape(potential_energy, ())
    potential_energy = potential_energy.astype(dtype)
    checks.check_finite_logdensity(
        potential_energy, "init_params", batched=False, what="the potential energy"
    )
    return RWMHKernelState(
        i=jnp.zeros((), jnp.int32),
        z=init_params,
        potential_energy=potential_energy,
        accept_prob=jnp.zeros((), dtype),
        mean_accept_prob=jnp.zeros((), dtype),
        step_size=adapt_state.step_size,
        adapt_state=adapt_state,
        rng_key=rng_key,
    )


def sample_kernel(state: RWMHKernelState, potential_fn, settings: KernelSettings):
    """One random-walk Metropolis-Hastings transition, adapting while ``i < num_warmup``.

    A batched state (vectorized mode) moves all its chains and adapts once from all of them;
    its ``adapt_state`` stays one shared copy (but for its per-chain ``step_size``).
    """
    logdensity_fn = lambda z: -potential_fn(z)
    kernel = build_kernel()
    batched = jnp.ndim(state.potential_energy) == 1
    adapt_state = state.adapt_state
    # The step size and the counter are the same for all chains of a batch.
    i, step_size = _first((state.i, state.step_size)) if batched else (state.i, state.step_size)
    if batched:
        adapt_state = adapt_state._replace(step_size=_first(adapt_state.step_size))

    def move(z, potential_energy, rng_key):
        # The key of transition i is fold_in(chain key, i), as rwmh.sample derives its step
        # keys, and the chain key stays put: one hash per transition. Splitting the carried
        # key instead made vectorized MCMC(RWMH) 1.26x rwmh.sample (numpyro_overhead.py).
        key_step = jax.random.fold_in(rng_key, i)
        current = RWMHState(z, -potential_energy)
        new, info = kernel(key_step, current, logdensity_fn, step_size, adapt_state.proposal)
        flat_position = ravel_pytree(z)[0]
        flat_proposal = ravel_pytree(info.proposal.position)[0]
        return new, info.acceptance_rate, flat_position, flat_proposal

    if batched:
        move = jax.vmap(move)
    new, accept_prob, flat_positions, flat_proposals = move(
        state.z, state.potential_energy, state.rng_key
    )
    if settings.adapt_step_size or settings.adapt_proposal_cov:
        # The adaptation takes a batch of chains; one chain is a batch of one.
        adapt_state, step_size = _adapt(
            settings, i, adapt_state, step_size, flat_positions, flat_proposals, accept_prob
        )

    itr = state.i + 1
    # The running mean restarts with the sampling phase.
    n = jnp.where(state.i < settings.num_warmup, itr, itr - settings.num_warmup)
    dtype = state.mean_accept_prob.dtype
    accept_prob = accept_prob.astype(dtype)
    mean_accept_prob = state.mean_accept_prob + (accept_prob - state.mean_accept_prob) / n
    if batched:
        step_size = _repeat(step_size, state.potential_energy.shape[0])
        adapt_state = adapt_state._replace(step_size=step_size)
    return RWMHKernelState(
        i=itr,
        z=new.position,
        potential_energy=(-new.logdensity).astype(state.potential_energy.dtype),
        accept_prob=accept_prob,
        mean_accept_prob=mean_accept_prob,
        step_size=step_size,
        adapt_state=adapt_state,
        rng_key=state.rng_key,
    )


def _adapt(settings, i, adapt_state, step_size, flat_positions, flat_proposals, accept_prob):
    """Warmup update from the transitions of all chains in the batch, under a ``lax.cond`` on
    ``i < num_warmup`` so that sampling iterations neither change the parameters nor pay for
    the update.

    A select of the update's result at every iteration instead (what jax 0.12 used before)
    makes warmup iterations cheaper and sampling ones dearer. ``benchmarks/numpyro_overhead.py``
    (4 chains, 2000 warmup + 2000 draws, 1000 points), jax 0.12.0.1 on Python 3.13, MCMC(RWMH)
    against rwmh.sample: cond 1.16, select 1.23 and 1.25; the parts on their own (2000 warmup
    steps and 1 draw, 1 warmup step and 2000 draws, ms): cond 23.7 and 12.2, select 20.9 and
    12.6, but with both phases cond 39.6 and select 45.5 ms. On jax 0.10 the cond was the
    faster already."""
    num_warmup = settings.num_warmup

    def update(operand):
        adapt_state, step_size = operand
        row = settings.schedule.at(jnp.minimum(i, num_warmup))
        adapt_state = tuning.update(
            adapt_state,
            row,
            flat_positions,
            flat_proposals,
            accept_prob,
            settings.target_accept_prob,
            step_index=i,
            moment_stride=tuning.moment_stride(flat_positions.shape[-1]),
        )
        if settings.adapt_step_size:
            # The last warmup step hands over the averaged iterate, the value to sample with.
            final = tuning.final(adapt_state)["step_size"]
            step_size = jnp.where(i == num_warmup - 1, final, adapt_state.step_size)
        step_size = step_size.astype(operand[1].dtype)
        # Keep adapt_state.step_size what it documents, the step size of the next
        # transition (users of NumPyro's HMC collect "adapt_state.step_size").
        return adapt_state._replace(step_size=step_size), step_size

    return jax.lax.cond(i < num_warmup, update, identity, (adapt_state, step_size))


class RWMH(MCMCKernel):
    """Random-walk Metropolis-Hastings for ``numpyro.infer.MCMC``.

    A Gaussian random walk in the unconstrained space with a step size and a proposal
    covariance tuned during warmup (:mod:`rwmh.tuning`), reusing rwmh's kernel
    (:func:`rwmh.build_kernel`). It needs no gradients, so it also serves models whose log
    density is not differentiable. In ``chain_method="vectorized"`` the warmup statistics
    are pooled across chains.

    Parameters
    ----------
    model
        A Python callable with NumPyro primitives. Give either ``model`` or ``potential_fn``.
    potential_fn
        A callable returning the potential energy (negative log density up to a constant) of
        one position; ``MCMC.run`` must then be given ``init_params`` (with a leading chain
        axis when ``num_chains > 1``).
    step_size
        Initial step size ``s`` (the fixed one when ``adapt_step_size=False``); positive.
        Default ``2.38 / sqrt(d)`` for ``d`` unconstrained dimensions.
    proposal_cov
        Initial proposal covariance over the flattened unconstrained position (dict sites in
        sorted name order, as ``jax.flatten_util.ravel_pytree`` flattens them): ``(d,)``
        variances or a ``(d, d)`` matrix. Default: the identity.
    adapt_step_size
        Tune the step size during warmup toward ``target_accept_prob``.
    adapt_proposal_cov
        Estimate the proposal covariance during warmup (Stan's slow windows).
    dense
        Use a dense (True) or diagonal (False) proposal covariance.
    target_accept_prob
        Acceptance probability the step size is tuned toward, in (0, 1). Default
        ``0.234 + 0.206 exp(-(d - 1) / 2)``: 0.44 for ``d = 1`` falling to 0.234
        (Roberts, Gelman & Gilks 1997).
    init_strategy
        A per-site initialization function (see ``numpyro.infer.initialization``).

    Raises
    ------
    ValueError
        If both or neither of ``model`` and ``potential_fn`` are given, ``step_size`` is not
        positive, ``target_accept_prob`` lies outside (0, 1) or ``proposal_cov`` is not a
        valid covariance.

    Notes
    -----
    As NumPyro's own kernels, ``RWMH`` runs models without a continuous latent site (it then
    returns their deterministic sites, as NUTS does) and serves as a block of
    ``numpyro.infer.Gibbs``: it takes the constrained start values ``Gibbs`` gives non-HMC
    blocks, and :meth:`get_constrain_fn` uses the sites' bijections without running the model.
    Positions must be float32 or float64.

    Collected by default: ``z`` (the draws), ``accept_prob`` and ``potential_energy``, which
    ``arviz.from_numpyro`` turns into ``sample_stats.acceptance_rate`` and ``sample_stats.lp``.
    Other fields of :class:`RWMHKernelState` (``step_size``, ``mean_accept_prob``, ...) can be
    asked for with ``MCMC.run(..., extra_fields=...)``.

    References
    ----------
    Roberts, G. O., Gelman, A. and Gilks, W. R. (1997). Weak convergence and optimal scaling
    of random walk Metropolis algorithms. Annals of Applied Probability 7, 110-120.

    Examples
    --------
    >>> import jax
    >>> from numpyro.infer import MCMC
    >>> from rwmh.models import linear_regression, simulate_linear_regression
    >>> from rwmh.numpyro import RWMH
    >>> x, y = simulate_linear_regression(jax.random.key(0), 100)
    >>> mcmc = MCMC(RWMH(linear_regression), num_warmup=500, num_samples=500, num_chains=2,
    ...             chain_method="vectorized", progress_bar=False)
    >>> mcmc.run(jax.random.key(1), x, y)
    >>> mcmc.get_samples(group_by_chain=True)["slope"].shape
    (2, 500)
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        step_size: float | None = None,
        proposal_cov: Any = None,
        adapt_step_size: bool = True,
        adapt_proposal_cov: bool = True,
        dense: bool = True,
        target_accept_prob: float | None = None,
        init_strategy: Callable = init_to_uniform,
    ):
        if (model is None) == (potential_fn is None):
            raise ValueError(
                "Give exactly one of `model` or `potential_fn`; got "
                + ("both." if model is not None else "neither.")
            )
        for name, fn in (("model", model), ("potential_fn", potential_fn)):
            if fn is not None:
                checks.check_callable(fn, name)
        checks.check_callable(init_strategy, "init_strategy")
        self._model = model
        self._potential_fn = potential_fn
        self._step_size = check_step_size(step_size)
        # Checked here to reject a bad covariance early; init checks it against the
        # dimension once that is known.
        proposal_scale(proposal_cov)
        self._proposal_cov = proposal_cov
        self._adapt_step_size = checks.check_bool(adapt_step_size, "adapt_step_size")
        self._adapt_proposal_cov = checks.check_bool(adapt_proposal_cov, "adapt_proposal_cov")
        self._dense = checks.check_bool(dense, "dense")
        # Traced under jax.jit, as NumPyro's own kernels allow.
        self._target_accept_prob = checks.check_probability(
            target_accept_prob, "target_accept_prob", allow_traced=True
        )
        self._init_strategy = init_strategy
        # Set by init.
        self._potential_fn_gen = None
        self._postprocess_fn = None
        self._inv_transforms = None
        self._settings = None
        # MCMC calls init again whenever this is None (a fresh or unpickled kernel).
        self._sample_fn = None

    @property
    def model(self):
        return self._model

    @property
    def sample_field(self):
        return "z"

    @property
    def default_fields(self):
        return ("z", "accept_prob", "potential_energy")

    def get_diagnostics_str(self, state):
        """Step size and mean acceptance probability, for NumPyro's progress bar."""
        step_size = float(jnp.mean(state.step_size))
        accept_prob = float(jnp.mean(state.mean_accept_prob))
        return f"step size {step_size:.2e}. acc. prob={accept_prob:.2f}"

    def postprocess_fn(self, model_args, model_kwargs):
        if self._postprocess_fn is None:
            return identity
        return self._postprocess_fn(*model_args, **model_kwargs)

    def get_potential_fn(self, model_args=(), model_kwargs=None):
        """The potential energy of one unconstrained position for these model arguments."""
        if self._model is None:
            return self._potential_fn
        if self._potential_fn_gen is None:
            raise RuntimeError("The kernel is not initialised: run `init` (or MCMC.run) first.")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        return self._potential_fn_gen(*model_args, **model_kwargs)

    def refresh(self, state, model_args, model_kwargs):
        """Recompute ``potential_energy`` at ``state.z`` for new model arguments (Gibbs)."""
        potential_fn = self.get_potential_fn(model_args, model_kwargs)
        if jnp.ndim(state.potential_energy) == 1:
            potential_fn = jax.vmap(potential_fn)
        return state._replace(potential_energy=potential_fn(state.z))

    def init(self, rng_key, num_warmup, init_params=None, model_args=(), model_kwargs=None):
        """Initial :class:`RWMHKernelState`; called by ``MCMC.run``.

        Parameters
        ----------
        rng_key
            One key, or a batch of ``num_chains`` keys in vectorized mode (the state is then
            batched too and this kernel moves all chains at once).
        num_warmup
            Number of adapting iterations.
        init_params
            Initial unconstrained position (required with ``potential_fn``); by default drawn
            with ``init_strategy``.
        model_args, model_kwargs
            Arguments of the model.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        # A batch of keys means chain_method="vectorized": this kernel moves all chains.
        vectorized = not is_prng_key(rng_key)
        if vectorized:
            rng_key, key_init = jnp.swapaxes(jax.vmap(jax.random.split)(rng_key), 0, 1)
        else:
            rng_key, key_init = jax.random.split(rng_key)

        if self._model is not None:
            init_strategy = self._init_strategy
            if init_params is not None and GIBBS_SITES_KWARG in model_kwargs:
                # A block of numpyro.infer.Gibbs: Gibbs hands blocks that are not HMC the
                # *constrained* values of their sites; NumPyro maps them to the unconstrained
                # space as it does for init_to_value.
                init_strategy = init_to_value(values=init_params)
                init_params = None
            param_info, self._potential_fn_gen, self._postprocess_fn, model_trace = (
                _initialize_model(key_init, self._model, model_args, model_kwargs, init_strategy)
            )
            self._inv_transforms = _inverse_transforms(model_trace)
            if init_params is None:
                init_params = param_info.z
        elif init_params is None:
            raise ValueError("`init_params` must be given to MCMC.run when using `potential_fn`.")
        init_params = _as_float(init_params)
        if jax.tree_util.tree_leaves(init_params) or self._model is None:
            # A model may have no continuous latent site (only deterministic or enumerated
            # ones): NumPyro's kernels run it all the same, and so does this one.
            checks.check_float_positions(init_params, "init_params", batched=vectorized)
        one_position = _first(init_params) if vectorized else init_params
        flat_one, _ = ravel_pytree(one_position)
        dimension = flat_one.shape[0]
        if self._proposal_cov is not None:
            proposal_scale(self._proposal_cov, dimension)
        check_step_size(self._step_size, dtype=flat_one.dtype)

        num_warmup = int(num_warmup)
        # The chains that pool their acceptance: the batch in vectorized mode, else this one.
        num_chains = jnp.shape(rng_key)[0] if vectorized else 1
        schedule = tuning.build_schedule(num_warmup, num_chains=num_chains)
        if not self._adapt_proposal_cov:
            # No slow window: the adaptation then leaves the covariance alone.
            schedule = tuning.Schedule(*(np.zeros_like(column) for column in schedule))
        # One spare row without adaptation, so that the row min(i, num_warmup) always exists.
        schedule = tuning.Schedule(*(np.append(column, False) for column in schedule))
        target = self._target_accept_prob
        if target is None:
            target = tuning.default_target_acceptance_rate(dimension)
        adapt = (self._adapt_step_size, self._adapt_proposal_cov)
        step_size, dense = self._step_size, self._dense
        if dimension == 0:
            # Nothing to move: every proposal is the current point (acceptance 1), and there
            # is nothing to adapt. A unit step and an empty diagonal stand in.
            adapt, step_size, dense = (False, False), 1.0, False
        self._settings = KernelSettings(num_warmup, schedule, target, *adapt)
        adapt_state = tuning.init(
            dimension, flat_one.dtype, step_size, self._proposal_cov, dense=dense
        )
        potential_fn = self.get_potential_fn(model_args, model_kwargs)
        state = init_kernel(init_params, potential_fn, adapt_state, rng_key)
        self._sample_fn = sample_kernel
        return state

    def sample(self, state, model_args, model_kwargs):
        """One random-walk Metropolis-Hastings transition (adapting while ``i < num_warmup``).

        Parameters
        ----------
        state
            The current :class:`RWMHKernelState` (batched in vectorized mode).
        model_args, model_kwargs
            Arguments of the model.

        Returns
        -------
        The next :class:`RWMHKernelState`.
        """
        if self._sample_fn is None:
            raise RuntimeError("The kernel is not initialised: run `init` (or MCMC.run) first.")
        if not isinstance(state, RWMHKernelState):
            raise TypeError(
                f"RWMH.sample needs an RWMHKernelState; got {type(state).__name__}. A "
                "post_warmup_state or last_state from another kernel (NUTS, HMC, ...) cannot "
                "continue with RWMH: run its warmup with RWMH."
            )
        model_kwargs = {} if model_kwargs is None else model_kwargs
        potential_fn = self.get_potential_fn(model_args, model_kwargs)
        return self._sample_fn(state, potential_fn, self._settings)

    def get_constrain_fn(self, model_args=(), model_kwargs=None) -> Callable:
        """Map unconstrained site values to constrained ones with the sites' bijections alone,
        without running the model (as NumPyro's HMC does): ``numpyro.infer.Gibbs`` calls it
        with model arguments that lack the sibling blocks' values."""
        if self._model is None:
            return identity
        if self._inv_transforms is None:
            raise RuntimeError("The kernel is not initialised: run `init` (or MCMC.run) first.")
        transforms = self._inv_transforms
        return lambda z: transform_fn(transforms, z)

    def __getstate__(self):
        state = self.__dict__.copy()
        # Closures built by init do not pickle; MCMC rebuilds them by calling init again.
        state["_sample_fn"] = None
        state["_potential_fn_gen"] = None
        state["_postprocess_fn"] = None
        return state

    def wrap_model(self, wrapper: Callable) -> RWMH:
        """A copy of this kernel bound to ``wrapper(self.model)``, to be initialised afresh."""
        if self._model is None:
            raise ValueError("wrap_model needs a kernel built from a model, not a potential_fn.")
        kernel = copy.copy(self)
        kernel._model = wrapper(self._model)
        kernel._sample_fn = None
        kernel._potential_fn_gen = None
        kernel._postprocess_fn = None
        kernel._inv_transforms = None
        return kernel
