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
``one_point``          1 / 1          1           (1, 1) regression       x = 1, y = 1 (uv model)
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
        x_train: inputs, shape (n_train, ...): rows (n, features), images (n, H, W, C), token
            ids (n, length) — any shape; integer inputs (token ids) stay integers.
        y_train: integer labels (n_train,) for classification, or targets (n_train, outputs).
        x_test: held-out inputs, shape (n_test, ...) (n_test may be 0: no test split).
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
        """Entries of one input (features of a row; H·W·C of an image)."""
        return int(np.prod(self.x_train.shape[1:], dtype=np.int64))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the example axis)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def has_test(self) -> bool:
        """True when there is a held-out split."""
        return int(self.x_test.shape[0]) > 0

    @classmethod
    def from_arrays(
        cls,
        x_train,
        y_train,
        x_test=None,
        y_test=None,
        *,
        task: str | None = None,
        n_classes: int | None = None,
        name: str = "custom",
    ) -> Dataset:
        """A dataset from your own arrays.

        Args:
            x_train: inputs (n, ...) of any shape: rows, images (n, H, W, C), token ids
                (integers stay integers, for embeddings).
            y_train: integer labels (n,) (classification) or float targets (n,) or (n, outputs)
                (regression; (n,) becomes (n, 1)).
            x_test, y_test: an optional held-out split (both or neither); without it the test
                metrics of a run are NaN.
            task: ``"classification"`` or ``"regression"``; default inferred: integer labels →
                classification, floats → regression.
            n_classes: classes of a classification task (default: the largest label + 1).
            name: the dataset's name in reports.

        Raises:
            ValueError / TypeError naming the field: mismatched lengths, NaN or infinite values,
            labels that are not integers for a classification task, negative labels.
        """
        x_train, y_train = _array("x_train", x_train), _array("y_train", y_train)
        if (x_test is None) != (y_test is None):
            raise ValueError("x_test: give x_test and y_test together, or neither")
        if x_test is None:
            x_test = np.zeros((0, *x_train.shape[1:]), x_train.dtype)
            y_test = np.zeros((0, *y_train.shape[1:]), y_train.dtype)
        x_test, y_test = _array("x_test", x_test), _array("y_test", y_test)
        for xs, ys, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
            if xs.shape[0] != ys.shape[0]:
                raise ValueError(
                    f"y_{split}: {ys.shape[0]} targets for {xs.shape[0]} inputs in x_{split}"
                )
        if x_train.shape[0] < 1:
            raise ValueError("x_train: needs at least one example")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"x_test: inputs of shape {x_test.shape[1:]} differ from x_train's {x_train.shape[1:]}"
            )
        if x_train.dtype.kind not in "fiu" or x_test.dtype.kind not in "fiu":
            raise TypeError(
                f"x_train: inputs must be numbers (float, or integer token ids), got {x_train.dtype}"
            )
        for arr, field in ((x_train, "x_train"), (x_test, "x_test")):
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ValueError(f"{field}: contains NaN or infinite values")
        int_labels = y_train.dtype.kind in "iu"
        if task is None:
            task = "classification" if int_labels else "regression"
        if task not in ("classification", "regression"):
            raise ValueError(f"task: unknown {task!r}; allowed: classification, regression")
        if task == "classification":
            if not int_labels or y_test.dtype.kind not in "iu":
                raise TypeError(
                    f"y_train: a classification task needs integer labels, got {y_train.dtype}"
                )
            if y_train.ndim != 1 or y_test.ndim != 1:
                raise ValueError(f"y_train: labels must have shape (n,), got {y_train.shape}")
            both = np.concatenate([y_train, y_test])
            if both.size and both.min() < 0:
                raise ValueError("y_train: labels must be >= 0")
            k = int(both.max()) + 1 if n_classes is None else int(n_classes)
            if both.size and both.max() >= k:
                raise ValueError(f"n_classes: labels reach {int(both.max())}, got n_classes={k}")
            y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
        else:
            if y_train.dtype.kind != "f":
                y_train, y_test = y_train.astype(np.float64), y_test.astype(np.float64)
            for arr, field in ((y_train, "y_train"), (y_test, "y_test")):
                if not np.isfinite(arr).all():
                    raise ValueError(f"{field}: contains NaN or infinite values")
            if y_train.ndim == 1:
                y_train, y_test = y_train[:, None], y_test[:, None]
            k = 0
        if x_train.dtype.kind == "f":
            x_test = x_test.astype(x_train.dtype)
        return cls(name, x_train, y_train, x_test, y_test, task, k)

    @classmethod
    def from_npz(cls, path, *, task: str | None = None, name: str | None = None) -> Dataset:
        """A dataset from an ``.npz`` file with keys ``x_train``, ``y_train`` and optionally
        ``x_test``, ``y_test`` (the checks of :meth:`from_arrays`)."""
        import os

        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise FileNotFoundError(f"data.path: no such file {path}") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"data.path: {path} is not a readable .npz file ({e})") from None
        missing = [k for k in ("x_train", "y_train") if k not in arrays]
        if missing:
            raise ValueError(
                f"data.path: {path} lacks {', '.join(missing)}; keys found: {sorted(arrays)}"
            )
        extra = sorted(set(arrays) - {"x_train", "y_train", "x_test", "y_test"})
        if extra:
            raise ValueError(
                f"data.path: unknown keys {extra} in {path}; allowed: x_train, y_train, x_test, y_test"
            )
        stem = os.path.splitext(os.path.basename(path))[0]
        return cls.from_arrays(
            arrays["x_train"],
            arrays["y_train"],
            arrays.get("x_test"),
            arrays.get("y_test"),
            task=task,
            name=name or stem,
        )

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
        """Inputs shifted and scaled by the *training* mean and std (constant features kept;
        float inputs only)."""
        if self.x_train.dtype.kind != "f":
            raise TypeError("standardize: integer inputs (token ids) cannot be standardised")
        mu = self.x_train.mean(0)
        sd = self.x_train.std(0)
        sd = np.where(sd > 0, sd, 1.0)
        return dataclasses.replace(
            self, x_train=(self.x_train - mu) / sd, x_test=(self.x_test - mu) / sd
        )

    def astype(self, dtype) -> Dataset:
        """Float inputs (and regression / one-hot targets) cast to ``dtype``; integer inputs
        (token ids) and integer labels kept."""
        out = {}
        if self.y_train.dtype.kind == "f":
            out = {"y_train": self.y_train.astype(dtype), "y_test": self.y_test.astype(dtype)}
        if self.x_train.dtype.kind == "f":
            out.update(x_train=self.x_train.astype(dtype), x_test=self.x_test.astype(dtype))
        return dataclasses.replace(self, **out)

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


