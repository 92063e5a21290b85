"""One process of the two-process test (tests/test_sharding.py): 2 CPU devices per process,
gloo collectives, a sharded replica run, a batched Lyapunov spectrum and a resume."""

import sys
from pathlib import Path

import jax

port, pid, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)

from chaosjax import sharding  # noqa: E402

sharding.initialize_distributed(f"localhost:{port}", 2, pid)

import numpy as np  # noqa: E402

import chaosjax as cj  # noqa: E402
from chaosjax import systems  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import iris_replicas  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
tmap, batch = iris_replicas()
kw = dict(steps=60, record_every=10, chunk_steps=20, progress=False)
res = cj.run_replicas(tmap, batch, checkpoint=out / "ckpt.npz", store=out / "store.zarr", **kw)
again = cj.run_replicas(tmap, batch, checkpoint=out / "ckpt.npz", resume=True, **kw)
h = systems.Henon()
x0 = np.stack([np.asarray(h.x0) + 0.01 * i for i in range(6)])
ly = cj.lyapunov_spectrum(h.step, x0, k=2, steps=300, batched=True)
np.savez(
    out / f"process{pid}.npz",
    final_state=res.final_state,
    loss=res.records["loss"],
    distance=res.records["distance_l2"],
    resumed_equal=all(
        np.array_equal(res.records[k], again.records[k], equal_nan=True) for k in res.records
    ),
    resumed_flag=again.attrs["resumed"],
    log_growth=ly.log_growth,
    n_shards=len(res.final_state),
)
jax.distributed.shutdown()
