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
# # 02 · Learning-rate regimes (Danovski, Soriano & Lacasa 2024)
#
# Iris, 4→10 sigmoid→3 softmax, N(0, 1) weights, full-batch GD, float64, weights perturbed by
# U(−ε, ε). The paper's claims: at η = 0.01 the loss falls monotonically and ε-perturbed
# replicas do not separate exponentially (d(t)/ε is independent of ε); at η = 1 the replicas
# separate by orders of magnitude with a positive slope; at η = 5 the loss does not converge
# and seeds differ (periodic locking, intermittent bursts, irregular motion). Then the onset
# of chaos: λ1 against η on a grid, all in one batch.
#
# **Runtime**: about 3 minutes on a 2-core CPU at full size; seconds at tiny size.

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
STEPS = 200 if TINY else 3000
SEEDS = [0, 1] if TINY else [0, 1, 2, 3]

# the network exactly as the lr-regimes preset builds it (its η = 1 variant)
tmap = build_training_map(dict(load_plan("lr-regimes"))["chaotic"])

# %% [markdown]
# ## Three regimes, two perturbation sizes, several seeds: one batch

# %%
etas = [0.01, 1.0, 5.0]
batch = cj.make_replicas(
    tmap, seeds=SEEDS, grid={"learning_rate": etas}, n_perturbed=3, eps=[1e-8, 1e-6]
)
print(len(batch), "replicas")
res = cj.run_replicas(tmap, batch, steps=STEPS, record_every=2, progress=not TINY)
c = res.coords

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
for ax, eta in zip(axes, etas):
    for eps, color in ((1e-8, "C0"), (1e-6, "C1")):
        sel = (c["learning_rate"] == eta) & (c["eps"] == eps) & (c["member"] > 0)
        ax.semilogy(res.steps, (res.records["distance_l1"][sel] / eps).T, color=color, lw=0.6)
    ax.set(title=f"η = {eta}", xlabel="step")
axes[0].set_ylabel("d(t) / ε  (blue ε=1e-8, orange 1e-6)")
plt.tight_layout()
plt.show()


def peak_separation(eta, eps):
    """(n_perturbed · n_seeds,) largest d(t)/ε of the perturbed replicas at (η, ε)."""
    sel = (c["learning_rate"] == eta) & (c["eps"] == eps) & (c["member"] > 0)
    return (res.records["distance_l1"][sel] / eps).max(axis=1)


# η = 0.01: d/ε independent of ε and O(1) (no exponential separation), the loss falls
# monotonically; η = 1: many orders of magnitude
slow = [np.median(peak_separation(0.01, eps)) for eps in (1e-8, 1e-6)]
assert max(slow) < 1e3 and 0.5 < slow[0] / slow[1] < 2
for seed in SEEDS:
    i = np.flatnonzero((c["learning_rate"] == 0.01) & (c["seed"] == seed) & (c["member"] == 0))[0]
    assert cj.series.fraction_increasing(res.records["loss"][i]) == 0
assert peak_separation(1.0, 1e-8).min() > 1e5

# %% [markdown]
# At η = 0.01 the curves for both ε coincide and stay O(1): no exponential separation. At
# η = 1 they grow by many orders of magnitude before saturating. The best-window fit of
# ⟨ln d⟩ gives the slope Danovski et al. report (≈ 0.1–0.4 per step):

# %%
sel = (c["learning_rate"] == 1.0) & (c["eps"] == 1e-8) & (c["member"] > 0)
fit = cj.best_window_fit(res.steps, res.records["distance_l1"][sel])
print(f"η = 1: slope {fit.slope:.3f} per step over steps {fit.start}–{fit.stop} (R² {fit.r2:.3f})")
assert 0.1 < fit.slope < 0.4 and fit.r2 > 0.9  # an accepted fit in the reported range

# %% [markdown]
# ## Loss-series diagnostics at η = 5: each seed behaves differently

