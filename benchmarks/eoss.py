"""Edge of stochastic stability (Andreyev & Beneventano, arXiv 2412.20553) in a plain SGD loop.

Claim tested: under minibatch SGD with a constant step η, the *batch sharpness*
E_B[g_Bᵀ H_B g_B / ‖g_B‖²] rises to about 2/η and hovers there, while the full-batch
λmax stays below 2/η (the more so the smaller the batch).

Setup (the defaults): MNIST-1D (Greydanus 2020; generated in this file by the package's
recipe, nothing to install or download, see :func:`mnist1d`), 8000 training examples of 40
inputs, 10 balanced classes, clean labels (``--label-noise`` redraws a fraction); an MLP
40→64→64→10 with tanh (``--hidden``, ``--depth``), softmax cross-entropy (``--loss ce``;
``mse`` is ½·MSE on one-hot targets, summed over the 10 outputs, mean over examples), float32,
SGD with constant η = 0.3 (2/η = 6.7, far above the initial λmax ≈ 1.2), minibatches drawn
without replacement each epoch (a fixed permutation seed), at two batch sizes (32 and 64),
8000 steps (at b = 16 and 128 the same configuration stays near 0.6–0.7 of 2/η: RESULTS.md).
A :class:`chaosjax.Monitor` watches the loop every ``--every`` (100) steps, measuring θ_t
before the step, with ``BatchSharpness(n=16)`` (over the last 16 batches the loop used),
``Sharpness(k=1, batch=the full training set)`` (λmax of the full-batch loss), ``Threshold``
(2/η) and ``GradientNorm``; a second monitor measures ``BatchSharpness(n=16, sampler=...)`` on
16 fresh uniformly drawn minibatches (the paper's Monte-Carlo estimate), reported as
``batch_sharpness_fresh``. MNIST-1D is used because small MLPs fit it slowly, and any number
of examples can be drawn: on the 1437 digits (and on 4000 MNIST-1D examples) the network
memorises the labels at b = 64 before the edge is reached.

The earlier digits configuration (it reproduces at b = 16 only) is ``--data digits --hidden
32 --label-noise 0.3 --steps 4000 --every 50 --batch-sizes 16 64``; the first configuration
(clean digits, 64→128→128→10, ½·MSE, η = 0.15) is ``--data digits --hidden 128 --loss mse
--eta 0.15 --steps 4000 --every 50 --batch-sizes 16 64``.

Options of the scoping runs (RESULTS.md): ``--eta`` takes one η or one per batch size (the
paper uses one η per run; each ratio is against that run's own 2/η); ``--data`` picks the
training set: ``mnist1d`` (the default), ``digits`` (1437 standardised images),
``digitsx<K>j<σ>`` (the 1437 images K times, each copy with its own noisy labels, every copy
but the first jittered by σ·N(0, 1) per pixel, so that the noisy labels take longer to
memorise), ``blobs<dim>`` (10 overlapping Gaussian classes),
``teacher<dim>`` (labels = argmax of a random tanh teacher of N(0, I) inputs) and
``regress<dim>`` (``chaosjax.datasets.teacher_student`` regression, noise 0.3, with ``--loss
mse``); ``--n-train`` sets their size.

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

#: the defaults (the configuration of RESULTS.md)
ETA, STEPS, EVERY, HIDDEN, DEPTH, LABEL_NOISE, LOSS = (0.3,), 8000, 100, 64, 2, 0.0, "ce"
BATCH_SIZES, DATA, N_TRAIN = (32, 64), "mnist1d", 8000


def init(sizes, key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def mse(params, batch):
    """½·mean over examples of ‖f(x) − target‖² (MSE: the loss of the EoS literature); the
    target is onehot(y) for integer labels, y itself for real targets."""
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    out = x @ params[-1]["w"] + params[-1]["b"]
    target = jax.nn.one_hot(y, out.shape[-1]) if jnp.issubdtype(y.dtype, jnp.integer) else y
    return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, -1))


def xent(params, batch):
    """Mean softmax cross-entropy over examples (the paper's other loss)."""
    x, y = batch
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    out = x @ params[-1]["w"] + params[-1]["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))


LOSSES = {"mse": mse, "ce": xent}


def noisy_labels(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """A copy of ``y`` with round(fraction·n) labels (a fixed random subset) redrawn uniformly
    from the 10 classes (a redrawn label may equal the old one); returns it and the count of
    labels that changed."""
    rng = np.random.default_rng((seed, 26))
    y = np.array(y)
    idx = rng.choice(len(y), round(fraction * len(y)), replace=False)
    new = y.copy()
    new[idx] = rng.integers(0, 10, idx.size)
    return new, int(np.sum(new != y))


#: MNIST-1D's ten 12-point digit templates (Greydanus 2020, github.com/greydanus/mnist1d)
MNIST1D_TEMPLATES = (
    (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
    (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
    (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
    (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
    (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
    (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
    (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
    (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of ``x`` onto ``n`` equally spaced points of the same interval."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _smooth(x: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Gaussian filter (σ samples, truncated at 4σ, reflected edges: scipy's default)."""
    r = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return np.convolve(np.pad(x, r, mode="symmetric"), k / k.sum(), mode="valid")


def mnist1d(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST-1D examples (40-dim inputs, 10 balanced classes, shuffled), generated here
    with mnist1d's ``make_dataset`` recipe and default settings (no download, no dependency):
    each whitened template is padded with 36–60 zeros, resampled to 72 points, scaled by
    1 ± 0.2, rolled by up to 47 points, its zeros replaced by correlated noise (0.25·N(0, 1)
    smoothed over σ = 2 points), i.i.d. noise 0.02 added, sheared by up to ±0.375 and
    resampled to 40 points; the whole set is standardised (one mean and scale). The same
    recipe as the package, with its own random stream (``seed``), so not its exact samples."""
    rng = np.random.default_rng((seed, 1, 1))
    t = np.asarray(MNIST1D_TEMPLATES, float)
    t = (t - t.mean(1, keepdims=True)) / t.std(1, keepdims=True)
    t = (t - t[:, :1]) / 6.0
    y = np.arange(n) % 10
    xs = np.empty((n, 40))
    for i, label in enumerate(y):
        x = np.concatenate([t[label] + 1e-8, np.zeros(36 + int(rng.random() * 25))])
        x = _resample(x, 72) * (1 + 0.4 * (rng.random() - 0.5))
        k = int(rng.integers(48))
        x = np.concatenate([x[-k:], x[:-k]]) if k else x
        x = np.where(x != 0, x, _smooth(0.25 * rng.standard_normal(72)))
        x = x + 0.02 * rng.standard_normal(72)
        x = x - 0.75 * (rng.random() - 0.5) * np.linspace(-0.5, 0.5, 72)
        xs[i] = _resample(x, 40)
    perm = rng.permutation(n)
    xs, y = xs[perm], y[perm]
    return (xs - xs.mean()) / xs.std(), y.astype(np.int32)


def load_data(name: str, n_train: int, label_noise: float, seed: int):
    """(x, y, n_outputs, labels changed) of the training set ``name``."""
    if name.startswith("digits"):  # digitsx<K>[j<σ>]: K copies, own noisy labels, jitter σ
        spec = name[7:]
        copies, _, sigma = spec.partition("j")
        copies, sigma = int(copies or 1), float(sigma or 0.0)
        ds = cj.datasets.digits(standardize=True)
        x, y = ds.x_train[:n_train], ds.y_train[:n_train]
        noisy = [noisy_labels(y, label_noise, seed + 1000 * c) for c in range(copies)]
        y_all = np.concatenate([n for n, _ in noisy])
        x_all = np.concatenate([x] * copies)
        if sigma:  # each copy but the first jittered by σ·N(0, 1) per pixel (fixed seed)
            jitter = np.random.default_rng((seed, 11)).normal(size=x_all.shape) * sigma
            jitter[: len(x)] = 0.0
            x_all = x_all + jitter
        return (
            jnp.asarray(x_all, jnp.float32),
            jnp.asarray(y_all),
            10,
            sum(c for _, c in noisy),
        )
    elif name == "mnist1d":  # generated here (see mnist1d)
        x, y = mnist1d(n_train, seed)
    elif name.startswith("blobs"):  # blobs<dim>: 10 overlapping Gaussian classes
        dim = int(name[5:] or 16)
        ds = cj.datasets.blobs(
            n=n_train, centers=10, dim=dim, std=1.0, spread=1.0, seed=seed, test_fraction=0.01
        )
        x, y = ds.x_train, ds.y_train
        x = (x - x.mean(0)) / x.std(0)
    elif name.startswith("teacher"):  # teacher<dim>: argmax of a random tanh teacher, 10 classes
        dim = int(name[7:] or 32)
        rng = np.random.default_rng((seed, 7))
        x = rng.normal(size=(n_train, dim))
        w1 = rng.normal(size=(dim, 64)) / np.sqrt(dim)
        w2 = rng.normal(size=(64, 10)) / np.sqrt(64)
        y = np.argmax(np.tanh(x @ w1) @ w2, -1).astype(np.int32)
    elif name.startswith("regress"):  # regress<dim>: teacher_student regression, noise 0.3
        dim = int(name[7:] or 10)
        ds = cj.datasets.teacher_student(
            n=n_train + 1, d_in=dim, d_out=1, noise=0.3, seed=seed, test_fraction=0.0001
        )
        x, y = ds.x_train[:n_train], ds.y_train[:n_train]
        return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1, 0
    else:
        raise ValueError(f"data: unknown {name!r}")
    y_np, changed = noisy_labels(y, label_noise, seed)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y_np), 10, changed


def run(
    batch_size: int,
    eta: float,
    steps: int,
    every: int,
    hidden: int,
    n_train: int,
    depth: int = 2,
    label_noise: float = 0.0,
    loss: str = "mse",
    seed=0,
    data: str = "digits",
):
    """One monitored SGD run; returns the monitor's records as arrays and the loop's time."""
    x, y, n_out, changed = load_data(data, n_train, label_noise, seed)
    n_train = x.shape[0]
    params = init((x.shape[1], *[hidden] * depth, n_out), jax.random.PRNGKey(seed))
    tx = optax.sgd(eta)
    loss_fn = LOSSES[loss]

    @jax.jit
    def step(state, batch):
        p, s = state
        value, g = jax.value_and_grad(loss_fn)(p, batch)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), value

    rows, fresh_rows = [], []

    def sampler(t, i):  # a fresh minibatch of the training set, drawn uniformly (seed (t, i))
        idx = np.random.default_rng((seed, t, i)).choice(n_train, batch_size, replace=False)
        return x[idx], y[idx]

    fresh = cj.Monitor(
        loss_fn,
        probes=[P.BatchSharpness(n=16, sampler=sampler)],
        every=every,
        params=lambda s: s[0],
        writer=lambda t, m: fresh_rows.append(m["batch_sharpness"]),
    )
    mon = cj.Monitor(
        loss_fn,
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
    return out, seconds, changed


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
    out["late_loss_mean"] = float(np.mean(rec["gradient_norm/loss"][start:]))
    out["final_loss"] = float(rec["gradient_norm/loss"][-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument(
        "--eta", type=float, nargs="+", default=list(ETA), help="one η, or one per batch size"
    )
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--every", type=int, default=EVERY)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--depth", type=int, default=DEPTH, help="hidden layers")
    ap.add_argument(
        "--n-train", type=int, default=N_TRAIN, help="training examples (digits: at most 1437)"
    )
    ap.add_argument(
        "--label-noise",
        type=float,
        default=LABEL_NOISE,
        help="fraction of training labels redrawn uniformly (fixed seed)",
    )
    ap.add_argument("--loss", choices=sorted(LOSSES), default=LOSS)
    ap.add_argument("--late", type=float, default=0.5, help="fraction of records read as late")
    args = ap.parse_args(argv)
    steps, every, hidden, n_train = args.steps, args.every, args.hidden, args.n_train
    sizes = args.batch_sizes
    if args.tiny:  # the code path once (one batch size: each size compiles its programs)
        steps, every, hidden, n_train, sizes = 20, 5, 8, 128, sizes[:1]
    rows = []
    etas = args.eta * len(sizes) if len(args.eta) == 1 else args.eta
    if len(etas) < len(sizes):
        raise SystemExit(f"--eta: one value or one per batch size ({len(sizes)}), got {args.eta}")
    for bs, eta in zip(sizes, etas):
        rec, seconds, changed = run(
            bs,
            eta,
            steps,
            every,
            hidden,
            n_train,
            args.depth,
            args.label_noise,
            args.loss,
            data=args.data,
        )
        row = {"batch_size": bs, "eta": eta, "steps": steps, "seconds": seconds}
        row["labels_changed"] = changed
        row.update(late_ratios(rec, eta, args.late))
        row["series"] = {k: v.tolist() for k, v in rec.items()}
        rows.append(row)
        print(
            f"b={bs}: batch_sharpness·η/2 = {row['batch_sharpness_ratio_mean']:.3f} ± "
            f"{row['batch_sharpness_ratio_std']:.3f} (fresh "
            f"{row['batch_sharpness_fresh_ratio_mean']:.3f} ± "
            f"{row['batch_sharpness_fresh_ratio_std']:.3f}), λmax·η/2 = "
            f"{row['sharpness_ratio_mean']:.3f} ± {row['sharpness_ratio_std']:.3f} "
            f"({row['records']} records from step {row['late_from_step']}; late batch loss "
            f"{row['late_loss_mean']:.3f}; {seconds:.0f} s)",
            flush=True,
        )
        k = max(1, len(rec["step"]) // 10)
        for i in range(0, len(rec["step"]), k):  # the trajectory, coarsely
            print(
                f"   step {int(rec['step'][i]):6d}: batch {rec['batch_sharpness'][i] * eta / 2:.3f}"
                f"  fresh {rec['batch_sharpness_fresh'][i] * eta / 2:.3f}"
                f"  λmax {rec['sharpness'][i] * eta / 2:.3f}"
                f"  loss {rec['gradient_norm/loss'][i]:.3f}",
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
        ("late_loss_mean", "late batch loss", ".3f"),
        ("seconds", "s", ".0f"),
    ]
    print(table(rows, cols))
    if args.json:
        write_json(args.json, "eoss", rows, {"args": vars(args)})
    return rows


if __name__ == "__main__":
    main()
