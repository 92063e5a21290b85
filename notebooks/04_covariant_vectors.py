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
# # 04 · Covariant Lyapunov vectors of a training map (Sharafi, Martin & Hallerberg 2024)
#
# Lyapunov exponents say how fast perturbations grow; covariant Lyapunov vectors (CLVs) say
# along which directions, and — unlike the orthogonal Gram–Schmidt vectors of the QR method —
# they are covariant (J_t v_i(t) ∥ v_i(t+1)) and need not be orthogonal. Near-tangencies
# (small angles between CLVs) signal that stable and unstable directions nearly coincide.
# Sharafi et al. study the tangent operator of learning dynamics this way; here we compute
# Ginelli CLVs of a linear map with a known answer, then of a training map, their angles, and
# how the leading CLV aligns with the top Hessian eigenvectors.
#
# **Runtime**: about 2 minutes on a 2-core CPU at full size; seconds at tiny size.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import chaosjax as cj
from chaosjax.experiments import build_training_map, load_plan

jax.config.update("jax_enable_x64", True)
TINY = os.environ.get("CHAOSJAX_NOTEBOOK_SIZE", "full") == "tiny"
STEPS = 200 if TINY else 2000

# %% [markdown]
# ## A known answer: the non-normal map [[2, 1], [0, 0.5]]
#
# Its CLVs are the eigenvectors (1, 0) and (1, −1.5)/‖·‖, at 56.3° — Gram–Schmidt vectors
# would be orthogonal.

# %%
lin = cj.systems.LinearMap()
c = cj.covariant_lyapunov_vectors(lin.step, jnp.array([1.0, 1.0]), k=2, steps=40,
                                  backward_transient=20)  # fmt: skip
v = c.vectors[-1]
print("exponents:", c.exponents, "(log 2 = 0.693, log 0.5 = −0.693, up to the short transient)")
print("CLV angle:", np.degrees(np.arccos(abs(v[:, 0] @ v[:, 1]))), "degrees")
# the CLVs are the eigenvectors, 56.3° apart, and the exponents ±ln 2 up to the transient
assert abs(v[0, 0]) > 1 - 1e-9 and abs(v[:, 1] @ [1.0, -1.5]) / np.hypot(1.0, 1.5) > 1 - 1e-9
assert abs(np.degrees(np.arccos(abs(v[:, 0] @ v[:, 1]))) - 56.31) < 0.01
assert np.allclose(c.exponents, [np.log(2), np.log(0.5)], atol=0.01)

# %% [markdown]
# ## CLVs of gradient descent on Iris at η = 1

# %%
# the network exactly as the lr-regimes preset builds it (its η = 1 variant)
tmap = build_training_map(dict(load_plan("lr-regimes"))["chaotic"])
x0 = tmap.init()
k = 4
clv = cj.covariant_lyapunov_vectors(
    tmap.step, x0, k=k, steps=STEPS, warmup=STEPS // 2, align=STEPS // 4,
    backward_transient=STEPS // 2, keep_every=max(1, STEPS // 20),
)  # fmt: skip
print("CLV exponents:", np.round(clv.exponents, 4))
print("QR exponents: ", np.round(clv.qr_exponents, 4))
print("near-tangencies (min angle < 1°):", clv.near_tangencies, "of", len(clv.angles), "steps")
angles = np.degrees(clv.angles)
print(f"smallest CLV angle: median {np.median(angles):.1f}°, minimum {angles.min():.1f}°")
# CLV and QR give the same spectrum; the CLVs are far from orthogonal
assert np.abs(clv.exponents - clv.qr_exponents).max() < 0.03 and np.median(angles) < 60
if TINY:  # a window inside the chaotic transient: λ1 > 0 and close approaches to tangency
    assert clv.exponents[0] > 0.05 and angles.min() < 5
else:  # a window after the run has settled: λ1 ≈ 0, no near-tangency
    assert abs(clv.exponents[0]) < 1e-3 and angles.min() > 30

fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].plot(np.degrees(clv.angles), lw=0.6)
axes[0].set(xlabel="renormalisation", ylabel="smallest CLV angle (°)", yscale="log")
axes[1].hist(np.degrees(clv.angles), bins=40)
axes[1].set(xlabel="smallest angle (°)", ylabel="count", title="angle distribution")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Which layer do the unstable directions live in, and do they follow the curvature?

# %%
mass = cj.clv_layer_mass(clv.vectors, tmap.layers, tmap.n_params)
for name, m in mass.items():
    print(f"{name:12s} share of each CLV's squared norm:", np.round(m.mean(axis=0), 3))

overlaps, sharpest = [], []
for t, state in zip(clv.times, clv.states):
    loss = lambda p, s=state: tmap.loss(jnp.concatenate([p, s[tmap.n_params :]]))  # noqa: E731
    eig = cj.hessian_eigs(loss, state[: tmap.n_params], k=k)
    sharpest.append(float(eig.eigenvalues[0]))
    basis = np.asarray(eig.eigenvectors).T  # (n_params, k)
    vec = clv.vectors[list(clv.times).index(t)][: tmap.n_params]
    vec = vec / np.linalg.norm(vec, axis=0, keepdims=True)
    overlaps.append(cj.clv_subspace_overlap(vec, basis))
overlaps = np.asarray(overlaps)
eta_lam = tmap.learning_rate * np.asarray(sharpest)
chance = k / tmap.n_params  # mean squared overlap of a random direction with k of the axes
print(f"ηλmax at the kept steps: {eta_lam.min():.2f}–{eta_lam.max():.2f}")
print(f"leading CLV: mean overlap {overlaps[:, 0].mean():.3f} (a random direction: {chance:.3f})")
if TINY:  # ηλmax crosses 2, and the leading CLV lies near the sharp directions
    assert eta_lam.max() > 2 and overlaps[:, 0].mean() > 3 * chance
else:  # ηλmax < 2 throughout, and the leading CLV avoids the sharp directions
    assert eta_lam.max() < 2 and overlaps[:, 0].mean() < chance
plt.figure(figsize=(6, 3))
for i in range(k):
    plt.plot(clv.times, overlaps[:, i], marker=".", label=f"CLV {i + 1}")
plt.gca().set(xlabel="step", ylabel="overlap with top-k Hessian eigvecs", ylim=(0, 1.05))
plt.legend()
plt.show()

# %% [markdown]
# **What this shows.** The CLV and QR exponents agree (the same spectrum measured two ways),
# and the CLVs are far from orthogonal. The overlap of the leading CLV with the top Hessian
# eigenvectors measures how much of the instability is explained by curvature along the
# sharpest directions: for GD the Jacobian is I − ηH, so a direction with ηλ > 2 grows.
#
# At η = 1 this network is chaotic only for a while, so what the CLVs show depends on where
# the window lies. The tiny run's window (steps 100–400) is inside the chaotic transient:
# λ1 ≈ 0.17 per step, the CLVs come close to tangency (smallest angle about 2°), ηλmax
# crosses 2 at some steps, and the leading CLV overlaps the top-4 Hessian eigenvectors about
# eight times more than a random direction — it lives near the sharp directions. The full
# run's window (after step 1000) comes once the run has settled where ηλmax ≈ 1.4–1.6 < 2:
# λ1 ≈ 1e-4 (neutral), the smallest angle stays near 50° (no near-tangency), and the leading
# CLV is almost orthogonal to the sharp directions (mean overlap about 0.002): it lies along
# the flat directions of the valley, which neither grow nor shrink.
