# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---


# %% [markdown]
# # 03 · Edge of stability (Cohen et al. 2021; Wang & Roberts 2024)
#
# Full-batch GD with MSE on Cohen et al.'s Chebyshev toy (20 points, 1→100 tanh→1): the
# sharpness λmax of the Hessian rises during training (*progressive sharpening*) until it
# reaches the stability threshold 2/η, then hovers there (*edge of stability*) while the loss
# keeps falling non-monotonically; for small η it stays below. Crossing 2/η sends the run
# through a *catapult* (a loss spike) into a flatter region, and the top eigenvector rotates
# (Wang & Roberts). With cross-entropy the sharpness often falls late in training instead.
#
# **Runtime**: about 6 minutes on a 2-core CPU at full size; under a minute at tiny size.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import chaosjax as cj
from chaosjax.experiments import build_training_map, load_plan

jax.config.update("jax_enable_x64", True)
TINY = os.environ.get("CHAOSJAX_NOTEBOOK_SIZE", "full") == "tiny"
STEPS, EVERY = (200, 10) if TINY else (6000, 20)
plan = dict(load_plan("edge-of-stability", ["model.hidden=[16]"] if TINY else []))

# %% [markdown]
# ## Sharpness against 2/η on the Chebyshev toy
#
# `CurvatureTracker` runs a warm-started block Krylov solve for the top Hessian eigenpairs of
# every replica at every record, inside the jitted training chunk.

# %%
tmap = build_training_map(plan["chebyshev"])
etas = [0.01, 0.1, 0.2, 0.4]
batch = cj.make_replicas(tmap, grid={"learning_rate": etas})
res = cj.run_replicas(
    tmap,
    batch,
    steps=STEPS,
    record_every=EVERY,
    observables=("loss",),
    trackers=[cj.CurvatureTracker(k=2)],
    progress=not TINY,
)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.3))
for i, eta in enumerate(etas):
    axes[0].semilogy(res.steps, res.records["loss"][i], label=f"η = {eta}")
    line = axes[1].plot(res.steps, res.records["sharpness"][i, :, 0], label=f"η = {eta}")
    axes[1].axhline(2 / eta, ls=":", color=line[0].get_color())
    axes[2].plot(res.steps[1:], res.records["rotation"][i, 1:], lw=0.7, label=f"η = {eta}")
axes[0].set(xlabel="step", ylabel="training loss (MSE)")
axes[1].set(xlabel="step", ylabel="λmax (dotted: 2/η)", yscale="log")
axes[2].set(xlabel="step", ylabel="1 − |⟨v1(t−Δ), v1(t)⟩|", yscale="log", title="rotation")
axes[1].legend(fontsize=7)
plt.tight_layout()
plt.show()
ratio = res.records["sharpness_ratio"]
late = ratio[:, ratio.shape[1] * 3 // 4 :]
for eta, r in zip(etas, late):
    print(f"η = {eta}: median λmax·η/2 over the last quarter = {np.nanmedian(r):.3f}")

# %% [markdown]
# For η ≥ 0.1 the ratio λmax/(2/η) settles near 1 (edge of stability); for η = 0.01 the run
# has not reached the threshold. Spikes in the loss coincide with the sharpness overshooting
# 2/η and dropping back: a catapult.
#
# ## Catapults in the loss series

# %%
i = etas.index(0.4)
ep = cj.series.spikes(res.records["loss"][i], factor=1.5)
print(f"η = 0.4: {len(ep)} loss spikes (a record more than 1.5× the running minimum)")

# %% [markdown]
# ## MSE against cross-entropy on digits

# %%
fig, ax = plt.subplots(figsize=(6, 3.3))
for name, eta in (("digits-mse", 0.4), ("digits-ce", 2.0)):
    cfg = plan[name]
    tm = build_training_map(cfg)
    r = cj.run_replicas(
        tm,
        cj.make_replicas(tm, grid={"learning_rate": [eta]}),
        steps=STEPS // 2,
        record_every=EVERY,
        observables=("loss",),
        trackers=[cj.CurvatureTracker(k=1)],
        progress=not TINY,
    )
    ax.plot(r.steps, r.records["sharpness_ratio"][0], label=f"{name}, η = {eta}")
ax.axhline(1, c="k", ls=":")
ax.set(xlabel="step", ylabel="λmax / (2/η)", title="digits: MSE sharpens, CE does not")
ax.legend()
plt.show()
