"""chaosjax.Monitor: probe overhead, warm-start matvecs, and Sharpness(k=1) at ≥ 5M parameters.

1. Overhead of each probe at ``every=100`` on a small MLP (digits-sized: 64→64→64→10 tanh,
   softmax cross-entropy, minibatches of 128, SGD η = 0.1, float32): one probe call (after
   its compile, the median of 5) in step-equivalents (÷ the median jitted train step), and the
   overhead fraction at every = 100 (÷ 100).
2. Warm start: along 2000 GD steps of that MLP (full batch of 1024, η = 0.5),
   every 100 steps a warm-started ``Sharpness(k=1, tol=1e-3)`` against a cold reference
   (Lanczos, 300 matvecs, float64): the matvecs per warm call and the largest relative
   difference (target ≤ 10 matvecs within 1e-3).
3. ``Sharpness(k=1)`` on a 784→2048→2048→10 MLP (5.8M parameters, float32, batch 128): time
   of the first (cold) and a warm call, and the memory of its compiled program (XLA's
   argument, output and temporary bytes) in parameter vectors (÷ 4·n bytes).

Usage:
    python benchmarks/monitor.py [--json benchmarks/out/monitor.json] [--tiny]
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
import optax  # noqa: E402
from _common import table, write_json  # noqa: E402

import chaosjax as cj  # noqa: E402
from chaosjax import probes as P  # noqa: E402


def mlp(sizes, key, dtype=jnp.float32):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype),
            "b": jnp.zeros(b, dtype),
        }
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def xent(params, batch):
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def data(n, d, classes, key, dtype=jnp.float32):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d), dtype)
    y = jnp.argmax(x @ jax.random.normal(kw, (d, classes), dtype), axis=1)
    return x, y


def make_step(tx):
    @jax.jit
    def step(state, batch):
        p, s = state
        g = jax.grad(xent)(p, batch)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s)

    return step


def median_time(fn, n=5):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def overhead(tiny: bool) -> list[dict]:
    tx = optax.sgd(0.1)
    p = mlp((64, 64, 64, 10), jax.random.PRNGKey(0))
    x, y = data(2048, 64, 10, jax.random.PRNGKey(1))
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 2048, 128)]
    step = make_step(tx)
    state = (p, tx.init(p))
    state = step(state, batches[0])
    t_step = median_time(lambda: step(state, batches[1]), 20)
    rows = []
    for probe in [
        P.GradientNorm(),
        P.Threshold(),
        P.DirectionalSharpness(),
        P.CriticalSharpness(),
        P.Sharpness(k=1, tol=1e-3),
        P.BatchSharpness(n=16),
        P.SelfStabilization(tol=1e-3),
        P.FTLE(k=1),
    ]:
        mon = cj.Monitor(
            xent,
            probes=[probe],
            every=1,
            params=lambda s: s[0],
            opt_state=lambda s: s[1],
            optimizer=tx,
            learning_rate=0.1,
        )
        wrapped = mon.wrap(step)
        st = state
        for t in range(17):  # fill the batch history, compile, warm up
            st = wrapped(st, batches[t % 16])
            mon(t, st, batches[t % 16])
        if probe.name == "ftle":  # its cost is per step, in wrap's tangent program
            cost = median_time(lambda st=st, w=wrapped: w(st, batches[0]), 10) - t_step
            per_call = cost * 100  # 100 steps of tangents per record at every = 100
        else:
            per_call = median_time(lambda st=st, mon=mon: mon(100, st, batches[0]))
        out = mon(200, st, batches[0])
        rows.append(
            {
                "probe": probe.name,
                "seconds": per_call,
                "step_equivalents": per_call / t_step,
                "overhead_at_100": per_call / t_step / 100,
                "matvecs": out[f"{probe.name}/matvecs"],
            }
        )
    print(f"train step: {t_step * 1e3:.3f} ms")
    return rows, t_step


def warm_start(tiny: bool) -> dict:
    eta, steps = 0.5, (100 if tiny else 2000)
    tx = optax.sgd(eta)
    p = mlp((64, 64, 64, 10), jax.random.PRNGKey(0), jnp.float64)
    batch = data(1024, 64, 10, jax.random.PRNGKey(1), jnp.float64)
    step = make_step(tx)
    mon = cj.Monitor(xent, probes=[P.Sharpness(k=1, tol=1e-3)], every=100, params=lambda s: s[0])
    state = (p, tx.init(p))
    cold_eigs = jax.jit(
        lambda q, b: cj.hessian_eigs(lambda v: xent(v, b), q, 1, n_matvecs=300).eigenvalues
    )
    rows = []
    for t in range(steps + 1):
        out = mon(t, state, batch)
        if out:
            lam = float(cold_eigs(state[0], batch)[0])
            rows.append(
                {
                    "step": t,
                    "cold": lam,
                    "warm": out["sharpness"],
                    "rel_diff": abs(out["sharpness"] - lam) / abs(lam),
                    "matvecs": out["sharpness/matvecs"],
                }
            )
        state = step(state, batch)
    return rows


def large(tiny: bool) -> dict:
    sizes = (784, 64, 64, 10) if tiny else (784, 2048, 2048, 10)
    p = mlp(sizes, jax.random.PRNGKey(0))
    n = sum(v.size for v in jax.tree_util.tree_leaves(p))
    batch = data(128, 784, 10, jax.random.PRNGKey(1))
    mon = cj.Monitor(xent, probes=[P.Sharpness(k=1, tol=1e-3, max_matvecs=200)], params=lambda s: s)
    t0 = time.perf_counter()
    first = mon(0, p, batch)
    t_first = time.perf_counter() - t0
    p2 = jax.tree_util.tree_map(lambda a: a * 1.001, p)
    t0 = time.perf_counter()
    warm = mon(1, p2, batch)
    t_warm = time.perf_counter() - t0
    ctx = mon._ctx
    from chaosjax._probe_base import ProbeInputs

    inp = ProbeInputs(p, batch, (), jnp.asarray(0.1, ctx.dtype), jax.random.PRNGKey(0))
    mem = mon._programs["sharpness"].lower(inp, mon._states["sharpness"]).compile()
    ma = mem.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    return {
        "n_params": int(n),
        "first_seconds": t_first,
        "first_matvecs": first["sharpness/matvecs"],
        "first_residual": first["sharpness/residual"],
        "warm_seconds": t_warm,
        "warm_matvecs": warm["sharpness/matvecs"],
        "sharpness": first["sharpness"],
        "temp_bytes": int(ma.temp_size_in_bytes),
        "total_bytes": int(total),
        "temp_vectors": ma.temp_size_in_bytes / (4 * n),
        "total_vectors": total / (4 * n),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    rows, t_step = overhead(args.tiny)
    print(
        table(
            rows,
            [
                ("probe", "probe", "s"),
                ("seconds", "s / call", ".2e"),
                ("step_equivalents", "steps", ".1f"),
                ("overhead_at_100", "overhead at every=100", ".1%"),
                ("matvecs", "matvecs", ".0f"),
            ],
        )
    )
    ws = warm_start(args.tiny)
    print(
        table(
            ws,
            [
                ("step", "step", "d"),
                ("cold", "cold λ1", ".6g"),
                ("warm", "warm λ1", ".6g"),
                ("rel_diff", "rel. diff", ".1e"),
                ("matvecs", "matvecs", ".0f"),
            ],
        )
    )
    big = large(args.tiny)
    print(big)
    if args.json:
        write_json(
            args.json, "monitor", rows, {"train_step_s": t_step, "warm_start": ws, "large": big}
        )
    return {"overhead": rows, "warm_start": ws, "large": big}


if __name__ == "__main__":
    main()
