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
    # the states of every record, kept for the loss landscape below (no re-run)
    trackers=[cj.CurvatureTracker(k=2), cj.StateSnapshots(at=tuple(range(0, STEPS + 1, EVERY)))],
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
# progressive sharpening at η = 0.4 up to near 2/η (a ratio close to 1 well before the tiny
# run ends), η = 0.01 far below its threshold, and the ratio ordered by η
settled = [float(np.nanmedian(r)) for r in late]
assert settled[0] < 0.5 and 0.5 < settled[-1] < 1.2 and settled == sorted(settled)
assert np.nanmax(res.records["sharpness"][-1, :, 0]) > 1.5 * res.records["sharpness"][-1, 0, 0]

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
# ## The valley the iterate bounces across
#
# `chaosjax.landscape` slices the loss along the directions that matter. At the end of the
# η = 0.4 run: the loss along the top Hessian eigenvector u (the recorded iterates of the last
# records marked by their offset along u), next to the quadratic model ½λ1α² and the
# curvature 2/η at which GD on a quadratic stops converging; then the loss on the plane of the
# run's two principal directions, with the trajectory projected on it.

# %%
from chaosjax import landscape

traj = res.records["state"][i]  # (records, dim): the run's own states
u = landscape.directions("hessian", tmap, traj[-1], k=1)[0]
lam = float(cj.hessian_eigs(tmap, traj[-1], k=1).eigenvalues[0])
offsets = (traj[-10:] - traj[-1]) @ u
sl = landscape.slice(tmap, traj[-1], u, span=3 * np.abs(offsets).max() + 1e-6, num=81)
plane = landscape.trajectory_plane(traj, k=2)
span2 = 1.2 * np.abs(plane.coordinates).max()
sl2 = landscape.slice(tmap, traj[-1], plane.directions, span=span2, num=21 if TINY else 41)
fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
ax[0].plot(sl.alphas, sl.values, label="loss along u")
ax[0].plot(sl.alphas, landscape.quadratic_model(sl.alphas, lam, sl.center), "--", label="½λ1α²")
ax[0].plot(sl.alphas, sl.center + 0.5 * (2 / 0.4) * sl.alphas**2, ":", label="½(2/η)α²")
ax[0].plot(offsets, np.interp(offsets, sl.alphas, sl.values), "o", ms=4, label="last iterates")
ax[0].set(xlabel="α along the top eigenvector", ylabel="training loss", title="η = 0.4")
ax[0].legend(fontsize=7)
ax[1].contourf(sl2.alphas, sl2.betas, np.log10(sl2.values).T, levels=20)
ax[1].plot(*plane.coordinates.T, "w.-", lw=0.8, ms=2)
ax[1].set(
    xlabel=f"PC1 ({plane.explained[0]:.0%})", ylabel=f"PC2 ({plane.explained[1]:.0%})",
    title="log10 loss on the trajectory plane",
)  # fmt: skip
plt.tight_layout()
plt.show()
print(f"λ1 at the end = {lam:.3f}; 2/η = {2 / 0.4:.3f}")
assert abs(lam / (2 / 0.4) - 1) < 0.2  # λ1 ≈ 2/η at the end of the η = 0.4 run

# %% [markdown]
# At the edge of stability λ1 ≈ 2/η: the iterates sit on both walls of a valley whose bottom
# curvature is the threshold. Compare the slice with its quadratic model away from the
# bottom: where it rises more slowly, the valley is flatter than its curvature says.
#
# ## MSE against cross-entropy on digits

# %%
fig, ax = plt.subplots(figsize=(6, 3.3))
ratios = {}
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
    ratios[name] = r.records["sharpness_ratio"][0]
    ax.plot(r.steps, ratios[name], label=f"{name}, η = {eta}")
ax.axhline(1, c="k", ls=":")
ax.set(xlabel="step", ylabel="λmax / (2/η)", title="digits: MSE sharpens, CE does not")
ax.legend()
plt.show()
# cross-entropy's ratio falls late in training (MSE's sharpening needs the full-size run)
assert ratios["digits-ce"][-1] < ratios["digits-ce"][0]
