"""Reference maps with known answers.

Every system is a registered pytree with ``.step(x, t) -> x`` and a default initial state
``.x0``; the analyses of chaosjax take any such step, so a Hénon map and a training step are
treated alike. Flows (Lorenz-63, Lorenz-96) are stepped by one classical RK4 step of size
``dt``: their exponents per step divided by ``dt`` are per unit time.

Known values (used by the tests):

* logistic r=4: λ = ln 2.
* Hénon (1.4, 0.3): (0.4194, −1.6234), λ1 + λ2 = ln 0.3 exactly.
* standard map: λ1 + λ2 = 0 (area preserving).
* Lorenz-63 (10, 28, 8/3): (0.906, 0, −14.57) per unit time, sum −(σ + 1 + β) = −13.667.
* Lorenz-96 N=40 F=8: λ1 ≈ 1.68–1.70, 13 positive, sum −N = −40 per unit time.
* linear map A and GD on ½θᵀAθ: exponents log|eig| and log|1 − η a_i|.

References:
    Hénon, M. (1976). A two-dimensional mapping with a strange attractor.
    Lorenz, E. N. (1963). Deterministic nonperiodic flow.
    Lorenz, E. N. (1996). Predictability: a problem partly solved.
    Chirikov, B. V. (1979). A universal instability of many-dimensional oscillator systems.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


def _system(*, data: tuple[str, ...] = ()):
    """Frozen dataclass registered as a pytree: ``data`` fields are leaves, the rest static.

    Unflattening bypasses ``__init__`` so that validation in ``__post_init__`` never sees
    tracers or placeholder leaves.
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        meta = tuple(f for f in fields if f not in data)

        def flatten(obj):
            children = tuple((jax.tree_util.GetAttrKey(k), getattr(obj, k)) for k in data)
            return children, tuple(getattr(obj, k) for k in meta)

        def unflatten(aux, children):
            obj = object.__new__(cls)
            for k, v in zip(meta, aux):
                object.__setattr__(obj, k, v)
            for k, v in zip(data, children):
                object.__setattr__(obj, k, v)
            return obj

        jax.tree_util.register_pytree_with_keys(cls, flatten, unflatten)
        return cls

    return wrap


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}")
    return value


def _rk4(f, x, dt):
    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


@_system()
class Logistic:
    """Logistic map x → r x (1 − x), state shape (1,). At r = 4, λ = ln 2."""

    r: float = 4.0
    x0_value: float = 0.3
    name: ClassVar[str] = "logistic"

    def __post_init__(self):
        if not 0 < float(self.r) <= 4:
            raise ValueError(f"r: must lie in (0, 4], got {self.r!r}")

    @property
    def x0(self) -> jax.Array:
        return jnp.array([self.x0_value])

    def step(self, x, t):
        return self.r * x * (1.0 - x)


@_system()
class Henon:
    """Hénon map (x, y) → (1 − a x² + y, b x), state shape (2,). |det J| = b everywhere."""

    a: float = 1.4
    b: float = 0.3
    name: ClassVar[str] = "henon"

    @property
    def x0(self) -> jax.Array:
        return jnp.array([0.1, 0.1])

    def step(self, x, t):
        return jnp.stack([1.0 - self.a * x[0] ** 2 + x[1], self.b * x[0]])


@_system()
class StandardMap:
    """Chirikov standard map (θ, p) → (θ + p′, p′) mod 2π with p′ = p + K sin θ; area preserving."""

    k: float = 6.0
    name: ClassVar[str] = "standard_map"

    @property
    def x0(self) -> jax.Array:
        return jnp.array([0.5, 0.3])

    def step(self, x, t):
        two_pi = 2.0 * jnp.pi
        p = jnp.mod(x[1] + self.k * jnp.sin(x[0]), two_pi)
        theta = jnp.mod(x[0] + p, two_pi)
        return jnp.stack([theta, p])


@_system(data=("matrix",))
class LinearMap:
    """Constant linear map x → A x, state shape (n,). Exponents are log|eig(A)| (for A normal
    or triangular: the log moduli of the eigenvalues, sorted)."""

    matrix: jax.Array = dataclasses.field(
        default_factory=lambda: jnp.array([[2.0, 1.0], [0.0, 0.5]])
    )
    name: ClassVar[str] = "linear_map"

    def __post_init__(self):
        a = jnp.asarray(self.matrix)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"matrix: must be a square 2-D array, got shape {a.shape}")
        object.__setattr__(self, "matrix", a)

    @property
    def x0(self) -> jax.Array:
        n = self.matrix.shape[0]
        return jnp.ones((n,), self.matrix.dtype) / np.sqrt(n)

    def step(self, x, t):
        return self.matrix @ x

    def exact_exponents(self) -> np.ndarray:
        """log|λ_i(A)| sorted descending (the Lyapunov spectrum of a constant map)."""
        ev = np.linalg.eigvals(np.asarray(self.matrix, dtype=np.float64))
        return np.sort(np.log(np.abs(ev)))[::-1]


