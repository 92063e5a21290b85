"""The benchmark suite: what chaosjax costs on real models, on whatever device it runs.

For three models — the quickstart MLP, a ResNet with BatchNorm on CIFAR-shaped data (32×32×3,
generated) and a decoder Transformer on token sequences — it measures:

1. replica throughput: replica-steps/s of ``run_replicas`` for R replicas under each replica
   strategy (``vmap``, ``lax.map``, ``lax.map`` over vmap blocks of 8), against a jitted
   per-replica loop (one jitted ``fori_loop`` over the steps of one replica, run R times);
2. tangent cost: S steps with ``LyapunovTracker(k)`` for k ∈ {1, 8, 32} over S plain steps
   (one replica);
3. HVP / gradient time (jitted, on the loss the step differentiates);
4. Lanczos top-5 time;
5. memory per replica: chaosjax's estimate and, on a GPU, the device's peak bytes in use;
6. the sharded speed-up over the devices present (R replicas on all devices against one).

With ``--pyhessian`` (the ``peers`` extra, CPU): PyHessian on a copy of the same ResNet (same
weights, same batch, BatchNorm in train mode) against chaosjax, both measured against a
float64 Lanczos run to residuals below 1e-8.

It writes JSON and a markdown table. Sizes: the default, ``--quick`` (fits in about 4 minutes
on one GPU) and ``--tiny`` (seconds; runs in the test suite). Every figure says the device.

Usage:
    python benchmarks/suite.py [--quick | --tiny] [--pyhessian] [--models mlp resnet-bn transformer]
                               [--json benchmarks/out/suite.json] [--md benchmarks/out/suite.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax

jax.config.update("jax_enable_x64", True)  # float64 reference runs; the timed maps are float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import best_time, block, table, write_json  # noqa: E402

import chaosjax as cj  # noqa: E402
from chaosjax import curvature as cv  # noqa: E402
from chaosjax.datasets import Dataset  # noqa: E402

STRATEGIES = ("vmap", "map", 8)

SIZES = {
    #        replicas,                     steps, loop steps, strategy R, ks,        lanczos m
    "tiny": {"R": [3], "steps": 2, "loop": 2, "R_strat": 3, "ks": [1], "m": 8},
    "quick": {
        "R": [1, 64, 1024],
        "steps": 10,
        "loop": 10,
        "R_strat": 64,
        "ks": [1, 8, 32],
        "m": 40,
    },
    # a 2-core CPU: smaller ResNet and Transformer (see build), every strategy at R = 8
    "cpu": {"R": [1, 8], "steps": 4, "loop": 4, "R_strat": 8, "ks": [1, 8], "m": 40},
    "full": {
        "R": [1, 8, 64, 256, 1024],
        "steps": 20,
        "loop": 20,
        "R_strat": 64,
        "ks": [1, 8, 32],
        "m": 60,
    },
}


# ---------------------------------------------------------------------------------------------
# models


def cifar_shaped(n: int, side: int, seed: int = 0, n_classes: int = 10) -> Dataset:
    """Generated images (n, side, side, 3) ~ N(0, 1) labelled by a random linear teacher on
    2×2-pooled pixels (learnable, CIFAR-shaped; no download)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, side, side, 3)).astype(np.float32)
    pooled = x.reshape(n, side // 2, 2, side // 2, 2, 3).mean(axis=(2, 4)).reshape(n, -1)
    w = rng.normal(size=(pooled.shape[1], n_classes))
    y = np.argmax(pooled @ w, axis=1).astype(np.int32)
    return Dataset.from_arrays(x, y, name=f"cifar-shaped-{side}")


def token_task(n: int, length: int, vocab: int, seed: int = 0) -> Dataset:
    """Random token sequences labelled by the sum of their tokens mod ``vocab``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, length)).astype(np.int32)
    y = (x.sum(axis=1) % vocab).astype(np.int32)
    return Dataset.from_arrays(x, y, name=f"tokens-{length}")


def build(name: str, size: str, dtype=jnp.float32):
    """(training map, description) of one suite model at ``size``."""
    import optax
    from flax import nnx

    from chaosjax import models

    if name == "mlp":
        from chaosjax.experiments import load_config
        from chaosjax.experiments.builders import build_training_map

        prec = "float64" if dtype == jnp.float64 else "float32"
        tm = build_training_map(
            load_config("quickstart", [f"precision={prec}", "training.learning_rates=[0.2]"])
        )
        return tm, f"quickstart MLP, two moons, full batch ({tm.n_params} parameters)"
    if name == "resnet-bn":
        side, width, depth, n, bs = {"tiny": (8, 4, 1, 16, 8), "cpu": (16, 8, 2, 128, 32)}.get(
            size, (32, 16, 3, 256, 64)
        )
        ds = cifar_shaped(n, side)

        def make(rngs):
            return models.ResNet(
                (side, side, 3), 10, width=width, depth=depth, rngs=rngs, dtype=dtype
            )

        tm = cj.TrainingMap.from_nnx(
            make(nnx.Rngs(0)), ds, model_factory=make, loss="cross_entropy",
            optimizer=optax.inject_hyperparams(optax.sgd), learning_rate=0.05,
            hparams={"momentum": 0.9}, optimizer_kind="momentum", batch_size=bs,
        )  # fmt: skip
        return tm, (
            f"ResNet-BN width {width}, depth {depth}, on {side}×{side}×3 images, batch {bs} "
            f"({tm.n_params} parameters)"
        )
    if name == "transformer":
        length, vocab, d, layers, n, bs = {
            "tiny": (4, 8, 8, 1, 16, 8),
            "cpu": (8, 16, 32, 1, 128, 32),
        }.get(size, (16, 32, 64, 2, 256, 64))
        ds = token_task(n, length, vocab)

        def make(rngs):
            return models.Transformer(
                vocab, length, vocab, d_model=d, n_heads=4 if d % 4 == 0 else 1, layers=layers,
                rngs=rngs, dtype=dtype,
            )  # fmt: skip

        tm = cj.TrainingMap.from_nnx(
            make(nnx.Rngs(0)), ds, model_factory=make, loss="cross_entropy",
            optimizer="adam", learning_rate=1e-3, batch_size=bs,
        )  # fmt: skip
        return tm, (
            f"Transformer d_model {d}, {layers} layers, sequences of {length}, batch {bs} "
            f"({tm.n_params} parameters)"
        )
    raise ValueError(f"model: unknown {name!r}; allowed: mlp, resnet-bn, transformer")


# ---------------------------------------------------------------------------------------------
# measurements


def _device_peak() -> int | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def _run(tm, batch, steps, *, strategy=None, trackers=(), devices=None):
    return cj.run_replicas(
        tm, batch, steps=steps, record_every=steps, chunk_steps=steps, observables=("loss",),
        trackers=list(trackers), strategy=strategy, progress=False, devices=devices,
    ).final_state  # fmt: skip


def _timed(fn, repeats: int = 2) -> float:
    block(fn())  # compile
    return best_time(fn, repeats)


def loop_rate(tm, steps: int) -> float:
    """replica-steps/s of a jitted per-replica loop (independent of R)."""
    s0 = tm.init()

    @jax.jit
    def run(s):
        return jax.lax.fori_loop(0, steps, lambda t, s: tm.step(s, t), s)

    return steps / _timed(lambda: run(s0))


def throughput(tm, sz, limit: int, strategies_everywhere: bool) -> list[dict]:
    """replica-steps/s per R and strategy, the loop baseline and memory per replica."""
    from chaosjax.engine import default_strategy, replica_memory

    rows = []
    base = loop_rate(tm, sz["loop"])
    default = default_strategy(tm)
    for R in sz["R"]:
        batch = cj.make_replicas(tm, seeds=[0], n_perturbed=R - 1, eps=1e-6)
        est = replica_memory(tm, batch).per_replica
        if est * R > limit:
            rows.append({"R": R, "strategy": "—", "skipped": f"needs {est * R / 2**30:.1f} GiB"})
            continue
        chosen = STRATEGIES if (strategies_everywhere or R == sz["R_strat"]) else (default,)
        for strategy in chosen:
            try:
                sec = _timed(lambda b=batch, s=strategy: _run(tm, b, sz["steps"], strategy=s))
            except Exception as e:  # out of device memory: say so, keep going
                rows.append({"R": R, "strategy": str(strategy), "skipped": type(e).__name__})
                continue
            rate = R * sz["steps"] / sec
            print(f"  R={R} {strategy}: {rate:.3g} replica-steps/s", flush=True)
            rows.append(
                {
                    "R": R,
                    "strategy": str(strategy) + (" (default)" if strategy == default else ""),
                    "replica_steps_per_s": rate,
                    "loop_replica_steps_per_s": base,
                    "speedup_vs_loop": rate / base,
                    "est_bytes_per_replica": est,
                    "device_peak_bytes": _device_peak(),
                }
            )
    return rows


def tangent_cost(tm, sz) -> list[dict]:
    batch = cj.make_replicas(tm, seeds=[0])
    steps = sz["steps"] * 2
    plain = _timed(lambda: _run(tm, batch, steps))
    rows = []
    for k in sz["ks"]:
        if k > tm.dim:
            continue
        tr = cj.LyapunovTracker(k=k)
        sec = _timed(lambda tr=tr: _run(tm, batch, steps, trackers=[tr]))
        rows.append({"k": k, "seconds": sec, "plain_seconds": plain, "ratio": sec / plain})
    return rows


def curvature_cost(tm, sz) -> dict:
    s = tm.init()
    loss, p, _ = cv.training_loss(tm, s)
    g = jax.jit(jax.grad(loss))
    hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])
    v = jnp.ones_like(p) / jnp.sqrt(jnp.asarray(p.shape[0], p.dtype))
    tg = _timed(lambda: g(p), 5)
    th = _timed(lambda: hvp(p, v), 5)
    m = min(sz["m"], p.shape[0])
    eigs = jax.jit(lambda q: cj.hessian_eigs(loss, q, 5, n_matvecs=m).eigenvalues)
    tl = _timed(lambda: eigs(p))
    return {"grad_s": tg, "hvp_s": th, "hvp_over_grad": th / tg, "lanczos_top5_s": tl, "m": m}


def sharded(tm, sz) -> dict | None:
    n = jax.local_device_count()
    if n < 2:
        return None
    R = max(sz["R"])
    batch = cj.make_replicas(tm, seeds=[0], n_perturbed=R - 1, eps=1e-6)
    one = _timed(lambda: _run(tm, batch, sz["steps"], devices=1))
    all_ = _timed(lambda: _run(tm, batch, sz["steps"], devices=n))
    return {"devices": n, "R": R, "speedup": one / all_}


# ---------------------------------------------------------------------------------------------
# PyHessian anchor (CPU)


def torch_resnet(model, dtype):
    """A PyTorch copy of a :class:`chaosjax.models.ResNet` (same weights, XLA's SAME padding,
    BatchNorm in train mode)."""
    import torch
    import torch.nn.functional as F

    def t(a):
        return torch.nn.Parameter(torch.tensor(np.asarray(a), dtype=dtype))

    def conv(layer, stride):
        w = t(np.transpose(np.asarray(layer.kernel.get_value()), (3, 2, 0, 1)))
        b = None
        if layer.bias is not None:
            b = t(layer.bias.get_value())
        kh = w.shape[2]

        def f(x):
            h = x.shape[2]
            out = -(-h // stride)
            pad = max((out - 1) * stride + kh - h, 0)
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
            return F.conv2d(x, w, b, stride=stride)

        return f, [w] + ([b] if b is not None else [])

    def bn(layer):
        if layer is None:
            return (lambda x: x), []
        g = t(layer.scale.get_value())
        b = t(layer.bias.get_value())

        def f(x):
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            xn = (x - mean) / torch.sqrt(var + layer.epsilon)
            return xn * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

        return f, [g, b]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            params = []
            self.stem, p = conv(model.stem, 1)
            params += p
            self.stem_bn, p = bn(model.stem_bn)
            params += p
            self.blocks = []
            for blk in model.blocks:
                stride = blk.conv1.strides
                stride = stride[0] if isinstance(stride, tuple | list) else (stride or 1)
                c1, p1 = conv(blk.conv1, stride)
                b1, q1 = bn(blk.bn1)
                c2, p2 = conv(blk.conv2, 1)
                b2, q2 = bn(blk.bn2)
                pr, pp = conv(blk.proj, stride) if blk.proj is not None else (None, [])
                self.blocks.append((c1, b1, c2, b2, pr))
                params += p1 + q1 + p2 + q2 + pp
            self.head_w = t(np.asarray(model.head.kernel.get_value()).T)
            self.head_b = t(model.head.bias.get_value())
            params += [self.head_w, self.head_b]
            self.plist = torch.nn.ParameterList(params)  # the closures' own Parameter objects

        def forward(self, x):
            # x: (n, H, W, C) as in NNX
            x = x.permute(0, 3, 1, 2)
            h = torch.relu(self.stem_bn(self.stem(x)))
            for c1, b1, c2, b2, pr in self.blocks:
                y = torch.relu(b1(c1(h)))
                y = b2(c2(y))
                h = torch.relu(y + (pr(h) if pr is not None else h))
            return F.linear(h.mean(dim=(2, 3)), self.head_w, self.head_b)

    return Net()


def pyhessian_anchor(tiny: bool) -> list[dict]:
    """Top-1 and top-5 of the ResNet's Hessian (train-mode BatchNorm, one batch): chaosjax
    (float32, float64) and PyHessian (float32), against a float64 Lanczos run to residuals
    below 1e-8."""
    try:
        import torch
        from pyhessian import hessian as pyh
    except ImportError:
        return [{"tool": "PyHessian", "skipped": "install the peers extra (torch, pyhessian)"}]
    from flax import nnx

    from chaosjax import models

    side, width, depth, n = (8, 4, 1, 16) if tiny else (16, 8, 2, 64)
    ds = cifar_shaped(n, side, seed=1)

    def make(dtype):
        return models.ResNet((side, side, 3), 10, width=width, depth=depth,
                             rngs=nnx.Rngs(0), dtype=dtype)  # fmt: skip

    model64 = make(jnp.float64)
    tm64 = cj.TrainingMap.from_nnx(model64, ds, loss="cross_entropy", learning_rate=0.1)
    # compare after some full-batch GD: at initialisation this ReLU ResNet's Hessian has
    # negative eigenvalues larger in magnitude than its top one, and power iteration
    # (PyHessian) returns those instead of the sharpness
    n_train = 20 if tiny else 200
    s64 = jax.jit(lambda s: jax.lax.fori_loop(0, n_train, lambda t, s: tm64.step(s, t), s))(
        tm64.init()
    )
    nnx.update(model64, tm64.params(s64))  # the torch copy reads the trained weights
    tm32 = cj.TrainingMap.from_nnx(make(jnp.float32), ds, loss="cross_entropy", learning_rate=0.1)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), tm64.params(s64))
    maps = {jnp.float64: (tm64, s64), jnp.float32: (tm32, tm32.init(p32))}  # the same weights
    loss64, p64, _ = cv.training_loss(tm64, s64)
    ref = None
    for m in (100, 200, 400, 800):
        r = cj.hessian_eigs(loss64, p64, 5, n_matvecs=min(m, p64.shape[0]))
        ref = r
        if float(np.max(np.asarray(r.residuals))) < 1e-8:
            break
    ev = np.asarray(ref.eigenvalues)
    resid = float(np.max(np.asarray(ref.residuals)))
    bottom = float(cj.hessian_eigs(loss64, p64, 1, which="smallest", n_matvecs=100).eigenvalues[0])
    rows = []

    def err(vals, k):
        return float(np.max(np.abs(np.sort(np.asarray(vals))[::-1][:k] - ev[:k]) / np.abs(ev[:k])))

    for dt, label in ((jnp.float32, "float32"), (jnp.float64, "float64")):
        tm, s = maps[dt]
        loss, p, _ = cv.training_loss(tm, s)
        for k, m in ((1, 20), (5, 40)):
            f = jax.jit(
                lambda q, k=k, m=m, loss=loss: cj.hessian_eigs(loss, q, k, n_matvecs=m).eigenvalues
            )
            sec = _timed(lambda f=f, p=p: f(p), 3)
            rows.append({"quantity": f"top-{k}", "tool": f"chaosjax {label} (Lanczos {m})",
                         "seconds": sec, "rel_error": err(f(p), k)})  # fmt: skip
    torch.manual_seed(0)
    net = torch_resnet(model64, torch.float32)  # the same weights, cast
    x = torch.tensor(np.asarray(ds.x_train, np.float32))
    y = torch.tensor(np.asarray(ds.y_train, np.int64))
    n_torch = sum(q.numel() for q in net.parameters())
    if n_torch != tm64.n_params:
        raise RuntimeError(f"torch copy has {n_torch} parameters, the map {tm64.n_params}")
    with torch.no_grad():  # train-mode outputs: batch statistics, as the Hessian sees them
        x64 = jnp.asarray(ds.x_train, jnp.float64)
        ours = np.asarray(tm64.output_of_params(tm64.params(s64), x64, s64))
        theirs = net(x).numpy()
    agree = float(np.max(np.abs(ours - theirs)))
    h = pyh(net, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    net.train()  # PyHessian sets eval mode; this BatchNorm always uses batch statistics
    for k in (1, 5):
        for tol, it in ((1e-3, 100), (1e-6, 1000)):
            best, vals = float("inf"), None
            for _ in range(2 if tol > 1e-6 else 1):  # the tight tolerance: one timing
                t0 = time.perf_counter()
                vals, _ = h.eigenvalues(top_n=k, maxIter=it, tol=tol)
                best = min(best, time.perf_counter() - t0)
            rows.append({"quantity": f"top-{k}", "tool": f"PyHessian float32 (tol {tol:g})",
                         "seconds": best, "rel_error": err(vals, k)})  # fmt: skip
    for r in rows:
        r["reference_residual"] = resid
        r["reference_top5"] = ev.tolist()
        r["smallest_eigenvalue"] = bottom
        r["gd_steps_before"] = n_train
        r["outputs_max_abs_diff"] = agree
        r["n_params"] = tm64.n_params
    return rows


# ---------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"Device: {result['device']} ({result['backend']}); jax {env.get('jax', '?')}; "
        f"size {result['size']}; float32 maps, matmul precision highest.",
        "",
    ]
    for name, m in result["models"].items():
        lines += [f"### {name}: {m['description']}", ""]
        lines.append(
            table(
                m["throughput"],
                [
                    ("R", "R", "d"),
                    ("strategy", "strategy", "s"),
                    ("replica_steps_per_s", "replica-steps/s", ".3g"),
                    ("loop_replica_steps_per_s", "jitted loop", ".3g"),
                    ("speedup_vs_loop", "× loop", ".1f"),
                    ("est_bytes_per_replica", "est. bytes/replica", ".3g"),
                    ("device_peak_bytes", "device peak bytes", ".3g"),
                    ("skipped", "skipped", "s"),
                ],
            )
        )
        lines.append("")
        lines.append(
            table(
                m["tangents"],
                [("k", "tangents k", "d"), ("ratio", "time / plain step", ".2f")],
            )
        )
        c = m["curvature"]
        lines += [
            "",
            f"HVP / gradient: {c['hvp_over_grad']:.2f} (gradient {c['grad_s']:.3g} s); "
            f"Lanczos top-5 ({c['m']} matvecs): {c['lanczos_top5_s']:.3g} s.",
        ]
        sh = m.get("sharded")
        lines.append(
            f"Sharded over {sh['devices']} devices (R = {sh['R']}): {sh['speedup']:.2f}× one device."
            if sh
            else "Sharded speed-up: n/a (one device)."
        )
        lines.append("")
    if result.get("pyhessian"):
        ph = result["pyhessian"][0]
        lines += [
            "### Hessian top-k against PyHessian (CPU, ResNet-BN, train-mode BatchNorm)",
            "",
            f"{ph.get('n_params', '?')} parameters, after {ph.get('gd_steps_before', '?')} GD "
            f"steps; errors against float64 Lanczos to residual {ph.get('reference_residual', float('nan')):.1e} "
            f"(top-5 {np.round(ph.get('reference_top5', []), 4).tolist()}, smallest eigenvalue "
            f"{ph.get('smallest_eigenvalue', float('nan')):.4g}); outputs of the torch copy "
            f"within {ph.get('outputs_max_abs_diff', float('nan')):.1e}.",
            "",
        ]
        lines.append(
            table(
                result["pyhessian"],
                [
                    ("quantity", "quantity", "s"),
                    ("tool", "tool", "s"),
                    ("seconds", "time (s)", ".3g"),
                    ("rel_error", "rel. error", ".1e"),
                    ("skipped", "skipped", "s"),
                ],
            )
        )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="about 4 minutes on one GPU")
    g.add_argument("--tiny", action="store_true", help="seconds: the test suite's size")
    g.add_argument("--cpu", action="store_true", help="minutes on a 2-core CPU (smaller models)")
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet-bn", "transformer"])
    ap.add_argument("--pyhessian", action="store_true", help="PyHessian anchor (peers extra)")
    ap.add_argument("--all-strategies", action="store_true", help="every strategy at every R")
    ap.add_argument(
        "--replicas", type=int, nargs="+", default=None, help="replica counts R (default: by size)"
    )
    ap.add_argument(
        "--tangents", type=int, nargs="+", default=None, help="tangent counts k (default: by size)"
    )
    ap.add_argument("--json", default="benchmarks/out/suite.json")
    ap.add_argument("--md", default=None, help="markdown table (default: next to --json)")
    a = ap.parse_args(argv)
    size = "tiny" if a.tiny else "cpu" if a.cpu else "quick" if a.quick else "full"
    sz = dict(SIZES[size])
    if a.replicas:
        sz["R"] = sorted(a.replicas)
        fits = [r for r in sz["R"] if r <= sz["R_strat"]]
        sz["R_strat"] = max(fits) if fits else sz["R"][0]  # where every strategy is timed
    if a.tangents:
        sz["ks"] = sorted(a.tangents)
    from chaosjax.sharding import device_memory_limit

    limit = device_memory_limit()
    dev = jax.devices()[0]
    result = {
        "size": size,
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "models": {},
    }
    t0 = time.perf_counter()
    for name in a.models:
        tm, desc = build(name, size)
        m = {"description": desc}
        m["throughput"] = throughput(tm, sz, limit, a.all_strategies)
        m["tangents"] = tangent_cost(tm, sz)
        m["curvature"] = curvature_cost(tm, sz)
        m["sharded"] = sharded(tm, sz)
        result["models"][name] = m
        print(f"{name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    if a.pyhessian:
        result["pyhessian"] = pyhessian_anchor(a.tiny)
    result["total_s"] = time.perf_counter() - t0
    from chaosjax._util import environment_info

    result["environment"] = environment_info()
    text = markdown(result)
    print(text)
    write_json(a.json, "suite", [], result)
    md = Path(a.md) if a.md else Path(a.json).with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    print(f"wrote {a.json} and {md}")
    return result


if __name__ == "__main__":
    main()
