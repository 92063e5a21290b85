"""Datasets, all generated or shipped with the package (no network).

Every loader returns a :class:`Dataset` with a fixed train/test split chosen by ``seed``.
Inputs are float arrays of shape (n, features); classification targets are integer labels of
shape (n,) (use :meth:`Dataset.one_hot` for MSE on classes); regression targets have shape
(n, outputs).

=====================  =============  ==========  ======================  =================
name                   train / test   features    targets                 source
=====================  =============  ==========  ======================  =================
``iris``               120 / 30       4           3 classes               scikit-learn copy
``digits``             1438 / 359     64          10 classes              scikit-learn copy
``two_moons``          n·(1−f) / n·f  2           2 classes               generated
``circles``            n·(1−f) / n·f  2           2 classes               generated
``blobs``              n·(1−f) / n·f  dim         ``centers`` classes     generated
``teacher_student``    n·(1−f) / n·f  d_in        (n, d_out) regression   generated
``chebyshev``          n / n_test     1           (n, 1) regression T_k   generated
=====================  =============  ==========  ======================  =================
"""

from __future__ import annotations

import dataclasses
import gzip
from importlib import resources

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A fixed train/test split.

    Attributes:
        name: dataset name.
        x_train: inputs, shape (n_train, features).
        y_train: integer labels (n_train,) for classification, or targets (n_train, outputs).
        x_test: held-out inputs, shape (n_test, features).
        y_test: held-out targets, shaped like ``y_train``.
        task: ``"classification"`` or ``"regression"``.
        n_classes: number of classes (classification) or 0.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    n_classes: int = 0

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.task == "classification" else int(self.y_train.shape[1])

    def one_hot(self) -> Dataset:
        """Classification targets as one-hot float rows (n, n_classes), for MSE losses."""
        if self.task != "classification":
            raise ValueError(f"one_hot: dataset {self.name!r} is a regression task")
        if self.y_train.ndim == 2:
            return self
        eye = np.eye(self.n_classes, dtype=self.x_train.dtype)
        return dataclasses.replace(self, y_train=eye[self.y_train], y_test=eye[self.y_test])

    def standardized(self) -> Dataset:
        """Inputs shifted and scaled by the *training* mean and std (constant features kept)."""
        mu = self.x_train.mean(0)
        sd = self.x_train.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        return dataclasses.replace(
            self, x_train=(self.x_train - mu) / sd, x_test=(self.x_test - mu) / sd
        )

    def astype(self, dtype) -> Dataset:
        """Inputs (and regression / one-hot targets) cast to ``dtype``; integer labels kept."""
        ys = {}
        if self.y_train.dtype.kind == "f":
            ys = {"y_train": self.y_train.astype(dtype), "y_test": self.y_test.astype(dtype)}
        return dataclasses.replace(
            self, x_train=self.x_train.astype(dtype), x_test=self.x_test.astype(dtype), **ys
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, task={self.task!r}, train={self.x_train.shape}, "
            f"test={self.x_test.shape}, n_classes={self.n_classes})"
        )


def _check_fraction(test_fraction: float) -> float:
    f = float(test_fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"test_fraction: must lie strictly between 0 and 1, got {test_fraction!r}")
    return f


def _check_count(name: str, n: int, minimum: int = 2) -> int:
    if int(n) != n or int(n) < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {n!r}")
    return int(n)


