# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Watch your own training loop
#
# You keep your loop — `for t in range(N): state, loss = train_step(state, batch)` — and
# `chaosjax.Monitor` measures it as it runs: the sharpness λmax, the batch sharpness of
# Andreyev & Beneventano (the quantity that sits at 2/η under SGD, arXiv 2412.20553), the
# critical sharpness of Kalra et al. (forward passes only, arXiv 2601.16979), the gradient
# norm, the threshold 2/η_t, and the finite-time Lyapunov exponent of your own trajectory
# (minibatch noise included). It writes where you log (CSV, JSONL, a zarr store,
# TensorBoard, or any `write_scalars` / callable writer), and `chaosjax report` turns the log
# into figures and a summary.
#
# The model is an Equinox MLP on the digits (8×8 images as 64 standardised pixels), trained
# by plain SGD on shuffled minibatches of 32 with MSE on one-hot targets, in float32.
#
# **Runtime**: about 1 minute on a 2-core CPU at full size (1500 steps); about 20 s at tiny
# size.

# %%
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import chaosjax as cj
from chaosjax import probes as P
from chaosjax.cli import main as chaosjax_cli

TINY = os.environ.get("CHAOSJAX_NOTEBOOK_SIZE", "full") == "tiny"
STEPS = 60 if TINY else 1500
EVERY = 10 if TINY else 50
WIDTH = 16 if TINY else 64
N_TRAIN = 256 if TINY else 1437
BATCH = 32
ETA = 0.05

# %% [markdown]
# ## Your model, loss, optimizer and step
#
# Nothing here knows about chaosjax. The state is `(params, opt_state)`, with `params` the
# float arrays of the Equinox model (`eqx.partition`) and the rest kept static.

# %%
digits = cj.datasets.digits(standardize=True)
x = jnp.asarray(digits.x_train[:N_TRAIN], jnp.float32)
y = jnp.asarray(digits.y_train[:N_TRAIN])
model = eqx.nn.MLP(64, 10, WIDTH, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
params, static = eqx.partition(model, eqx.is_inexact_array)


def loss_fn(params, batch):
    """½·mean over the examples of ‖f(x) − onehot(y)‖²."""
    xb, yb = batch
    out = jax.vmap(eqx.combine(params, static))(xb)
    return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(yb, 10)) ** 2, -1))


tx = optax.sgd(ETA)


@jax.jit
def train_step(state, batch):
    p, s = state
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss


