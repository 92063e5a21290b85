"""Models: Flax NNX MLP and small CNN, and a pure-function MLP for the smallest cases.

Parameter names follow Flax (``kernel`` for weight matrices, ``bias``), so the training map can
tell weights from biases (Danovski et al. perturb weights only) and group them by layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS: dict[str, Callable] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "identity": lambda x: x,
}

INITS = ("lecun", "xavier", "he", "normal", "uniform")


def activation(name: str) -> Callable:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# the constructors below take a parameter named ``activation``: they look names up through this
_activation_of = activation


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(widths)
    if len(widths) < 2 or any(int(w) != w or w < 1 for w in widths):
        raise ValueError(
            f"widths: need at least (inputs, outputs), all positive integers; got {widths!r}"
        )
    return tuple(int(w) for w in widths)


def _per_layer(name: str, value, n_layers: int) -> tuple:
    if isinstance(value, list | tuple):
        if len(value) != n_layers:
            raise ValueError(f"{name}: expected one value per layer ({n_layers}), got {value!r}")
        return tuple(value)
    return (value,) * n_layers


def _init_std(scheme: str, scale: float, fan_in: int, fan_out: int) -> float:
    """Standard deviation (normal schemes) or half-width (``"uniform"``) of a weight init."""
    if scheme not in INITS:
        raise ValueError(f"init: unknown scheme {scheme!r}; allowed: {', '.join(INITS)}")
    var = {
        "lecun": 1.0 / fan_in,
        "he": 2.0 / fan_in,
        "xavier": 2.0 / (fan_in + fan_out),
        "normal": 1.0,
        "uniform": 1.0 / fan_in,
    }[scheme]
    return float(scale) * var**0.5


def _kernel_init(scheme: str, scale: float, fan_in: int, fan_out: int):
    """Initialiser ``init(key, shape, dtype)``: N(0, std²), or U(−b, b) for ``"uniform"``
    (b = s/√fan_in, PyTorch's default for linear layers when s = 1)."""
    width = _init_std(scheme, scale, fan_in, fan_out)

    def init(key, shape, dtype=jnp.float32):
        if scheme == "uniform":
            return jax.random.uniform(key, shape, dtype, minval=-width, maxval=width)
        return width * jax.random.normal(key, shape, dtype)

    return init


class MLP(nnx.Module):
    """Fully connected network ``widths[0] → … → widths[-1]`` (Flax NNX).

    Args:
        widths: layer widths including input and output, e.g. (4, 10, 3).
        activation: hidden activation name (see :data:`ACTIVATIONS`); the output is linear.
        init: weight scheme ``"lecun"`` (N(0, s²/fan_in)), ``"he"``, ``"xavier"``,
            ``"normal"`` (N(0, s²)) or ``"uniform"`` (U(±s/√fan_in)); a tuple gives one per
            layer.
        init_scale: the gain s (per layer with a tuple).
        bias: whether layers have biases (initialised to zero).
        output_bias: whether the output layer has a bias (default: ``bias``).
        output_activation: activation of the output layer (``"identity"``: linear outputs;
            ``"tanh"`` bounds them, and with MSE the loss, so large steps cannot diverge).
        rngs: ``nnx.Rngs`` for the initialisation.
        dtype: parameter dtype.

    Shapes: input (batch, widths[0]) → output (batch, widths[-1]).
    """

    def __init__(
        self,
        widths: Sequence[int],
        *,
        activation: str = "tanh",
        init: str | Sequence[str] = "lecun",
        init_scale: float | Sequence[float] = 1.0,
        bias: bool = True,
        output_bias: bool | None = None,
        output_activation: str = "identity",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        widths = _check_widths(widths)
        output_bias = bias if output_bias is None else output_bias
        _activation_of(activation)  # validate the name
        n = len(widths) - 1
        inits = _per_layer("init", init, n)
        scales = _per_layer("init_scale", init_scale, n)
        _activation_of(output_activation)
        self.output_activation = output_activation
        self.activation = activation
        self.layers = nnx.List(
            [
                nnx.Linear(
                    widths[i],
                    widths[i + 1],
                    use_bias=bias if i < n - 1 else output_bias,
                    kernel_init=_kernel_init(inits[i], scales[i], widths[i], widths[i + 1]),
                    bias_init=nnx.initializers.zeros_init(),
                    param_dtype=dtype,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )

    def features(self, x):
        """Hidden representations of every hidden layer (list of (batch, width) arrays)."""
        act = ACTIVATIONS[self.activation]
        out = []
        for layer in self.layers[:-1]:
            x = act(layer(x))
            out.append(x)
        return out

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return ACTIVATIONS[self.output_activation](self.layers[-1](x))


class CNN(nnx.Module):
    """Small convolutional network for image inputs given as flat rows (Flax NNX).

    Two 3×3 convolutions with ``channels`` feature maps, each followed by the activation and a
    2×2 average pool, then a dense output layer.

    Shapes: input (batch, H·W·C) or (batch, H, W, C) → output (batch, n_outputs).
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (8, 8, 1),
        n_outputs: int = 10,
        *,
        channels: Sequence[int] = (8, 16),
        activation: str = "relu",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        _activation_of(activation)
        h, w, c = (int(v) for v in image_shape)
        self.image_shape = (h, w, c)
        self.activation = activation
        convs = []
        cin = c
        for cout in channels:
            convs.append(
                nnx.Conv(
                    cin,
                    int(cout),
                    (3, 3),
                    padding="SAME",
                    param_dtype=dtype,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
            cin = int(cout)
            h, w = max(h // 2, 1), max(w // 2, 1)
        self.convs = nnx.List(convs)
        self.head = nnx.Linear(
            h * w * cin, int(n_outputs), param_dtype=dtype, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], *self.image_shape))
        for conv in self.convs:
            x = act(conv(x))
            if x.shape[1] >= 2 and x.shape[2] >= 2:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.reshape((x.shape[0], -1)))


def batch_norm_layer(features: int, *, dtype, rngs) -> nnx.BatchNorm:
    """``nnx.BatchNorm`` whose running statistics share the layer's dtype (Flax keeps them in
    float32 whatever ``dtype`` says, so a float64 network would write float64 statistics into
    float32 buffers)."""
    layer = nnx.BatchNorm(features, param_dtype=dtype, dtype=dtype, rngs=rngs)
    layer.mean.set_value(layer.mean.get_value().astype(dtype))
    layer.var.set_value(layer.var.get_value().astype(dtype))
    return layer


class ResidualBlock(nnx.Module):
    """conv → (BatchNorm) → act → conv → (BatchNorm) + shortcut → act (a 1×1 projection when the
    width or stride changes)."""

    def __init__(self, cin, cout, stride, *, batch_norm, activation, rngs, dtype):
        def bn(c):
            return batch_norm_layer(c, dtype=dtype, rngs=rngs) if batch_norm else None

        kw = {"param_dtype": dtype, "dtype": dtype, "rngs": rngs}
        self.activation = activation
        # a bias in front of BatchNorm is cancelled by its mean: no gradient, a null direction
        # of the map, so the convolutions that feed BatchNorm carry none
        bias = not batch_norm
        self.conv1 = nnx.Conv(
            cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=bias, **kw
        )
        self.bn1 = bn(cout)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=bias, **kw)
        self.bn2 = bn(cout)
        self.proj = (
            nnx.Conv(cin, cout, (1, 1), strides=stride, padding="SAME", **kw)
            if (cin != cout or stride != 1)
            else None
        )

    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        h = self.conv1(x)
        h = act(self.bn1(h) if self.bn1 is not None else h)
        h = self.conv2(h)
        h = self.bn2(h) if self.bn2 is not None else h
        short = self.proj(x) if self.proj is not None else x
        return act(h + short)


class ResNet(nnx.Module):
    """A small ResNet (Flax NNX): a 3×3 stem, ``depth`` stages of residual blocks (the width
    doubles and the resolution halves from the second stage on), global average pooling and a
    dense head. ``batch_norm=False`` gives the same network without BatchNorm (for comparing
    the edge of stability with and without it).

    Shapes: input (batch, H, W, C) or flat rows (batch, H·W·C) → output (batch, n_outputs).
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (8, 8, 1),
        n_outputs: int = 10,
        *,
        width: int = 8,
        depth: int = 2,
        blocks_per_stage: int = 1,
        batch_norm: bool = True,
        activation: str = "relu",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        _activation_of(activation)
        if int(width) < 1 or int(depth) < 1 or int(blocks_per_stage) < 1:
            raise ValueError(
                f"width, depth, blocks_per_stage: must be >= 1, got {width}, {depth}, "
                f"{blocks_per_stage}"
            )
        h, w, c = (int(v) for v in image_shape)
        self.image_shape = (h, w, c)
        self.activation = activation
        kw = {"param_dtype": dtype, "dtype": dtype, "rngs": rngs}
        self.stem = nnx.Conv(c, int(width), (3, 3), padding="SAME", use_bias=not batch_norm, **kw)
        self.stem_bn = batch_norm_layer(int(width), dtype=dtype, rngs=rngs) if batch_norm else None
        blocks, cin = [], int(width)
        for stage in range(int(depth)):
            cout = int(width) * 2**stage
            for b in range(int(blocks_per_stage)):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(
                    ResidualBlock(
                        cin,
                        cout,
                        stride,
                        batch_norm=batch_norm,
                        activation=activation,
                        rngs=rngs,
                        dtype=dtype,
                    )
                )
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, int(n_outputs), **kw)

    def features(self, x):
        """The pooled representation before the head, (batch, channels), as a one-item list."""
        act = ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], *self.image_shape))
        h = self.stem(x)
        h = act(self.stem_bn(h) if self.stem_bn is not None else h)
        for block in self.blocks:
            h = block(h)
        return [h.mean(axis=(1, 2))]

    def __call__(self, x):
        return self.head(self.features(x)[0])