def _split(name, x, y, test_fraction, seed, task, n_classes, standardize) -> Dataset:
    n = x.shape[0]
    n_test = max(1, round(n * _check_fraction(test_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    tr, te = perm[: n - n_test], perm[n - n_test :]
    ds = Dataset(name, x[tr], y[tr], x[te], y[te], task, n_classes)
    return ds.standardized() if standardize else ds


def iris(*, seed: int = 0, n_test: int = 30, standardize: bool = False) -> Dataset:
    """Fisher's Iris (scikit-learn's copy), 150 samples, 4 raw features, 3 classes.

    Following Danovski et al. (2024) the class-sorted rows are permuted by a fixed random
    permutation (``seed``), then the first ``150 − n_test`` are training and the rest test.
    """
    raw = resources.files("chaosjax").joinpath("data/iris.csv.gz").read_bytes()
    rows = gzip.decompress(raw).decode().strip().splitlines()[1:]
    arr = np.array([[float(v) for v in r.split(",")] for r in rows])
    x, y = arr[:, :4], arr[:, 4].astype(np.int32)
    n_test = _check_count("n_test", n_test, 1)
    if n_test >= len(x):
        raise ValueError(f"n_test: must be < {len(x)}, got {n_test}")
    return _split("iris", x, y, n_test / len(x), seed, "classification", 3, standardize)


def digits(*, seed: int = 0, test_fraction: float = 0.2, standardize: bool = False) -> Dataset:
    """8×8 handwritten digits (scikit-learn's copy of the UCI set), 1797 samples, 10 classes.

    Pixel values 0–16 are scaled to [0, 1] (or standardised with ``standardize=True``).
    """
    with resources.files("chaosjax").joinpath("data/digits.npz").open("rb") as f:
        d = np.load(f)
        x = d["images"].astype(np.float64) / 16.0
        y = d["labels"].astype(np.int32)
    return _split("digits", x, y, test_fraction, seed, "classification", 10, standardize)


def two_moons(
    n: int = 200,
    *,
    noise: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = False,
) -> Dataset:
    """Two interleaving half circles in 2-D with Gaussian noise ``noise``; 2 classes."""
    n = _check_count("n", n, 4)
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t0 = np.linspace(0, np.pi, n0)
    t1 = np.linspace(0, np.pi, n - n0)
    x = np.concatenate(
        [np.stack([np.cos(t0), np.sin(t0)], 1), np.stack([1 - np.cos(t1), 0.5 - np.sin(t1)], 1)]
    )
    x = x + noise * rng.normal(size=x.shape)
    y = np.concatenate([np.zeros(n0, np.int32), np.ones(n - n0, np.int32)])
    return _split("two_moons", x, y, test_fraction, seed, "classification", 2, standardize)


def circles(
    n: int = 200,
    *,
    noise: float = 0.05,
    factor: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = False,
) -> Dataset:
    """Two concentric circles (inner radius ``factor``) with Gaussian noise; 2 classes."""
    n = _check_count("n", n, 4)
    if not 0 < factor < 1:
        raise ValueError(f"factor: must lie strictly between 0 and 1, got {factor!r}")
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t0 = np.linspace(0, 2 * np.pi, n0, endpoint=False)
    t1 = np.linspace(0, 2 * np.pi, n - n0, endpoint=False)
    x = np.concatenate(
        [np.stack([np.cos(t0), np.sin(t0)], 1), factor * np.stack([np.cos(t1), np.sin(t1)], 1)]
    )
    x = x + noise * rng.normal(size=x.shape)
    y = np.concatenate([np.zeros(n0, np.int32), np.ones(n - n0, np.int32)])
    return _split("circles", x, y, test_fraction, seed, "classification", 2, standardize)


def blobs(
    n: int = 300,
    *,
    centers: int = 3,
    dim: int = 2,
    std: float = 1.0,
    spread: float = 5.0,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = False,
) -> Dataset:
    """Isotropic Gaussian blobs: ``centers`` classes with centres uniform in [−spread, spread]^dim."""
    n = _check_count("n", n, 2)
    centers = _check_count("centers", centers, 2)
    dim = _check_count("dim", dim, 1)
    rng = np.random.default_rng(seed)
    mu = rng.uniform(-spread, spread, size=(centers, dim))
    y = np.arange(n, dtype=np.int32) % centers
    x = mu[y] + std * rng.normal(size=(n, dim))
    return _split("blobs", x, y, test_fraction, seed, "classification", centers, standardize)


def teacher_student(
    n: int = 256,
    *,
    d_in: int = 10,
    d_out: int = 1,
    teacher_width: int = 32,
    noise: float = 0.0,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Regression on the outputs of a random one-hidden-layer tanh teacher.

    x ~ N(0, I), y = W2 tanh(W1 x / sqrt(d_in)) / sqrt(width) + noise·N(0, 1); shapes
    (n, d_in) and (n, d_out).
    """
    n = _check_count("n", n, 2)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    w1 = rng.normal(size=(d_in, teacher_width))
    w2 = rng.normal(size=(teacher_width, d_out))
    y = np.tanh(x @ w1 / np.sqrt(d_in)) @ w2 / np.sqrt(teacher_width)
    y = y + noise * rng.normal(size=y.shape)
    return _split("teacher_student", x, y, test_fraction, seed, "regression", 0, False)


def chebyshev(k: int = 3, n: int = 20, *, n_test: int = 200) -> Dataset:
    """Cohen et al.'s toy regression: n points evenly spaced on [−1, 1], target T_k(x).

    The test split is a finer even grid of ``n_test`` points on the same interval.
    """
    k = _check_count("k", k, 0)
    n = _check_count("n", n, 2)
    coef = np.zeros(k + 1)
    coef[k] = 1.0
    x = np.linspace(-1.0, 1.0, n)
    xt = np.linspace(-1.0, 1.0, _check_count("n_test", n_test, 2))
    t = np.polynomial.chebyshev.chebval
    return Dataset(
        f"chebyshev-{k}-{n}",
        x[:, None],
        t(x, coef)[:, None],
        xt[:, None],
        t(xt, coef)[:, None],
        "regression",
        0,
    )


LOADERS = {
    "iris": iris,
    "digits": digits,
    "two_moons": two_moons,
    "circles": circles,
    "blobs": blobs,
    "teacher_student": teacher_student,
    "chebyshev": chebyshev,
}


def load(name: str, **kwargs) -> Dataset:
    """Load a dataset by name (see the module table), passing ``kwargs`` to its loader."""
    if name not in LOADERS:
        raise ValueError(f"dataset: unknown name {name!r}; allowed: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](**kwargs)


__all__ = [
    "LOADERS",
    "Dataset",
    "blobs",
    "chebyshev",
    "circles",
    "digits",
    "iris",
    "load",
    "teacher_student",
    "two_moons",
]
