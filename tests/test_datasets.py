import numpy as np
import pytest

from chaosjax import datasets


@pytest.mark.parametrize(
    "name, kwargs, n_train, n_test, features, n_classes",
    [
        ("iris", {}, 120, 30, 4, 3),
        ("digits", {}, 1438, 359, 64, 10),
        ("two_moons", {"n": 100}, 80, 20, 2, 2),
        ("circles", {"n": 100}, 80, 20, 2, 2),
        ("blobs", {"n": 90, "centers": 3, "dim": 5}, 72, 18, 5, 3),
        ("teacher_student", {"n": 50, "d_in": 7, "d_out": 2}, 40, 10, 7, 0),
        ("chebyshev", {"k": 3, "n": 20}, 20, 200, 1, 0),
    ],
)
def test_shapes_offline(name, kwargs, n_train, n_test, features, n_classes):
    ds = datasets.load(name, **kwargs)
    assert ds.x_train.shape == (n_train, features)
    assert ds.x_test.shape == (n_test, features)
    assert ds.n_classes == n_classes
    if n_classes:
        assert ds.y_train.shape == (n_train,) and ds.y_train.dtype.kind == "i"
        assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) <= set(range(n_classes))
        oh = ds.one_hot()
        assert oh.y_train.shape == (n_train, n_classes)
        np.testing.assert_array_equal(oh.y_train.argmax(1), ds.y_train)
    else:
        assert ds.y_train.shape[0] == n_train and ds.y_train.ndim == 2
    assert np.all(np.isfinite(ds.x_train))


def test_iris_is_the_scikit_learn_copy_permuted():
    ds = datasets.iris()
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    # class counts 50/50/50 and the well-known feature means of Fisher's data
    np.testing.assert_array_equal(np.bincount(y), [50, 50, 50])
    np.testing.assert_allclose(x.mean(0), [5.8433, 3.0573, 3.7580, 1.1993], atol=1e-3)
    # the fixed permutation mixes classes into the test split
    assert len(np.unique(ds.y_test)) == 3


def test_digits_pixels_scaled():
    ds = datasets.digits()
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).sum() == 1797


def test_split_is_fixed_by_seed():
    a, b, c = datasets.two_moons(seed=3), datasets.two_moons(seed=3), datasets.two_moons(seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_train, c.x_train)


def test_standardize_uses_training_statistics():
    ds = datasets.digits(standardize=True)
    np.testing.assert_allclose(ds.x_train.mean(0), 0, atol=1e-10)
    sd = ds.x_train.std(0)
    assert np.all((np.abs(sd - 1) < 1e-10) | (sd == 0))


def test_chebyshev_targets():
    ds = datasets.chebyshev(3, 20)
    x = ds.x_train[:, 0]
    np.testing.assert_allclose(ds.y_train[:, 0], 4 * x**3 - 3 * x, atol=1e-12)
    np.testing.assert_allclose(np.diff(x), 2 / 19)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda: datasets.load("mnist"), "dataset: unknown name 'mnist'"),
        (lambda: datasets.two_moons(test_fraction=1.5), "test_fraction"),
        (lambda: datasets.iris(n_test=200), "n_test"),
        (lambda: datasets.circles(factor=2.0), "factor"),
        (lambda: datasets.teacher_student(n=1), "n:"),
    ],
)
def test_bad_arguments(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()