class Transformer(nnx.Module):
    """A decoder-style Transformer on token ids (Flax NNX): token and position embeddings,
    ``layers`` pre-LayerNorm blocks of multi-head attention (causal or full) and an MLP, a
    final LayerNorm and a linear read-out of the last position.

    Shapes: input (batch, sequence) integer token ids → output (batch, n_outputs).

    The key projection's bias has a zero gradient (softmax is invariant to it): under Adam its
    updates are normalised round-off, a direction that follows each program's rounding.
    """

    def __init__(
        self,
        vocab_size: int,
        sequence_length: int,
        n_outputs: int,
        *,
        d_model: int = 32,
        n_heads: int = 4,
        layers: int = 1,
        mlp_ratio: int = 4,
        causal: bool = True,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if int(d_model) % int(n_heads):
            raise ValueError(f"n_heads: must divide d_model={d_model}, got {n_heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout}")
        kw = {"param_dtype": dtype, "dtype": dtype, "rngs": rngs}
        self.causal = bool(causal)
        self.sequence_length = int(sequence_length)
        self.embed = nnx.Embed(int(vocab_size), int(d_model), param_dtype=dtype, rngs=rngs)
        self.pos = nnx.Embed(int(sequence_length), int(d_model), param_dtype=dtype, rngs=rngs)
        blocks = []
        for _ in range(int(layers)):
            blocks.append(
                nnx.Dict(
                    ln1=nnx.LayerNorm(int(d_model), **kw),
                    attn=nnx.MultiHeadAttention(
                        int(n_heads),
                        int(d_model),
                        int(d_model),
                        dropout_rate=float(dropout),
                        decode=False,
                        deterministic=False,
                        **kw,
                    ),
                    ln2=nnx.LayerNorm(int(d_model), **kw),
                    up=nnx.Linear(int(d_model), int(mlp_ratio) * int(d_model), **kw),
                    down=nnx.Linear(int(mlp_ratio) * int(d_model), int(d_model), **kw),
                    drop=nnx.Dropout(float(dropout), rngs=rngs),
                )
            )
        self.blocks = nnx.List(blocks)
        self.ln_f = nnx.LayerNorm(int(d_model), **kw)
        self.head = nnx.Linear(int(d_model), int(n_outputs), **kw)

    def features(self, tokens):
        """The final representation of the last position, (batch, d_model), as a list."""
        n = tokens.shape[-1]
        h = self.embed(tokens) + self.pos(jnp.arange(n))
        mask = nnx.make_causal_mask(tokens) if self.causal else None
        for b in self.blocks:
            h = h + b["attn"](b["ln1"](h), mask=mask)
            h = h + b["drop"](b["down"](nnx.gelu(b["up"](b["ln2"](h)))))
        return [self.ln_f(h)[:, -1]]

    def __call__(self, tokens):
        return self.head(self.features(tokens)[0])


@dataclasses.dataclass(frozen=True)
class PureMLP:
    """A pure-function MLP: ``init_params(key) -> params`` and ``apply(params, x)``.

    The same network as :class:`MLP` (equal parameters from the same key). ``params`` is ``{"layer_0": {"kernel": (w0, w1), "bias": (w1,)}, ...}``. Same arguments as
    :class:`MLP`; ``output`` may be ``"linear"`` (logits / regression) or ``"softmax"``.
    """

    widths: tuple[int, ...]
    activation: str = "tanh"
    init: str | tuple[str, ...] = "lecun"
    init_scale: float | tuple[float, ...] = 1.0
    bias: bool = True
    output: str = "linear"
    output_bias: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "widths", _check_widths(self.widths))
        activation(self.activation)
        n = len(self.widths) - 1
        object.__setattr__(self, "init", _per_layer("init", self.init, n))
        object.__setattr__(self, "init_scale", _per_layer("init_scale", self.init_scale, n))
        for s in self.init:
            _init_std(s, 1.0, 1, 1)
        if self.output not in ("linear", "softmax"):
            raise ValueError(f"output: must be 'linear' or 'softmax', got {self.output!r}")

    def init_params(self, key, dtype=None) -> dict:
        """Parameters drawn exactly as :class:`MLP` draws them from ``nnx.Rngs(key)``: the
        command line (which builds the NNX network) and this API give one network per
        config and seed. Works under ``jit``/``vmap`` (``key`` may be traced)."""
        dtype = dtype or jnp.asarray(0.0).dtype
        net = MLP(
            self.widths,
            activation=self.activation,
            init=self.init,
            init_scale=self.init_scale,
            bias=self.bias,
            output_bias=self.output_bias,
            rngs=nnx.Rngs(key),
            dtype=dtype,
        )
        params = {}
        for i, layer in enumerate(net.layers):
            params[f"layer_{i}"] = {"kernel": layer.kernel[...]}
            if layer.bias is not None:
                params[f"layer_{i}"]["bias"] = layer.bias[...]
        return params

    def features(self, params, x) -> list:
        act = ACTIVATIONS[self.activation]
        out = []
        n = len(self.widths) - 1
        for i in range(n - 1):
            layer = params[f"layer_{i}"]
            x = act(x @ layer["kernel"] + layer.get("bias", 0.0))
            out.append(x)
        return out

    def apply(self, params, x):
        n = len(self.widths) - 1
        h = self.features(params, x)
        x = h[-1] if h else x
        last = params[f"layer_{n - 1}"]
        y = x @ last["kernel"] + last.get("bias", 0.0)
        return jax.nn.softmax(y, axis=-1) if self.output == "softmax" else y

    __call__ = apply


__all__ = [
    "ACTIVATIONS",
    "CNN",
    "INITS",
    "MLP",
    "PureMLP",
    "ResNet",
    "ResidualBlock",
    "Transformer",
    "activation",
]
