"""The protocol stages of the seed studies, one module per study (this module gathers their
names): :mod:`~chaosjax.experiments.danovski` (loss-series diagnostics, divergence fits per ε,
marginal stability), :mod:`~chaosjax.experiments.prediction` (time to a target accuracy, the
early-FTLE prediction of the final loss), :mod:`~chaosjax.experiments.training_response`,
:mod:`~chaosjax.experiments.instability` and :mod:`~chaosjax.experiments.grokking`. Each stage
returns an ``xarray.Dataset`` stored as a group of ``results.zarr``, with a markdown renderer
and figures; the registry is :mod:`chaosjax.experiments.stages`."""

from __future__ import annotations

from chaosjax.experiments.danovski import (
    divergence_figures,
    divergence_markdown,
    divergence_stage,
    marginal_markdown,
    marginal_snapshots,
    marginal_stage,
    series_figures,
    series_markdown,
    series_stage,
)
from chaosjax.experiments.grokking import (
    GROKKING_RULE,
    grokking_figures,
    grokking_markdown,
    grokking_stage,
)
from chaosjax.experiments.instability import (
    PHASE_RULE,
    instability_markdown,
    instability_stage,
    phases,
)
from chaosjax.experiments.prediction import (
    prediction_figures,
    prediction_markdown,
    prediction_stage,
    target_markdown,
    target_stage,
)
from chaosjax.experiments.training_response import (
    response_figures,
    response_markdown,
    response_stage,
)

__all__ = [
    "GROKKING_RULE",
    "PHASE_RULE",
    "divergence_figures",
    "divergence_markdown",
    "divergence_stage",
    "grokking_figures",
    "grokking_markdown",
    "grokking_stage",
    "instability_markdown",
    "instability_stage",
    "marginal_markdown",
    "marginal_snapshots",
    "marginal_stage",
    "phases",
    "prediction_figures",
    "prediction_markdown",
    "prediction_stage",
    "response_figures",
    "response_markdown",
    "response_stage",
    "series_figures",
    "series_markdown",
    "series_stage",
    "target_markdown",
    "target_stage",
]
