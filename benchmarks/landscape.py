"""Loss landscape: a 2-D slice of the quickstart MLP as one batched evaluation against a
Python loop over grid points.

The quickstart training map (two moons, 2→32→32→2 tanh, MSE, float64) after 200 GD steps;
the plane of two filter-normalised random directions; ``num × num`` grid points.
``chaosjax.landscape.slice`` evaluates the grid as one jitted ``lax.map`` over vmapped chunks;
the loop calls a jitted loss once per grid point.

Usage:
    python benchmarks/landscape.py [--num 101] [--json benchmarks/out/landscape.json] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import best_time, table, write_json  # noqa: E402

from chaosjax import landscape  # noqa: E402
from chaosjax.curvature import training_loss  # noqa: E402


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=101)
    ap.add_argument("--json", default="benchmarks/out/landscape.json")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    num = 11 if a.tiny else a.num
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map

    tmap = build_training_map(load_config("quickstart", ["training.learning_rates=[0.5]"]))
    step = jax.jit(tmap.step)
    s = tmap.init()
    for t in range(20 if a.tiny else 200):
        s = step(s, t)
    d = landscape.directions("filter", tmap, s, k=2)
    f, p, _ = training_loss(tmap, s)

    def batched():
        return landscape.slice(tmap, s, d, span=1.0, num=num).values

    grid = np.linspace(-1.0, 1.0, num)
    loss = jax.jit(f)
    dj = jnp.asarray(d)

    def loop():
        out = np.empty((num, num))
        for i, al in enumerate(grid):
            for j, be in enumerate(grid):
                out[i, j] = float(loss(p + al * dj[0] + be * dj[1]))
        return out

    vb = batched()
    t_b = best_time(batched, 3)
    vl = loop()
    t_l = best_time(loop, 1)
    err = float(np.max(np.abs(vb - vl)) / np.max(np.abs(vl)))
    rows = [
        {"method": "chaosjax.landscape.slice (one program)", "seconds": t_b, "points": num * num},
        {"method": "Python loop of a jitted loss", "seconds": t_l, "points": num * num},
    ]
    print(f"quickstart MLP ({tmap.n_params} parameters), {num}×{num} grid")
    print(table(rows, [("method", "method", "s"), ("seconds", "time (s)", ".3g")]))
    print(f"speed-up {t_l / t_b:.1f}×; largest relative difference {err:.1e}")
    path = write_json(
        a.json, "landscape", rows, {"speedup": t_l / t_b, "max_rel_diff": err, "num": num}
    )
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
