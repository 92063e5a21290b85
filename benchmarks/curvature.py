"""Curvature engine: HVP cost, eigenvalues and trace against PyHessian, tracking throughput.

On the quickstart MLP (two moons, 2→32→32→2 tanh, MSE, 1218 parameters) after 500 GD steps:

1. HVP cost relative to a gradient (both jitted, full batch; target ≤ 2.5×).
2. Top-1, top-5 and trace: chaosjax (float64 and float32) and PyHessian (``peers`` extra,
   float32 PyTorch copy with identical weights and data), time and relative error against
   the dense float64 Hessian (target: ≥ 20× faster for top-5 at ≥ 10× smaller error).
3. Sharpness tracking throughput: replica-records per second of ``CurvatureTracker(k=1)``
   in ``run_replicas`` for R replicas.

Usage:
    python benchmarks/curvature.py [--json benchmarks/out/curvature.json] [--tiny]
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
from _common import best_time, table, write_json  # noqa: E402

import chaosjax as cj  # noqa: E402
from chaosjax import curvature as cv  # noqa: E402


def setup(train_steps: int, hidden: str = "[32, 32]"):
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map

    tmap = build_training_map(
        load_config(
            "quickstart",
            [
                "training.learning_rates=[0.2]",
                f"model.hidden={hidden}",
                "model.output_activation=identity",
            ],
        )
    )
    s = tmap.init()
    step = jax.jit(tmap.step)
    for t in range(train_steps):
        s = step(s, t)
    return tmap, s


def as_float32(tmap, s, hidden: str):
    """The same network, data and weights as a float32 training map."""
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map

    cfg = load_config(
        "quickstart",
        [
            "training.learning_rates=[0.2]",
            "precision=float32",
            f"model.hidden={hidden}",
            "model.output_activation=identity",
        ],
    )
    tm32 = build_training_map(cfg)
    return tm32, tm32.init(tmap.params(s))


def timed(fn, repeats=3):
    fn()
    return best_time(fn, repeats)


def hvp_cost(tmap, s):
    loss, p, _ = cv.training_loss(tmap, s)
    g = jax.jit(jax.grad(loss))
    mv = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])
    v = jnp.ones_like(p)
    tg = timed(lambda: g(p), 20)
    th = timed(lambda: mv(p, v), 20)
    return {"grad_s": tg, "hvp_s": th, "ratio": th / tg, "target": 2.5}


def torch_model(tmap, s, dtype):
    import torch

    params = tmap.params(s)
    layers = []
    names = sorted(params["layers"].keys())
    for i, name in enumerate(names):
        kern = np.asarray(params["layers"][name]["kernel"])
        bias = np.asarray(params["layers"][name]["bias"])
        lin = torch.nn.Linear(kern.shape[0], kern.shape[1], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(kern.T, dtype=dtype))
            lin.bias.copy_(torch.tensor(bias, dtype=dtype))
        layers.append(lin)
        if i < len(names) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def compare(tmap, s, trace_probes: int, tiny: bool, hidden: str):
    loss, p, _ = cv.training_loss(tmap, s)
    t0 = time.perf_counter()
    dense = np.asarray(cv.dense_hessian(loss, p, chunk_size=128))
    t_dense = time.perf_counter() - t0
    ev = np.sort(np.linalg.eigvalsh(dense))[::-1]
    true_trace = float(np.trace(dense))
    rows = []

    def err_top(vals, n):
        return float(np.max(np.abs(np.asarray(vals)[:n] - ev[:n]) / np.abs(ev[:n])))

    maps = {"float64": (tmap, s), "float32": as_float32(tmap, s, hidden)}
    for prec, (tm, st) in maps.items():
        lossd, pp, _ = cv.training_loss(tm, st)
        for k in (1, 5):
            m = min(24 if k == 1 else 48, pp.shape[0])
            f = jax.jit(
                lambda q, k=k, m=m, lossd=lossd: (
                    cj.hessian_eigs(lossd, q, k, n_matvecs=m).eigenvalues
                )
            )
            sec = timed(lambda f=f, pp=pp: f(pp))
            rows.append(
                {
                    "quantity": f"top-{k}",
                    "tool": f"chaosjax {prec}",
                    "seconds": sec,
                    "rel_error": err_top(f(pp), k),
                }
            )
        ftr = jax.jit(
            lambda q, lossd=lossd: (
                cj.hessian_trace(
                    lossd, q, n_probes=trace_probes, key=jax.random.PRNGKey(0), method="hutch++"
                ).estimate
            )
        )
        sec = timed(lambda ftr=ftr, pp=pp: ftr(pp))
        rows.append(
            {
                "quantity": "trace",
                "tool": f"chaosjax {prec} (Hutch++, {trace_probes} probes)",
                "seconds": sec,
                "rel_error": abs(float(ftr(pp)) - true_trace) / abs(true_trace),
            }
        )
    try:
        import torch
        from pyhessian import hessian as pyh
    except ImportError:
        return rows, t_dense, ev, true_trace
    torch.manual_seed(0)
    model = torch_model(tmap, s, torch.float32)
    x = torch.tensor(np.asarray(tmap.data["x_train"]), dtype=torch.float32)
    y = torch.tensor(np.asarray(tmap.data["y_train"]), dtype=torch.float32)

    def crit(out, target):
        return 0.5 * ((out - target) ** 2).sum(-1).mean()

    h = pyh(model, crit, data=(x, y), cuda=False)
    max_iter = 10 if tiny else 100
    h.eigenvalues(top_n=1, maxIter=3)  # warm-up (autograd graph, allocations)

    def best_of(fn, n=3):
        best, out = float("inf"), None
        for _ in range(n):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    for k in (1, 5):
        for tol in (1e-3, 1e-6):
            sec, (vals, _) = best_of(
                lambda k=k, tol=tol: h.eigenvalues(
                    top_n=k, maxIter=10 * max_iter if tol < 1e-3 else max_iter, tol=tol
                )
            )
            # power iteration finds the largest *magnitude*: compare sorted algebraically
            rows.append(
                {
                    "quantity": f"top-{k}",
                    "tool": f"PyHessian (float32, tol {tol:g})",
                    "seconds": sec,
                    "rel_error": err_top(np.sort(vals)[::-1], k),
                }
            )
    sec, tr = best_of(lambda: h.trace(maxIter=max_iter))
    rows.append(
        {
            "quantity": "trace",
            "tool": f"PyHessian (float32, {len(tr)} probes)",
            "seconds": sec,
            "rel_error": abs(float(np.mean(tr)) - true_trace) / abs(true_trace),
        }
    )
    return rows, t_dense, ev, true_trace


def tracking(tmap, s, replicas, steps):
    out = []
    for R in replicas:
        rb = (
            cj.make_replicas(tmap, base=s, n_perturbed=R - 1, eps=1e-6)
            if R > 1
            else cj.make_replicas(tmap, base=s)
        )
        tr = cv.CurvatureTracker(k=1)

        def go(rb=rb, tr=tr):
            return cj.run_replicas(
                tmap,
                rb,
                steps=steps,
                record_every=1,
                observables=("loss",),
                trackers=[tr],
                chunk_steps=steps,
                progress=False,
            ).final_state

        go()
        sec = best_time(go, 2)
        out.append({"replicas": R, "records_per_s": R * steps / sec, "seconds": sec})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="benchmarks/out/curvature.json")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    train, probes, reps, tsteps = (20, 12, (1, 4), 5) if a.tiny else (500, 99, (1, 16, 64), 50)
    hidden = "[8]" if a.tiny else "[32, 32]"
    tmap, s = setup(train, hidden)
    cost = hvp_cost(tmap, s)
    print(
        f"HVP / gradient time: {cost['ratio']:.2f} (grad {cost['grad_s']:.2e} s, hvp {cost['hvp_s']:.2e} s; target ≤ 2.5)"
    )
    rows, t_dense, ev, trace = compare(tmap, s, probes, a.tiny, hidden)
    print(
        f"dense Hessian ({len(ev)}²) in {t_dense:.1f} s; top-5 {np.round(ev[:5], 4)}, trace {trace:.4f}"
    )
    print(
        table(
            rows,
            [
                ("quantity", "quantity", "s"),
                ("tool", "tool", "s"),
                ("seconds", "time (s)", ".3g"),
                ("rel_error", "rel. error vs dense", ".1e"),
            ],
        )
    )
    track = tracking(tmap, s, reps, tsteps)
    print(
        table(
            track, [("replicas", "R", "d"), ("records_per_s", "tracked replica-records/s", ".3g")]
        )
    )
    path = write_json(
        a.json,
        "curvature",
        rows,
        {"hvp_cost": cost, "tracking": track, "dense_top5": ev[:5].tolist(), "dense_trace": trace},
    )
    print(f"wrote {path}")
    return rows + track


if __name__ == "__main__":
    main()
