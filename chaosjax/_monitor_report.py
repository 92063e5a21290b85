"""``chaosjax report`` on a monitor log: figures and a short ``summary.md``.

A monitor log is what :class:`chaosjax.Monitor` wrote through :mod:`chaosjax.writers`: a
:class:`~chaosjax.writers.Zarr` store (root attribute ``kind = "monitor"``), a
:class:`~chaosjax.writers.CSV` file or a :class:`~chaosjax.writers.JSONL` file. It is read
into one table (:class:`MonitorLog`: the logged steps (n,) and each name's values (n,), NaN
where a name was not written at a step), and rendered next to the log:

* ``figures/sharpness.png`` — ``sharpness`` (λmax), ``batch_sharpness``,
  ``critical_sharpness`` and ``directional_sharpness`` against the threshold 2/η_t, and
  their ratios to it with the band [0.9, 1.1];
* ``figures/preconditioned_sharpness.png`` — λ1(P⁻¹H) against its own threshold (Adam);
* ``figures/ftle.png`` — the FTLEs per record interval (per step);
* ``figures/gradient_norm.png`` — ‖∇L‖ and the batch loss;
* ``summary.md`` — the numbers, each verdict with its rule (DESIGN.md, "Reporting rules").

Rules the summary applies (stated in it):

* the late window is the last ⌈n/2⌉ records of the log; the early window the first ⌊n/2⌋;
* threshold rule: r = value / threshold at the same record (2/η_t of that step, never the
  peak); a verdict needs at least ``MIN_RECORDS`` finite ratios in the late window, and is
  "at the threshold" when at least half of them lie in [0.9, 1.1], else "above" (median
  r > 1.1), "below" (median r < 0.9) or "scattered around it";
* a flat plateau (median sharpness ratio < 0.01 and the logged loss changing by less than
  1e-3 relative over the late window) is its own verdict, not "below";
* FTLE windows: λ̄ = Σ nᵢλᵢ / Σ nᵢ over the records of the window (nᵢ the steps a record
  averages), T = Σ nᵢ; "positive" needs λ̄·T ≥ 5 (growth by at least e⁵), "negative"
  λ̄·T ≤ −5, otherwise "not resolved from 0". One run: no spread between seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from chaosjax.writers import read_csv, read_jsonl, read_texts, read_zarr

#: file names a folder's monitor log may have (after any ``*.zarr`` store of kind "monitor")
LOG_NAMES = ("monitor.csv", "monitor.jsonl")
BAND = (0.9, 1.1)
MIN_RECORDS = 10
EDGE_FRACTION = 0.5
FLAT_RATIO = 1e-2
FLAT_LOSS = 1e-3
FTLE_GROWTH = 5.0

#: the values compared with the threshold 2/η_t, as (name, threshold name, label)
AGAINST_THRESHOLD = (
    ("sharpness", "threshold", "λmax (sharpness)"),
    ("batch_sharpness", "threshold", "batch sharpness"),
    ("critical_sharpness", "threshold", "critical sharpness"),
    ("directional_sharpness", "threshold", "directional sharpness"),
    (
        "preconditioned_sharpness",
        "preconditioned_sharpness/threshold",
        "preconditioned sharpness λ1(P⁻¹H)",
    ),
)

#: contract names listed in the summary even when absent (with the reason)
LISTED = (
    "sharpness",
    "batch_sharpness",
    "critical_sharpness",
    "directional_sharpness",
    "preconditioned_sharpness",
    "threshold",
    "gradient_norm",
    "ftle",
    "self_stabilization",
)


class MonitorLog(NamedTuple):
    """A monitor log as one table.

    Attributes:
        source: the file or store it was read from.
        steps: (n,) int, the logged steps in increasing order.
        values: {name: (n,) float}, NaN where the name was not written at that step.
        texts: {name: [(step, text), …]}, the texts of the log (``reason/<probe>``: why the
            probe's values are NaN, written by :class:`chaosjax.Monitor`).
    """

    source: Path
    steps: np.ndarray
    values: dict
    texts: Mapping = MappingProxyType({})

    def get(self, name: str) -> np.ndarray:
        """The (n,) values of ``name`` (all NaN when it is not in the log)."""
        return self.values.get(name, np.full(len(self.steps), np.nan))

    def reason(self, name: str) -> str:
        """Why ``name`` (or ``probe/extra``) is NaN, as the monitor logged it for its probe
        (``reason/<probe>``); "" when the log has no reason."""
        got = self.texts.get(f"reason/{name.split('/')[0]}")
        return got[0][1] if got else ""


def _zarr_kind(path: Path) -> str | None:
    """The root attribute ``kind`` of a zarr (v2) store, None when ``path`` is not one."""
    attrs = path / ".zattrs"
    if not attrs.is_file():
        return None
    try:
        return json.loads(attrs.read_text()).get("kind")
    except (ValueError, AttributeError):
        return None


def find_monitor_log(path: str | Path) -> Path | None:
    """The monitor log at ``path``: the path itself (a ``.csv``/``.jsonl`` file or a store of
    kind "monitor"), or inside the folder a ``*.zarr`` store of kind "monitor", then
    ``monitor.csv``, then ``monitor.jsonl``. None otherwise, and for a run folder (its
    ``results.zarr`` is a run's, not a monitor's)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix in (".csv", ".jsonl") else None
    if not path.is_dir():
        return None
    if _zarr_kind(path) == "monitor":
        return path
    if (path / "results.zarr").is_dir() and _zarr_kind(path / "results.zarr") != "monitor":
        return None
    for store in sorted(path.glob("*.zarr")):
        if _zarr_kind(store) == "monitor":
            return store
    for name in LOG_NAMES:
        if (path / name).is_file():
            return path / name
    return None


def read_monitor_log(path: str | Path) -> MonitorLog:
    """Read a CSV, JSONL or Zarr monitor log into a :class:`MonitorLog` (rows sorted by step,
    stable). ValueError (one line) for a log without records."""
    path = Path(path)
    texts = read_texts(path)
    if path.is_dir():
        cols = read_zarr(path)
        steps = next(iter(cols.values()))[0] if cols else np.zeros(0, np.int64)
        values = {k: np.asarray(v, np.float64) for k, (_, v) in cols.items()}
    else:
        rows = read_csv(path) if path.suffix == ".csv" else read_jsonl(path)
        # a row of texts only (CSV/JSONL write_texts) is no record; texts are read above
        rows = [
            {k: v for k, v in r.items() if not isinstance(v, str)}
            for r in rows
            if any(k != "step" and not isinstance(v, str) for k, v in r.items())
        ]
        names = list(dict.fromkeys(k for r in rows for k in r if k != "step"))
        steps = np.array([int(r["step"]) for r in rows], np.int64)
        values = {n: np.array([float(r.get(n, np.nan)) for r in rows]) for n in names}
    if len(steps) == 0:
        raise ValueError(f"report: the monitor log {path} holds no records")
    order = np.argsort(steps, kind="stable")
    values = {k: v[order] for k, v in values.items()}
    return MonitorLog(path, np.asarray(steps)[order], values, texts)


def late_window(n: int) -> slice:
    """The late window of n records: the last ⌈n/2⌉."""
    return slice(n // 2, n)


def threshold_rule(log: MonitorLog, name: str, threshold: str = "threshold") -> dict:
    """The threshold verdict of ``name`` over the late window (module doc).

    Returns:
        {"n": finite ratios in the window, "fraction": share of them in [0.9, 1.1],
        "median": their median, "verdict": str, "reason": why there is no verdict ("")}.
    """
    out = {"n": 0, "fraction": math.nan, "median": math.nan, "verdict": "n/a", "reason": ""}
    if name not in log.values:
        out["reason"] = f"`{name}` is not in the log"
        return out
    if threshold not in log.values or not np.isfinite(log.values[threshold]).any():
        logged = log.reason(threshold)
        out["reason"] = f"no finite `{threshold}` in the log" + (
            f": {logged}"
            if logged
            else " (add probes.Threshold() and give the monitor η_t: learning_rate= or an "
            "inject_hyperparams optimizer)"
        )
        return out
    w = late_window(len(log.steps))
    r = log.values[name][w] / log.values[threshold][w]
    r = r[np.isfinite(r)]
    out["n"] = int(r.size)
    if r.size:
        out["fraction"] = float(np.mean((r >= BAND[0]) & (r <= BAND[1])))
        out["median"] = float(np.median(r))
    if r.size < MIN_RECORDS:
        out["reason"] = f"{r.size} finite ratios in the late window, fewer than {MIN_RECORDS}"
        return out
    loss = log.get("gradient_norm/loss")[w]
    loss = loss[np.isfinite(loss)]
    stalled = loss.size >= 2 and abs(loss[-1] - loss[0]) <= FLAT_LOSS * max(abs(loss[0]), 1e-300)
    if name == "sharpness" and out["median"] < FLAT_RATIO and stalled:
        out["verdict"] = "flat plateau"
    elif out["fraction"] >= EDGE_FRACTION:
        out["verdict"] = "at the threshold"
    elif out["median"] > BAND[1]:
        out["verdict"] = "above the threshold"
    elif out["median"] < BAND[0]:
        out["verdict"] = "below the threshold"
    else:
        out["verdict"] = "scattered around the threshold"
    return out


def ftle_steps(log: MonitorLog) -> np.ndarray:
    """(n,) steps each FTLE record averages: ``ftle/matvecs`` / k (k the logged exponents),
    else the step difference to the previous record (NaN for the first)."""
    k = 1 + sum(1 for key in log.values if key.startswith("ftle/") and key[5:].isdigit())
    mv = log.get("ftle/matvecs")
    diff = np.r_[np.nan, np.diff(log.steps).astype(float)]
    return np.where(np.isfinite(mv), mv / k, diff)


def ftle_windows(log: MonitorLog) -> list[dict]:
    """The early and late FTLE windows (module doc): for each {"window", "from", "to",
    "records", "T", "mean", "growth" = mean·T, "label", "reason"}."""
    lam, n = log.get("ftle"), ftle_steps(log)
    total = len(log.steps)
    out = []
    for label, w in (("early", slice(0, total // 2)), ("late", late_window(total))):
        ok = np.isfinite(lam[w]) & np.isfinite(n[w]) & (n[w] > 0)
        steps = log.steps[w][ok]
        row = {"window": label, "records": int(ok.sum()), "T": math.nan, "mean": math.nan}
        row.update(growth=math.nan, label="n/a", reason="", start=None, end=None)
        if not ok.any():
            logged = log.reason("ftle")
            row["reason"] = "no finite FTLE records in the window" + (
                f" ({logged})" if logged else ""
            )
            out.append(row)
            continue
        t_sum = float(np.sum(n[w][ok]))
        mean = float(np.sum(lam[w][ok] * n[w][ok]) / t_sum)
        row.update(T=t_sum, mean=mean, growth=mean * t_sum, start=int(steps[0]), end=int(steps[-1]))
        if row["growth"] >= FTLE_GROWTH:
            row["label"] = "positive"
        elif row["growth"] <= -FTLE_GROWTH:
            row["label"] = "negative"
        else:
            row["label"] = "not resolved from 0"
        out.append(row)
    return out


def _fmt(v, spec: str = ".4g") -> str:
    return "NaN" if v is None or not np.isfinite(v) else format(float(v), spec)


def _quantity_rows(log: MonitorLog) -> list[str]:
    rows = [
        "| name | finite / records | first | last | late median | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    names = list(LISTED) + [
        n for n in log.values if "/" not in n and n not in LISTED and n != "step"
    ]
    w = late_window(len(log.steps))
    for name in names:
        v = log.values.get(name)
        if v is None:
            rows.append(f"| `{name}` | 0 / {len(log.steps)} | NaN: not in the log | | | | |")
            continue
        ok = np.isfinite(v)
        if not ok.any():
            reason = log.reason(name)
            why = (
                f"NaN: every record NaN: {_cell(reason)}"
                if reason
                else "NaN: every record NaN (the probe did not apply; no reason in the log)"
            )
            rows.append(f"| `{name}` | 0 / {len(v)} | {why} | | | | |")
            continue
        late = v[w][np.isfinite(v[w])]
        cells = [
            v[ok][0],
            v[ok][-1],
            np.median(late) if late.size else math.nan,
            v[ok].min(),
            v[ok].max(),
        ]
        rows.append(
            f"| `{name}` | {int(ok.sum())} / {len(v)} | "
            + " | ".join(_fmt(c) for c in cells)
            + " |"
        )
    return rows


def _cell(text: str) -> str:
    """``text`` safe in one markdown table cell (one line, no bare ``|``)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _reason_rows(log: MonitorLog) -> list[str]:
    """The logged reasons (``reason/<probe>``) with the step each was first written."""
    items = [(k[len("reason/") :], v[0]) for k, v in log.texts.items() if k.startswith("reason/")]
    if not items:
        return ["No reasons in the log (no probe reported a NaN with a reason)."]
    rows = ["| probe | first at step | why its values are NaN |", "|---|---|---|"]
    rows += [f"| `{p}` | {step} | {_cell(text)} |" for p, (step, text) in items]
    return rows


def _cost_rows(log: MonitorLog) -> list[str]:
    probes = [k[: -len("/seconds")] for k in log.values if k.endswith("/seconds")]
    if not probes:
        return ["No costs in the log (`name/seconds` is written by chaosjax.Monitor)."]
    rows = [
        "| probe | calls | median seconds (after the first call) | first call seconds "
        "(with compilation) | median matvecs |",
        "|---|---|---|---|---|",
    ]
    for p in probes:
        s = log.values[f"{p}/seconds"]
        s = s[np.isfinite(s)]
        m = log.get(f"{p}/matvecs")
        m = m[np.isfinite(m)]
        rest = _fmt(np.median(s[1:])) if s.size > 1 else "NaN (one call)"
        first = _fmt(s[0]) if s.size else "NaN"
        mv = _fmt(np.median(m)) if m.size else "NaN"
        rows.append(f"| `{p}` | {s.size} | {rest} | {first} | {mv} |")
    return rows


def summary_text(log: MonitorLog, figures: dict) -> str:
    """The markdown summary of ``log``; ``figures`` {file name: "" or why it was not drawn}."""
    n = len(log.steps)
    w = late_window(n)
    late_from = int(log.steps[w][0])
    lines = [
        "# Monitor log",
        "",
        f"Log: `{log.source.name}` — {n} records, steps {int(log.steps[0])}–{int(log.steps[-1])}."
        f" Late window: the last ⌈n/2⌉ = {n - n // 2} records (steps ≥ {late_from}).",
        "",
        "## Values",
        "",
        *_quantity_rows(log),
        "",
        "## Why values are NaN",
        "",
        "The reasons the monitor logged (`reason/<probe>`, written the first time the probe "
        "did not apply).",
        "",
        *_reason_rows(log),
        "",
        "## Against the threshold",
        "",
        f"Rule: r = value / threshold of the same record (2/η_t at that step). Over the late "
        f"window, with at least {MIN_RECORDS} finite r: **at the threshold** when a fraction "
        f"≥ {EDGE_FRACTION:g} of r lies in [{BAND[0]}, {BAND[1]}]; otherwise **above** (median "
        f"r > {BAND[1]}), **below** (median r < {BAND[0]}) or **scattered around it**. A "
        f"sharpness with median r < {FLAT_RATIO:g} and a loss changing by less than "
        f"{FLAT_LOSS:g} relative over the window is a **flat plateau**.",
        "",
        "| value | threshold | finite r (late) | fraction in [0.9, 1.1] | median r | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, thr, label in AGAINST_THRESHOLD:
        res = threshold_rule(log, name, thr)
        verdict = res["verdict"] if not res["reason"] else f"NaN: {res['reason']}"
        lines.append(
            f"| {label} (`{name}`) | `{thr}` | {res['n']} | {_fmt(res['fraction'], '.3f')} | "
            f"{_fmt(res['median'], '.4g')} | {verdict} |"
        )
    lines += [
        "",
        "## Finite-time Lyapunov exponents",
        "",
        f"Rule: per window, λ̄ = Σ nᵢλᵢ / Σ nᵢ over its records (nᵢ steps each), T = Σ nᵢ; "
        f"**positive** needs λ̄·T ≥ {FTLE_GROWTH:g} (growth ≥ e⁵), **negative** λ̄·T ≤ "
        f"−{FTLE_GROWTH:g}, otherwise **not resolved from 0**. One run: no spread between "
        "seeds, so no statement about other seeds.",
        "",
        "| window | steps | records | T | λ̄ (per step) | λ̄·T | label |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ftle_windows(log):
        span = f"{row['start']}–{row['end']}" if row["start"] is not None else "—"
        label = row["label"] if not row["reason"] else f"NaN: {row['reason']}"
        lines.append(
            f"| {row['window']} | {span} | {row['records']} | {_fmt(row['T'])} | "
            f"{_fmt(row['mean'])} | {_fmt(row['growth'])} | {label} |"
        )
    lines += ["", "## Costs", "", *_cost_rows(log), "", "## Figures", ""]
    for fname, why in figures.items():
        lines.append(f"- `figures/{fname}`" + (f": not drawn — {why}" if why else ""))
    return "\n".join(lines) + "\n"


def _plot_against(ax_v, ax_r, log: MonitorLog, items) -> None:
    for name, thr, label in items:
        v = log.get(name)
        if np.isfinite(v).any():
            ok = np.isfinite(v)
            ax_v.plot(log.steps[ok], v[ok], marker=".", lw=1.2, label=label)
            r = v / log.get(thr)
            if np.isfinite(r).any():
                ok = np.isfinite(r)
                ax_r.plot(log.steps[ok], r[ok], marker=".", lw=1.2, label=label)
    thr = log.get(items[0][1])
    if np.isfinite(thr).any():
        ok = np.isfinite(thr)
        ax_v.plot(log.steps[ok], thr[ok], "k--", lw=1.2, label="threshold (2/η_t)")
    ax_r.axhspan(*BAND, color="0.85", label=f"[{BAND[0]}, {BAND[1]}]")
    ax_r.axhline(1.0, color="k", lw=0.8)
    ax_v.set_ylabel("eigenvalue scale")
    ax_r.set_ylabel("value / threshold")
    for ax in (ax_v, ax_r):
        ax.set_xlabel("step t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def write_figures(log: MonitorLog, folder: Path) -> dict:
    """Draw the figures into ``folder/figures``; returns {file name: "" or why not drawn}."""
    import matplotlib.pyplot as plt

    from chaosjax import plots

    out = {}
    has = {n: bool(np.isfinite(log.get(n)).any()) for n in log.values}
    groups = {
        "sharpness.png": [a for a in AGAINST_THRESHOLD[:4] if has.get(a[0])],
        "preconditioned_sharpness.png": [a for a in AGAINST_THRESHOLD[4:] if has.get(a[0])],
    }
    for fname, items in groups.items():
        if not items:
            out[fname] = "no finite values of " + ", ".join(
                f"`{a[0]}`"
                for a in (
                    AGAINST_THRESHOLD[:4] if fname == "sharpness.png" else AGAINST_THRESHOLD[4:]
                )
            )
            continue
        fig, (ax_v, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
        _plot_against(ax_v, ax_r, log, items)
        ax_v.set_title("curvature against the stability threshold")
        ax_r.set_title("ratio to the threshold at step t")
        plots.save(fig, folder / "figures" / fname)
        out[fname] = ""
    if has.get("ftle"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key in [
            "ftle",
            *sorted(k for k in log.values if k.startswith("ftle/") and k[5:].isdigit()),
        ]:
            v = log.get(key)
            ok = np.isfinite(v)
            ax.plot(log.steps[ok], v[ok], marker=".", lw=1.2, label=key)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set(xlabel="step t (end of the record interval)", ylabel="FTLE (per step)")
        ax.set_title("finite-time Lyapunov exponents along the loop")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots.save(fig, folder / "figures" / "ftle.png")
        out["ftle.png"] = ""
    else:
        out["ftle.png"] = "no finite `ftle` in the log (probes.FTLE through mon.wrap)"
    if has.get("gradient_norm"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        g = log.get("gradient_norm")
        ok = np.isfinite(g) & (g > 0)
        ax.semilogy(log.steps[ok], g[ok], marker=".", lw=1.2, color="C0", label="‖∇L‖")
        ax.set(xlabel="step t", ylabel="gradient norm ‖∇L‖ (batch of step t)")
        loss = log.get("gradient_norm/loss")
        if np.isfinite(loss).any():
            ax2 = ax.twinx()
            ok = np.isfinite(loss)
            ax2.plot(log.steps[ok], loss[ok], color="C1", lw=1.0, label="batch loss")
            ax2.set_ylabel("batch loss L(θ_t)")
            ax2.legend(fontsize=8, loc="upper center")
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
        ax.set_title("gradient norm")
        plots.save(fig, folder / "figures" / "gradient_norm.png")
        out["gradient_norm.png"] = ""
    else:
        out["gradient_norm.png"] = "no finite `gradient_norm` in the log (probes.GradientNorm)"
    return out


def report_monitor(log_path: str | Path) -> Path:
    """Render ``figures/`` and ``summary.md`` of a monitor log next to it (in the folder
    holding the store or file); returns the summary's path."""
    log = read_monitor_log(log_path)
    folder = Path(log_path).resolve().parent
    figures = write_figures(log, folder)
    path = folder / "summary.md"
    path.write_text(summary_text(log, figures))
    return path


__all__ = [
    "MonitorLog",
    "find_monitor_log",
    "ftle_windows",
    "read_monitor_log",
    "report_monitor",
    "summary_text",
    "threshold_rule",
    "write_figures",
]