@_system()
class Lorenz63:
    """Lorenz-63 flow stepped by one RK4 step of size ``dt``; state shape (3,)."""

    sigma: float = 10.0
    rho: float = 28.0
    beta: float = 8.0 / 3.0
    dt: float = 0.01
    name: ClassVar[str] = "lorenz63"

    def __post_init__(self):
        _positive("dt", self.dt)

    @property
    def x0(self) -> jax.Array:
        return jnp.array([1.0, 1.0, 1.0])

    def vector_field(self, x):
        return jnp.stack(
            [
                self.sigma * (x[1] - x[0]),
                x[0] * (self.rho - x[2]) - x[1],
                x[0] * x[1] - self.beta * x[2],
            ]
        )

    def step(self, x, t):
        return _rk4(self.vector_field, x, self.dt)


@_system()
class Lorenz96:
    """Lorenz-96 flow dx_i/dt = (x_{i+1} − x_{i−2}) x_{i−1} − x_i + F, RK4 step ``dt``; shape (n,)."""

    n: int = 40
    forcing: float = 8.0
    dt: float = 0.01
    name: ClassVar[str] = "lorenz96"

    def __post_init__(self):
        _positive("dt", self.dt)
        if int(self.n) < 4:
            raise ValueError(f"n: must be >= 4, got {self.n!r}")

    @property
    def x0(self) -> jax.Array:
        return jnp.full((self.n,), self.forcing).at[0].add(0.01)

    def vector_field(self, x):
        return (jnp.roll(x, -1) - jnp.roll(x, 2)) * jnp.roll(x, 1) - x + self.forcing

    def step(self, x, t):
        return _rk4(self.vector_field, x, self.dt)


@_system(data=("matrix",))
class QuadraticGD:
    """Gradient descent θ → θ − η A θ on the loss ½θᵀAθ; state shape (n,).

    The Lyapunov spectrum is exactly log|1 − η a_i| (a_i the eigenvalues of symmetric A) and
    the covariant vectors are A's eigenvectors. Build with a matrix, or with ``eigenvalues``
    and a ``seed`` for a random orthogonal basis.
    """

    matrix: jax.Array | None = None
    learning_rate: float = 0.1
    eigenvalues: tuple[float, ...] | None = None
    seed: int = 0
    name: ClassVar[str] = "quadratic_gd"

    def __post_init__(self):
        _positive("learning_rate", self.learning_rate)
        if self.matrix is None:
            ev = np.asarray(
                self.eigenvalues if self.eigenvalues is not None else (1.0, 5.0, 12.0, 25.0)
            )
            q, _ = np.linalg.qr(np.random.default_rng(self.seed).normal(size=(ev.size, ev.size)))
            a = (q * ev) @ q.T
            a = 0.5 * (a + a.T)
            object.__setattr__(self, "matrix", jnp.asarray(a))
            object.__setattr__(self, "eigenvalues", tuple(float(e) for e in ev))
        else:
            a = jnp.asarray(self.matrix)
            if a.ndim != 2 or a.shape[0] != a.shape[1]:
                raise ValueError(f"matrix: must be a square 2-D array, got shape {a.shape}")
            if not np.allclose(np.asarray(a), np.asarray(a).T):
                raise ValueError("matrix: must be symmetric (the Hessian of ½θᵀAθ)")
            object.__setattr__(self, "matrix", a)

    @property
    def x0(self) -> jax.Array:
        n = self.matrix.shape[0]
        return jnp.ones((n,), self.matrix.dtype)

    def loss(self, theta):
        return 0.5 * theta @ (self.matrix @ theta)

    def step(self, x, t):
        return x - self.learning_rate * (self.matrix @ x)

    def exact_exponents(self) -> np.ndarray:
        """log|1 − η a_i| sorted descending."""
        ev = np.linalg.eigvalsh(np.asarray(self.matrix, dtype=np.float64))
        return np.sort(np.log(np.abs(1.0 - self.learning_rate * ev)))[::-1]


logistic = Logistic
henon = Henon
standard_map = StandardMap
linear_map = LinearMap
lorenz63 = Lorenz63
lorenz96 = Lorenz96
quadratic_gd = QuadraticGD
"""Build a :class:`QuadraticGD`."""

__all__ = [
    "Henon",
    "LinearMap",
    "Logistic",
    "Lorenz63",
    "Lorenz96",
    "QuadraticGD",
    "StandardMap",
    "henon",
    "linear_map",
    "logistic",
    "lorenz63",
    "lorenz96",
    "quadratic_gd",
    "standard_map",
]
