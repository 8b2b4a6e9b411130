"""rwmh: random-walk Metropolis-Hastings in JAX.

A vmapped RWMH kernel with BlackJAX's ``init``/``step`` interface, warmup that adapts the step
size and proposal covariance with statistics pooled across chains, a multi-chain driver, a
NumPyro ``MCMCKernel`` and ArviZ output. ``docs/architecture.md`` maps the modules.
"""

from rwmh import _ctrl_c

# Ctrl-C during these imports (seconds: JAX, NumPyro, ArviZ) is raised once they are done.
with _ctrl_c.deferred_import():
    from rwmh.adaptation import window_adaptation
    from rwmh.arviz import to_inference_data
    from rwmh.convergence import Converged, ConvergenceWarning, superchain_positions
    from rwmh.kernel import RWMHInfo, RWMHState, build_kernel, init, random_walk
    from rwmh.pmmh import EstimatedLogDensity, PseudoMarginalState, estimator_noise, pseudo_marginal
    from rwmh.sampling import SampleResult, resume, sample
    from rwmh.stragglers import RestartWarning

__all__ = [
    "Converged",
    "ConvergenceWarning",
    "EstimatedLogDensity",
    "PseudoMarginalState",
    "RWMHInfo",
    "RestartWarning",
    "RWMHState",
    "SampleResult",
    "build_kernel",
    "estimator_noise",
    "init",
    "pseudo_marginal",
    "random_walk",
    "resume",
    "sample",
    "superchain_positions",
    "to_inference_data",
    "window_adaptation",
]

__version__ = "0.1.0"
