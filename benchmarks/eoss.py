"""Edge of stochastic stability (Andreyev & Beneventano, arXiv 2412.20553) in a plain SGD loop.

Claim tested: under minibatch SGD with a constant step η, the *batch sharpness*
E_B[g_Bᵀ H_B g_B / ‖g_B‖²] rises to about 2/η and hovers there, while the full-batch
λmax stays below 2/η (the more so the smaller the batch).

Setup: digits (1437 training images, 64 pixels standardised per pixel), an MLP
64→128→128→10 with tanh, ½·MSE on one-hot targets (summed over the 10 outputs, mean over
examples), float32, SGD with constant η (default 0.15: 2/η = 13.3, just below the initial
λmax ≈ 13.9, so training starts at the edge), minibatches drawn without replacement each
epoch (a fixed permutation seed), at two batch sizes (16 and 64), 4000 steps. A
:class:`chaosjax.Monitor` watches the loop every ``--every`` steps, measuring θ_t before the
step, with ``BatchSharpness(n=16)`` (over the last 16 batches the loop used),
``Sharpness(k=1, batch=the full training set)`` (λmax of the full-batch loss), ``Threshold``
(2/η) and ``GradientNorm``; a second monitor measures ``BatchSharpness(n=16, sampler=...)``
on 16 fresh uniformly drawn minibatches (the paper's Monte-Carlo estimate), reported as
``batch_sharpness_fresh``.

Reported per batch size, over the late part of training (the last ``--late`` fraction of the
records): the ratios batch_sharpness·η/2, batch_sharpness_fresh·η/2 and λmax·η/2 as mean ±
standard deviation over the records (ddof 1), their min and max, and the number of records.

Usage:
    python benchmarks/eoss.py [--json benchmarks/out/eoss.json] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import table, write_json

import chaosjax as cj
from chaosjax import probes as P


def init(sizes, key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def mse(params, batch):
    """½·mean over examples of ‖f(x) − onehot(y)‖² (MSE: the loss of the EoS literature)."""
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    out = x @ params[-1]["w"] + params[-1]["b"]
    return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(y, out.shape[-1])) ** 2, -1))


def run(batch_size: int, eta: float, steps: int, every: int, hidden: int, n_train: int, seed=0):
    """One monitored SGD run; returns the monitor's records as arrays and the loop's time."""
    ds = cj.datasets.digits(standardize=True)
    x = jnp.asarray(ds.x_train[:n_train], jnp.float32)
    y = jnp.asarray(ds.y_train[:n_train])
    params = init((64, hidden, hidden, 10), jax.random.PRNGKey(seed))
    tx = optax.sgd(eta)

    @jax.jit
    def step(state, batch):
        p, s = state
        loss, g = jax.value_and_grad(mse)(p, batch)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    rows, fresh_rows = [], []

    def sampler(t, i):  # a fresh minibatch of the training set, drawn uniformly (seed (t, i))
        idx = np.random.default_rng((seed, t, i)).choice(n_train, batch_size, replace=False)
        return x[idx], y[idx]

    fresh = cj.Monitor(
        mse,
        probes=[P.BatchSharpness(n=16, sampler=sampler)],
        every=every,
        params=lambda s: s[0],
        writer=lambda t, m: fresh_rows.append(m["batch_sharpness"]),
    )
    mon = cj.Monitor(
        mse,
        probes=[
            P.BatchSharpness(n=16),
            P.Sharpness(k=1, tol=1e-4, batch=(x, y)),
            P.Threshold(),
            P.GradientNorm(),
        ],
        every=every,
        params=lambda s: s[0],
        optimizer=tx,
        opt_state=lambda s: s[1],
        learning_rate=eta,
        writer=lambda t, m: rows.append({"step": t, **m}),
    )
    rng = np.random.default_rng(seed)
    state = (params, tx.init(params))
    per_epoch = n_train // batch_size
    t0 = time.perf_counter()
    for t in range(steps + 1):
        if t % per_epoch == 0:
            order = rng.permutation(n_train)
        idx = order[(t % per_epoch) * batch_size : (t % per_epoch + 1) * batch_size]
        batch = (x[idx], y[idx])
        mon(t, state, batch)  # measured at θ_t, on the batches the loop used up to t
        fresh(t, state, batch)  # and on 16 fresh minibatches
        state, _ = step(state, batch)
    seconds = time.perf_counter() - t0
    keys = ("step", "batch_sharpness", "sharpness", "threshold", "gradient_norm/loss")
    out = {k: np.array([r[k] for r in rows]) for k in keys}
    out["batch_sharpness_fresh"] = np.array(fresh_rows)
    return out, seconds


def late_ratios(rec: dict, eta: float, late: float) -> dict:
    """Ratios ·η/2 over the last ``late`` fraction of the records (mean, std, min, max, n)."""
    n = len(rec["step"])
    start = int(np.floor(n * (1 - late)))
    out = {"late_from_step": int(rec["step"][start]), "records": n - start}
    for name in ("batch_sharpness", "batch_sharpness_fresh", "sharpness"):
        r = rec[name][start:] * eta / 2
        r = r[np.isfinite(r)]
        out[f"{name}_ratio_mean"] = float(np.mean(r)) if r.size else float("nan")
        out[f"{name}_ratio_std"] = float(np.std(r, ddof=1)) if r.size > 1 else float("nan")
        out[f"{name}_ratio_min"] = float(np.min(r)) if r.size else float("nan")
        out[f"{name}_ratio_max"] = float(np.max(r)) if r.size else float("nan")
    out["final_loss"] = float(rec["gradient_norm/loss"][-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--eta", type=float, default=0.15)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--late", type=float, default=0.5, help="fraction of records read as late")
    args = ap.parse_args(argv)
    steps, every, hidden, n_train = args.steps, args.every, 128, 1437
    sizes = args.batch_sizes
    if args.tiny:  # the code path once (one batch size: each size compiles its programs)
        steps, every, hidden, n_train, sizes = 20, 5, 8, 128, sizes[:1]
    rows = []
    for bs in sizes:
        rec, seconds = run(bs, args.eta, steps, every, hidden, n_train)
        row = {"batch_size": bs, "eta": args.eta, "steps": steps, "seconds": seconds}
        row.update(late_ratios(rec, args.eta, args.late))
        row["series"] = {k: v.tolist() for k, v in rec.items()}
        rows.append(row)
        print(
            f"b={bs}: batch_sharpness·η/2 = {row['batch_sharpness_ratio_mean']:.3f} ± "
            f"{row['batch_sharpness_ratio_std']:.3f}, λmax·η/2 = "
            f"{row['sharpness_ratio_mean']:.3f} ± {row['sharpness_ratio_std']:.3f} "
            f"({row['records']} records from step {row['late_from_step']}; {seconds:.0f} s)",
            flush=True,
        )
    cols = [
        ("batch_size", "batch", "d"),
        ("batch_sharpness_ratio_mean", "batch sharpness·η/2 mean", ".3f"),
        ("batch_sharpness_ratio_std", "± sd", ".3f"),
        ("batch_sharpness_fresh_ratio_mean", "fresh batches mean", ".3f"),
        ("batch_sharpness_fresh_ratio_std", "± sd", ".3f"),
        ("sharpness_ratio_mean", "λmax·η/2 mean", ".3f"),
        ("sharpness_ratio_std", "± sd", ".3f"),
        ("records", "records", "d"),
        ("late_from_step", "from step", "d"),
        ("final_loss", "final batch loss", ".4f"),
        ("seconds", "s", ".0f"),
    ]
    print(table(rows, cols))
    if args.json:
        write_json(args.json, "eoss", rows, {"args": vars(args)})
    return rows


if __name__ == "__main__":
    main()
