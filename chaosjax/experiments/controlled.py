"""The numbers of the ``control`` stage (declared in :mod:`chaosjax.experiments.stages.control`):
fixed learning rates against the controllers of :mod:`chaosjax.control`.

For the same network, data and seeds as the main (fixed-η) run, it runs the sharpness-margin
controller at each ``control.margins`` value and the FTLE controller at each
``control.ftle_targets`` value (one vmapped batch per controller), then compares every
reference run — fixed or controlled — on: steps to a target test accuracy (classification)
or test loss (regression), the final test metric, the final sharpness λmax and
η·λmax / c (c the optimizer's stability constant; 1 = edge of stability), the top Lyapunov
exponent λ1 over the last ``control.lyapunov_steps`` steps of each run (the tangents of the
run itself), and its
instability episodes (:func:`chaosjax.control.instability_episodes`; the matched stable run of
a seed is its fixed run with the largest η that shows no episode, else its smallest η).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from chaosjax._util import finite_median, fmt
from chaosjax.experiments._sections import BaseConfig
from chaosjax.experiments.analyses import curvature_tracker, reference_groups, tangent_tracker
from chaosjax.experiments.builders import build_training_map
from chaosjax.experiments.stats import seeds_cell
from chaosjax.experiments.tables import table_head

_PARAM = {"sharpness": "margin", "ftle": "target"}


def _settings(cfg: BaseConfig) -> list[tuple[str, list[float]]]:
    c = cfg.control
    out = []
    if c.margins:
        out.append(("sharpness", list(c.margins)))
    if c.ftle_targets:
        out.append(("ftle", list(c.ftle_targets)))
    return out


def build_controlled_maps(cfg: BaseConfig) -> list:
    """The map of every controller setting (the stage's ``validate`` builds them once, so bad
    settings fail before the run folder is touched); a ``ValueError`` names the setting."""
    return [
        build_training_map(cfg, controller=kind).replace(**{_PARAM[kind]: v})
        for kind, values in _settings(cfg)
        for v in values
    ]


def _constant(cfg: BaseConfig) -> float:
    from chaosjax.control import stability_constant

    t = cfg.training
    hp = {"momentum": t.momentum} if t.optimizer in ("momentum", "nesterov") else {}
    return float(stability_constant(t.optimizer, **hp))


def _first_hit(steps, values, ok) -> float:
    hit = ok(values)
    return float(steps[np.argmax(hit)]) if hit.any() else float("nan")


def _last(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x[-1]) if x.size else float("nan")


def _lambda1(cfg, results, refs, renorm_every: int):
    """λ1 per reference run over the last ``control.lyapunov_steps`` steps of the run, from
    the tangents the run carried (its LyapunovTracker), with the reason where it is NaN."""
    from chaosjax.lyapunov import _reasons

    ends = np.asarray(results.axes["renorm"])
    sel = ends > int(results.steps[-1]) - cfg.control.lyapunov_steps
    lg = results.records["log_growth"][refs][:, sel, :1]
    with np.errstate(invalid="ignore"):
        lam = lg[..., 0].mean(axis=1) / renorm_every
    return lam, _reasons(lg, ends[sel], results.diverged_step[refs])


def _controlled_run(cfg, kind: str, values, folder: Path, progress: bool):
    from chaosjax import control
    from chaosjax.observers import LyapunovTracker
    from chaosjax.replicas import make_replicas, run_replicas

    r = cfg.replicas
    ctl_map = build_training_map(cfg, controller=kind)
    batch = make_replicas(
        ctl_map,
        seeds=list(r.seeds),
        grid={_PARAM[kind]: values},
        n_perturbed=min(r.n_perturbed, 1),
        eps=[r.eps[0]],
        distribution=r.distribution,
        target=r.target,
    )
    observables = ["loss", "test_loss", "distance_l2"]
    if ctl_map.task == "classification":
        observables += ["accuracy", "test_accuracy"]
    tangents = LyapunovTracker(k=1, warmup=cfg.steps - cfg.control.lyapunov_steps)
    res = run_replicas(
        ctl_map,
        batch,
        steps=cfg.steps,
        record_every=cfg.record_every,
        observables=observables,
        custom_observables=control.controller_observables(ctl_map),
        trackers=[curvature_tracker(cfg), tangents],
        chunk_steps=max(cfg.record_every, cfg.chunk_steps - cfg.chunk_steps % cfg.record_every),
        loss_bound=r.loss_bound,
        progress=progress,
        checkpoint=folder / f"control_{kind}_checkpoint.npz",
        resume=True,
        devices=cfg.scale.devices or None,
        memory_limit=cfg.scale.memory_limit or None,
    )
    return ctl_map, batch, res


def _runs_of(results, refs, kind, values, lrs, c_thr):
    """Per reference run: label, series (ratio, test metric, loss, sharpness), distance."""
    rec = results.records
    distance = results.at_records("distance_l2")  # the episodes read every series per record
    out = []
    ref_of = np.asarray(results.coords["reference"])
    member = np.asarray(results.coords["member"])
    for i in refs:
        pert = np.flatnonzero((ref_of == i) & (member > 0))
        sharp = rec["sharpness"][i, :, 0]
        lr = np.asarray(lrs[i], np.float64)
        out.append(
            {
                "kind": kind,
                "value": float(values[i]),
                "seed": int(results.coords["seed"][i]),
                "lr": lr,
                "sharpness": sharp,
                "ratio": lr * sharp / c_thr,
                "loss": rec["loss"][i],
                "test_loss": rec["test_loss"][i],
                "test_accuracy": rec["test_accuracy"][i] if "test_accuracy" in rec else None,
                "distance": distance[pert[0]] if pert.size else None,
                "diverged": int(results.diverged_step[i]),
            }
        )
    return out


def _label(kind: str, value: float) -> str:
    if kind == "fixed":
        return f"fixed η = {value:g}"
    if kind == "sharpness":
        return f"margin {value:g}"
    return f"FTLE target {value:g}"


def _matched(runs: list[dict], episodes) -> dict[int, int]:
    """The matched stable run of each seed: its fixed run with the largest η that shows no
    instability episode (judged on its own); the smallest fixed η if every one has some."""
    out = {}
    for seed in {r["seed"] for r in runs}:
        fixed = sorted(
            (r["value"], j)
            for j, r in enumerate(runs)
            if r["kind"] == "fixed" and r["seed"] == seed
        )
        if not fixed:
            continue
        calm = [j for _, j in fixed if runs[j]["diverged"] < 0 and not episodes(runs[j])]
        out[seed] = calm[-1] if calm else fixed[0][1]
    return out


def control_stage(cfg: BaseConfig, tmap, batch, results, folder: Path, progress: bool):
    """Run the controllers and compare them with the fixed-η reference runs."""
    from chaosjax import control

    folder = Path(folder)
    c = cfg.control
    c_thr = _constant(cfg)
    steps = np.asarray(results.steps)
    refs = reference_groups(batch)
    fixed_lr = np.asarray(batch.hparams["learning_rate"], np.float64)
    runs = _runs_of(
        results,
        refs,
        "fixed",
        fixed_lr,
        np.repeat(fixed_lr[:, None], len(steps), axis=1),
        c_thr,
    )
    lam, why = _lambda1(cfg, results, refs, tangent_tracker(cfg).renorm_every)
    for run, lam_i, w in zip(runs, lam, why):
        run["lambda1"], run["lambda1_reason"] = float(lam_i), w

    for kind, values in _settings(cfg):
        _, cbatch, res = _controlled_run(cfg, kind, values, folder, progress)
        crefs = reference_groups(cbatch)
        param = np.asarray(cbatch.hparams[_PARAM[kind]], np.float64)
        eta = res.records["control_lr"]
        new = _runs_of(res, crefs, kind, param, eta, c_thr)
        lam, why = _lambda1(cfg, res, crefs, 1)
        for run, lam_i, w in zip(new, lam, why):
            run["lambda1"], run["lambda1_reason"] = float(lam_i), w
        runs += new

    def episodes(run, ref=None):
        return control.instability_episodes(
            run["loss"],
            steps=steps,
            sharpness=run["sharpness"],
            threshold=c_thr / run["lr"],
            distance=run["distance"],
            test_loss=run["test_loss"],
            reference_sharpness=None if ref is None else ref["sharpness"],
            reference_test_loss=None if ref is None else ref["test_loss"],
            spike_factor=c.spike_factor,
            recover_factor=c.recover_factor,
            recovery=c.recovery or None,
            loss_bound=cfg.replicas.loss_bound,
        )

    matched = _matched(runs, episodes)
    classification = runs[0]["test_accuracy"] is not None
    target = cfg.target.test_accuracy if classification else c.target_loss
    ep_rows = []
    for j, run in enumerate(runs):
        m = matched.get(run["seed"])
        run["matched"] = _label("fixed", runs[m]["value"]) if m is not None else ""
        eps = episodes(run, runs[m] if m is not None and m != j else None)
        counts = control.count_labels(eps)
        run.update({f"n_{k}": v for k, v in counts.items()})
        ep_rows += [(j, e) for e in eps]
        if target > 0:
            if classification:
                run["steps_to_target"] = _first_hit(
                    steps, run["test_accuracy"], lambda a: np.nan_to_num(a) >= target
                )
            else:
                run["steps_to_target"] = _first_hit(
                    steps, run["test_loss"], lambda a: np.nan_to_num(a, nan=np.inf) <= target
                )
        else:
            run["steps_to_target"] = float("nan")
        run["final_test"] = _last(run["test_accuracy"] if classification else run["test_loss"])

    def col(name, dtype=np.float64):
        return ("run",), np.asarray([r[name] for r in runs], dtype)

    def ser(name):
        return ("run", "step"), np.stack([np.asarray(r[name], np.float64) for r in runs])

    test_name = "test_accuracy" if classification else "test_loss"
    nan = float("nan")
    data = {
        "kind": col("kind", str),
        "value": col("value"),
        "seed": col("seed", np.int64),
        "label": (("run",), np.asarray([_label(r["kind"], r["value"]) for r in runs], str)),
        "steps_to_target": col("steps_to_target"),
        "final_test": col("final_test"),
        "final_sharpness": (("run",), np.asarray([_last(r["sharpness"]) for r in runs])),
        "final_lr": (("run",), np.asarray([_last(np.asarray(r["lr"])) for r in runs])),
        "final_ratio": (("run",), np.asarray([_last(r["ratio"]) for r in runs])),
        "lambda1": col("lambda1"),
        "lambda1_reason": col("lambda1_reason", str),
        "n_helpful": col("n_helpful", np.int64),
        "n_harmful": col("n_harmful", np.int64),
        "n_neutral": col("n_neutral", np.int64),
        "n_unresolved": col("n_unresolved", np.int64),
        "diverged_step": col("diverged", np.int64),
        "matched": col("matched", str),
        "ratio": ser("ratio"),
        "lr": ser("lr"),
        "test": ser(test_name),
        "loss": ser("loss"),
        "episode_run": (("episode",), np.asarray([j for j, _ in ep_rows], np.int64)),
        "episode_start": (("episode",), np.asarray([e.start for _, e in ep_rows], np.int64)),
        "episode_peak": (("episode",), np.asarray([e.peak for _, e in ep_rows], np.int64)),
        "episode_end": (("episode",), np.asarray([e.end for _, e in ep_rows], np.int64)),
        "episode_kinds": (("episode",), np.asarray([",".join(e.kinds) for _, e in ep_rows], str)),
        "episode_label": (("episode",), np.asarray([e.label for _, e in ep_rows], str)),
        "episode_reason": (("episode",), np.asarray([e.reason for _, e in ep_rows], str)),
    }
    for key in ("peak_ratio", "sharpness_after", "reference_sharpness", "test_loss_after"):
        data[f"episode_{key}"] = (
            ("episode",),
            np.asarray([e.numbers.get(key, nan) for _, e in ep_rows], np.float64),
        )
    return xr.Dataset(
        data,
        coords={"run": np.arange(len(runs)), "step": steps, "episode": np.arange(len(ep_rows))},
        attrs={
            "target": float(target),
            "target_metric": test_name,
            "stability_constant": c_thr,
            "optimizer": cfg.training.optimizer,
            "every": c.every,
            "smoothing": c.smoothing,
            "lyapunov_steps": c.lyapunov_steps,
            "episode_rule": control.EPISODE_RULE,
        },
    )


# ---------------------------------------------------------------------------------------------
# report


def _settings_of(ds: xr.Dataset) -> list[str]:
    labels = ds["label"].values
    seen = []
    for lab in labels:
        if lab not in seen:
            seen.append(lab)
    return seen


def comparison_rows(ds: xr.Dataset) -> list[dict]:
    """One row per setting (median over seeds)."""
    rows = []
    for lab in _settings_of(ds):
        sel = ds["label"].values == lab
        st = ds["steps_to_target"].values[sel]
        reached = np.isfinite(st)
        rows.append(
            {
                "label": lab,
                "kind": str(ds["kind"].values[sel][0]),
                "seeds": int(sel.sum()),
                "reached": int(reached.sum()),
                "steps": float(np.median(st)) if reached.all() else float("nan"),
                "final_test": finite_median(ds["final_test"].values[sel]),
                "final_sharpness": finite_median(ds["final_sharpness"].values[sel]),
                "final_lr": finite_median(ds["final_lr"].values[sel]),
                "final_ratio": finite_median(ds["final_ratio"].values[sel]),
                "lambda1": finite_median(ds["lambda1"].values[sel]),
                "helpful": int(ds["n_helpful"].values[sel].sum()),
                "harmful": int(ds["n_harmful"].values[sel].sum()),
                "neutral": int(ds["n_neutral"].values[sel].sum()),
                "unresolved": int(ds["n_unresolved"].values[sel].sum())
                if "n_unresolved" in ds
                else 0,
                "diverged": int((ds["diverged_step"].values[sel] >= 0).sum()),
                "per_seed": {
                    k: ds[k].values[sel]
                    for k in ("final_test", "final_sharpness", "final_lr", "final_ratio", "lambda1")
                },
            }
        )
    return rows


#: the documented comparison rule (summaries repeat it)
VERDICT_RULE = (
    "A setting qualifies when every seed reached the target and no seed diverged; qualifying "
    "settings are compared by their median steps to the target."
)


def verdict(rows: list[dict]) -> str:
    """Does any controller beat the best fixed η on time to target (:data:`VERDICT_RULE`)?"""

    def best(kind_fixed: bool):
        cand = [
            r
            for r in rows
            if (r["kind"] == "fixed") == kind_fixed
            and np.isfinite(r["steps"])
            and r["diverged"] == 0
        ]
        return min(cand, key=lambda r: r["steps"]) if cand else None

    f, c = best(True), best(False)
    if f is None and c is None:
        return "No setting qualified (every seed at the target, none diverged); no comparison."
    if c is None:
        return (
            f"No controller qualified (every seed at the target, none diverged); the best fixed "
            f"η ({f['label']}) took {f['steps']:.0f} steps."
        )
    if f is None:
        return (
            f"No fixed η qualified (every seed at the target, none diverged); {c['label']} did, "
            f"in {c['steps']:.0f} steps."
        )
    if c["steps"] < f["steps"]:
        return (
            f"Yes: {c['label']} reached the target in {c['steps']:.0f} steps (median over seeds), "
            f"faster than the best fixed η ({f['label']}, {f['steps']:.0f} steps)."
        )
    return (
        f"No: the best controller ({c['label']}, {c['steps']:.0f} steps, median over seeds) "
        f"was not faster than the best fixed η ({f['label']}, {f['steps']:.0f} steps)."
    )


def control_markdown(ds: xr.Dataset) -> list[str]:
    metric = "test accuracy" if ds.attrs["target_metric"] == "test_accuracy" else "test loss"
    tgt = ds.attrs["target"]
    rows = comparison_rows(ds)
    lines = [
        "## Instability control against fixed learning rates",
        "",
        f"Fixed η against the sharpness-margin controller (η·λmax held at margin × c, "
        f"c = {ds.attrs['stability_constant']:g} for {ds.attrs['optimizer']}, re-estimated every "
        f"{ds.attrs['every']} steps, smoothing {ds.attrs['smoothing']:g}) and the FTLE "
        "controller, from the same initialisations. Steps to the target: median over seeds "
        "(n/a unless every seed reached it); the other columns: mean ± standard error over seeds "
        "with each seed in brackets; episodes summed over seeds; diverged: seeds. "
        f"η·λmax/c: 1 = edge of stability. λ1: top Lyapunov exponent per step over "
        f"the last {ds.attrs['lyapunov_steps']} steps of each run, from its own tangents (the "
        "controller's state is part of the map).",
        "",
        *table_head(
            "setting",
            f"steps to {metric} {'≥' if metric == 'test accuracy' else '≤'} {tgt:g}",
            "reached",
            f"final {metric}",
            "final λmax",
            "final η",
            "η·λmax/c",
            "λ1",
            "helpful",
            "harmful",
            "neutral",
            "unresolved",
            "diverged seeds",
        ),
    ]
    for r in rows:
        ps = r["per_seed"]
        lines.append(
            f"| {r['label']} | {fmt(r['steps'], '.0f')} | {r['reached']}/{r['seeds']} | "
            f"{seeds_cell(ps['final_test'], '.3f' if metric == 'test accuracy' else '.3g')} | "
            f"{seeds_cell(ps['final_sharpness'], '.3g')} | {seeds_cell(ps['final_lr'], '.3g')} | "
            f"{seeds_cell(ps['final_ratio'], '.3f')} | {seeds_cell(ps['lambda1'], '.3g')} | "
            f"{r['helpful']} | {r['harmful']} | {r['neutral']} | {r['unresolved']} | "
            f"{r['diverged']}/{r['seeds']} |"
        )
    if tgt > 0:
        lines += [
            "",
            f"**Does a controller beat the best fixed η?** {verdict(rows)} ({VERDICT_RULE})",
        ]
    reasons = {str(x) for x in ds["lambda1_reason"].values if str(x)}
    if reasons:
        lines += ["", "λ1 not available for some runs: " + "; ".join(sorted(reasons))]
    matched = sorted({str(m) for m in ds["matched"].values if str(m)})
    lines += [
        "",
        "**Episode rule.** " + ds.attrs["episode_rule"],
        "",
        "Matched stable run of a seed: its fixed run with the largest η that shows no episode "
        "(else its smallest η); here " + (", ".join(matched) or "none") + ".",
        "",
    ]
    n = ds.sizes["episode"]
    if n:
        lines += [
            *table_head("run", "seed", "start", "peak", "end", "kinds", "label", "why"),
        ]
        order = sorted(range(n), key=lambda e: ds["episode_label"].values[e] == "neutral")
        for e in order[:30]:
            j = int(ds["episode_run"].values[e])
            end = int(ds["episode_end"].values[e])
            lines.append(
                f"| {ds['label'].values[j]} | {int(ds['seed'].values[j])} | "
                f"{int(ds['episode_start'].values[e])} | {int(ds['episode_peak'].values[e])} | "
                f"{end if end >= 0 else 'open'} | {ds['episode_kinds'].values[e]} | "
                f"{ds['episode_label'].values[e]} | {ds['episode_reason'].values[e]} |"
            )
        if n > 30:
            lines.append(f"\n({n - 30} more episodes in results.zarr, group `control`.)")
    else:
        lines.append("No instability episodes were found.")
    lines += ["", "![control](figures/control.png)", ""]
    return lines


def control_figures(ds: xr.Dataset, folder: Path) -> None:
    """η·λmax/c, η and the test metric against step for every setting (first seed)."""
    import matplotlib.pyplot as plt

    from chaosjax import plots

    steps = ds["step"].values
    seed0 = int(ds["seed"].values.min())
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    labels = _settings_of(ds)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(labels), 1)))
    for lab, color in zip(labels, colors):
        sel = np.flatnonzero((ds["label"].values == lab) & (ds["seed"].values == seed0))
        if not sel.size:
            continue
        j = int(sel[0])
        ls = "--" if ds["kind"].values[j] == "fixed" else "-"
        axes[0].plot(steps, ds["ratio"].values[j], ls, color=color, lw=1, label=lab)
        axes[1].plot(steps, ds["lr"].values[j], ls, color=color, lw=1)
        axes[2].plot(steps, ds["test"].values[j], ls, color=color, lw=1)
        ep = np.flatnonzero(ds["episode_run"].values == j)
        for e in ep:
            mark = {"helpful": "^", "harmful": "x", "neutral": "o", "unresolved": "."}[
                str(ds["episode_label"].values[e])
            ]
            s = int(ds["episode_peak"].values[e])
            k = int(np.clip(np.searchsorted(steps, s), 0, len(steps) - 1))
            axes[2].plot(steps[k], ds["test"].values[j][k], mark, color=color, ms=6)
    axes[0].axhline(1.0, color="k", lw=0.8, ls=":")
    axes[0].set_ylabel("η·λmax / c")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("η")
    axes[1].set_yscale("log")
    axes[2].set_ylabel(ds.attrs["target_metric"].replace("_", " "))
    if ds.attrs["target_metric"] == "test_loss":
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].set_title("episodes: ^ helpful, x harmful, o neutral", fontsize=8)
    fig.suptitle(f"instability control (seed {seed0}; dashed: fixed η)", fontsize=10)
    plots.save(fig, folder / "control.png")


__all__ = [
    "VERDICT_RULE",
    "comparison_rows",
    "control_figures",
    "control_markdown",
    "control_stage",
    "verdict",
]
