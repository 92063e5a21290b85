"""Scale-out: replica throughput against device count, and the memory estimate against the
measured peak.

CPU (this machine): each device count runs in its own process with that many forced CPU
devices (``jax_num_cpu_devices``), the same R replicas of the quickstart MLP (two moons,
2→32→32→2 tanh, MSE, full-batch GD, float64) sharded over them. Forced CPU devices share
the host's cores, so this measures the sharding overhead, not a speed-up.

GPU (a lent machine): one device, throughput against the replica count, doubling R up to
the count the memory plan allows on one device.

Memory: ``estimate`` is :func:`chaosjax.replicas.replica_memory` times the replicas per
device; ``peak`` is the device's ``peak_bytes_in_use`` (GPU) or, on the CPU, the peak of the process's resident set
sampled every 5 ms during the timed (already compiled) run, above its value at the start
(all devices together, so compared with the estimate for all rows).

Usage:
    python benchmarks/scaling.py [--devices 1 2 4] [--replicas 256] [--steps 500]
                                 [--tracker-k 0] [--gpu-replicas 64 ... 16384]
                                 [--json benchmarks/out/scaling.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the resident set every 5 ms in a thread: the peak above the starting RSS."""

    def __enter__(self):
        import threading

        self.base = self.peak = _rss_now()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_now())
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def measure(R: int, steps: int, tracker_k: int, devices) -> dict:
    """One configuration in this process: throughput, memory estimate and peak."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from chaosjax import CurvatureTracker
    from chaosjax.experiments import load_config
    from chaosjax.experiments.builders import build_training_map
    from chaosjax.replicas import make_replicas, replica_memory, run_replicas
    from chaosjax.sharding import mesh_size, replica_mesh

    cfg = load_config(
        "quickstart", ["training.learning_rates=[0.2]", "model.output_activation=identity"]
    )
    tmap = build_training_map(cfg)
    rb = make_replicas(tmap, n_perturbed=R - 1, eps=1e-6)
    trackers = [CurvatureTracker(k=tracker_k, cold_matvecs=32)] if tracker_k else []
    kw = dict(
        steps=steps,
        record_every=steps // 5,
        chunk_steps=steps,
        observables=("loss", "distance_l2"),
        trackers=trackers,
        progress=False,
        devices=devices,
    )
    mesh = replica_mesh(devices)
    n_dev = mesh_size(mesh)
    run_replicas(tmap, rb, **{**kw, "steps": kw["record_every"]})  # compile the first record
    run_replicas(tmap, rb, **kw)  # compile the chunk
    with _PeakRSS() as rss:
        t = time.perf_counter()
        res = run_replicas(tmap, rb, **kw)
        wall = time.perf_counter() - t
    est = replica_memory(tmap, rb, trackers)
    per_dev = -(-R // n_dev)
    row = {
        "backend": jax.default_backend(),
        "devices": n_dev,
        "replicas": R,
        "steps": steps,
        "tracker_k": tracker_k,
        "wall_s": wall,
        "replica_steps_per_s": R * steps / wall,
        "estimate_per_replica_MiB": est.per_replica / 2**20,
        "estimate_per_device_MiB": est.per_replica * per_dev / 2**20,
        "estimate_all_MiB": est.per_replica * R / 2**20,
        "passes": res.attrs["passes"],
        "finite": bool(np.isfinite(res.records["loss"]).all()),
    }
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_device_MiB"] = (
            max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
            / 2**20
        )
    else:
        row["peak_rss_growth_MiB"] = rss.growth / 2**20
    return row


def _worker(args) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.worker)  # the parent forces the CPU backend
    row = measure(args.replicas, args.steps, args.tracker_k, args.worker)
    print("ROW " + json.dumps(row))


def _run_worker(n: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(n),
        "--replicas",
        str(args.replicas),
        "--steps",
        str(args.steps),
        "--tracker-k",
        str(args.tracker_k),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000)
    for line in out.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"scaling worker with {n} devices failed:\n{out.stderr[-2000:]}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--replicas", type=int, default=256)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--tracker-k", type=int, default=0)
    p.add_argument("--gpu-replicas", type=int, nargs="+", default=None)
    p.add_argument("--json", default="benchmarks/out/scaling.json")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(args)
        return []
    if args.tiny:
        args.devices, args.replicas, args.steps = [1, 2], 6, 10
        if args.gpu_replicas:
            args.gpu_replicas = args.gpu_replicas[:1]
    from _common import table, write_json

    rows = []
    if args.gpu_replicas:  # accelerator: one device, throughput against R in this process
        for R in args.gpu_replicas:
            try:
                rows.append(measure(R, args.steps, args.tracker_k, 1))
            except ValueError as e:  # the memory plan refused it: the limit is reached
                rows.append({"replicas": R, "refused": str(e)[:120]})
                break
    else:
        for n in args.devices:
            rows.append(_run_worker(n, args))
    cols = [
        ("backend", "backend", "s"),
        ("devices", "devices", "d"),
        ("replicas", "R", "d"),
        ("tracker_k", "tracker k", "d"),
        ("replica_steps_per_s", "replica-steps/s", ".3g"),
        ("passes", "passes", "d"),
        ("estimate_per_device_MiB", "estimate/device MiB", ".3g"),
        ("estimate_all_MiB", "estimate all MiB", ".3g"),
        ("peak_rss_growth_MiB", "peak RSS growth MiB", ".3g"),
        ("peak_device_MiB", "peak device MiB", ".3g"),
    ]
    print(table([r for r in rows if "refused" not in r], cols))
    for r in rows:
        if "refused" in r:
            print(f"R = {r['replicas']}: {r['refused']}")
    write_json(args.json, "scaling", rows)
    return rows


if __name__ == "__main__":
    main()
