"""`Reference`: the published figures a variant reproduces.

A variant declares it in its folder (`reference:`, bench.variants); the grid record keeps it as a
dict at launch (bench.grid_record) and the report rebuilds it from there
(bench.report.fidelity). It lives in a module of its own, importing nothing of the project, so
that the report can read it without importing variants, models or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Reference:
    """Published figures a variant reproduces (../shared/docs/REFERENCE.md), for the report."""

    source: str = ""  # where the figures come from
    rows: list[int] = field(default_factory=list)  # row numbers in REFERENCE.md
    count_accuracy: float | None = None  # final count accuracy of good runs, in [0, 1]
    count_accuracy_by_count: dict[int, float] = field(default_factory=dict)  # per true count
    elbo: float | None = None  # test ELBO (one sample), nats per image
    iw_bound: float | None = None  # importance-weighted bound (Burda et al.), nats per image
    # log-mean-exp of K single-sample ELBOs (addtt's "log p(x) >="): another estimator than the
    # IW bound, compared with our `lme_elbo_bound`
    lme_elbo_bound: float | None = None
    # The likelihood the published ELBO and bounds are on ("gaussian" with likelihood_sd, or
    # "bernoulli"); required when any of them is given: nats of different scales never compare.
    likelihood: str = ""
    likelihood_sd: float | None = None
    success_rate: float | None = None  # fraction of seeds that converge
    iterations_to_target: float | None = None  # iterations to ~98 % count accuracy
    interpolation_accuracy: float | None = None  # train 0,1,3 digits; accuracy on 2
    extrapolation_accuracy: float | None = None  # train 0-2 digits; accuracy on 3
    # Test images the published figures were measured on (bench/data/protocols.py): heldout
    # (ours: MNIST test digits), pyro, addtt or aakhundov. Final metrics are also computed on
    # it when it is not heldout, so the published row is compared on its own protocol.
    protocol: str = "heldout"
    # How the source counts objects: "sampled" (posterior samples, every reference) or "mode".
    count_definition: str = "sampled"
    # Training length (iterations) behind the published figures. A row is set against them
    # when it trained at least min(budget_iterations, 25,000) iterations (bench/report/fidelity):
    # the figures are at convergence, which the references reach in 25-35k iterations.
    budget_iterations: int | None = None
    # Settings in which the source still differs from this variant's runs (architecture,
    # optimiser, data, metric), one short line each: the report lists them beside the row.
    differences: list[str] = field(default_factory=list)
    notes: str = ""