def batches(seed=0):
    """Shuffled minibatches of BATCH examples, a new permutation each epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(N_TRAIN)
        for i in range(N_TRAIN // BATCH):
            idx = order[i * BATCH : (i + 1) * BATCH]
            yield x[idx], y[idx]


# %% [markdown]
# ## The monitor
#
# `Sharpness` measures λmax on a fixed batch — here the whole training set, so it is the
# full-batch sharpness; `BatchSharpness(n=8)` averages g_Bᵀ H_B g_B / ‖g_B‖² over the last 8
# minibatches the loop used, all at the current parameters; `CriticalSharpness` is 2/η_c with
# η_c the smallest step along SGD's own update that raises the loss; `FTLE` needs the tangents
# that `mon.wrap(train_step)` advances on the batch of each step (a separate program: your
# step is called as given). `learning_rate=ETA` gives η_t, which `optax.sgd`'s state does not
# hold. Two writers: a zarr store (read by `chaosjax report`) and a CSV file.

# %%
os.makedirs("runs/08", exist_ok=True)
mon = cj.Monitor(
    loss_fn,
    probes=[
        P.Sharpness(k=1, tol=1e-4, batch=(x, y)),
        P.BatchSharpness(n=8),
        P.CriticalSharpness(),
        P.GradientNorm(),
        P.Threshold(),
        P.FTLE(k=1),
    ],
    every=EVERY,
    writer=[
        cj.writers.Zarr("runs/08/monitor.zarr", flush_every=5),
        cj.writers.CSV("runs/08/monitor.csv"),
    ],
    params=lambda state: state[0],
    opt_state=lambda state: state[1],
    optimizer=tx,
    learning_rate=ETA,
)
step = mon.wrap(train_step)

state = (params, tx.init(params))
rows = []
for t, batch in zip(range(STEPS + 1), batches()):
    state, loss = step(state, batch)
    out = mon(t, state, batch)  # {} off cadence
    if out:
        rows.append({"step": t, **out})
mon.close()
print(f"{len(rows)} records; last: " + ", ".join(f"{k} = {rows[-1][k]:.4g}" for k in (
    "sharpness", "batch_sharpness", "critical_sharpness", "threshold", "ftle")))  # fmt: skip
assert len(rows) == STEPS // EVERY + 1

# %% [markdown]
# ## The monitor did not change your training
#
# The same loop without the monitor gives bitwise the same parameters: the monitor reads the
# state and donates nothing, and `wrap` calls your jitted step as given.

# %%
plain = (params, tx.init(params))
for _, batch in zip(range(STEPS + 1), batches()):
    plain, _ = train_step(plain, batch)
same = all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(state))
)
print("bitwise equal:", same)
assert same

# %% [markdown]
# ## What the monitor measured
#
# Each value is against the threshold 2/η (dashed). `threshold` is exactly 2/η at every record;
# at this step size the full-batch λmax stays below it throughout — this η is in the stable
# regime (`benchmarks/eoss.py` trains until it reaches the edge of stochastic stability). The
# FTLE is per step, along this very trajectory and its minibatch sequence.

# %%
steps = np.array([r["step"] for r in rows])
col = {k: np.array([r[k] for r in rows]) for k in rows[0] if k != "step"}
assert np.allclose(col["threshold"], 2 / ETA)
assert (col["sharpness"] < 2 / ETA).all()

fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
for k in ("sharpness", "batch_sharpness", "critical_sharpness"):
    ax[0].plot(steps, col[k], marker=".", label=k)
ax[0].axhline(2 / ETA, color="k", ls="--", label="2/η")
ax[0].set(xlabel="step t", ylabel="curvature", title="sharpness measures against 2/η")
ax[0].legend(fontsize=8)
ax[1].plot(steps[1:], col["ftle"][1:], marker=".")
ax[1].axhline(0, color="k", lw=0.8)
ax[1].set(
    xlabel="step t", ylabel="FTLE per step", title=f"leading FTLE over {EVERY}-step intervals"
)
ax[2].semilogy(steps, col["gradient_norm"], marker=".", label="‖∇L‖")
ax[2].semilogy(steps, col["gradient_norm/loss"], marker=".", label="batch loss")
ax[2].set(xlabel="step t", title="gradient norm and loss")
ax[2].legend(fontsize=8)
for a in ax:
    a.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Each probe's cost is logged beside its value: `name/seconds` (wall time of the call; the
# first includes compilation) and `name/matvecs` (Hessian-vector products, forward passes for
# `critical_sharpness`, tangent JVPs for `ftle`). The FTLE record at t averages the steps since
# the previous record: EVERY tangent steps each (one before the first record).

# %%
for k in ("sharpness", "batch_sharpness", "critical_sharpness", "ftle"):
    print(f"{k:20s} median {np.median(col[k + '/seconds'][1:]) * 1e3:7.2f} ms, "
          f"median matvecs {np.median(col[k + '/matvecs'][1:]):5.0f}")  # fmt: skip
assert (col["ftle/matvecs"][1:] == EVERY).all() and col["ftle/matvecs"][0] == 1
assert (col["batch_sharpness/batches"][1:] == 8).all()  # 8 kept batches after the first record

# %% [markdown]
# ## `chaosjax report` on the log
#
# The command finds the monitor's zarr store in the folder (its attribute `kind = "monitor"`)
# and writes `summary.md` and `figures/` next to it. The summary states each rule it applies:
# the ratio to 2/η_t over the late half of the records, the band [0.9, 1.1], the λ̄·T ≥ 5 rule
# for a positive exponent. A verdict needs at least 10 records in the late window (at tiny size
# there are fewer, and the summary says so instead of guessing); at full size λmax is judged
# "below the threshold". The CSV log holds the same numbers as the store.

# %%
assert chaosjax_cli(["report", "runs/08"]) == 0
summary = open("runs/08/summary.md").read()
print(summary.split("## Costs")[0])
table = cj.writers.read_csv("runs/08/monitor.csv")
store = cj.writers.read_zarr("runs/08/monitor.zarr")
assert np.allclose([r["sharpness"] for r in table], store["sharpness"][1], rtol=1e-12)
verdict = summary.split("λmax (sharpness)")[1].splitlines()[0]
late = len(rows) - len(rows) // 2  # the late window: the last ⌈n/2⌉ records
assert ("below the threshold" if late >= 10 else "fewer than 10") in verdict, verdict

fig, ax = plt.subplots(figsize=(12, 4.5))
ax.imshow(plt.imread("runs/08/figures/sharpness.png"))
ax.axis("off")
plt.show()
