"""``chaosjax.Monitor``: the field's stability measures inside the user's own training loop.

The user keeps their loop; the monitor reads the state at its cadence, runs each due probe
(:mod:`chaosjax.probes`) as one jitted program, and writes (:mod:`chaosjax.writers`). It never
changes the user's state: it reads the arrays and donates nothing. ``wrap(train_step)`` adds the
tangents FTLEs need (:mod:`chaosjax._monitor_tangents`).
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chaosjax._layout import is_float, layout_of, path_name
from chaosjax._monitor_tangents import Tangents
from chaosjax._probe_base import Context, Probe, ProbeInputs, check_every
from chaosjax._util import one_line, warn_at_caller
from chaosjax.optimizers import held_learning_rate
from chaosjax.writers import as_writers, write_all

_ARRAY = (jax.Array, np.ndarray, np.generic, float, int)


def default_params(state):
    """``state.params``, ``state["params"]``, or the state itself (the parameter pytree)."""
    p = getattr(state, "params", None)
    if p is not None:
        return p
    if isinstance(state, Mapping) and "params" in state:
        return state["params"]
    return state


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((jnp.shape(v), str(jnp.result_type(v))) for v in leaves)


class Monitor:
    """Measure the stability of a training loop the user runs (DESIGN.md, "Watching your own
    loop").

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, the loss the loop differentiates.
        probes: a sequence of :class:`chaosjax.probes.Probe` (each name at most once).
        every: the cadence: ``mon(t, …)`` measures when ``t % every == 0`` (a probe's own
            ``every`` overrides it).
        writer: a writer or a list of writers (:mod:`chaosjax.writers`).
        params: ``params(state) -> parameter pytree`` (default: ``state.params``,
            ``state["params"]``, or the state itself); its leaves must be arrays, some float.
        optimizer: the optax transformation (default: ``state.tx`` of a flax ``TrainState``).
        opt_state: ``opt_state(state) -> its state`` (default: ``state.opt_state``).
        learning_rate: η_t as a float or an optax schedule of t (default: what the optimizer
            state holds, e.g. ``optax.inject_hyperparams``; NaN with a reason otherwise).
        key: PRNG key of the probes' random starts (default ``PRNGKey(0)``).

    Calling ``mon(t, state, batch)`` returns a dict of Python floats: each due probe's values
    (``sharpness``, ``sharpness/1``, …) and its cost ``name/seconds`` (wall time of its call,
    blocked on; the first call includes compilation) and ``name/matvecs``; ``{}`` off cadence.
    The same dict goes to the writers with ``t`` as the step. The first time a probe's value is
    NaN because the probe does not apply, its reason also goes, as the text
    ``reason/<probe name>`` at that step, to the writers that take texts
    (:func:`chaosjax.writers.takes_texts`: the built-in writers and any with CLU's
    ``write_texts``; a ``write_scalars``-only writer or a callable gets the scalars only).

    Attributes:
        reasons: {probe name: why its value is NaN} (each also warned once, and logged once as
            ``reason/<probe name>``).
        traces: {probe name: times its program was traced} (1 after the first call; a second
            trace means a recompilation, e.g. a new batch shape).
    """

    def __init__(
        self,
        loss_fn: Callable,
        *,
        probes: Sequence[Probe],
        every: int = 1,
        writer=None,
        params: Callable | None = None,
        optimizer=None,
        opt_state: Callable | None = None,
        learning_rate=None,
        key=None,
    ):
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn: expected loss_fn(params, batch), got {type(loss_fn).__name__}"
            )
        if isinstance(probes, Probe) or not isinstance(probes, Sequence) or not probes:
            raise TypeError("probes: expected a non-empty list of chaosjax.probes probes")
        for p in probes:
            if not isinstance(p, Probe):
                raise TypeError(f"probes: {p!r} is not a chaosjax.probes.Probe")
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"probes: each probe at most once, got {names}")
        self.every = check_every(every)
        if self.every is None:
            raise ValueError("every: must be an integer >= 1, got None")
        for what, fn in (("params", params), ("opt_state", opt_state)):
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"{what}: expected a function of the state, got {type(fn).__name__}"
                )
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                f"optimizer: expected an optax GradientTransformation, got {type(optimizer).__name__}"
            )
        if learning_rate is not None and not callable(learning_rate):
            if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float):
                raise TypeError(
                    "learning_rate: expected a float or an optax schedule of t, got "
                    f"{type(learning_rate).__name__}"
                )
        self.loss_fn = loss_fn
        self.probes = tuple(probes)
        self.writers = as_writers(writer)
        self._pick_params = params or default_params
        self._pick_opt_state = opt_state
        self._optimizer = optimizer
        self.learning_rate = learning_rate
        self._key = jax.random.PRNGKey(0) if key is None else key
        self.reasons: dict[str, str] = {}
        self.traces = {n: 0 for n in names}
        self._ctx: Context | None = None
        self._sig = None
        self._batch_sig = None
        self._states: dict[str, object] = {}
        self._programs: dict[str, Callable] = {}
        self._history = {
            p.name: collections.deque(maxlen=p.history_size())
            for p in self.probes
            if "history" in p.needs and p.history_size() > 0
        }
        self._tangents: Tangents | None = None
        self._wrapped = False

    # -----------------------------------------------------------------------------------------
    # reading the state

    def params_of(self, state):
        """The parameter pytree of ``state`` (validated: array leaves, some of them float)."""
        try:
            params = self._pick_params(state)
        except Exception as e:
            raise ValueError(f"params: the picker failed on the state: {one_line(e)}") from None
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        for path, leaf in flat:
            if not isinstance(leaf, _ARRAY):
                raise TypeError(
                    f"params: leaf {path_name(path)!r} is a {type(leaf).__name__}, not an array; "
                    "pick the array leaves (Equinox: eqx.partition(model, eqx.is_inexact_array), "
                    "NNX: nnx.split(model, nnx.Param, ...))"
                )
        if not any(is_float(leaf) for _, leaf in flat):
            raise ValueError(
                "params: the picked parameters have no float leaves; pass "
                "Monitor(params=lambda state: ...) returning the parameter pytree"
            )
        return params

    def optimizer_of(self, state):
        """``(tx, opt_state)`` of ``state`` (None where there is none)."""
        tx = self._optimizer if self._optimizer is not None else getattr(state, "tx", None)
        if tx is not None and not isinstance(tx, optax.GradientTransformation):
            tx = None
        if self._pick_opt_state is not None:
            try:
                opt_state = self._pick_opt_state(state)
            except Exception as e:
                raise ValueError(
                    f"opt_state: the picker failed on the state: {one_line(e)}"
                ) from None
        else:
            opt_state = getattr(state, "opt_state", None)
        return tx, opt_state

    def eta(self, t: int, opt_state) -> float:
        """η_t: ``learning_rate`` (a float or a schedule of t), else what ``opt_state`` holds,
        else NaN."""
        lr = self.learning_rate
        if lr is None and opt_state is not None:
            lr = held_learning_rate(opt_state)
        elif callable(lr):
            lr = lr(t)
        return float("nan") if lr is None else float(lr)

    # -----------------------------------------------------------------------------------------
    # setup (first call, and again when the parameters' shapes change)

    def _setup(self, state, params, batch) -> None:
        tx, opt_state = self.optimizer_of(state)
        needs = set().union(*(p.needs for p in self.probes))
        if "optimizer" in needs:
            who = next(type(p).__name__ for p in self.probes if "optimizer" in p.needs)
            if tx is None:
                raise ValueError(
                    f"optimizer: {who} needs the optax transformation; pass "
                    "Monitor(optimizer=tx) (a flax TrainState's tx is read by default)"
                )
            if opt_state is None:
                raise ValueError(
                    f"opt_state: {who} needs the optimizer state; pass "
                    "Monitor(opt_state=lambda state: ...) (a flax TrainState's is read by default)"
                )
        sig = _signature(params)
        if sig != self._sig:
            dyn = [v for v in jax.tree_util.tree_leaves(params) if is_float(v)]
            work = jnp.result_type(jnp.float32, *(jnp.result_type(v) for v in dyn))
            layout = layout_of(params, dtype=work, what="params")
            self._ctx = Context(self.loss_fn, tx, layout)
            self._programs = {p.name: self._program(p) for p in self.probes}
            keys = jax.random.split(self._key, len(self.probes))
            self._states = {p.name: p.init_state(self._ctx, k) for p, k in zip(self.probes, keys)}
            self._sig = sig
            self._batch_sig = None
        self._check_batch(params, batch, tx, opt_state, "optimizer" in needs)

    def _check_batch(self, params, batch, tx, opt_state, with_optimizer: bool) -> None:
        bsig = _signature(batch)
        if bsig == self._batch_sig:
            return
        try:
            out = jax.eval_shape(self.loss_fn, params, batch)
        except Exception as e:
            raise ValueError(f"batch: loss_fn(params, batch) fails on it: {one_line(e)}") from None
        if not (
            hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)
        ):
            raise ValueError(
                f"loss_fn: must return a float scalar, got {getattr(out, 'shape', type(out).__name__)}"
            )
        if with_optimizer:
            for p in self.probes:
                if "optimizer" in p.needs:
                    p.check_opt_state(opt_state)
            try:
                jax.eval_shape(lambda p, s: tx.update(p, s, p), params, opt_state)
            except Exception as e:
                raise ValueError(
                    f"opt_state: optimizer.update(grads, opt_state, params) fails on it: {one_line(e)}"
                ) from None
        self._batch_sig = bsig

    def _program(self, probe: Probe) -> Callable:
        ctx = self._ctx

        def run(inp, state):
            self.traces[probe.name] += 1
            vals, new, n = probe.measure(ctx, inp, state)
            return {k: jnp.asarray(v, ctx.dtype) for k, v in vals.items()}, new, jnp.asarray(n)

        return jax.jit(run)

    # -----------------------------------------------------------------------------------------
    # the call

    def due(self, t: int) -> list[Probe]:
        """The probes that measure at step t."""
        return [p for p in self.probes if t % (p.every or self.every) == 0]

    def __call__(self, t, state, batch) -> dict[str, float]:
        """Measure ``state`` on ``batch`` at step ``t`` (when due); write; return the values."""
        if isinstance(t, bool) or int(t) != t:
            raise TypeError(f"t: expected an integer step, got {t!r}")
        t = int(t)
        params = self.params_of(state)
        self._setup(state, params, batch)
        for h in self._history.values():
            h.append(batch)
        due = self.due(t)
        if not due:
            return {}
        opt_state = self.optimizer_of(state)[1]
        eta = self.eta(t, opt_state)
        out: dict[str, float] = {}
        known = set(self.reasons)
        for p in due:
            out.update(self._measure(p, t, params, batch, opt_state, eta))
        texts = {f"reason/{k}": v for k, v in self.reasons.items() if k not in known}
        write_all(self.writers, t, out, texts)
        return out

    def _measure(self, p: Probe, t, params, batch, opt_state, eta) -> dict[str, float]:
        ctx = self._ctx
        history, tangents, extra_seconds = (), (), 0.0
        if "history" in p.needs:
            history = self._history_of(p, t, batch)
        has_tangents = self._tangents is not None and not self._tangents.void
        if "tangents" in p.needs:
            if self._tangents is None:
                tangents = (jnp.zeros((p.k,), ctx.dtype), jnp.asarray(0))
            else:
                tangents, extra_seconds = self._tangents.take()
        self._note_reason(p, eta)
        inp = ProbeInputs(
            params=params,
            batch=batch,
            opt_state=opt_state if "optimizer" in p.needs else (),
            eta=jnp.asarray(eta, ctx.dtype),
            key=jax.random.fold_in(self._key, t),
            history=history,
            tangents=tangents if "tangents" in p.needs else (),
        )
        t0 = time.perf_counter()
        vals, new, n = jax.block_until_ready(self._programs[p.name](inp, self._states[p.name]))
        seconds = time.perf_counter() - t0
        self._states[p.name] = new
        out = {k: float(v) for k, v in vals.items()}
        if "tangents" in p.needs and not has_tangents:
            out = {k: float("nan") for k in out}
        out[f"{p.name}/seconds"] = seconds + extra_seconds
        out[f"{p.name}/matvecs"] = float(n)
        return out

    def _note_reason(self, p: Probe, eta: float) -> None:
        tan = self._tangents
        why = p.reason(eta_known=bool(np.isfinite(eta)), tangents=tan is not None)
        if not why and tan is not None and tan.void and "tangents" in p.needs:
            why = tan.void
        if why and p.name not in self.reasons:
            self.reasons[p.name] = why
            warn_at_caller(f"{p.name}: NaN: {why}")

    def _history_of(self, p: Probe, t: int, batch):
        """``(stacked batches (n, ...), weights (n,))``: the kept batches with the current
        batch's shapes, padded to n with the current batch at weight 0 (one program shape)."""
        n = p.n_batches()
        if p.sampler is not None:
            got = [p.sampler(t, i) for i in range(n)]
            for b in got:
                self._check_batch_like(b, batch, "sampler")
            w = np.ones(n)
        else:
            sig = _signature(batch)
            got = [b for b in self._history[p.name] if _signature(b) == sig]
            w = np.r_[np.ones(len(got)), np.zeros(n - len(got))]
            got = got + [batch] * (n - len(got))
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *got)
        return stacked, jnp.asarray(w, self._ctx.dtype)

    @staticmethod
    def _check_batch_like(b, batch, what: str) -> None:
        if _signature(b) != _signature(batch):
            raise ValueError(
                f"{what}: returned a batch whose structure or shapes differ from the loop's"
            )

    # -----------------------------------------------------------------------------------------
    # tangents along the user's trajectory

    def wrap(self, train_step: Callable) -> Callable:
        """``train_step(state, batch, *args, **kwargs)`` that also advances the FTLE tangents.

        Before calling the user's step (as given: it is not re-jitted, and may donate its
        buffers), a separate jitted program advances k tangents through the optimizer map at
        ``state`` on ``batch`` (its second argument): see :mod:`chaosjax._monitor_tangents`
        and :class:`chaosjax.probes.FTLE`. Returns exactly what ``train_step`` returns.
        """
        if not callable(train_step):
            raise TypeError(f"train_step: expected a callable, got {type(train_step).__name__}")
        ftle = [p for p in self.probes if "tangents" in p.needs]

        @functools.wraps(train_step)
        def stepped(state, batch, *args, **kwargs):
            if ftle:
                self._advance(state, batch, ftle[0])
            return train_step(state, batch, *args, **kwargs)

        self._wrapped = True
        return stepped

    def _advance(self, state, batch, probe) -> None:
        params = self.params_of(state)
        tx, opt_state = self.optimizer_of(state)
        if tx is None or opt_state is None:
            what = "optimizer" if tx is None else "opt_state"
            raise ValueError(
                f"{what}: FTLE needs the optax transformation and its state to build the step's "
                "map; pass Monitor(optimizer=tx, opt_state=lambda state: ...)"
            )
        if self._tangents is None:
            key = jax.random.fold_in(self._key, 7)
            self._tangents = Tangents(self.loss_fn, tx, params, opt_state, batch, probe.k, key)
        self._tangents.advance(params, opt_state, batch)

    def close(self) -> None:
        """Close the writers (flushes a :class:`chaosjax.writers.Zarr` store)."""
        for w in self.writers:
            close = getattr(w, "close", None)
            if callable(close):
                close()


__all__ = ["Monitor", "default_params"]
