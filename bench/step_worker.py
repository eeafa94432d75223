"""One side of bench.step_ab, run as a script in a subprocess whose PYTHONPATH is the checkout under test (today's
commit or another one), so it imports that checkout's nanochat. Uses only the nanochat.train API every commit has
(Config, model_config, build_model, make_optimizer, init_state, make_train_step).

argv[1]: JSON {"config": nanochat.Config fields (unknown ones dropped: older checkouts lack them), "vocab": int,
"seed": int}. Prints one JSON line when compiled ({"loss": first step's loss from the shared initial batch,
"params": count}), then answers each stdin line "N" with {"wall_ms", "cpu_ms"} per step of N steps; "q" ends.
"""

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat import train as nanochat


def main() -> None:
    spec = json.loads(sys.argv[1])
    known = {f.name for f in dataclasses.fields(nanochat.Config)}
    nc = nanochat.Config(**{k: v for k, v in spec["config"].items() if k in known})
    model = nanochat.build_model(nc, nanochat.model_config(nc, spec["vocab"]), spec["seed"])
    graphdef, params = nnx.split(model, nnx.Param)
    tx = nanochat.make_optimizer(nc, params)
    state = nanochat.init_state(params, tx)
    state["total_steps"] = jnp.asarray(1000, jnp.int32)
    rows = np.random.default_rng(spec["seed"]).integers(0, spec["vocab"], (nc.batch_size, nc.sequence_len + 1))
    batch = jax.device_put({"inputs_BT": jnp.asarray(rows[:, :-1], jnp.int32),
                            "targets_BT": jnp.asarray(rows[:, 1:], jnp.int32)})
    step = jax.jit(nanochat.make_train_step(graphdef, tx, nc), donate_argnums=0)
    executable = step.lower(state, batch).compile()
    state, metrics = executable(state, batch)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    print(json.dumps({"loss": float(metrics["loss"]), "params": n_params}), flush=True)
    for line in sys.stdin:
        if line.strip() == "q":
            return
        n = int(line)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            state, metrics = executable(state, batch)
        jax.block_until_ready((state, metrics))
        print(json.dumps({"wall_ms": 1e3 * (time.perf_counter() - wall) / n,
                          "cpu_ms": 1e3 * (time.process_time() - cpu) / n}), flush=True)


if __name__ == "__main__":
    main()
