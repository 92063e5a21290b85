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

overlaps = []
for t, state in zip(clv.times, clv.states):
    loss = lambda p, s=state: tmap.loss(jnp.concatenate([p, s[tmap.n_params :]]))  # noqa: E731
    eig = cj.hessian_eigs(loss, state[: tmap.n_params], k=k)
    basis = np.asarray(eig.eigenvectors).T  # (n_params, k)
    vec = clv.vectors[list(clv.times).index(t)][: tmap.n_params]
    vec = vec / np.linalg.norm(vec, axis=0, keepdims=True)
    overlaps.append(cj.clv_subspace_overlap(vec, basis))
overlaps = np.asarray(overlaps)
plt.figure(figsize=(6, 3))
for i in range(k):
    plt.plot(clv.times, overlaps[:, i], marker=".", label=f"CLV {i + 1}")
plt.gca().set(xlabel="step", ylabel="overlap with top-k Hessian eigvecs", ylim=(0, 1.05))
plt.legend()
plt.show()

# %% [markdown]
# **What this shows.** The CLV and QR exponents agree (the same spectrum measured two ways).
# The CLVs are far from orthogonal and come close to tangency at some steps. The overlap of
# the leading CLV with the top Hessian eigenvectors measures how much of the instability is
# explained by curvature along the sharpest directions — for GD the Jacobian is I − ηH, so a
# direction with ηλ > 2 grows, and the leading CLV lives near it.
