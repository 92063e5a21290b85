"""Curvature engine: HVP cost, eigenvalues and trace against PyHessian, tracking throughput.

On the quickstart MLP (two moons, 2→32→32→2 tanh, MSE, 1218 parameters) after 500 GD steps:

1. HVP cost relative to a gradient (both jitted, full batch; target ≤ 2.5×).
2. Top-1, top-5 and trace: chaosjax (float64 and float32) and PyHessian (``peers`` extra,
   float32 PyTorch copy with identical weights and data), time and relative error against
   the dense float64 Hessian (target: ≥ 20× faster for top-5 at ≥ 10× smaller error).
3. Sharpness tracking throughput: replica-records per second of ``CurvatureTracker(k=1)``
   in ``run_replicas`` for R replicas.
4. The Krylov kernels against matfree (``peers`` extra; imported lazily, the section is
   skipped with a message when it is missing), side by side on the same jitted matvec, the
   same start vectors / probes and the same m, both jitted: top-5 by Lanczos (full
   reorthogonalisation; matfree ``eigh_partial(tridiag_sym(m))``) on an MLP Hessian of
   4810 parameters (8→60→60→10 tanh, MSE, 256 random samples) and one of 269 322
   (784→256→256→10), on a diagonal operator (n = 269 322, m = 64 and 80) and vmapped over 4
   replicas (n = 50 000 each); Hutchinson trace (100 Rademacher probes; matfree
   ``estimator_monte_carlo_mean_and_sem``); SLQ nodes and weights (m = 40, 3 runs; matfree
   ``tridiag_sym`` + ``eigh`` per run). Timings after a warm-up compile, chaosjax and matfree
   interleaved (A, B, A, B, …) in one process so machine load hits both alike; the median
   and the best of the repeats, the ratio chaosjax/matfree of the medians (target ≤ 1) and
   the largest difference of the results.

Usage:
    python benchmarks/curvature.py [--json benchmarks/out/curvature.json] [--tiny]
        [--only matfree]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
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
        tr = cj.CurvatureTracker(k=1)

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


# ---------------------------------------------------------------------------------------------
# 4. against matfree


def _import_matfree():
    try:
        import matfree
        from matfree import decomp, eig, stochtrace
    except ImportError:
        return None
    from importlib.metadata import version

    return decomp, eig, stochtrace, version(matfree.__name__)


def mlp_hessian(widths, batch=256, seed=0):
    """The Hessian of an MSE-trained tanh MLP on random data: ``(hvp(p, v), p)``. The
    parameters are an argument of the jitted functions (closed over, XLA would fold the
    products of constants at compile time)."""
    net = cj.models.PureMLP(tuple(widths), activation="tanh")
    p0 = net.init_params(jax.random.PRNGKey(seed), jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(p0)
    kx, ky = jax.random.split(jax.random.PRNGKey(seed + 1))
    x = jax.random.normal(kx, (batch, widths[0]))
    y = jax.random.normal(ky, (batch, widths[-1]))

    def hvp(p, v):
        return cv.hessian_operator(lambda q: cj.training.mse_loss(net.apply(unravel(q), x), y), p)[
            0
        ](v)

    return hvp, flat


def interleaved(fns: dict, args, repeats: int) -> tuple[dict, dict, dict]:
    """Warm up (compile) every function, then time them in turn A, B, A, B, …: the median and
    the best of ``repeats`` rounds per function, and the outputs."""
    out = {k: jax.block_until_ready(f(*args)) for k, f in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return med, {k: float(np.min(v)) for k, v in times.items()}, out


def _topk_pair(mf, hvp, dim, m, k=5):
    decomp, eig = mf[0], mf[1]
    solve = eig.eigh_partial(decomp.tridiag_sym(m))

    def ours(p, v0):
        r = cv.lanczos_eigs(lambda v: hvp(p, v), dim, k, n_matvecs=m, v0=v0)
        return r.eigenvalues, r.eigenvectors

    def theirs(p, v0):
        vals, vecs = solve(lambda v: hvp(p, v), v0)
        return vals[::-1][:k], vecs[::-1][:k]

    return ours, theirs


def _diag(n, scale=1.0):
    return scale * (0.01 + 100.0 * jnp.linspace(0.0, 1.0, n) ** 12)


def _scale(d, v):
    return d * v


def _slq_pair(mf, hvp, dim, m, runs):
    tri = mf[0].tridiag_sym(m, materialize=False)

    def ours(p, key):
        d = cv.density_estimate(lambda v: hvp(p, v), dim, n_matvecs=m, n_runs=runs, key=key)
        return d.nodes, d.weights

    def theirs(p, key):  # the same Rademacher starts as density_estimate draws
        def one(k):
            v0 = jax.random.rademacher(jax.random.split(k)[0], (dim,), jnp.float64)
            _, (diag, off), *_ = tri(lambda v: hvp(p, v), v0)
            t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
            theta, s = jnp.linalg.eigh(t)
            return theta, s[0, :] ** 2

        nodes, weights = jax.lax.map(one, jax.random.split(key, runs))
        return nodes.ravel(), weights.ravel() / runs

    return ours, theirs


def _trace_pair(mf, hvp, dim, probes):
    stochtrace = mf[2]
    est = stochtrace.estimator_monte_carlo_mean_and_sem(
        stochtrace.monte_carlo_trace(),
        stochtrace.sampler_signs(jnp.zeros((dim,), jnp.float64), num=probes),
    )

    def ours(p, key):
        r = cv.trace_estimate(lambda v: hvp(p, v), dim, n_probes=probes, key=key)
        return r.estimate, r.stderr

    def theirs(p, key):
        return est(lambda v: hvp(p, v), key)

    return ours, theirs


def _max_diff(a, b, sort=False):
    a, b = (np.asarray(x[0] if isinstance(x, tuple) else x) for x in (a, b))
    if sort:
        a, b = np.sort(a, axis=-1), np.sort(b, axis=-1)
    return float(np.max(np.abs(a - b)))


def against_matfree(tiny: bool, repeats: int):
    """Section 4: one row per case (see the module docstring)."""
    mf = _import_matfree()
    if mf is None:
        print("matfree is not installed (pip install -e '.[peers]'): comparison skipped")
        return [], None
    small, large = ((3, 6, 2), None) if tiny else ((8, 60, 60, 10), (784, 256, 256, 10))
    n_diag, n_rep, m, m_slq, probes = (
        (300, 100, 12, 8, 10) if tiny else (269_322, 50_000, 64, 40, 100)
    )
    # at tiny size (the smoke test) one case of each kind: the compiles dominate
    mlps = [mlp_hessian(w) for w in (small, large) if w is not None]
    key = jax.random.PRNGKey(11)
    cases = []
    for hvp, p in mlps:
        v0 = jax.random.normal(key, p.shape)
        pair = _topk_pair(mf, hvp, p.shape[0], min(m, p.shape[0]))
        cases.append((f"top-5 MLP {p.shape[0]}", m, pair, (p, v0), False))
    d, v0 = _diag(n_diag), jax.random.normal(key, (n_diag,))
    for mm in (m,) if tiny else (m, m + 16):
        pair = _topk_pair(mf, _scale, n_diag, mm)
        cases.append((f"top-5 diagonal n={n_diag}", mm, pair, (d, v0), False))
    ds = jnp.stack([_diag(n_rep, 1.0 + 0.1 * r) for r in range(4)])
    pair = tuple(jax.vmap(f) for f in _topk_pair(mf, _scale, n_rep, m))
    vs = jax.random.normal(key, (4, n_rep))
    cases.append((f"top-5 diagonal vmap 4×n={n_rep}", m, pair, (ds, vs), False))
    for hvp, p in mlps:
        pair = _trace_pair(mf, hvp, p.shape[0], probes)
        cases.append((f"trace Hutchinson, MLP {p.shape[0]}", probes, pair, (p, key), False))
    hvp, p = mlps[-1]
    pair = _slq_pair(mf, hvp, p.shape[0], m_slq, 3)
    cases.append((f"SLQ 3 runs, MLP {p.shape[0]}", m_slq, pair, (p, key), True))
    rows = []
    for name, mm, (ours, theirs), args, sort in cases:
        fns = {"chaosjax": jax.jit(ours), "matfree": jax.jit(theirs)}
        med, best, out = interleaved(fns, args, repeats)
        rows.append(
            {
                "case": name,
                "m": mm,
                "chaosjax_s": med["chaosjax"],
                "matfree_s": med["matfree"],
                "chaosjax_best_s": best["chaosjax"],
                "matfree_best_s": best["matfree"],
                "ratio": med["chaosjax"] / med["matfree"],
                "max_diff": _max_diff(out["chaosjax"], out["matfree"], sort),
            }
        )
        print(
            f"  {name}: chaosjax {med['chaosjax']:.3g} s, matfree {med['matfree']:.3g} s, "
            f"ratio {rows[-1]['ratio']:.2f}, max diff {rows[-1]['max_diff']:.1e}",
            flush=True,
        )
    return rows, mf[3]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="benchmarks/out/curvature.json")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", choices=("all", "matfree"), default="all")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of section 4 (default 5)")
    a = ap.parse_args(argv)
    repeats = a.repeats or (1 if a.tiny else 5)
    rows, extra, track = [], {}, []
    if a.only == "all":
        rows, extra, track = sections_1_to_3(a.tiny)
    print("chaosjax against matfree (median of interleaved rounds; ratio target ≤ 1):")
    mf_rows, mf_version = against_matfree(a.tiny, repeats)
    if mf_rows:
        print(
            table(
                mf_rows,
                [
                    ("case", "case", "s"),
                    ("m", "m / probes", "d"),
                    ("chaosjax_s", "chaosjax (s)", ".3g"),
                    ("matfree_s", "matfree (s)", ".3g"),
                    ("ratio", "ratio", ".2f"),
                    ("max_diff", "max |difference|", ".1e"),
                ],
            )
        )
    extra.update({"matfree": {"version": mf_version, "repeats": repeats, "rows": mf_rows}})
    path = write_json(a.json, "curvature", rows, extra)
    print(f"wrote {path}")
    return rows + track + mf_rows


def sections_1_to_3(tiny: bool):
    train, probes, reps, tsteps = (20, 12, (1, 4), 5) if tiny else (500, 99, (1, 16, 64), 50)
    hidden = "[8]" if tiny else "[32, 32]"
    tmap, s = setup(train, hidden)
    cost = hvp_cost(tmap, s)
    print(
        f"HVP / gradient time: {cost['ratio']:.2f} (grad {cost['grad_s']:.2e} s, hvp {cost['hvp_s']:.2e} s; target ≤ 2.5)"
    )
    rows, t_dense, ev, trace = compare(tmap, s, probes, tiny, hidden)
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
    extra = {
        "hvp_cost": cost,
        "tracking": track,
        "dense_top5": ev[:5].tolist(),
        "dense_trace": trace,
    }
    return rows, extra, track


if __name__ == "__main__":
    main()
