"""chaosjax: neural-network training as a dynamical system, in JAX.

The same functions analyse any map ``step(x, t) -> x``: a Hénon map from
:mod:`chaosjax.systems` or one optimizer step of a :class:`TrainingMap`.
"""

import os as _os

# The one import side effect. XLA's concurrency-optimised CPU scheduler can deadlock (all
# threads idle, no progress) when several CPU devices run a program that mixes a long loop with
# a batched LAPACK call (a sharded Lanczos with its small eigh). chaosjax turns it off, only
# when the user has not set XLA_FLAGS themselves; it affects the CPU backend only and takes
# effect only if the backend has not started yet (import chaosjax before running JAX code).
# x64 is never switched on by importing: call jax.config.update("jax_enable_x64", True) or set
# a config's precision = "float64".
if "XLA_FLAGS" not in _os.environ:
    _os.environ["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

from chaosjax import control as control
from chaosjax import datasets as datasets
from chaosjax import episodes as episodes
from chaosjax import landscape as landscape
from chaosjax import models as models
from chaosjax import observers as observers
from chaosjax import optimizers as optimizers
from chaosjax import orbits as orbits
from chaosjax import probes as probes
from chaosjax import response as response
from chaosjax import series as series
from chaosjax import sharding as sharding
from chaosjax import smoothness as smoothness
from chaosjax import systems as systems
from chaosjax import writers as writers
from chaosjax._curvature_tracker import CurvatureTracker as CurvatureTracker
from chaosjax._map import Map as Map
from chaosjax._map import PlainMap as PlainMap
from chaosjax._monitor import Monitor as Monitor
from chaosjax._observer import Observer as Observer
from chaosjax._observer import Record as Record
from chaosjax._observer import RunInfo as RunInfo
from chaosjax.clv import CLVResult as CLVResult
from chaosjax.clv import clv_layer_mass as clv_layer_mass
from chaosjax.clv import clv_memory_bytes as clv_memory_bytes
from chaosjax.clv import clv_subspace_overlap as clv_subspace_overlap
from chaosjax.clv import covariant_lyapunov_vectors as covariant_lyapunov_vectors
from chaosjax.curvature import DensityResult as DensityResult
from chaosjax.curvature import EigResult as EigResult
from chaosjax.curvature import TraceResult as TraceResult
from chaosjax.curvature import dense_hessian as dense_hessian
from chaosjax.curvature import hessian_density as hessian_density
from chaosjax.curvature import hessian_eigs as hessian_eigs
from chaosjax.curvature import hessian_trace as hessian_trace
from chaosjax.curvature import hvp as hvp
from chaosjax.curvature import smooth_density as smooth_density
from chaosjax.datasets import Dataset as Dataset
from chaosjax.lyapunov import LyapunovResult as LyapunovResult
from chaosjax.lyapunov import WindowFit as WindowFit
from chaosjax.lyapunov import best_window_fit as best_window_fit
from chaosjax.lyapunov import ensemble_log_distance as ensemble_log_distance
from chaosjax.lyapunov import local_growth_rates as local_growth_rates
from chaosjax.lyapunov import lyapunov_spectrum as lyapunov_spectrum
from chaosjax.lyapunov import max_lyapunov as max_lyapunov
from chaosjax.lyapunov import twin_lyapunov as twin_lyapunov
from chaosjax.observers import CLVWindow as CLVWindow
from chaosjax.observers import LyapunovTracker as LyapunovTracker
from chaosjax.observers import StateSnapshots as StateSnapshots
from chaosjax.observers import TwinTracker as TwinTracker
from chaosjax.optimizers import stability_threshold as stability_threshold
from chaosjax.orbits import Bifurcation as Bifurcation
from chaosjax.orbits import Orbit as Orbit
from chaosjax.orbits import bifurcation as bifurcation
from chaosjax.replicas import ReplicaBatch as ReplicaBatch
from chaosjax.replicas import make_replicas as make_replicas
from chaosjax.replicas import perturbation as perturbation
from chaosjax.replicas import run_replicas as run_replicas
from chaosjax.response import ResponseTracker as ResponseTracker
from chaosjax.response import ntk as ntk
from chaosjax.results import ReplicaResults as ReplicaResults
from chaosjax.results import open_store as open_store
from chaosjax.smoothness import step_smoothness as step_smoothness
from chaosjax.stepmap import StepMap as StepMap
from chaosjax.tangents import log_det_jacobian as log_det_jacobian
from chaosjax.tangents import qr_renormalize as qr_renormalize
from chaosjax.tangents import random_basis as random_basis
from chaosjax.tangents import tangent_step as tangent_step
from chaosjax.training import MapState as MapState
from chaosjax.training import TrainingMap as TrainingMap
from chaosjax.training import make_schedule as make_schedule
from chaosjax.training import split_state as split_state

try:
    from importlib.metadata import version as _version

    __version__ = _version("chaosjax")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "Bifurcation",
    "CLVResult",
    "CLVWindow",
    "CurvatureTracker",
    "Dataset",
    "DensityResult",
    "EigResult",
    "LyapunovResult",
    "LyapunovTracker",
    "Map",
    "MapState",
    "Monitor",
    "Observer",
    "Orbit",
    "PlainMap",
    "Record",
    "ReplicaBatch",
    "ReplicaResults",
    "ResponseTracker",
    "RunInfo",
    "StateSnapshots",
    "StepMap",
    "TraceResult",
    "TrainingMap",
    "TwinTracker",
    "WindowFit",
    "best_window_fit",
    "bifurcation",
    "clv_layer_mass",
    "clv_memory_bytes",
    "clv_subspace_overlap",
    "control",
    "covariant_lyapunov_vectors",
    "datasets",
    "dense_hessian",
    "ensemble_log_distance",
    "episodes",
    "hessian_density",
    "hessian_eigs",
    "hessian_trace",
    "hvp",
    "landscape",
    "local_growth_rates",
    "log_det_jacobian",
    "lyapunov_spectrum",
    "make_replicas",
    "make_schedule",
    "max_lyapunov",
    "models",
    "ntk",
    "observers",
    "open_store",
    "optimizers",
    "orbits",
    "perturbation",
    "probes",
    "qr_renormalize",
    "random_basis",
    "response",
    "run_replicas",
    "series",
    "sharding",
    "smooth_density",
    "smoothness",
    "split_state",
    "stability_threshold",
    "step_smoothness",
    "systems",
    "tangent_step",
    "twin_lyapunov",
    "writers",
]
