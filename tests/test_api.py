"""The package's surface: what importing does, and which names are public."""

import os
import subprocess
import sys

import pytest

_PROBE = (
    "import os, jax, chaosjax; "
    "print(os.environ.get('XLA_FLAGS', '')); print(jax.config.jax_enable_x64)"
)


@pytest.mark.parametrize("user_flags", [None, "--xla_cpu_use_thunk_runtime=true"])
def test_import_side_effects(user_flags):
    """Importing sets the CPU scheduler flag only when XLA_FLAGS is unset, never x64."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    if user_flags is not None:
        env["XLA_FLAGS"] = user_flags
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    want = user_flags or "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert out == [want, "False"]


#: the documented top-level names (a change here is a change of the public API)
TOP_LEVEL = {
    # modules
    "control", "datasets", "episodes", "landscape", "models", "observers", "optimizers",
    "response", "series", "sharding", "systems", "orbits",
    # the engine, maps and replicas
    "Map", "PlainMap", "Observer", "Record", "RunInfo",
    "TrainingMap", "StepMap", "MapState", "split_state", "make_schedule", "ReplicaBatch",
    "make_replicas", "perturbation", "run_replicas", "ReplicaResults", "open_store", "Dataset",
    # observers
    "LyapunovTracker", "CLVWindow", "TwinTracker", "StateSnapshots", "CurvatureTracker",
    "ResponseTracker",
    # Lyapunov analysis and CLVs
    "lyapunov_spectrum", "max_lyapunov", "twin_lyapunov", "LyapunovResult", "WindowFit",
    "best_window_fit", "ensemble_log_distance", "local_growth_rates",
    "covariant_lyapunov_vectors", "CLVResult", "clv_layer_mass", "clv_memory_bytes",
    "clv_subspace_overlap",
    # tangent pieces
    "tangent_step", "qr_renormalize", "random_basis", "log_det_jacobian",
    # curvature and response
    "hvp", "dense_hessian", "hessian_eigs", "hessian_trace", "hessian_density",
    "smooth_density", "EigResult", "TraceResult", "DensityResult", "stability_threshold", "ntk",
    # orbits and bifurcations
    "bifurcation", "Bifurcation", "Orbit",
    # smoothness of a step (tangent exponents need it)
    "smoothness", "step_smoothness",
    # watching your own loop
    "Monitor", "probes", "writers",
}  # fmt: skip

PUBLIC_MODULES = (
    "clv", "control", "curvature", "datasets", "engine", "episodes", "landscape", "losses",
    "lyapunov", "models", "nnx_adapter", "observers", "optimizers", "orbits", "plots", "replicas",
    "response", "results", "series", "sharding", "smoothness", "stepmap", "systems", "tangents",
    "training", "experiments", "experiments.stages", "cli",
)  # fmt: skip


#: implementation helpers that no module lists as public
PRIVATE_HELPERS = {"as_traceable", "pad_rows", "donating_jit", "pass_path", "one_line"}


def test_top_level_surface_is_the_documented_one():
    import chaosjax

    assert set(chaosjax.__all__) == TOP_LEVEL
    for name in chaosjax.__all__:
        assert getattr(chaosjax, name).__doc__, name


def test_every_public_name_is_documented_and_no_private_helper_is_exported():
    import importlib
    import inspect

    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module(f"chaosjax.{mod_name}")
        assert mod.__doc__, mod_name
        names = getattr(mod, "__all__", None)
        assert names is not None, f"chaosjax.{mod_name} declares no __all__"
        for name in names:
            assert not name.startswith("_"), f"{mod_name}.{name}"
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                assert (obj.__doc__ or "").strip(), f"{mod_name}.{name} has no docstring"
            assert name not in PRIVATE_HELPERS, f"{mod_name} exports {name}"


@pytest.mark.parametrize(
    "name",
    ["as_traceable", "ftle_target", "sharpness_margin", "gradient_noise", "instability_episodes"],
)
def test_names_that_were_never_released_at_the_top_level_are_not_there(name):
    """0.2.0 drops the one-release aliases of names that moved before any release."""
    import chaosjax

    with pytest.raises(AttributeError, match=f"no attribute '{name}'"):
        getattr(chaosjax, name)


def test_api_reference_builds_from_the_docstrings(tmp_path):
    """The API reference (pdoc, the `docs` extra) builds without a warning other than pdoc's
    known one about NamedTuple annotations, and documents every public name of every module."""
    import importlib
    import re
    import warnings

    import pdoc
    import pdoc.render

    import chaosjax

    pdoc.render.configure(docformat="google")
    extra = [f"chaosjax.{m}" for m in PUBLIC_MODULES if m not in chaosjax.__all__ and m != "cli"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("chaosjax", *extra, output_directory=tmp_path)
    # ExperimentConfig is composed at import from the stages' sections (make_dataclass): pdoc
    # has no source to find its fields in and says it assumes the module it documents, which
    # is where they are
    composed = re.compile(
        r"Cannot determine where chaosjax\.experiments(\.config)?\.ExperimentConfig\."
    )
    bad = [
        str(w.message).splitlines()[0]
        for w in caught
        if "Error parsing type annotation" not in str(w.message)  # NamedTuple + __future__
        and not composed.match(str(w.message))
    ]
    assert not bad, bad
    for mod_name in PUBLIC_MODULES:
        if mod_name == "cli":
            continue
        page = tmp_path / "chaosjax" / (mod_name.replace(".", "/") + ".html")
        assert page.exists(), page
        html = page.read_text()
        for name in importlib.import_module(f"chaosjax.{mod_name}").__all__:
            assert f'id="{name}"' in html, f"{mod_name}.{name} missing from the API reference"


def test_names_renamed_before_0_2_0_have_no_aliases():
    """0.2.0 is the first release: arguments renamed before it take only their new names."""
    import jax.numpy as jnp

    from chaosjax import clv, control, systems
    from chaosjax.lyapunov import local_growth_rates

    assert systems.quadratic_gd(learning_rate=0.05).learning_rate == 0.05
    with pytest.raises(TypeError, match="lr"):
        systems.quadratic_gd(lr=0.05)
    lm = systems.linear_map([[1.1, 0.0], [0.0, 0.5]])
    assert local_growth_rates(lm.step, jnp.ones((1, 2)), n_perturbed=3, delta_t=5).shape == (1, 3)
    with pytest.raises(TypeError, match="n_perturbations"):
        local_growth_rates(lm.step, jnp.ones((1, 2)), n_perturbations=3, delta_t=5)
    with pytest.raises((TypeError, ValueError), match="num_blocks"):
        control.sharpness_margin(num_blocks=3)
    with pytest.raises(TypeError, match="memory_budget"):
        clv.covariant_lyapunov_vectors(lm.step, jnp.ones(2), k=1, steps=4, memory_budget=1)


def test_krylov_counts_are_n_star_with_old_names_for_one_release():
    import jax.numpy as jnp

    import chaosjax as cj
    from chaosjax.experiments import load_plan

    a = jnp.diag(jnp.arange(1.0, 7.0))

    def loss(p):
        return 0.5 * p @ a @ p

    with pytest.warns(DeprecationWarning, match="num_matvecs: renamed 'n_matvecs'"):
        old = cj.hessian_eigs(loss, jnp.ones(6), 2, num_matvecs=6)
    new = cj.hessian_eigs(loss, jnp.ones(6), 2, n_matvecs=6)
    assert new.n_matvecs == 6
    with pytest.warns(DeprecationWarning, match="num_matvecs: renamed"):
        assert old.num_matvecs == 6
    import numpy as np

    np.testing.assert_allclose(old.eigenvalues, [6.0, 5.0], rtol=1e-10)
    with pytest.raises(TypeError, match="num_blocks"):  # no alias in 0.2.0
        cj.CurvatureTracker(k=1, num_blocks=3)
    from chaosjax.experiments import ConfigError

    with pytest.raises(ConfigError, match=r"curvature\.num_blocks: unknown key"):
        load_plan("quickstart", ["curvature.num_blocks=3"])
    assert load_plan("quickstart", ["curvature.n_blocks=3"])[0][1].curvature.n_blocks == 3
