"""Compare two ``chaosjax run`` folders array by array and say which agree, and how.

    python scripts/compare_runs.py BEFORE AFTER [--stable 0.05 0.5] [--steps 100] [--rtol 1e-10]

Every variable of ``results.zarr`` and of each stage group is compared (a preset with
variants: each variant folder). Verdicts: ``bitwise``; ``rtol`` (every entry within ``rtol``
relative); ``early`` (within ``rtol`` on the rows of the ``--stable`` learning rates and on the
first ``--steps`` steps of every other row: a chaotic trajectory cannot be integrated twice, so
a changed compiled program is compared where round-off has not grown yet); ``chaotic`` (the
stable rows agree, the others have no step axis to compare on: informational); ``DIFFERS``.
The exit code is 1 when any variable DIFFERS or a variable exists on one side only, else 0.
Timings, environments and other run metadata are not compared.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

STORE = "results.zarr"
#: attributes and variables that describe the machine or the clock, not the numbers
IGNORED = {"total_time_s", "environment", "wall_time_s", "memory_plan"}


def _datasets(store: Path) -> dict[str, xr.Dataset]:
    out = {}
    with xr.open_zarr(store, consolidated=False) as ds:
        out["/"] = ds.load()
    for name in sorted(zarr.open_group(str(store), mode="r").group_keys()):
        with xr.open_zarr(store, group=name, consolidated=False) as ds:
            out[name] = ds.load()
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest relative difference over entries finite on both sides (NaN where the NaN
    patterns differ)."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    if not np.array_equal(fa, fb) or not np.array_equal(a[~fa], b[~fb], equal_nan=True):
        return float("nan")
    if not fa.any():
        return 0.0
    x, y = a[fa].astype(np.float64), b[fb].astype(np.float64)
    scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(x - y) / scale))


def _rows(ds: xr.Dataset, var: xr.DataArray, stable: list[float]) -> tuple[str, np.ndarray] | None:
    """(row dim, mask of the stable rows) of a variable, or None when it has no row dim with a
    learning rate."""
    for dim in ("replica", "group"):
        if dim in var.dims:
            lr = ds.coords.get("learning_rate")
            if lr is None or lr.dims != (dim,):
                return None
            v = np.asarray(lr.values, np.float64)
            return dim, np.any(np.isclose(v[:, None], np.asarray(stable)[None, :]), axis=1)
    return None


def _time_dim(ds: xr.Dataset, var: xr.DataArray) -> str | None:
    for dim in var.dims:
        if dim in ("replica", "group"):
            continue
        c = ds.coords.get(dim)
        if c is not None and c.dims == (dim,) and np.issubdtype(c.dtype, np.integer):
            if dim in ("step", "renorm", "distance_step", "time") or dim.endswith("step"):
                return dim
    return None


def compare_var(name, da, db, ds_a, stable, steps, rtol) -> tuple[str, str]:
    a, b = np.asarray(da.values), np.asarray(db.values)
    if a.shape != b.shape:
        return "DIFFERS", f"shape {a.shape} vs {b.shape}"
    if not np.issubdtype(a.dtype, np.number) or a.dtype == bool:
        same = np.array_equal(a, b)
        return ("bitwise", "") if same else ("DIFFERS", "values differ")
    if np.array_equal(a, b, equal_nan=np.issubdtype(a.dtype, np.floating)):
        return "bitwise", ""
    rel = _rel(a, b)
    if rel <= rtol:
        return "rtol", f"max rel {rel:.1e}"
    rows = _rows(ds_a, da, stable)
    if rows is None:
        return "DIFFERS", f"max rel {rel:.1e}"
    dim, ok = rows
    axis = da.dims.index(dim)
    s_rel = _rel(np.compress(ok, a, axis), np.compress(ok, b, axis)) if ok.any() else 0.0
    if not s_rel <= rtol:
        return "DIFFERS", f"stable rows: max rel {s_rel:.1e}"
    tdim = _time_dim(ds_a, da)
    if tdim is None:
        return "chaotic", f"stable rows max rel {s_rel:.1e}; other rows: no step axis"
    t = np.asarray(ds_a.coords[tdim].values)
    early = t <= t.min() + steps
    taxis = da.dims.index(tdim)
    ea = np.compress(early, np.compress(~ok, a, axis), taxis)
    eb = np.compress(early, np.compress(~ok, b, axis), taxis)
    e_rel = _rel(ea, eb)
    if e_rel <= rtol:
        return "early", f"stable rows {s_rel:.1e}; first {steps} steps {e_rel:.1e}"
    return "DIFFERS", f"first {steps} steps of the other rows: max rel {e_rel:.1e}"


def compare_stores(a: Path, b: Path, stable, steps, rtol) -> list[tuple[str, str, str]]:
    da, db = _datasets(a), _datasets(b)
    out = []
    for group in sorted(set(da) | set(db)):
        if group not in da or group not in db:
            out.append((group, "*", "DIFFERS: only in " + ("after" if group in db else "before")))
            continue
        x, y = da[group], db[group]
        for name in sorted(set(x.data_vars) | set(y.data_vars)):
            if name in IGNORED:
                continue
            if name not in x.data_vars or name not in y.data_vars:
                side = "after" if name in y.data_vars else "before"
                out.append((group, name, f"DIFFERS: only {side}"))
                continue
            verdict, detail = compare_var(name, x[name], y[name], x, stable, steps, rtol)
            out.append((group, name, verdict + (f" ({detail})" if detail else "")))
    return out


def _stores(folder: Path) -> dict[str, Path]:
    if (folder / STORE).exists():
        return {".": folder / STORE}
    subs = {p.name: p / STORE for p in sorted(folder.iterdir()) if (p / STORE).exists()}
    if not subs:
        raise SystemExit(f"compare_runs: {folder} holds no results.zarr (nor variant folders)")
    return subs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--stable", type=float, nargs="*", default=[], help="non-chaotic η values")
    ap.add_argument("--steps", type=int, default=100, help="steps compared on chaotic rows")
    ap.add_argument("--rtol", type=float, default=1e-10)
    args = ap.parse_args(argv)
    sa, sb = _stores(args.before), _stores(args.after)
    if set(sa) != set(sb):
        print(f"variants differ: {sorted(sa)} vs {sorted(sb)}")
        return 1
    bad = 0
    counts: dict[str, int] = {}
    for variant in sa:
        for group, name, verdict in compare_stores(
            sa[variant], sb[variant], args.stable, args.steps, args.rtol
        ):
            key = verdict.split(" ")[0].rstrip(":")
            counts[key] = counts.get(key, 0) + 1
            bad += key == "DIFFERS"
            print(f"{variant}\t{group}\t{name}\t{verdict}")
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
