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
# # 01 · Quickstart: a map and a network, analysed by the same functions
#
# chaosjax treats one optimizer step as a map `s_{t+1} = F_t(s_t)`. Whatever the map — the
# Hénon map or a training step — `lyapunov_spectrum` measures how nearby states separate.
# Here: the Hénon map against its known exponents (0.419, −1.623), then Danovski et al.'s
# Iris network at η = 1, where they report chaotic training (replicas separate
# exponentially, λ1 > 0).
#
# **Runtime**: about 1 minute on a 2-core CPU at full size; seconds with
# `CHAOSJAX_NOTEBOOK_SIZE=tiny` (the size the test suite uses).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import chaosjax as cj

jax.config.update("jax_enable_x64", True)  # ε = 1e-8 perturbations need float64
TINY = os.environ.get("CHAOSJAX_NOTEBOOK_SIZE", "full") == "tiny"
STEPS = 300 if TINY else 5000

# %% [markdown]
# ## A map with known answers

# %%
henon = cj.systems.Henon()
res = cj.lyapunov_spectrum(henon.step, henon.x0, k=2, steps=STEPS, warmup=100)
print("Hénon exponents per step:", res.exponents, "±", res.stderr)
print("λ1 + λ2 − ln 0.3 =", res.exponents.sum() - np.log(0.3))
# the known exponents (to three decimals at full size, a few hundredths at tiny size), and
# λ1 + λ2 = ln|det J| = ln 0.3 at every step
assert abs(res.exponents[0] - 0.4194) < 0.05 and abs(res.exponents[1] + 1.6234) < 0.05
assert abs(res.exponents.sum() - np.log(0.3)) < 1e-8

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(res.times, res.running[:, 0], label="λ1 (running)")
ax.plot(res.times, res.running[:, 1], label="λ2 (running)")
ax.axhline(0.4194, ls=":", c="k")
ax.axhline(-1.6234, ls=":", c="k")
ax.set(xlabel="step", ylabel="exponent", title="Hénon: running estimates converge")
ax.legend()
plt.show()

# %% [markdown]
# ## A network trained by gradient descent is a map too
#
# The state is one flat vector of parameters (and optimizer moments, none for plain GD).

# %%
net = cj.models.PureMLP((4, 10, 3), activation="sigmoid", init="normal")
tmap = cj.TrainingMap(
    net.apply,
    net.init_params(jax.random.PRNGKey(0), jnp.float64),
    cj.datasets.iris(),
    loss="cross_entropy",
    optimizer="sgd",
    learning_rate=1.0,
    init_fn=lambda k: net.init_params(k, jnp.float64),
)
x0 = tmap.init()
print("state dimension:", x0.shape[0], "| initial loss:", float(tmap.loss(x0)))

# %% [markdown]
# ### Replicas: the reference run and ε-perturbed copies in one vmapped batch

# %%
batch = cj.make_replicas(tmap, seeds=[0], n_perturbed=4, eps=1e-8)
rep = cj.run_replicas(
    tmap, batch, steps=STEPS // 5 if TINY else 1000, record_every=5, progress=False
)
d = rep.records["distance_l1"][rep.coords["member"] > 0]
assert (d[:, -1] > 3 * d[:, 0]).all()  # every ε-replica separates from the reference
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(rep.steps, rep.records["loss"][0])
axes[0].set(xlabel="step", ylabel="training loss", title="reference run, η = 1")
axes[1].semilogy(rep.steps, d.T)
axes[1].set(xlabel="step", ylabel="L1 distance to the reference", title="ε = 1e-8 replicas")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### λ1 and the spectrum of the same training map

# %%
spec = cj.lyapunov_spectrum(tmap.step, x0, k=4, steps=STEPS // 2 if TINY else 2000)
print("top-4 exponents per step:", np.round(spec.exponents, 4), "±", np.round(spec.stderr, 4))
print("λ1 per unit ηt:", spec.per_eta_t(1.0)[0])
assert spec.exponents[0] > 0  # training at η = 1 is chaotic
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(np.arange(1, 5), spec.exponents, yerr=spec.stderr)
ax.axhline(0, c="k", lw=0.5)
ax.set(xlabel="i", ylabel="λ_i per step", title="Iris, η = 1: top of the spectrum")
plt.show()

# %% [markdown]
# **What this shows.** The same function returns the Hénon exponents to three decimals and,
# for the network, a positive λ1 with replicas separating exponentially from ε = 1e-8:
# training at η = 1 is chaotic in Danovski et al.'s sense. The bound on the separation is the
# size of the attractor (the replicas stay on the same loss level).
