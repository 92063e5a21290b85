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

# %%

# %% [markdown]
# # 07 · Your model, your optimizer, your train step
#
# chaosjax measures *your* training, not a toy of its own. This notebook takes a CNN written
# the way the Flax NNX tutorials write it — convolutions, BatchNorm, Dropout, average pooling
# — trained by `optax.adamw` with a warm-up cosine schedule on minibatches, and runs it through
# chaosjax: perturbed replicas, finite-time Lyapunov exponents along the recorded runs,
# sharpness against Adam's stability threshold, and covariant Lyapunov vectors. Then it does
# the same for a hand-written `train_step` on a flax `TrainState`.
#
# What chaosjax does with your model (README, "Your own training, as a map"):
#
# - `nnx.Param` variables are the trained parameters; with Adam's moments they are the
#   dynamical coordinates that tangents, perturbations and distances act on;
# - BatchNorm's running statistics are *carried*: advanced exactly by each step, never
#   perturbed or differentiated;
# - Dropout draws its keys from (the map's `rng_seed`, t): every replica sees the same masks
#   at the same step, so the map is deterministic and replicas differ only by their state;
# - curvature is that of the loss the step differentiates (train mode, batch statistics of the
#   examples, dropout off); `loss`/`accuracy` records are in eval mode.
#
# **Runtime**: about 8 minutes on a 2-core CPU at full size (measured: 8 min 11 s, the
# replica run in two passes of the memory plan); under a minute at tiny size.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import chaosjax as cj

jax.config.update("jax_enable_x64", True)
TINY = os.environ.get("CHAOSJAX_NOTEBOOK_SIZE", "full") == "tiny"
STEPS = 10 if TINY else 400
N_TRAIN = 64 if TINY else 1300
WIDTH = 4 if TINY else 8

# %% [markdown]
# ## Your data
#
# `Dataset.from_arrays` takes inputs of any shape — here 8×8 images with a channel axis —
# and integer labels (a classification task). Splits by count: `digits(n_test=497)` gives
# the 1300/497 split.

# %%
digits = cj.datasets.digits(images=True, n_test=497)
assert (len(digits.x_train), len(digits.x_test)) == (1300, 497)
ds = cj.Dataset.from_arrays(
    digits.x_train[:N_TRAIN], digits.y_train[:N_TRAIN], digits.x_test, digits.y_test,
    name="digits-images",
)  # fmt: skip
print(ds)


# %% [markdown]
# ## Your model and optimizer


# %%
class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, width: int = 8):
        self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.dense1 = nnx.Linear(width * 16, 32, rngs=rngs)
        self.dense2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(self.bn(nnx.relu(self.conv1(x))), (2, 2), (2, 2))
        x = nnx.relu(self.conv2(x)).reshape(x.shape[0], -1)
        return self.dense2(nnx.relu(self.dense1(self.dropout(x))))


schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 2 * STEPS)
# inject_hyperparams keeps η_t in the optimizer state: the stability threshold reads it there
adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=1e-4)

tmap = cj.TrainingMap.from_nnx(
    CNN(nnx.Rngs(0), WIDTH),
    ds,
    loss="cross_entropy",
    optimizer=adamw,
    optimizer_kind="adamw",  # which stability threshold and curvature operator apply
    batch_size=64,
    dtype=jnp.float64,
    model_factory=lambda rngs: CNN(rngs, WIDTH),
)
print(tmap)
print("η_t known from:", tmap.learning_rate_source)
# η_t is read from the optimizer state; parameters and Adam's two moments are the coordinates
assert tmap.learning_rate_source == "state" and tmap.dim == 3 * tmap.n_params

# %% [markdown]
# ## Replicas, FTLEs and sharpness along the recorded runs
#
# Two initialisations, each with three replicas (one at tiny size) perturbed by ε = 1e-8 on
# the weights. The Lyapunov observer carries k = 4 tangents (2 at tiny size) along each
# reference run and records FTLEs every record; the curvature observer records the top
# eigenvalue of Adam's preconditioned Hessian P^-1/2 H P^-1/2 (P from the optimizer state's
# second moments) against Adam's threshold (2 + 2β1)/((1 − β1)η_t), η_t read from the state
# at each record. `optimizer_kind="adamw"` told chaosjax which threshold applies to the
# transformation it was given.

