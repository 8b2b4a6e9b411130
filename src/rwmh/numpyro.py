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
proposal covariance :math:`\\Sigma` are tuned by :mod:`rwmh.adaptation` (Stan-style windows,
Robbins-Monro on :math:`\\log s`); afterwards both are frozen, so the chain is a
time-homogeneous Markov chain.

With ``chain_method="vectorized"`` the kernel receives the whole batch of chains and updates
them together: the adaptation statistics are then *pooled* across chains (one step size and
one covariance for all of them, estimated from every chain's draws), as :func:`rwmh.sample`
does. With the other chain methods (``"sequential"``, ``"parallel"``, or a callable such as
``jax.vmap``) each chain adapts on its own draws.

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
from numpyro.infer.initialization import init_to_uniform
from numpyro.infer.mcmc import MCMCKernel
from numpyro.infer.util import initialize_model
from numpyro.util import identity, is_prng_key

from rwmh import _checks
from rwmh import adaptation as _adaptation
from rwmh import kernel as _kernel
from rwmh.arviz import bind_numpyro_submodules

# ``import arviz`` (1.x) before NumPyro can leave numpyro.infer without its submodules.
bind_numpyro_submodules()

__all__ = ["RWMH", "RWMHKernelState"]

Array = jax.Array


class RWMHKernelState(NamedTuple):
    """State of :class:`RWMH` between two calls of ``sample``.

    In vectorized mode (``chain_method="vectorized"``) every field carries a leading chain
    axis; the step size and the adaptation state are then the same for all chains (pooled)
    and merely repeated along that axis, so that ``MCMC`` can collect any field per chain.

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
        The :class:`rwmh.adaptation.AdaptationState`; its ``scale`` factors the proposal
        covariance that the next transition uses, and its ``step_size`` equals ``step_size``.
    rng_key
        Random key for the next transition.
    """

    i: Array
    z: Any
    potential_energy: Array
    accept_prob: Array
    mean_accept_prob: Array
    step_size: Array
    adapt_state: _adaptation.AdaptationState
    rng_key: Array


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


def _add_axis(tree):
    return jax.tree_util.tree_map(lambda x: x[None], tree)


def _repeat(tree, num_chains: int):
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_chains,) + jnp.shape(x)), tree)


