"""How close the adapted proposal is to the target's shape, over chain counts and seeds.

The target is a 10-d Gaussian whose covariance has eigenvalues log-spaced from 1e-2 to 1e2 in
a random rotation (a new rotation for every seed). ``rwmh.sample`` runs with its defaults
(1000 warmup steps, 1000 draws) from uniform(-2, 2) initial positions. For each run this
prints the eigenvalue spread of ``step_size**2 * proposal_cov`` relative to the true
covariance (max / min eigenvalue of ``Sigma^{-1/2} A Sigma^{-1/2}``: 1 is a perfect match of
shape, the identity scores 1e4) and the acceptance rate after warmup. Every run compiles
afresh (the log density changes with the seed), so this takes a minute or two. Run it with::

    PYTHONPATH=src python benchmarks/adaptation_spread.py [--seeds 5] [--chains 4 8 16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rwmh

DIMENSION = 10


def target(seed):
    rng = np.random.default_rng(1000 + seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(DIMENSION, DIMENSION)))
    return (rotation * np.logspace(-2, 2, DIMENSION)) @ rotation.T


def relative_spread(matrix, covariance):
    values, vectors = np.linalg.eigh(covariance)
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    eigenvalues = np.linalg.eigvalsh(inverse_root @ matrix @ inverse_root)
    return eigenvalues.max() / eigenvalues.min()


def run(num_chains, seed):
    covariance = target(seed)
    precision = jnp.asarray(np.linalg.inv(covariance), jnp.float32)

    def logdensity(x):
        return -0.5 * x @ precision @ x

    initial = jax.random.uniform(
        jax.random.key(100 + seed), (num_chains, DIMENSION), minval=-2.0, maxval=2.0
    )
    result = rwmh.sample(jax.random.key(seed), logdensity, initial, progress_bar=False)
    adapted = float(result.parameters["step_size"]) ** 2 * np.asarray(
        result.parameters["proposal_cov"], float
    )
    return relative_spread(adapted, covariance), float(np.mean(result.stats["acceptance_rate"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0, 1, ... per chain count")
    parser.add_argument("--chains", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--quick", action="store_true", help="one seed of 4 chains")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.seeds, arguments.chains = 1, [4]
    print(f"{'chains':>6} {'seed':>4} {'spread':>7} {'accept':>7}")
    worst = {}
    for num_chains in arguments.chains:
        for seed in range(arguments.seeds):
            spread, acceptance = run(num_chains, seed)
            worst[num_chains] = max(worst.get(num_chains, 0.0), spread)
            print(f"{num_chains:6d} {seed:4d} {spread:7.2f} {acceptance:7.3f}", flush=True)
    summary = ", ".join(f"{k} chains {v:.2f}" for k, v in worst.items())
    print(f"worst spread (acceptance line: < 4): {summary}")


if __name__ == "__main__":
    main()
