"""Covariant Lyapunov vectors of a ~1e5-parameter training map: time and peak host memory.

A digits MLP 64→256→256→10 (85 002 parameters, float32), minibatch SGD (batch 32),
k = 16 CLVs over 10⁴ steps with a backward transient, vectors kept every 1000 steps. The
issue's bar: peak host memory under 2 GB. Peak resident memory is read from
``resource.getrusage`` (ru_maxrss) at the end, next to chaosjax's own estimate
(``clv_memory_bytes``).

Usage:
    python benchmarks/clv.py [--steps 10000] [--k 16] [--json benchmarks/out/clv.json] [--tiny]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import table, write_json


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--backward-transient", type=int, default=1000)
    ap.add_argument("--keep-every", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--json", default="benchmarks/out/clv.json")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    if a.tiny:
        a.steps, a.k, a.backward_transient, a.keep_every, a.hidden = 40, 2, 20, 20, 16
    from flax import nnx

    import chaosjax as cj

    ds = cj.datasets.digits()
    model = cj.models.MLP((64, a.hidden, a.hidden, 10), rngs=nnx.Rngs(0))
    tmap = cj.TrainingMap.from_nnx(
        model, ds, loss="cross_entropy", optimizer="sgd", learning_rate=0.1, batch_size=32
    )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    res = cj.covariant_lyapunov_vectors(
        tmap.step,
        tmap.init(),
        k=a.k,
        steps=a.steps,
        align=100,
        backward_transient=a.backward_transient,
        keep_every=a.keep_every,
        chunk_steps=500,
        progress=not a.tiny,
    )
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {
        "n_params": tmap.n_params,
        "k": a.k,
        "steps": a.steps,
        "backward_transient": a.backward_transient,
        "kept": len(res.times),
        "seconds": seconds,
        "ms_per_step": 1e3 * seconds / (a.steps + a.backward_transient + 100),
        "estimate_MiB": res.info["memory_estimate_bytes"] / 2**20,
        "peak_rss_MiB": peak / 2**20,
        "rss_before_MiB": rss0 / 2**20,
        "under_2GB": bool(peak < 2 * 1024**3),
        "clv_lambda1": float(res.exponents[0]),
        "qr_lambda1": float(res.qr_exponents[0]),
        "median_min_angle_deg": float(np.degrees(np.median(res.angles))),
    }
    print(
        table(
            [row],
            [
                ("n_params", "params", "d"),
                ("k", "k", "d"),
                ("steps", "steps", "d"),
                ("seconds", "time (s)", ".1f"),
                ("ms_per_step", "ms/step", ".1f"),
                ("estimate_MiB", "estimate (MiB)", ".1f"),
                ("peak_rss_MiB", "peak RSS (MiB)", ".0f"),
                ("under_2GB", "< 2 GB", ""),
            ],
        )
    )
    print(
        f"λ1 CLV {row['clv_lambda1']:.3e}, QR {row['qr_lambda1']:.3e}; median smallest angle "
        f"{row['median_min_angle_deg']:.1f}°"
    )
    path = write_json(a.json, "clv", [row])
    print(f"wrote {path}")
    return [row]


if __name__ == "__main__":
    main()
