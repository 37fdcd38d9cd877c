"""Export programs and summarise what each lowering proves (run by tests/export/test_export.py).

    python tests/export/export_worker.py '[{"model": "2b", "program": "prefill", "platforms": ["tpu"],
                                           "mesh": {"data": 2, "model": 4}}, ...]'

prints one JSON line: a summary per job (`summarize`). A mesh needs as many devices: the test starts this with
`--xla_force_host_platform_device_count=8`. The test imports `summarize` and `run_job` for its one-device jobs.
"""

from __future__ import annotations

import json
import re
import sys

TENSOR = re.compile(r"tensor<([0-9x]+)x(f32|bf16)>")


def summarize(art) -> dict:
    """What the lowering shows, from the manifest and the module's text."""
    text = art.module_text()
    m = art.manifest
    weights = [a["shape"] for a in m["arguments"].values()
               if a["dtype"] == "bfloat16" and len(a["shape"]) >= 2 and a["shape"][-1] * a["shape"][-2] >= 1 << 20]
    # a weight's own shape, and one layer's slice of a stacked [L, ...] weight (scan_layers)
    big_bf16 = {tuple(s) for s in weights} | {tuple(s[1:]) for s in weights if len(s) == 3}
    f32_shapes = {tuple(int(d) for d in dims.split("x")) for dims, t in TENSOR.findall(text) if t == "f32"}
    integers = [a["dtype"] for n, a in m["arguments"].items() if a["dtype"] in ("int8", "uint8") and n.startswith(
        ("weights/", "trainable/", "frozen/")) and n.endswith(".weight.value")]
    sharded = [n for n, a in m["arguments"].items() if a["sharding"] is not None and a["sharding"].strip("(,)")]
    return {
        "platforms": m["platforms"], "nr_devices": m["nr_devices"], "custom_calls": m["custom_calls"],
        "attention_by_platform": m["attention_by_platform"], "cudnn_fallbacks": m["cudnn_fallbacks"],
        "while_loops": text.count("stablehlo.while"), "callbacks": "callback" in text,
        "shard_maps": text.count("sdy.manual_computation"),
        # the Mosaic ragged paged attention kernels: one private function each
        "ragged_paged_kernels": len(re.findall(r"func\.func private @ragged_paged_attention(?:_\d+)?\(", text)),
        # a bf16 weight (at least 2**20 elements) that appears in fp32 anywhere in the module: an upcast copy
        "f32_weight_copies": sorted(big_bf16 & f32_shapes), "bf16_weights": len(weights),
        "integer_weights": len(integers), "integer_dtype": integers[0] if integers else None,
        "layers": m["layers"], "sharded_arguments": len(sharded), "arguments": len(m["arguments"]),
        "results": len(m["results"]),
        "module_bytes": m["module_bytes"], "memory_plan_bytes_per_device": m["memory_plan_bytes_per_device"],
        "export_seconds": m["export_seconds"],
    }


def run_job(job: dict) -> dict:
    from qwen2vl_jax.export import Shapes, export_program

    shapes = Shapes(**job.get("shapes", {}))
    art = export_program(job["model"], job["program"], platforms=tuple(job["platforms"]), mesh=job.get("mesh"),
                         dtype=job.get("dtype", "bfloat16"), shapes=shapes,
                         attn_implementation=job.get("attn"), scan_layers=job.get("scan_layers"))
    return {**job, "asked_platforms": job["platforms"], **summarize(art)}


if __name__ == "__main__":
    print(json.dumps([run_job(job) for job in json.loads(sys.argv[1])]))