def _array(name: str, a) -> np.ndarray:
    try:
        out = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: not an array ({e})") from None
    if out.ndim == 0:
        raise ValueError(f"{name}: expected an array with an example axis, got a scalar")
    if out.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got dtype object")
    return out


def _split(name, x, y, test_fraction, seed, task, n_classes, standardize, n_test=None):
    n = x.shape[0]
    if n_test is not None:
        n_test = _check_count("n_test", n_test, 1)
        if n_test >= n:
            raise ValueError(f"n_test: must be < {n} (the examples), got {n_test}")
    else:
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


def digits(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_test: int | None = None,
    standardize: bool = False,
    images: bool = False,
) -> Dataset:
    """8×8 handwritten digits (scikit-learn's copy of the UCI set), 1797 samples, 10 classes.

    Pixel values 0–16 are scaled to [0, 1] (or standardised with ``standardize=True``).
    ``n_test`` splits by count (e.g. 497 for 1300 / 497) instead of ``test_fraction``;
    ``images=True`` gives (n, 8, 8, 1) images for convolutional networks.
    """
    with resources.files("chaosjax").joinpath("data/digits.npz").open("rb") as f:
        d = np.load(f)
        x = d["images"].astype(np.float64) / 16.0
        y = d["labels"].astype(np.int32)
    ds = _split("digits", x, y, test_fraction, seed, "classification", 10, standardize, n_test)
    if images:
        ds = dataclasses.replace(
            ds, x_train=ds.x_train.reshape(-1, 8, 8, 1), x_test=ds.x_test.reshape(-1, 8, 8, 1)
        )
    return ds


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


def one_point(x: float = 1.0, y: float = 1.0) -> Dataset:
    """A single example (x, y): the data of the uv model (a two-layer linear network of width
    one, f = u·v·x) whose gradient descent doubles its period on the way to chaos as η grows
    (Kalra, He, Barkeshli 2023). The test split is the same point."""
    a, b = np.asarray([[float(x)]]), np.asarray([[float(y)]])
    return Dataset("one_point", a, b, a.copy(), b.copy(), "regression", 0)


def modular_addition(p: int = 23, *, train_fraction: float = 0.4, seed: int = 0) -> Dataset:
    """Power et al.'s algorithmic task: every pair (a, b) of residues mod p as the token
    sequence [a, b, p] (p is the "=" token; vocabulary p + 1) with label (a + b) mod p.

    The p² pairs are shuffled with ``seed`` and the first ``train_fraction`` of them train;
    the rest is the test split (the generalisation a grokking run reaches late).

    Shapes: x (n, 3) int32 token ids, y (n,) int32 labels in [0, p).
    """
    p = _check_count("p", p, 2)
    if not 0.0 < float(train_fraction) < 1.0:
        raise ValueError(f"train_fraction: must be in (0, 1), got {train_fraction!r}")
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    x = np.stack([a.ravel(), b.ravel(), np.full(p * p, p)], axis=1).astype(np.int32)
    y = ((a + b) % p).ravel().astype(np.int32)
    order = np.random.default_rng(seed).permutation(p * p)
    n_train = max(1, min(p * p - 1, round(float(train_fraction) * p * p)))
    tr, te = order[:n_train], order[n_train:]
    return Dataset(f"mod{p}-addition", x[tr], y[tr], x[te], y[te], "classification", p)


LOADERS = {
    "iris": iris,
    "digits": digits,
    "two_moons": two_moons,
    "circles": circles,
    "blobs": blobs,
    "teacher_student": teacher_student,
    "chebyshev": chebyshev,
    "modular_addition": modular_addition,
    "one_point": one_point,
}


from_arrays = Dataset.from_arrays
from_npz = Dataset.from_npz


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
    "from_arrays",
    "from_npz",
    "iris",
    "load",
    "modular_addition",
    "one_point",
    "teacher_student",
    "two_moons",
]