class RWMH(MCMCKernel):
    """Random-walk Metropolis-Hastings for ``numpyro.infer.MCMC``.

    A Gaussian random walk in the unconstrained space with a step size and a proposal
    covariance tuned during warmup (:mod:`rwmh.adaptation`), reusing rwmh's kernel
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
                _checks.check_callable(fn, name)
        _checks.check_callable(init_strategy, "init_strategy")
        self._model = model
        self._potential_fn = potential_fn
        self._step_size = _kernel.check_step_size(step_size)
        # Factor once here only to reject a bad covariance early; init factors it again
        # once the dimension is known.
        _kernel.proposal_scale(proposal_cov)
        self._proposal_cov = proposal_cov
        self._adapt_step_size = _checks.check_bool(adapt_step_size, "adapt_step_size")
        self._adapt_proposal_cov = _checks.check_bool(adapt_proposal_cov, "adapt_proposal_cov")
        self._dense = _checks.check_bool(dense, "dense")
        self._target_accept_prob = _adaptation._check_target(
            target_accept_prob, "target_accept_prob"
        )
        self._init_strategy = init_strategy
        # Set by init.
        self._potential_fn_gen = None
        self._postprocess_fn = None
        self._num_warmup = 0
        self._schedule = None
        self._target = None
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
            param_info, self._potential_fn_gen, self._postprocess_fn, _ = initialize_model(
                key_init,
                self._model,
                init_strategy=self._init_strategy,
                dynamic_args=True,
                model_args=model_args,
                model_kwargs=model_kwargs,
                # Random-walk proposals need no gradient: accept models without one.
                validate_grad=False,
            )
            if init_params is None:
                init_params = param_info.z
        elif init_params is None:
            raise ValueError("`init_params` must be given to MCMC.run when using `potential_fn`.")
        init_params = _as_float(init_params)
        _checks.check_float_positions(init_params, "init_params", batched=vectorized)
        one_position = _first(init_params) if vectorized else init_params
        flat_one, _ = ravel_pytree(one_position)
        dimension = flat_one.shape[0]
        if dimension == 0:
            raise ValueError("RWMH needs at least one continuous latent variable; found none.")
        if self._proposal_cov is not None:
            _kernel.proposal_scale(self._proposal_cov, dimension)

        self._num_warmup = int(num_warmup)
        self._target = (
            self._target_accept_prob
            if self._target_accept_prob is not None
            else _adaptation.default_target_acceptance_rate(dimension)
        )
        schedule = _adaptation.build_schedule(self._num_warmup)
        if not self._adapt_proposal_cov:
            # No slow window: the adaptation then leaves the covariance alone.
            schedule = np.zeros_like(schedule)
        # One spare all-False row, so that indexing with min(i, num_warmup) is always valid.
        self._schedule = np.concatenate([schedule, np.zeros((1, schedule.shape[1]), bool)])

        adapt_state = _adaptation.init(
            dimension, flat_one.dtype, self._step_size, self._proposal_cov, dense=self._dense
        )
        potential_fn = self.get_potential_fn(model_args, model_kwargs)
        dtype = flat_one.dtype
        if vectorized:
            num_chains = jnp.shape(jax.tree_util.tree_leaves(init_params)[0])[0]
            potential_energy = jax.vmap(potential_fn)(init_params).astype(dtype)
            _checks.check_finite_logdensity(
                potential_energy, "init_params", what="the potential energy"
            )
            zeros = jnp.zeros((num_chains,), dtype)
            state = RWMHKernelState(
                i=jnp.zeros((num_chains,), jnp.int32),
                z=init_params,
                potential_energy=potential_energy,
                accept_prob=zeros,
                mean_accept_prob=zeros,
                step_size=_repeat(adapt_state.step_size, num_chains),
                adapt_state=_repeat(adapt_state, num_chains),
                rng_key=rng_key,
            )
        else:
            potential_energy = jnp.asarray(potential_fn(init_params)).astype(dtype)
            _checks.check_finite_logdensity(
                potential_energy, "init_params", batched=False, what="the potential energy"
            )
            state = RWMHKernelState(
                i=jnp.zeros((), jnp.int32),
                z=init_params,
                potential_energy=potential_energy,
                accept_prob=jnp.zeros((), dtype),
                mean_accept_prob=jnp.zeros((), dtype),
                step_size=adapt_state.step_size,
                adapt_state=adapt_state,
                rng_key=rng_key,
            )
        self._sample_fn = self._transition
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
        return self._sample_fn(state, model_args, model_kwargs)

    def _transition(self, state, model_args, model_kwargs):
        model_kwargs = {} if model_kwargs is None else model_kwargs
        potential_fn = self.get_potential_fn(model_args, model_kwargs)
        logdensity_fn = lambda z: -potential_fn(z)
        kernel = _kernel.build_kernel()
        batched = jnp.ndim(state.potential_energy) == 1

        # The step size, covariance and counter are shared by all chains of a batch.
        shared = (state.i, state.step_size, state.adapt_state)
        i, step_size, adapt_state = _first(shared) if batched else shared

        def move(z, potential_energy, rng_key):
            rng_key, key_step = jax.random.split(rng_key)
            current = _kernel.RWMHState(z, -potential_energy)
            new, info = kernel(key_step, current, logdensity_fn, step_size, scale=adapt_state.scale)
            flat_position = ravel_pytree(z)[0]
            flat_proposal = ravel_pytree(info.proposal.position)[0]
            return new, info.acceptance_rate, flat_position, flat_proposal, rng_key

        if batched:
            move = jax.vmap(move)
        new, accept_prob, flat_positions, flat_proposals, rng_key = move(
            state.z, state.potential_energy, state.rng_key
        )
        if self._adapt_step_size or self._adapt_proposal_cov:
            # The adaptation takes a batch of chains; one chain is a batch of one.
            batch = (flat_positions, flat_proposals, accept_prob)
            adapt_state, step_size = self._adapt(
                i, adapt_state, step_size, *(batch if batched else _add_axis(batch))
            )

        itr = state.i + 1
        # The running mean restarts with the sampling phase.
        n = jnp.where(state.i < self._num_warmup, itr, itr - self._num_warmup)
        dtype = state.mean_accept_prob.dtype
        accept_prob = accept_prob.astype(dtype)
        mean_accept_prob = state.mean_accept_prob + (accept_prob - state.mean_accept_prob) / n
        if batched:
            num_chains = state.potential_energy.shape[0]
            step_size, adapt_state = _repeat((step_size, adapt_state), num_chains)
        return RWMHKernelState(
            i=itr,
            z=new.position,
            potential_energy=(-new.logdensity).astype(state.potential_energy.dtype),
            accept_prob=accept_prob,
            mean_accept_prob=mean_accept_prob,
            step_size=step_size,
            adapt_state=adapt_state,
            rng_key=rng_key,
        )

    def _adapt(self, i, adapt_state, step_size, flat_positions, flat_proposals, accept_prob):
        """Warmup update from the transitions of all chains in the batch, gated by
        ``i < num_warmup`` so that sampling never changes the parameters."""
        num_warmup = self._num_warmup
        schedule = jnp.asarray(self._schedule)

        def update(operand):
            adapt_state, step_size = operand
            row = schedule[jnp.minimum(i, num_warmup)]
            adapt_state = _adaptation.update(
                adapt_state, row, flat_positions, flat_proposals, accept_prob, self._target
            )
            if self._adapt_step_size:
                # The last warmup step hands over the averaged iterate, the value to sample with.
                final = _adaptation.parameters(adapt_state)["step_size"]
                step_size = jnp.where(i == num_warmup - 1, final, adapt_state.step_size)
            step_size = step_size.astype(operand[1].dtype)
            # Keep adapt_state.step_size what it documents, the step size of the next
            # transition (users of NumPyro's HMC collect "adapt_state.step_size").
            return adapt_state._replace(step_size=step_size), step_size

        return jax.lax.cond(i < num_warmup, update, identity, (adapt_state, step_size))

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
        return kernel