# %%
fig, axes = plt.subplots(1, len(SEEDS), figsize=(3.2 * len(SEEDS), 3), sharey=True)
for ax, seed in zip(np.atleast_1d(axes), SEEDS):
    i = np.flatnonzero((c["learning_rate"] == 5.0) & (c["seed"] == seed) & (c["member"] == 0))[0]
    loss = res.records["loss"][i]
    acf = cj.series.autocorrelation(loss, max_lag=min(50, len(loss) // 3), start=len(loss) // 2)
    ax.plot(res.steps, loss, lw=0.6)
    ax.set(
        title=f"seed {seed}: ↑ {cj.series.fraction_increasing(loss):.2f}, ACF(2) {acf.acf[2]:.2f}",
        xlabel="step",
    )
np.atleast_1d(axes)[0].set_ylabel("training loss, η = 5")
plt.tight_layout()
plt.show()

# %% [markdown]
# A period-2 seed has an autocorrelation near 1 at lag 2; an intermittent one alternates
# laminar stretches with bursts; an irregular one has a quickly decaying ACF. Chaos at η = 5
# is a statement about the ensemble, not about every seed.
#
# ## Onset of chaos: λ1 against η, the whole grid as one batched tangent run

# %%
grid = np.geomspace(0.05, 8.0, 6 if TINY else 16)
x0 = jnp.stack([tmap.init()] * len(grid))
hp = {"learning_rate": jnp.asarray(grid)}
lyap = cj.lyapunov_spectrum(
    tmap.step_with, x0, k=1, steps=STEPS, warmup=STEPS // 2, batched=True, args=hp
)
lam = lyap.exponents[:, 0]
fig, ax = plt.subplots(figsize=(6, 3))
ax.errorbar(grid, lam, yerr=lyap.stderr[:, 0], marker="o")
ax.axhline(0, c="k", lw=0.5)
ax.set(xscale="log", xlabel="η", ylabel="λ1 per step", title="onset of chaos (seed 0)")
plt.show()
print("first η with λ1 > 0:", grid[np.argmax(lam > 0)] if (lam > 0).any() else "none")
assert lam[0] < 0.01 and lam[np.argmin(abs(grid - 1.0))] > 0  # stable at small η, chaotic at 1

# %% [markdown]
# ## What the runs turn into: periods, orbits and a route to chaos
#
# `cj.orbits.detect_period` reads the period off recorded states; `find_periodic_orbit`
# converges onto the orbit by Newton–Krylov on F^k(x) − x (matrix-free) and returns its
# Floquet multipliers; `cj.bifurcation` runs a whole η grid as one batched run and refines the
# points where the period changes. The uv model — GD on ½(u·v·x − y)² at one example — doubles
# its period as η grows (Kalra, He & Barkeshli 2023): the preset `routes-to-chaos` runs it on a
# dense grid (its cascade and Feigenbaum ratios are in `benchmarks/RESULTS.md`).

# %%
uv = build_training_map(load_plan("routes-to-chaos", variants=["uv"])[0][1])
etas = np.linspace(0.9, 1.32, 12 if TINY else 106)
diagram = cj.bifurcation(
    uv, uv.init_from_key(0), etas, steps=1000 if TINY else 6000, n_samples=16, max_period=32,
    refine_tol=1e-3 if TINY else 1e-5,
)  # fmt: skip
cj.orbits.plot_bifurcation(diagram, label="learning rate η")
plt.show()
print(
    "period-change points:", np.round(diagram.points, 4), "periods:", diagram.transitions.tolist()
)
# the fixed point (period 1) gives way to a 2-cycle near η = 1 = 2/λ (λ = u² + v² = 2 at u = v = 1)
assert diagram.transitions[0].tolist() == [1, 2] and abs(diagram.points[0] - 1.0) < 0.02

# %%
# the 2-cycle at η = 1.1: the orbit, its residual and its multipliers (stable: |μ| < 1)
two = uv.replace(learning_rate=1.1)
state = uv.init_from_key(0)
for t in range(300 if TINY else 2000):
    state = two.step(state, t)
orbit = cj.orbits.find_periodic_orbit(two.step, state, 2)
print("residual", orbit.residual, "multipliers", np.round(orbit.multipliers, 4))
assert orbit.converged and orbit.stable and orbit.residual < 1e-10
