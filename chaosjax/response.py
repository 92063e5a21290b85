"""Training response and the empirical neural tangent kernel (Nakazato 2024), and the
geometry of representations.

One SGD step with learning rate η on a sample (x, y) changes the output at a probe x′ by

    Δf(x′) = −η Θ(x′, x) ∇_f ℓ(f(x), y) + O(η²),      Θ(x′, x) = J(x′) J(x)ᵀ,

with J the Jacobian of the outputs with respect to the parameters. :func:`one_step_response`
measures Δf directly; :func:`ntk` computes Θ matrix-free (a vjp per column of J(x)ᵀ, a jvp
over the probes, vmapped and chunked — never J itself). For one hidden layer
f(x) = Σ_j v_j σ(w_j·x + b_j) + c, :func:`one_hidden_layer_ntk_terms` splits Θ analytically
into the output-layer (feature-kernel) term Σ_j σ(a_j(x)) σ(a_j(x′)) (+1 for the output bias)
and the hidden-layer term Σ_j v_j² σ′(a_j(x)) σ′(a_j(x′)) (x·x′ + 1).

References:
    Nakazato (2024). Training response of neural networks. arXiv:2405.04074.
    Jacot, Gabriel, Hongler (2018). Neural tangent kernel. NeurIPS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chaosjax._observer import Observer, Record
from chaosjax.curvature import _ravel as ravel_params
from chaosjax.models import ACTIVATIONS


def _outputs_2d(y):
    return y if y.ndim == 2 else y[:, None]


def ntk(apply_fn: Callable, params, x1, x2=None, *, chunk_size: int = 64, trace: bool = False):
    """Empirical NTK Θ(x1_i, x2_j) = J(x1_i) J(x2_j)ᵀ, matrix-free.

    Args:
        apply_fn: ``apply_fn(params, x) -> outputs`` of shape (batch, out) or (batch,).
        params: parameter pytree.
        x1: probe inputs (n1, features).
        x2: second inputs (n2, features); default ``x1``.
        chunk_size: columns of J(x2)ᵀ processed per vmap (memory ∝ chunk_size·params).
        trace: return the output-trace Σ_k Θ_kk of shape (n1, n2) instead of the full kernel.

    Returns:
        (n1, n2, out, out) kernel (or (n1, n2) with ``trace=True`` or scalar outputs).
    """
    x2 = x1 if x2 is None else x2
    flat, unravel = ravel_params(params)

    def f(p, x):
        return _outputs_2d(apply_fn(unravel(p), x))

    out = f(flat, x2[:1]).shape[-1]
    n2 = x2.shape[0]
    _, vjp2 = jax.vjp(lambda p: f(p, x2), flat)

    def column(jk):
        j, k = jk // out, jk % out
        ct = jnp.zeros((n2, out), flat.dtype).at[j, k].set(1.0)
        u = vjp2(ct)[0]  # J(x2_j, k)ᵀ in parameter space
        return jax.jvp(lambda p: f(p, x1), (flat,), (u,))[1]  # (n1, out)

    cols = []
    idx = jnp.arange(n2 * out)
    with jax.default_matmul_precision("highest"):
        for s in range(0, n2 * out, int(chunk_size)):
            cols.append(jax.vmap(column)(idx[s : s + int(chunk_size)]))
    k = jnp.concatenate(cols, axis=0)  # (n2·out, n1, out)
    k = k.reshape(n2, out, x1.shape[0], out).transpose(2, 0, 3, 1)  # (n1, n2, out_1, out_2)
    if trace or out == 1:
        return jnp.trace(k, axis1=2, axis2=3) if trace else k[..., 0, 0]
    return k


class Response(NamedTuple):
    """One-step training response at the probes.

    Attributes:
        delta_f: measured change of the outputs at the probes, (n_probe, out).
        first_order: −η Θ(x′, x) ∇_f ℓ, the linear prediction, (n_probe, out).
        response: −Δf / (η ℓ′) for scalar outputs (n_probe,), else NaN.
        loss_grad: ∇_f ℓ at the trained sample(s), (batch, out).
    """

    delta_f: jax.Array
    first_order: jax.Array
    response: jax.Array
    loss_grad: jax.Array


def one_step_response(
    apply_fn: Callable, out_loss: Callable, params, x, y, x_probe, lr: float
) -> Response:
    """Change of the outputs at ``x_probe`` after one SGD step of size ``lr`` on (x, y).

    ``out_loss(outputs, y) -> scalar`` is the loss of the batch (x, y) (e.g. the training
    map's MSE); the first-order prediction uses the same batch-mean convention.
    """
    flat, unravel = ravel_params(params)

    def f(p, xx):
        return _outputs_2d(apply_fn(unravel(p), xx))

    with jax.default_matmul_precision("highest"):
        out_x = f(flat, x)
        g_f = jax.grad(lambda o: out_loss(o, y))(out_x)  # (batch, out)
        g_p = jax.vjp(lambda p: f(p, x), flat)[1](g_f)[0]
        new = flat - lr * g_p
        delta = f(new, x_probe) - f(flat, x_probe)
        first = -lr * jax.jvp(lambda p: f(p, x_probe), (flat,), (g_p,))[1]
    resp = jnp.full(delta.shape[0], jnp.nan, delta.dtype)
    if delta.shape[1] == 1 and x.shape[0] == 1:
        resp = -delta[:, 0] / (lr * g_f[0, 0])
    return Response(delta, first, resp, g_f)


def one_hidden_layer_ntk_terms(params, x1, x2, activation: str = "tanh"):
    """Analytic NTK terms of f(x) = Σ_j v_j σ(w_j·x + b_j) + c (scalar output).

    Args:
        params: ``{"layer_0": {"kernel": (d, h), "bias": (h,)}, "layer_1": {"kernel": (h, 1),
            "bias": (1,)}}`` (the layout of :class:`chaosjax.models.PureMLP`; biases optional).
        x1, x2: inputs (n1, d) and (n2, d).

    Returns:
        ``(output_term, hidden_term)``, each (n1, n2); their sum is the NTK.
    """
    act = ACTIVATIONS[activation]
    dact = jax.vmap(jax.vmap(jax.grad(act)))
    w = params["layer_0"]["kernel"]
    b = params["layer_0"].get("bias", jnp.zeros(w.shape[1], w.dtype))
    v = params["layer_1"]["kernel"][:, 0]
    a1, a2 = x1 @ w + b, x2 @ w + b
    out_term = act(a1) @ act(a2).T
    if "bias" in params["layer_1"]:
        out_term = out_term + 1.0
    has_b = "bias" in params["layer_0"]
    inner = x1 @ x2.T + (1.0 if has_b else 0.0)
    hid = (dact(a1) * v**2) @ dact(a2).T * inner
    return out_term, hid


class PowerLaw(NamedTuple):
    """a(t) ≈ prefactor · t^(−alpha) fitted in log–log; ``r2`` of the fit."""

    alpha: float
    prefactor: float
    r2: float


def power_law_fit(t, a) -> PowerLaw:
    """Fit a(t) = c·t^(−α) on t > 0 and a > 0 by least squares in log–log (aging)."""
    t = np.asarray(t, np.float64)
    a = np.asarray(a, np.float64)
    ok = (t > 0) & (a > 0) & np.isfinite(a)
    if ok.sum() < 3:
        return PowerLaw(float("nan"), float("nan"), float("nan"))
    lt, la = np.log(t[ok]), np.log(a[ok])
    slope, icpt = np.polyfit(lt, la, 1)
    res = la - (icpt + slope * lt)
    ss = float(((la - la.mean()) ** 2).sum())
    return PowerLaw(
        float(-slope), float(math.exp(icpt)), 1 - float(res @ res) / ss if ss > 0 else 0.0
    )


def kernel_shape_correlation(k, k_ref) -> float:
    """Pearson correlation of two kernels' entries (shape similarity, scale-free)."""
    a, b = np.ravel(np.asarray(k, np.float64)), np.ravel(np.asarray(k_ref, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"k: shape {np.shape(k)} differs from k_ref {np.shape(k_ref)}")
    return float(np.corrcoef(a, b)[0, 1])


def participation_ratio(x) -> float:
    """Participation ratio (Σλ)²/Σλ² of the covariance spectrum of representations x
    (samples, features): between 1 (one direction) and the number of features (isotropic).
    For a Gram or kernel matrix use :func:`gram_participation_ratio`."""
    ev = _cov_spectrum(x)
    s = ev.sum()
    return float(s * s / (ev @ ev)) if s > 0 else float("nan")


def effective_rank(x) -> float:
    """Entropy effective rank exp(−Σ p log p), p = λ/Σλ, of the covariance spectrum of x (n, d)."""
    ev = _cov_spectrum(x)
    p = ev / ev.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _cov_spectrum(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"x: expected (samples, features), got shape {x.shape}")
    x = x - x.mean(axis=0)
    ev = np.linalg.svd(x, compute_uv=False) ** 2 / max(x.shape[0] - 1, 1)
    return np.clip(ev, 0.0, None)


def gram_participation_ratio(k) -> float:
    """Participation ratio of the eigenvalues of a symmetric PSD Gram matrix (e.g. the NTK)."""
    ev = np.clip(np.linalg.eigvalsh(np.asarray(k, np.float64)), 0.0, None)
    return float(ev.sum() ** 2 / (ev @ ev)) if ev.sum() > 0 else float("nan")


class Fragility(NamedTuple):
    """Mean output change per unit perturbation: ``input`` (‖Δf‖/‖δx‖) and ``weight``
    (‖Δf‖/‖δθ‖), over ``n`` random perturbations of size ``eps``."""

    input: float
    weight: float


def fragility(
    apply_fn: Callable, params, x, *, eps: float = 1e-4, n: int = 16, key=None
) -> Fragility:
    """Output sensitivity to small random input and weight perturbations (finite differences)."""
    key = jax.random.PRNGKey(0) if key is None else key
    flat, unravel = ravel_params(params)
    f0 = _outputs_2d(apply_fn(params, x))
    kx, kw = jax.random.split(key)

    def d_input(k):
        d = jax.random.normal(k, x.shape, x.dtype)
        d = eps * d / jnp.linalg.norm(d, axis=1, keepdims=True)
        return jnp.mean(jnp.linalg.norm(_outputs_2d(apply_fn(params, x + d)) - f0, axis=1) / eps)

    def d_weight(k):
        d = jax.random.normal(k, flat.shape, flat.dtype)
        d = eps * d / jnp.linalg.norm(d)
        return (
            jnp.mean(jnp.linalg.norm(_outputs_2d(apply_fn(unravel(flat + d), x)) - f0, axis=1))
            / eps
        )

    fi = jax.vmap(d_input)(jax.random.split(kx, n)).mean()
    fw = jax.vmap(d_weight)(jax.random.split(kw, n)).mean()
    return Fragility(float(fi), float(fw))


def _trace_pr(k):
    """(Σλ)²/Σλ² of a symmetric PSD matrix as (tr K)²/‖K‖_F² — no eigendecomposition, so it is
    cheap inside vmapped, jitted trackers."""
    return jnp.trace(k) ** 2 / jnp.sum(k * k)


@dataclasses.dataclass(frozen=True)
class ResponseTracker(Observer):
    """Track the training response of every replica at each record of :func:`run_replicas`.

    On the first ``n_probes`` training inputs, from the stacked output gradients
    G = [∇_θ f_k(x_i)] (one vjp per probe and output; memory n_probes·out·n_params):

    * ``ntk_amplitude``: A(t) = ⟨Θ_t(x, x)⟩ (mean over probes of the output-traced diagonal);
    * ``ntk_shape_corr``: correlation of Θ_t with Θ at the first record (shape change);
    * ``ntk_pr``: participation ratio of the Θ_t Gram matrix (kernel rank);
    * ``feature_pr``: participation ratio of the last hidden layer's representation of the
      probes (NaN without a features function);
    * ``ntk_layer_amplitude`` (layers,): A(t) split by parameter layer — for one hidden
      layer the last entry is the output-layer (feature-kernel) term and the first the
      hidden-layer term (see :func:`one_hidden_layer_ntk_terms`).

    ``rows``: the replicas tracked, ``"all"`` or ``"references"`` (NaN rows for the others).
    """

    n_probes: int = 32
    rows: str = "all"

    requires = ("outputs",)

    def records(self, model) -> dict[str, Record]:
        names = ("ntk_amplitude", "ntk_shape_corr", "ntk_pr", "feature_pr")
        out = {name: Record("step") for name in names}
        out["ntk_layer_amplitude"] = Record("step", ("layer",))
        return out

    def validate(self, tmap, dim=None, info=None) -> None:
        if self.rows not in ("all", "references"):
            raise ValueError(f"rows: unknown {self.rows!r}; allowed: all, references")
        n = int(tmap.data["x_train"].shape[0])
        if int(self.n_probes) != self.n_probes or not 2 <= self.n_probes <= n:
            raise ValueError(f"n_probes: must be an integer in [2, {n}], got {self.n_probes!r}")

    def _one(self, tmap, state, kref):
        x = tmap.data["x_train"][: self.n_probes]

        def f(p):
            return _outputs_2d(tmap.output_of_params(tmap.unravel_params(p), x, state))

        p = tmap.flat_params(state)
        out, vjp = jax.vjp(f, p)
        n, o = out.shape
        eye = jnp.eye(n * o, dtype=p.dtype).reshape(n * o, n, o)
        with jax.default_matmul_precision("highest"):
            g = jax.vmap(lambda ct: vjp(ct)[0])(eye).reshape(n, o, -1)  # (n, out, P)
            k = jnp.einsum("iop,jop->ij", g, g)
        layers = jnp.stack(
            [jnp.mean(jnp.sum(g[..., a:b] ** 2, axis=(1, 2))) for a, b in tmap.layers.values()]
        )
        if tmap.features_fn is not None:
            h = tmap.features(state, x)[-1]
            h = h - h.mean(axis=0)
            fpr = _trace_pr(h.T @ h)
        else:
            fpr = jnp.full((), jnp.nan, p.dtype)
        kref = k if kref is None else kref
        kc, rc = k - k.mean(), kref - kref.mean()
        corr = jnp.sum(kc * rc) / jnp.sqrt(jnp.sum(kc**2) * jnp.sum(rc**2))
        values = {
            "ntk_amplitude": jnp.mean(jnp.diagonal(k)),
            "ntk_shape_corr": corr,
            "ntk_pr": _trace_pr(k),
            "feature_pr": fpr,
            "ntk_layer_amplitude": layers,
        }
        return values, kref

    def init(self, tmap, states, hparams, t):
        return jax.vmap(lambda s: self._one(tmap, s, None))(states)

    def update(self, tmap, states, hparams, kref, t):
        return jax.vmap(lambda s, kr: self._one(tmap, s, kr))(states, kref)


__all__ = [
    "Fragility",
    "PowerLaw",
    "Response",
    "ResponseTracker",
    "effective_rank",
    "fragility",
    "gram_participation_ratio",
    "kernel_shape_correlation",
    "ntk",
    "one_hidden_layer_ntk_terms",
    "one_step_response",
    "participation_ratio",
    "power_law_fit",
]
