"""One process of a multi-process (multi-host on localhost) load + forward, for tests/sharding/test_multihost.py.

    python multihost_worker.py CHECKPOINT OUT_DIR PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES MODEL_AXIS

NUM_PROCESSES > 1 joins a `jax.distributed` job (coordinator 127.0.0.1:PORT, gloo CPU collectives). MODEL_AXIS > 0
loads with `mesh=make_mesh(model=MODEL_AXIS)` over every process's devices (`params.load_sharded`: each process
reads only its devices' slices); 0 loads the plain one-device way. Writes OUT_DIR/logits_{id}.npy (the whole
logits, gathered to every process), OUT_DIR/tokens_{id}.npy (6 greedy tokens from `generate`) and
OUT_DIR/report_{id}.json (bytes this process read from the files).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644]  # 12 fixed token ids


def rchar() -> int:
    """Bytes this process has read through read-like syscalls so far (Linux /proc/self/io), -1 elsewhere."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def main(checkpoint: str, out_dir: str, pid: int, nproc: int, port: int, local_devices: int, model_axis: int):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={local_devices}")
    os.environ["QWEN2VL_JAX_CPU_KERNELS"] = "0"  # the native kernels have no partitioning rule (sharding.py)
    import jax
    import numpy as np

    from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls

    use_exact_cpu_fp32_matmuls()
    jax.config.update("jax_default_matmul_precision", "highest")
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on the CPU
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    from jax.experimental import multihost_utils

    from qwen2vl_jax import sharding
    from qwen2vl_jax.checkpoints import keymap as params_lib
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    assert jax.process_count() == nproc and len(jax.local_devices()) == local_devices, jax.devices()
    reports = []
    load_sharded = params_lib.load_sharded

    def counting(*args, **kwargs):  # load_pretrained drops load_sharded's report: keep it here
        reports.append(load_sharded(*args, **kwargs))
        return reports[-1]

    params_lib.load_sharded = counting
    mesh = sharding.make_mesh(model=model_axis) if model_axis else None
    rchar0, t0 = rchar(), time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, mesh=mesh, attn_implementation="xla")
    load_s, rchar_delta = time.perf_counter() - t0, rchar() - rchar0
    logits = model(input_ids=np.array([IDS], np.int64)).logits
    if not logits.is_fully_addressable:
        logits = multihost_utils.process_allgather(logits, tiled=True)
    logits = np.asarray(logits)
    np.save(Path(out_dir) / f"logits_{pid}.npy", logits)
    # generation under the multi-process mesh: the decode loop runs on every process's devices
    tokens = model.generate(input_ids=np.array([IDS], np.int64), max_new_tokens=6, do_sample=False)
    np.save(Path(out_dir) / f"tokens_{pid}.npy", np.asarray(tokens))
    up = model.language_model.layers[0].mlp.up_proj.weight[...]
    loaded = reports[0] if reports else None  # None: the one-device reference loads through `load_into`
    report = {"bytes_read": loaded and loaded.bytes_read, "tensors": loaded and loaded.tensors, "rchar": rchar_delta,
              "load_s": load_s, "devices": len(jax.devices()),
              "up_proj_spec": [str(a) for a in up.sharding.spec] if mesh is not None else None,
              "up_proj_local_rows": [s.data.shape[0] for s in up.addressable_shards]}
    (Path(out_dir) / f"report_{pid}.json").write_text(json.dumps(report))
    if nproc > 1:
        multihost_utils.sync_global_devices("done")  # neither process leaves while the other still needs it
        jax.distributed.shutdown()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), int(a[6]))
