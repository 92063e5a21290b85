import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from chaosjax import models


def test_pure_mlp_danovski_sizes():
    net = models.PureMLP((4, 10, 3), activation="sigmoid", init="normal")
    p = net.init_params(jax.random.PRNGKey(0))
    sizes = {k: {n: a.size for n, a in v.items()} for k, v in p.items()}
    assert sum(sum(v.values()) for v in sizes.values()) == 83
    assert p["layer_0"]["kernel"].size + p["layer_1"]["kernel"].size == 70
    np.testing.assert_array_equal(p["layer_0"]["bias"], 0)
    assert net.apply(p, jnp.ones((5, 4))).shape == (5, 3)
    soft = models.PureMLP((4, 10, 3), activation="sigmoid", output="softmax")
    np.testing.assert_allclose(soft.apply(p, jnp.ones((5, 4))).sum(-1), 1.0, rtol=1e-12)


def test_init_scales():
    key = jax.random.PRNGKey(1)
    w = models.PureMLP((400, 300, 1), init="lecun", init_scale=2.0).init_params(key)["layer_0"][
        "kernel"
    ]
    assert abs(float(w.std()) - 2.0 / np.sqrt(400)) < 0.01
    w = models.PureMLP((400, 300, 1), init="normal").init_params(key)["layer_0"]["kernel"]
    assert abs(float(w.std()) - 1.0) < 0.02


def test_nnx_mlp_matches_pure_function_with_same_weights():
    m = models.MLP((3, 7, 2), activation="tanh", rngs=nnx.Rngs(0), dtype=jnp.float64)
    pure = models.PureMLP((3, 7, 2), activation="tanh")
    p = {
        f"layer_{i}": {"kernel": m.layers[i].kernel[...], "bias": m.layers[i].bias[...]}
        for i in range(2)
    }
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    np.testing.assert_allclose(m(x), pure.apply(p, x), rtol=1e-12)
    assert [f.shape for f in m.features(x)] == [(4, 7)]


def test_cnn_equals_its_documented_layers():
    """Two 3×3 SAME convolutions, each with the activation and a 2×2 average pool, then a
    dense layer: the module's output equals that computation written with lax."""
    c = models.CNN((8, 8, 1), 10, channels=(4, 8), rngs=nnx.Rngs(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 64), jnp.float64)
    h = x.reshape(3, 8, 8, 1)
    for conv in c.convs:
        h = jax.lax.conv_general_dilated(
            h, conv.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h + conv.bias[...])
        n, hh, ww, ch = h.shape
        h = h.reshape(n, hh // 2, 2, ww // 2, 2, ch).mean(axis=(2, 4))
    want = h.reshape(3, -1) @ c.head.kernel[...] + c.head.bias[...]
    got = c(x)
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="activation: unknown 'nope'"):
        models.CNN((8, 8, 1), 10, activation="nope", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: models.PureMLP((4,)), "widths"),
        (lambda: models.PureMLP((4, 3), activation="swish2"), "activation"),
        (lambda: models.PureMLP((4, 3), init="orthogonal"), "init"),
        (lambda: models.PureMLP((4, 5, 3), init_scale=(1.0,)), "init_scale"),
        (lambda: models.MLP((4, 3), activation="nope", rngs=nnx.Rngs(0)), "activation"),
    ],
)
def test_bad_model_arguments(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


@pytest.mark.parametrize("preset", ["instability-generalization", "lr-regimes"])
def test_cli_and_api_build_one_network(preset):
    """The command line (NNX MLP from the config) and the API (PureMLP) give equal initial
    parameters, and so equal outputs, for the same config and seed."""
    from chaosjax.experiments import load_plan
    from chaosjax.experiments.builders import build_dataset, build_training_map

    cfg = load_plan(preset)[0][1]
    ds = build_dataset(cfg)
    dtype = jnp.float64 if cfg.precision == "float64" else jnp.float32
    cli = build_training_map(cfg, ds)
    m = cfg.model
    pure = models.PureMLP(
        (ds.n_features, *m.hidden, ds.n_outputs),
        activation=m.activation,
        init=tuple(m.init) if len(m.init) > 1 else m.init[0],
        init_scale=tuple(m.init_scale) if len(m.init_scale) > 1 else m.init_scale[0],
        bias=m.bias,
        output_bias=m.output_bias,
    )
    p = pure.init_params(jax.random.PRNGKey(cfg.replicas.seeds[0]), dtype)
    state = cli.init()
    got = cli.params(state)
    kernels = [np.asarray(a) for a in jax.tree.leaves(got) if np.ndim(a) == 2]
    want = [np.asarray(p[f"layer_{i}"]["kernel"]) for i in range(len(p))]
    assert len(kernels) == len(want) >= 2
    for a, b in zip(kernels, want, strict=True):
        np.testing.assert_array_equal(a, b)
    x = jnp.asarray(ds.x_train[:16], dtype)
    np.testing.assert_allclose(cli.output(state, x), pure.apply(p, x), rtol=1e-12, atol=1e-14)