# %%
batch = cj.make_replicas(tmap, seeds=[0, 1], n_perturbed=1 if TINY else 3, eps=1e-8)
# the perturbations: entries up to ε on every weight, none on Adam's moments
kick = np.asarray(batch.states - batch.states[batch.reference])[batch.coords["member"] > 0]
assert 0.9e-8 < np.abs(kick[:, : tmap.n_params]).max(axis=1).min() < 1.01e-8
assert not kick[:, tmap.n_params :].any()
results = cj.run_replicas(
    tmap,
    batch,
    steps=STEPS,
    record_every=10,
    observables=["loss", "test_accuracy", "distance_l2"],
    trackers=[cj.LyapunovTracker(k=2 if TINY else 4), cj.CurvatureTracker(k=1)],
    progress=not TINY,
)
refs = batch.coords["member"] == 0
steps = results.steps_of("loss")
fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
for r in np.flatnonzero(refs):
    ax[0].plot(steps, results.records["loss"][r], label=f"seed {batch.coords['seed'][r]}")
    ax[2].plot(steps, results.records["ftle"][r, :, 0])
ax[0].set(xlabel="step", ylabel="train loss (eval mode)")
ax[0].legend()
pert = batch.coords["member"] > 0
ax[1].semilogy(steps, results.records["distance_l2"][pert].T, color="C1", alpha=0.5)
ax[1].set(xlabel="step", ylabel="‖θ − θ_ref‖ (ε = 1e-8)")
ax[2].set(xlabel="step", ylabel="FTLE λ1 per step")
plt.tight_layout()

# %%
sharp = results.records["sharpness"][refs][..., 0]
threshold = results.records["threshold"][refs]
print("final preconditioned sharpness per seed:", np.round(sharp[:, -1], 1))
ratio = sharp / threshold
print(
    "preconditioned sharpness / Adam threshold, largest over the run:",
    np.round(np.nanmax(ratio, axis=1), 3),
)
print("final test accuracy per seed:", np.round(results.records["test_accuracy"][refs, -1], 3))
ftle = results.records["ftle"][refs][:, 1:]
print("mean FTLE λ1 over the run per seed:", np.round(np.nanmean(ftle[..., 0], axis=1), 4))

# %% [markdown]
# ## Covariant Lyapunov vectors of your training
#
# The CLVs of one run over a window of the training, with a backward transient after it:
# the smallest angle between them at each kept step tells whether the expanding and
# contracting directions come close (near-tangencies).

# %%
clv = cj.covariant_lyapunov_vectors(
    tmap.step,
    tmap.init_from_key(0),
    k=2 if TINY else 3,
    steps=5 if TINY else 100,
    backward_transient=5 if TINY else 100,
    keep_every=5,
)
print("CLV exponents per step:", np.round(clv.exponents, 4))
print("smallest CLV angle (degrees):", np.round(np.degrees(clv.angles.min()), 2))

# %% [markdown]
# ## Or your own `train_step`
#
# A `TrainState`, an optax chain with clipping and a schedule, and the `train_step` you
# already have. `batch_fn(t, data)` picks the data of step t (jittable in t); `loss_fn` gives
# loss records and curvature. Integer leaves (the step counter, optax counts) are carried.

# %%
x_flat = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1))
y = jnp.asarray(ds.y_train)


def apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]


def init_state(key):
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (64, 16), jnp.float64) / 8,
        "b1": jnp.zeros(16, jnp.float64),
        "w2": jax.random.normal(k2, (16, 10), jnp.float64) / 4,
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
    return train_state.TrainState.create(apply_fn=apply, params=params, tx=tx)


def loss_fn(params, batch):
    x, labels = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), labels).mean()


@jax.jit
def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads), {"loss": loss}


def batch_fn(t, data):
    idx = jax.random.choice(jax.random.fold_in(jax.random.key(1), t), len(data[0]), (64,), False)
    return data[0][idx], data[1][idx]


smap = cj.TrainingMap.from_step(
    train_step, init_state(jax.random.key(0)), batch_fn=batch_fn, data=(x_flat, y),
    loss_fn=loss_fn, init_fn=init_state,
)  # fmt: skip
print(smap)
assert smap.dim == 3 * smap.n_params  # the parameters and adamw's two moments; counts carried
sbatch = cj.make_replicas(smap, seeds=[0, 1], n_perturbed=2, eps=1e-8)
sres = cj.run_replicas(
    smap,
    sbatch,
    steps=STEPS,
    record_every=10,
    custom_observables=smap.metric_observables(),
    trackers=[cj.LyapunovTracker(k=2)],
    progress=not TINY,
)
print("batch loss the step returned, last record:", np.round(sres.records["metric_loss"][:, -1], 4))
print(
    "FTLE λ1 of the references, last record:",
    np.round(sres.records["ftle"][sbatch.coords["member"] == 0, -1, 0], 4),
)
