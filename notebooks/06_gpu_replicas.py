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
# # 06 · Hundreds of replicas and a learning-rate grid in one batch
#
# The replica engine vmaps the training step over a leading replica axis and shards that axis
# over the devices of a `jax.make_mesh` mesh: every device runs its own replicas (each
# reference run together with its perturbed copies) with no communication, and only the
# recorded observables come back to the host. This notebook runs a seeds × η-grid × ε batch,
# shows the memory plan, and measures throughput in replica-steps per second.
#
# How to read the throughput: on a GPU a replica-step of a small MLP costs far less than a
# kernel launch, so throughput grows almost linearly with the number of replicas until the
# device is busy, then flattens; the memory estimate tells how far R can go. On a CPU the
# cores are busy with one replica-step already, so throughput is nearly flat in R, and forced
# CPU devices (`jax_num_cpu_devices`) share the same cores (no speed-up, only a test of the
# sharding).
#
# **Runtime**: about 2 minutes on a 2-core CPU at full size, under a minute on a GPU; seconds
# at tiny size.

# %%
import os
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import chaosjax as cj
from chaosjax.experiments import build_training_map, load_config
from chaosjax.replicas import replica_memory

jax.config.update("jax_enable_x64", True)
TINY = os.environ.get("CHAOSJAX_NOTEBOOK_SIZE", "full") == "tiny"
STEPS = 50 if TINY else 1000
cfg = load_config("quickstart", ["model.output_activation=identity"])
tmap = build_training_map(cfg)
mesh = cj.sharding.replica_mesh()
print("backend:", jax.default_backend(), "| devices in the replica mesh:", mesh.devices.size)

# %% [markdown]
# ## One batch: 4 seeds × 8 learning rates × (reference + 7 perturbed) = 256 replicas
#
# (2 × 3 × 3 = 18 at tiny size.)

# %%
seeds = [0, 1] if TINY else [0, 1, 2, 3]
etas = list(np.geomspace(0.05, 6.0, 3 if TINY else 8))
n_perturbed = 2 if TINY else 7
batch = cj.make_replicas(
    tmap, seeds=seeds, grid={"learning_rate": etas}, n_perturbed=n_perturbed, eps=1e-8
)
assert len(batch) == len(seeds) * len(etas) * (1 + n_perturbed)  # one batch holds the grid
est = replica_memory(tmap, batch)
plan = cj.sharding.plan_batches(len(batch), est, mesh)
print(est.describe())
print(plan.describe())

t = time.perf_counter()
res = cj.run_replicas(tmap, batch, steps=STEPS, record_every=STEPS // 10, progress=not TINY)
wall = time.perf_counter() - t
print(f"{len(batch)} replicas × {STEPS} steps in {wall:.1f} s "
      f"(compile included): {len(batch) * STEPS / wall:.3g} replica-steps/s")  # fmt: skip

# %% [markdown]
# ## Results of the whole grid at once

# %%
c = res.coords
final = res.records["loss"][:, -1]
sep = res.records["distance_l2"][:, -1]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for seed in seeds:
    ref = (c["seed"] == seed) & (c["member"] == 0)
    axes[0].semilogx(c["learning_rate"][ref], final[ref], marker="o", label=f"seed {seed}")
    pert = (c["seed"] == seed) & (c["member"] > 0)
    axes[1].loglog(c["learning_rate"][pert], sep[pert] / 1e-8, ".", alpha=0.6)
axes[0].set(xlabel="η", ylabel=f"loss after {STEPS} steps")
axes[1].set(xlabel="η", ylabel="final distance / ε", title="separation of ε-replicas")
axes[0].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Throughput against the number of replicas

# %%
counts = [1, 8, 32] if TINY else [1, 8, 32, 128, 512]
rates = []
for R in counts:
    b = cj.make_replicas(tmap, n_perturbed=R - 1, eps=1e-6) if R > 1 else cj.make_replicas(tmap)
    kw = dict(steps=STEPS, record_every=STEPS, observables=("loss",), progress=False)
    cj.run_replicas(tmap, b, **kw)  # compile
    t = time.perf_counter()
    cj.run_replicas(tmap, b, **kw)
    rates.append(R * STEPS / (time.perf_counter() - t))
plt.figure(figsize=(5, 3))
plt.loglog(counts, rates, marker="o")
plt.gca().set(xlabel="replicas R", ylabel="replica-steps / s", title=jax.default_backend())
plt.show()
for R, r in zip(counts, rates):
    print(f"R = {R:4d}: {r:.3g} replica-steps/s")
if jax.default_backend() == "cpu":  # nearly flat in R (linear growth would be ×32 or ×512)
    assert max(rates) < 10 * min(rates)
