"""A run of :func:`rwmh.sample` in progress: its frozen settings and everything it has done.

A :class:`Run` holds all that is needed to continue it, so that a checkpoint
(:mod:`rwmh.checkpoint`) can be written after any chunk and :func:`rwmh.resume` can pick it
up: the settings, the key, the phase and step, the chain states, the adaptation state, the
sampling parameters and the host buffers that the chunks fill.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from rwmh import checks, tuning
from rwmh.kernel import FactoredCov, RWMHState

__all__ = ["PHASES", "Run", "Settings"]

#: The phases of a run, in order.
PHASES = ("warmup", "sampling", "done")


@dataclass(frozen=True)
class Settings:
    """What a run was asked to do; fixed for its whole life, resumes included."""

    num_chains: int
    num_samples: int
    num_warmup: int
    thin: int
    chunk_size: int | None
    target_acceptance_rate: float | None
    dense: bool
    restart_stranded: bool = True
    #: ``rwmh.Converged(...).to_dict()`` (superchains resolved) for ``until=``, else None.
    until: dict | None = None
    #: ``num_warmup="auto"``: warmup decides its own length, ``num_warmup`` is then the cap.
    auto_warmup: bool = False

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (the checkpoint's ``settings`` entry)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Settings:
        """Settings from :meth:`to_dict`'s output, validated as :func:`rwmh.sample` validates
        its arguments (a checkpoint may have been edited); ``KeyError`` for a missing field,
        ``TypeError`` or ``ValueError`` naming a bad one."""
        chunk_size = values["chunk_size"]
        if chunk_size is not None:
            chunk_size = checks.check_int(chunk_size, "chunk_size", 1)
        return cls(
            num_chains=checks.check_int(values["num_chains"], "num_chains", 1),
            num_samples=checks.check_int(values["num_samples"], "num_samples", 1),
            num_warmup=checks.check_int(values["num_warmup"], "num_warmup", 0),
            thin=checks.check_int(values["thin"], "thin", 1),
            chunk_size=chunk_size,
            target_acceptance_rate=checks.check_probability(
                values["target_acceptance_rate"], "target_acceptance_rate"
            ),
            dense=checks.check_bool(values["dense"], "dense"),
            restart_stranded=checks.check_bool(values["restart_stranded"], "restart_stranded"),
            until=values.get("until"),
            auto_warmup=checks.check_bool(values.get("auto_warmup", False), "auto_warmup"),
        )


def _leaf_pairs(a, b):
    return zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)


@dataclass
class Run:
    """A run in progress.

    ``phase`` is one of :data:`PHASES`; ``next_step`` is the next warmup step, or the next
    stored draw, to compute. ``states`` live on the device(s) in the padded layout.
    ``parameters`` (``{"step_size", "proposal_cov"}``) and ``proposal`` (the covariance with its
    factor) are the sampling parameters, None until sampling starts. ``warmup_trace`` (step
    axis first) and ``draws`` (chain axis first) are host arrays allocated for the whole run
    when the first chunk arrives and filled chunk by chunk, so the host never holds the draws
    twice (as joining a list of chunks at the end would).
    """

    settings: Settings
    rng_key: Any
    phase: str
    next_step: int
    states: RWMHState
    adapt: tuning.AdaptationState
    parameters: dict | None = None
    proposal: FactoredCov | None = None
    warmup_trace: Any = None
    draws: Any = None
    #: With ``until``: the report of every check so far, and of the one that stopped the run.
    checks: list = dataclasses.field(default_factory=list)
    stop: dict | None = None
    #: With ``num_warmup="auto"``: the warmup's length once decided, and its report.
    warmup_length: int | None = None
    warmup_report: dict | None = None

    @property
    def num_warmup(self) -> int:
        """The length of the warmup (its cap while an automatic warmup is undecided)."""
        return self.settings.num_warmup if self.warmup_length is None else self.warmup_length

    def start_sampling(self) -> None:
        """Fix the parameters at the end of warmup (without warmup they were given)."""
        if self.num_warmup > 0:
            self.parameters = tuning.final(self.adapt)
            # The adaptation keeps the factor of its covariance up to date: nothing is
            # factored (or compiled) again here.
            self.proposal = self.adapt.proposal
        self.phase, self.next_step = "sampling", 0

    def store_warmup(self, info, first: int) -> None:
        """Copy a chunk of the warmup trace, ``(steps, ...)``, to rows ``first, ...``."""
        total = self.settings.num_warmup
        needed = first + jax.tree_util.tree_leaves(info)[0].shape[0]
        capacity = 0 if self.warmup_trace is None else self.warmup_trace[0].shape[0]
        if self.settings.auto_warmup:
            # An automatic warmup rarely reaches its cap: the trace grows with it.
            total = min(total, max(needed, 2 * capacity))
        if self.warmup_trace is None or capacity < needed:
            old = self.warmup_trace
            self.warmup_trace = jax.tree_util.tree_map(
                lambda x: np.empty((total, *x.shape[1:]), x.dtype), info
            )
            if old is not None:
                for buffer, kept in _leaf_pairs(self.warmup_trace, old):
                    buffer[:first] = kept[:first]
        for buffer, part in _leaf_pairs(self.warmup_trace, info):
            buffer[first : first + part.shape[0]] = part

    def store_draws(self, draws, first: int) -> None:
        """Copy a chunk of draws, ``(draw, chain, ...)``, to draws ``first, ...`` of every chain."""
        total = self.settings.num_samples
        needed = first + jax.tree_util.tree_leaves(draws)[0].shape[0]
        if self.settings.until is not None:
            # A run that stops when it converges rarely reaches its cap: the buffers grow (by
            # doubling) with the draws instead of holding the cap from the start.
            total = min(total, max(needed, 2 * self._capacity()))
        if self.draws is None or self._capacity() < needed:
            old = self.draws
            self.draws = jax.tree_util.tree_map(
                lambda x: np.empty((x.shape[1], total, *x.shape[2:]), x.dtype), draws
            )
            if old is not None:
                for buffer, kept in _leaf_pairs(self.draws, old):
                    buffer[:, :first] = kept[:, :first]
        for buffer, part in _leaf_pairs(self.draws, draws):
            buffer[:, first : first + part.shape[0]] = np.swapaxes(part, 0, 1)

    def _capacity(self) -> int:
        return 0 if self.draws is None else jax.tree_util.tree_leaves(self.draws)[0].shape[1]

    def completed(self):
        """``(warmup_info, (positions, stats))`` of the steps completed so far (views), or None
        for a part not started."""
        num_warmup = self.next_step if self.phase == "warmup" else self.num_warmup
        num_draws = 0 if self.phase == "warmup" else self.next_step
        warmup = draws = None
        if self.warmup_trace is not None:
            warmup = tuning.AdaptationInfo(*(x[:num_warmup] for x in self.warmup_trace))
        if self.draws is not None and num_draws != 0:
            draws = jax.tree_util.tree_map(lambda x: x[:, :num_draws], self.draws)
        return warmup, draws
