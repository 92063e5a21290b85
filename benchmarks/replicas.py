"""Replica throughput: replica-steps per second of the default (quickstart) MLP.

Compares, for R replicas of the quickstart training map (two moons, 2→32→32→2 tanh, MSE,
full-batch GD):

* ``chaosjax``: the replica engine (one jitted scan over a chunk, vmapped over replicas);
* ``jit loop``: a Python loop calling a jitted single-replica step for each replica;
* ``torch eager``: a PyTorch eager loop over replicas (only with the ``peers`` extra).

Usage:
    python benchmarks/replicas.py [--replicas 1 16 64 256] [--steps 500] [--precision float64]
                                  [--json benchmarks/out/replicas.json] [--tiny]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import best_time, block, table, write_json


def build(precision: str):
    import jax

    if precision == "float64":
        jax.config.update("jax_enable_x64", True)
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map

    cfg = load_config(
        "quickstart",
        [
            f"precision={precision}",
            "training.learning_rates=[0.2]",
            "model.output_activation=identity",
        ],
    )
    return build_training_map(cfg)


def bench_chaosjax(tmap, R: int, steps: int) -> float:
    from chaosjax.replicas import make_replicas, run_replicas

    rb = make_replicas(tmap, n_perturbed=R - 1, eps=1e-6) if R > 1 else make_replicas(tmap)

    def go():
        return run_replicas(
            tmap,
            rb,
            steps=steps,
            record_every=steps,
            chunk_steps=steps,
            observables=("loss",),
            progress=False,
        ).final_state

    go()  # compile
    return R * steps / best_time(go, 2)


def bench_jit_loop(tmap, R: int, steps: int) -> float:
    import jax

    step = jax.jit(tmap.step)
    s0 = tmap.init()
    block(step(s0, 0))
    states = [s0 + 1e-6 * i for i in range(R)]
    t = time.perf_counter()
    for r in range(R):
        s = states[r]
        for k in range(steps):
            s = step(s, k)
        states[r] = s
    block(states)
    return R * steps / (time.perf_counter() - t)


def bench_torch(tmap, R: int, steps: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dtype = torch.float64 if tmap.state_dtype == "float64" else torch.float32
    x = torch.tensor(np.asarray(tmap.data["x_train"]), dtype=dtype)
    y = torch.tensor(np.asarray(tmap.data["y_train"]), dtype=dtype)
    widths = [x.shape[1], 32, 32, y.shape[1]]
    lr = float(tmap.learning_rate)
    gen = torch.Generator().manual_seed(0)
    nets = []
    for _ in range(R):
        layers = []
        for a, b in itertools.pairwise(widths):
            lin = torch.nn.Linear(a, b, dtype=dtype)
            with torch.no_grad():
                lin.weight.normal_(0, 1 / np.sqrt(a), generator=gen)
                lin.bias.zero_()
            layers += [lin, torch.nn.Tanh()]
        nets.append(torch.nn.Sequential(*layers[:-1]))
    t = time.perf_counter()
    for net in nets:
        for _ in range(steps):
            net.zero_grad()
            loss = 0.5 * ((net(x) - y) ** 2).sum(-1).mean()
            loss.backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= lr * p.grad
    return R * steps / (time.perf_counter() - t)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--loop-steps", type=int, default=100, help="steps per replica of the loops")
    ap.add_argument("--precision", choices=("float32", "float64"), default="float64")
    ap.add_argument("--json", default="benchmarks/out/replicas.json")
    ap.add_argument("--tiny", action="store_true", help="smoke-test size")
    a = ap.parse_args(argv)
    if a.tiny:
        a.replicas, a.steps, a.loop_steps = [1, 4], 20, 5
    tmap = build(a.precision)
    rows = []
    for R in a.replicas:
        loop_steps = max(1, min(a.loop_steps, a.loop_steps * 16 // max(R, 1)))
        row = {
            "replicas": R,
            "chaosjax": bench_chaosjax(tmap, R, a.steps),
            "jit_loop": bench_jit_loop(tmap, R, loop_steps),
            "torch_eager": bench_torch(tmap, R, loop_steps),
        }
        row["speedup_vs_loop"] = row["chaosjax"] / row["jit_loop"]
        if row["torch_eager"]:
            row["speedup_vs_torch"] = row["chaosjax"] / row["torch_eager"]
        rows.append(row)
        print(f"R={R}: {row['chaosjax']:.3g} replica-steps/s", flush=True)
    cols = [
        ("replicas", "R", "d"),
        ("chaosjax", "chaosjax (replica-steps/s)", ".3g"),
        ("jit_loop", "jitted loop", ".3g"),
        ("torch_eager", "torch eager", ".3g"),
        ("speedup_vs_loop", "× loop", ".1f"),
        ("speedup_vs_torch", "× torch", ".1f"),
    ]
    print(f"\nquickstart MLP ({tmap.n_params} parameters), {a.precision}, full batch")
    print(table(rows, cols))
    path = write_json(
        a.json, "replicas", rows, {"n_params": tmap.n_params, "precision": a.precision}
    )
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
