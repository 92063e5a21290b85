"""Lyapunov engine: time and agreement against lyapynov, batch throughput, tangent cost.

1. Hénon, 1e5 steps, k = 2: chaosjax against lyapynov (``peers`` extra) and the literature.
2. Hénon, 1000 initial conditions at once (``batched=True``).
3. Lorenz-96 (N = 40, F = 8, RK4 dt = 0.01), top-10 spectrum: chaosjax against lyapynov.
4. Training maps: cost of k tangents relative to one plain step (target ≤ 1.5·k): the
   quickstart MLP with k ∈ {1, 4, 16}, and the 4810-parameter MLP of
   ``benchmarks/curvature.py`` with k = 8 (the engine issue's target: ≤ 12×).
5. One trajectory, many observers: a replica run (seeds × η grid × perturbed replicas) with a
   ``LyapunovTracker(k=4)`` on its references, against today's two-step recipe — the same
   ``run_replicas`` without it plus a separate ``lyapunov_spectrum`` of the references —
   measured side by side.

Usage:
    python benchmarks/lyapunov.py [--json benchmarks/out/lyapunov.json] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import best_time, block, table, write_json  # noqa: E402

import chaosjax as cj  # noqa: E402
from chaosjax._util import as_traceable  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def henon_rows(steps: int, n_ics: int, ic_steps: int) -> list[dict]:
    h = cj.systems.henon()
    rows = []
    res, first = timed(lambda: cj.lyapunov_spectrum(h.step, h.x0, k=2, steps=steps, warmup=100))
    again = best_time(lambda: cj.lyapunov_spectrum(h.step, h.x0, k=2, steps=steps, warmup=100), 5)
    rows.append(
        {
            "case": f"Hénon k=2, {steps} steps",
            "tool": "chaosjax",
            "seconds": again,
            "seconds_with_compile": first,
            "lambda1": res.exponents[0],
            "lambda2": res.exponents[1],
            "error_vs_literature": float(np.abs(res.exponents - [0.4194, -1.6234]).max()),
        }
    )
    try:
        import lyapynov
    except ImportError:
        lyapynov = None
    if lyapynov is not None:

        def f(x, t):
            return np.array([1 - 1.4 * x[0] ** 2 + x[1], 0.3 * x[0]])

        def jac(x, t):
            return np.array([[-2.8 * x[0], 1.0], [0.3, 0.0]])

        ds = lyapynov.DiscreteDS(np.array([0.1, 0.1]), 0, f, jac)
        lce, _ = timed(lambda: lyapynov.LCE(ds, 2, 100, steps, False))
        sec = best_time(lambda: lyapynov.LCE(ds, 2, 100, steps, False), 3)
        rows.append(
            {
                "case": f"Hénon k=2, {steps} steps",
                "tool": "lyapynov",
                "seconds": sec,
                "lambda1": lce[0],
                "lambda2": lce[1],
                "error_vs_literature": float(np.abs(np.asarray(lce) - [0.4194, -1.6234]).max()),
            }
        )
    x0s = jnp.stack([h.x0 * (1 + 0.1 * i / n_ics) for i in range(n_ics)])
    cj.lyapunov_spectrum(h.step, x0s, k=2, steps=ic_steps, warmup=100, batched=True)
    res, sec = timed(
        lambda: cj.lyapunov_spectrum(h.step, x0s, k=2, steps=ic_steps, warmup=100, batched=True)
    )
    rows.append(
        {
            "case": f"Hénon k=2, {n_ics} ICs × {ic_steps} steps (batched)",
            "tool": "chaosjax",
            "seconds": sec,
            "lambda1": float(res.exponents[:, 0].mean()),
            "lambda2": float(res.exponents[:, 1].mean()),
            "error_vs_literature": float(np.abs(res.exponents.mean(0) - [0.4194, -1.6234]).max()),
        }
    )
    return rows


def lorenz96_rows(steps: int) -> list[dict]:
    l96 = cj.systems.lorenz96(n=40, forcing=8.0, dt=0.01)
    rows = []
    kw = dict(k=10, steps=steps, warmup=1000, renorm_every=1)
    cj.lyapunov_spectrum(l96.step, l96.x0, **kw)  # compile
    res, sec = timed(lambda: cj.lyapunov_spectrum(l96.step, l96.x0, **kw))
    ours = res.per_time(l96.dt)
    rows.append(
        {
            "case": f"Lorenz-96 N=40 top-10, {steps} steps",
            "tool": "chaosjax",
            "seconds": sec,
            "lambda1": ours[0],
            "lambda2": ours[1],
        }
    )
    try:
        import lyapynov
    except ImportError:
        return rows
    F = 8.0

    def f(x, t):
        return (np.roll(x, -1) - np.roll(x, 2)) * np.roll(x, 1) - x + F

    def jac(x, t):
        n = x.size
        j = -np.eye(n)
        for i in range(n):
            j[i, (i + 1) % n] += x[(i - 1) % n]
            j[i, (i - 2) % n] -= x[(i - 1) % n]
            j[i, (i - 1) % n] += x[(i + 1) % n] - x[(i - 2) % n]
        return j

    ds = lyapynov.ContinuousDS(np.asarray(l96.x0), 0.0, f, jac, 0.01)
    lce, sec = timed(lambda: lyapynov.LCE(ds, 10, 1000, steps, False))
    lce = np.asarray(lce)
    rows.append(
        {
            "case": f"Lorenz-96 N=40 top-10, {steps} steps",
            "tool": "lyapynov",
            "seconds": sec,
            "lambda1": lce[0],
            "lambda2": lce[1],
            "max_abs_diff_top10": float(np.abs(lce - ours).max()),
        }
    )
    return rows


def mlp_4810():
    """The 4810-parameter MLP of ``benchmarks/curvature.py`` (8→60→60→10 tanh, MSE on 256
    random samples) as a GD training map, η = 0.05."""
    from chaosjax.datasets import Dataset

    net = cj.models.PureMLP((8, 60, 60, 10), activation="tanh")
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x = np.asarray(jax.random.normal(kx, (256, 8)))
    y = np.asarray(jax.random.normal(ky, (256, 10)))
    data = Dataset.from_arrays(x, y, x[:0], y[:0], name="random-256")
    p0 = net.init_params(jax.random.PRNGKey(0), jnp.float64)
    return cj.TrainingMap(net.apply, p0, data, loss="mse", optimizer="sgd", learning_rate=0.05)


def quickstart_map():
    """The quickstart MLP (two moons) as its training map, η = 0.2."""
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map

    return build_training_map(
        load_config(
            "quickstart", ["training.learning_rates=[0.2]", "model.output_activation=identity"]
        )
    )


def tangent_cost_rows(steps: int, ks, tmap) -> list[dict]:
    s0 = tmap.init()
    step = as_traceable(tmap.step)

    @jax.jit
    def plain(step, s):
        return jax.lax.scan(lambda c, t: (step(c, t), None), s, jnp.arange(steps))[0]

    block(plain(step, s0))
    base = best_time(lambda: plain(step, s0)) / steps
    rows = [
        {"k": 0, "renorm_every": None, "seconds_per_step": base, "relative": 1.0, "target": None}
    ]
    for k in ks:
        for renorm in (1, 10):

            def go(k=k, renorm=renorm):
                return cj.lyapunov_spectrum(
                    tmap.step, s0, k=k, steps=steps, chunk_steps=steps, renorm_every=renorm
                ).log_growth

            go()
            sec = best_time(go) / steps
            rows.append(
                {
                    "k": k,
                    "renorm_every": renorm,
                    "seconds_per_step": sec,
                    "relative": sec / base,
                    "target": 1.5 * k,
                }
            )
    return rows, tmap.n_params


def observer_rows(steps: int, k: int, seeds, lrs, n_perturbed: int) -> list[dict]:
    """A replica run with the tangent observer against the run plus a separate spectrum."""
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map

    tmap = build_training_map(
        load_config("quickstart", ["model.output_activation=identity", "replicas.seeds=[0]"])
    )
    batch = cj.make_replicas(
        tmap, seeds=list(seeds), grid={"learning_rate": list(lrs)}, n_perturbed=n_perturbed
    )
    refs = np.flatnonzero(batch.coords["member"] == 0)
    kw = dict(steps=steps, record_every=10, chunk_steps=steps, progress=False, devices=1)
    obs = ("loss", "distance_l1")

    def together():
        return cj.run_replicas(
            tmap, batch, observables=obs, trackers=[cj.LyapunovTracker(k=k)], **kw
        ).records["log_growth"]

    def apart():
        res = cj.run_replicas(tmap, batch, observables=obs, **kw)
        hp = {name: v[refs] for name, v in batch.hparams.items()}
        spec = cj.lyapunov_spectrum(
            tmap.step_with, batch.states[refs], k=k, steps=steps, batched=True, args=hp,
            chunk_steps=steps, devices=1,
        )  # fmt: skip
        return res.records["loss"], spec.log_growth

    together()
    apart()
    t_obs, t_sep = best_time(together), best_time(apart)
    case = f"{len(batch)} replicas ({len(refs)} references), k = {k}, {steps} steps"
    return [
        {"case": case, "recipe": "run_replicas + LyapunovTracker", "seconds": t_obs,
         "relative": 1.0},
        {"case": case, "recipe": "run_replicas, then lyapunov_spectrum", "seconds": t_sep,
         "relative": t_sep / t_obs},
    ]  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="benchmarks/out/lyapunov.json")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    if a.tiny:
        h_steps, n_ics, ic_steps, l96_steps, mlp_steps, ks = 500, 8, 100, 50, 20, (1, 2)
        obs_size = dict(steps=20, k=2, seeds=(0,), lrs=(0.5,), n_perturbed=1)
    else:
        obs_size = dict(steps=500, k=4, seeds=(0, 1), lrs=(0.05, 0.5, 2.0, 4.0), n_perturbed=4)
        h_steps, n_ics, ic_steps, l96_steps, mlp_steps, ks = (
            100_000,
            1000,
            10_000,
            20_000,
            500,
            (1, 4, 16),
        )
    rows = henon_rows(h_steps, n_ics, ic_steps) + lorenz96_rows(l96_steps)
    print(
        table(
            rows,
            [
                ("case", "case", "s"),
                ("tool", "tool", "s"),
                ("seconds", "time (s)", ".3g"),
                ("lambda1", "λ1", ".4f"),
                ("lambda2", "λ2", ".4f"),
                ("error_vs_literature", "|err| vs literature", ".1e"),
                ("max_abs_diff_top10", "max |Δλ| top-10", ".1e"),
            ],
        )
    )
    cost = []
    for name, tmap, kk in (
        ("the quickstart MLP", quickstart_map(), ks),
        ("the MLP of benchmarks/curvature.py", mlp_4810(), (1, 2) if a.tiny else (8,)),
    ):
        rows_m, n_params = tangent_cost_rows(mlp_steps, kk, tmap)
        for r in rows_m:
            r["model"] = f"MLP {n_params}"
        cost += rows_m
        print(
            f"\ntangent cost on {name} ({n_params} parameters), per step, relative to a plain step"
        )
        print(
            table(
                rows_m,
                [
                    ("k", "k", "d"),
                    ("renorm_every", "QR every", "d"),
                    ("seconds_per_step", "s / step", ".3g"),
                    ("relative", "× plain step", ".2f"),
                    ("target", "target ≤", ".1f"),
                ],
            )
        )
    together = observer_rows(**obs_size)
    print("\none trajectory, many observers: the tangent observer inside the replica run")
    print(
        table(
            together,
            [
                ("case", "case", "s"),
                ("recipe", "recipe", "s"),
                ("seconds", "time (s)", ".3g"),
                ("relative", "× observer run", ".2f"),
            ],
        )
    )
    path = write_json(a.json, "lyapunov", rows, {"tangent_cost": cost, "observer": together})
    print(f"wrote {path}")
    return rows + cost + together


if __name__ == "__main__":
    main()
