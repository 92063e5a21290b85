"""A referee for a run's summary.md: every number its tables state is recomputed from the
stored arrays (results.zarr and its stage groups) and compared as the summary formats it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chaosjax._util import fmt
from chaosjax.experiments.regimes import curvature_words, end_state_of, regime_of
from chaosjax.experiments.stats import seeds_cell
from chaosjax.results import ReplicaResults, open_group


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{section title: rows as {header: cell}} of every markdown table, by its section."""
    out: dict[str, list[dict[str, str]]] = {}
    section, head = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            section, head = line[3:].strip(), None
            continue
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
            out.setdefault(section, [])
        elif set(line.replace("|", "").strip()) != {"-"}:
            out[section].append(dict(zip(head, cells)))
    return out


def check_summary(folder: Path) -> int:
    """Assert the summary's numbers against the stored arrays; returns the cells checked."""
    text = (folder / "summary.md").read_text()
    res = ReplicaResults.load(folder / "results.zarr")
    tab = tables(text)
    n = 0
    lr, member = res.coords["learning_rate"], res.coords["member"]
    for row in tab["Results per learning rate"]:
        ref = (lr == float(row["η"])) & (member == 0)
        assert row["train loss"] == seeds_cell(res.records["loss"][ref, -1], ".3g")
        n += 1
    lya = open_group(folder / "results.zarr", "lyapunov")
    curv = open_group(folder / "results.zarr", "curvature")
    if lya is not None:
        lrs = lya["learning_rate"].values
        for row in tab["Lyapunov exponents"]:
            if "λ1 over seeds (per seed)" in row:
                sel = lrs == float(row["η"])
                lam = lya["exponents"].values[sel][:, 0]
                assert row["λ1 over seeds (per seed)"] == seeds_cell(lam, ".3g")
                n += 1
            elif "early FTLE" in row:
                g = int(
                    np.flatnonzero(
                        (lrs == float(row["η"])) & (lya["seed"].values == int(row["seed"]))
                    )[0]
                )
                f = lya["ftle"].values[g][:, 0]
                assert row["early FTLE"] == fmt(float(f[0]), ".3g")
                assert row["late FTLE"] == fmt(float(f[-1]), ".3g")
                assert row["FTLE regime"] == str(lya["regime"].values[g])
                n += 3
    if curv is not None:
        for g, row in enumerate(tab["Curvature and the edge of stability"]):
            r = int(curv["reference"].values[g])
            sh = res.records["sharpness"][r, :, 0]
            assert row["λ1 start"] == fmt(float(sh[0]))
            assert row["converged"] == (
                f"{int((res.records['sharpness_converged'][r, :, 0] > 0.5).sum())}/{sh.size}"
            )
            assert row["max λ1/thr"] == fmt(float(curv["max_ratio"].values[g]), ".2f")
            ftle = "" if lya is None else str(lya["regime"].values[g])
            end = end_state_of(lya, g)
            assert row["verdict"] == curvature_words(str(curv["verdict"].values[g]), ftle, end)
            n += 4
    for g, row in enumerate(tab.get("Regime of each run", [])):
        verdict = "" if curv is None else str(curv["verdict"].values[g])
        ftle = "" if lya is None else str(lya["regime"].values[g])
        end = end_state_of(lya, g)
        assert row["regime"] == regime_of(verdict, ftle, end)
        assert row["FTLE regime"] == (ftle or "n/a")
        assert row["end state"] == (end or "none")
        if lya is not None and "period" in lya:  # the end state is the stored period's
            p = float(lya["period"].values[g])
            dead = bool(lya["dead"].values[g])
            assert (end == "") == (not dead and (not np.isfinite(p) or p < 1))
        n += 3
    return n
