"""Bifurcations of the logistic map x ↦ r x(1 − x): runtime, the period-doubling points r_k
found, and the ratios of successive intervals against Feigenbaum's δ = 4.669 2016.

1. The whole diagram, r ∈ [2.8, 4.0]: every period change (doublings, the period-3 window
   opened by a saddle-node at r = 1 + √8, …) from one batched run plus the bisection rounds.
2. The cascade, r ∈ [2.95, r∞): a grid geometric toward the accumulation point r∞ with periods up to 64, the r_k to
   ``refine_tol`` against the literature values, and δ_k = (r_k − r_{k−1}) / (r_{k+1} − r_k).

Usage:
    python benchmarks/orbits.py [--json benchmarks/out/orbits.json] [--tiny]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import table, write_json  # noqa: E402

import chaosjax as cj  # noqa: E402

#: period-doubling points r_k (period 2^(k-1) → 2^k) of the logistic map, from the literature
#: (Feigenbaum 1978; Briggs 1991), to 9 digits
EXACT = [3.0, 3.449489743, 3.544090360, 3.564407266, 3.568759420, 3.569691610, 3.569891259]
FEIGENBAUM = 4.669201609
R_INF = 3.569945672  # the accumulation point of the cascade


def logistic(x, t, r):
    return r * x * (1.0 - x)


def scan(values, **kw):
    t = time.perf_counter()
    b = cj.bifurcation(logistic, jnp.array([0.3]), values, **kw)
    return b, time.perf_counter() - t


def doubling_rows(b) -> list[dict]:
    rows = []
    for p, (ka, kb) in zip(b.points, b.transitions):
        if ka > 0 and (kb == 2 * ka or kb == 0) and ka & (ka - 1) == 0:
            k = int(np.log2(ka)) + 1  # r_k: period 2^(k-1) loses stability
            if k <= len(EXACT) and abs(p - EXACT[k - 1]) < 1e-3:
                rows.append({"k": k, "change": f"{ka}→{kb or '?'}", "r_k": p,
                             "exact": EXACT[k - 1], "error": abs(p - EXACT[k - 1])})  # fmt: skip
    for i in range(1, len(rows) - 1):
        d0 = rows[i]["r_k"] - rows[i - 1]["r_k"]
        d1 = rows[i + 1]["r_k"] - rows[i]["r_k"]
        rows[i]["delta"] = d0 / d1
        e = [rows[j]["exact"] for j in (i - 1, i, i + 1)]
        rows[i]["delta_exact"] = (e[1] - e[0]) / (e[2] - e[1])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="benchmarks/out/orbits.json")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    if a.tiny:
        whole = dict(n=40, steps=400, n_samples=16, max_period=8, refine_tol=1e-3)
        cascade = dict(n=40, steps=400, n_samples=16, max_period=8, refine_tol=1e-4)
    else:
        whole = dict(n=400, steps=2000, n_samples=64, max_period=16, refine_tol=1e-6)
        cascade = dict(n=400, steps=8000, n_samples=32, max_period=64, refine_tol=1e-8)
    n = whole.pop("n")
    b1, sec1 = scan(np.linspace(2.8, 4.0, n), **whole)
    print(f"whole diagram: {n} values of r in [2.8, 4.0], {whole['steps']} steps, "
          f"{sec1:.2f} s ({b1.info['seconds_run']:.2f} s the batched run, "
          f"{b1.info['rounds']} bisection rounds); {b1.points.size} period changes:")  # fmt: skip
    changes = [{"r": p, "change": f"{ka}→{kb}"} for p, (ka, kb) in zip(b1.points, b1.transitions)]
    print(table(changes, [("r", "r", ".7f"), ("change", "periods", "s")]))
    n = cascade.pop("n")
    # geometric toward the accumulation point, so each band of period 2^k holds grid values
    b2, sec2 = scan(R_INF - np.geomspace(R_INF - 2.95, 2e-6, n), **cascade)
    rows = doubling_rows(b2)
    print(f"\ncascade: {n} values of r in [2.95, r∞ − 2e-6] (geometric), {cascade['steps']} steps, max_period "
          f"{cascade['max_period']}, refine_tol {cascade['refine_tol']:g}: {sec2:.2f} s "
          f"({b2.info['seconds_run']:.2f} s the batched run, {b2.info['rounds']} rounds)")  # fmt: skip
    cols = [("k", "k", "d"), ("change", "periods", "s"), ("r_k", "r_k found", ".9f"),
            ("exact", "literature", ".9f"), ("error", "|error|", ".1e"),
            ("delta", "δ_k found", ".4f"), ("delta_exact", "δ_k literature", ".4f")]  # fmt: skip
    print(table(rows, cols))
    print(f"(Feigenbaum's δ = {FEIGENBAUM}; δ_k converges to it as k grows)")
    window = [r for r in changes if r["change"] == "0→3"]
    extra = {
        "whole": {"seconds": sec1, "seconds_run": b1.info["seconds_run"], "changes": changes,
                  "period3_window": window[0]["r"] if window else None,
                  "period3_exact": 1 + np.sqrt(8), **whole},
        "cascade": {"seconds": sec2, "seconds_run": b2.info["seconds_run"], **cascade},
    }  # fmt: skip
    write_json(a.json, "orbits", rows, extra)
    return rows or changes


if __name__ == "__main__":
    main()
