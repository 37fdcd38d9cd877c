"""`jax.export` of a program for TPU, CUDA and / or CPU, on any host, and the artifact folder it is saved in.

    art = export_program("2b", "prefill", platforms=("tpu",), mesh={"data": 2, "model": 4}, dtype="bfloat16")
    art.save("out/")          # out/program.jax_exported (Exported.serialize()) + out/manifest.json
    art = load_artifact("out/")
    result = art.call(weights, inputs)   # flat {name: array} dicts; see `programs` for each program's groups

Only lowering happens here (StableHLO, and Mosaic / cuDNN custom calls inside it): nothing is compiled by XLA, no
weights are needed (the weights are the program's first argument group, abstract while exporting). The manifest
says what the lowering proves: platforms, shapes, shardings and dtypes of every argument and result, the custom
calls in the module (Mosaic's `tpu_custom_call`, cuDNN's `__cudnn$fmha*`, our CPU kernels), which attention calls
cuDNN refused while tracing, the module's size and the memory plan's bytes per device (`sharding.plan`).

Custom calls without jax's compatibility guarantee (cuDNN attention, this package's CPU kernels) are allowed in
the module and listed in `manifest["unguaranteed_custom_calls"]`: such an artifact is meant for the jax version
that wrote it (`manifest["jax_version"]`), and a CPU artifact that uses our native kernels needs them registered
in the process that calls it (`import qwen2vl_jax.kernels`, which builds them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np

from ..attention import jax_nn, pallas_paged, platform_backend
from ..kernels import build as kernel_build
from ..modeling.config import PRESETS, Qwen2VLConfig
from ..sharding.mesh import make_mesh
from ..sharding.plan import plan as memory_plan
from .programs import PROGRAMS, Shapes, build, check_shapes

PROGRAM_FILE = "program.jax_exported"
MANIFEST_FILE = "manifest.json"
FORMAT = "qwen2vl_jax.export/1"
PLATFORMS = ("tpu", "cuda", "rocm", "cpu")
MOSAIC_CALL = "tpu_custom_call"
CPU_KERNEL_CALLS = (kernel_build.GEMV_TARGET, kernel_build.ATTENTION_TARGET, kernel_build.DECODE_ATTENTION_TARGET)
CUDNN_CALLS = tuple(f"__cudnn${name}" for name in (
    "fmhaSoftmax", "fmhaScaleBiasSoftmax", "fmhaSoftmaxDropout", "fmhaScaleBiasSoftmaxDropout",
    "fmhaSoftmaxBackward", "fmhaScaleBiasSoftmaxBackward", "fmhaSoftmaxDropoutBackward",
    "fmhaScaleBiasSoftmaxDropoutBackward"))
HOST_CALLBACKS = ("xla_python_cpu_callback", "xla_python_gpu_callback", "xla_ffi_python_cpu_callback",
                  "xla_ffi_python_gpu_callback", "xla_ffi_partitioned_python_cpu_callback")
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$-]+)\(")


def custom_calls(module_text: str) -> list[str]:
    """The custom-call target names in a StableHLO module's text, sorted, each once."""
    return sorted(set(_CUSTOM_CALL.findall(module_text)))


@dataclasses.dataclass
class Artifact:
    """An exported program and its manifest."""

    exported: jax.export.Exported
    manifest: dict

    def call(self, *groups):
        """Run the program on this host's devices (its platform must be one of `manifest["platforms"]`): the
        argument groups as flat `{name: array}` dicts, in `manifest["argument_groups"]` order."""
        return self.exported.call(*groups)

    def module_text(self) -> str:
        return self.exported.mlir_module()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `program.jax_exported` and `manifest.json` into `out_dir` (each file atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / PROGRAM_FILE, bytes(self.exported.serialize()))
        _write_atomic(out / MANIFEST_FILE, (json.dumps(self.manifest, indent=1) + "\n").encode())
        return out


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_artifact(directory: str | os.PathLike) -> Artifact:
    """The artifact in `directory` (what `Artifact.save` / `qwen2vl-jax export` wrote)."""
    d = Path(directory)
    for name in (PROGRAM_FILE, MANIFEST_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d} holds no {name}: not an artifact folder of `qwen2vl-jax export`")
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d / MANIFEST_FILE}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return Artifact(jax.export.deserialize(bytearray((d / PROGRAM_FILE).read_bytes())), manifest)


def resolve_config(model: str | Qwen2VLConfig) -> tuple[Qwen2VLConfig, str]:
    """A preset name ("2b", "2.5-72b", ...), a checkpoint folder (its config.json) or a config: (config, label)."""
    if isinstance(model, Qwen2VLConfig):
        return model, model.model_type
    if model in PRESETS:
        return PRESETS[model](), model
    path = Path(model)
    if (path / "config.json").is_file():
        return Qwen2VLConfig.from_hf(path), str(path)
    raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a folder with a "
                     "config.json")


def _mesh(mesh: Mapping[str, int] | None):
    unknown = sorted(set(mesh or {}) - {"data", "fsdp", "model"})
    if unknown:
        raise ValueError(f"mesh axes are data, fsdp and model; got {unknown}")
    if not mesh or all(n == 1 for n in mesh.values()):
        return None
    need = int(np.prod(list(mesh.values())))
    have = len(jax.devices())
    if need > have:
        raise ValueError(f"a mesh of {need} devices needs {need} devices to lower on; this process has {have}. "
                         f"On a CPU host start it with XLA_FLAGS=--xla_force_host_platform_device_count={need} "
                         "(`qwen2vl-jax export` does this itself)")
    return make_mesh(**mesh)


def _describe(avals, shardings, names) -> dict:
    """Shape, dtype and PartitionSpec (over the mesh's axes; None on one device) of each leaf."""
    return {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                   "sharding": None if s is None else str(tuple(s.spec))}
            for name, a, s in zip(names, avals, shardings)}


def _leaf_names(tree_def, avals, groups: tuple[str, ...]) -> list[str]:
    """`group/name` of each leaf of a program's arguments (`(groups, {})`) or results (one dict or a tuple)."""
    tree = jax.tree_util.tree_unflatten(tree_def, list(avals))
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [getattr(k, "idx", getattr(k, "key", None)) for k in path]
        if isinstance(keys[0], int) and isinstance(keys[1], int):  # arguments: ((group 0, group 1, ...), {})
            keys = keys[1:]
        group = groups[keys[0]] if isinstance(keys[0], int) else groups[0]
        names.append(f"{group}/{keys[-1]}")
    return names


def export_program(model: str | Qwen2VLConfig, program: str, *, platforms: Sequence[str] = ("tpu",),
                   mesh: Mapping[str, int] | None = None, dtype: str = "bfloat16", shapes: Shapes | None = None,
                   attn_implementation: str | None = None, scan_layers: bool | None = None) -> Artifact:
    """Lower `program` of `model` (a preset, a checkpoint folder or a config) for `platforms` with `jax.export`,
    with abstract weights, on a `mesh` of `{"data", "fsdp", "model"}` sizes (None: one device)."""
    platforms, shapes = tuple(platforms), shapes or Shapes()
    bad = [p for p in platforms if p not in PLATFORMS]
    if not platforms or bad:
        raise ValueError(f"platforms must be among {PLATFORMS}, got {list(platforms)}")
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; choose one of {', '.join(PROGRAMS)}")
    try:
        dtype_name = np.dtype(dtype).name
    except TypeError:
        dtype_name = None
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    config, label = resolve_config(model)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    check_shapes(config, shapes)
    device_mesh = _mesh(mesh)  # a bad mesh fails before anything is planned or traced
    mesh_sizes = {"data": 1, "fsdp": 1, "model": 1, **(mesh or {})}
    plan = memory_plan(config, mesh_sizes, batch=shapes.batch,  # also refuses activations past 2**63 elements
                       context=shapes.cache_len if program == "decode" else shapes.prompt_len, dtype=dtype,
                       scan_layers=config.scan_layers, name=label, quantization=shapes.quantization)
    t0 = time.perf_counter()
    prog = build(program, config, dtype, shapes, device_mesh, attn_implementation)
    disabled = [jax.export.DisabledSafetyCheck.custom_call(t) for t in (*CUDNN_CALLS, *CPU_KERNEL_CALLS)]
    # Mosaic's lowering of the paged attention kernel asks which TPU it targets: an abstract one off a TPU host
    tpu_context = (pallas_paged.for_tpu_lowering() if program == "engine_step" and "tpu" in platforms
                   and jax.default_backend() != "tpu" else contextlib.nullcontext())
    with jax_nn.assume_cudnn(), jax_nn.cudnn_fallbacks() as fallbacks, tpu_context:
        try:
            exported = jax.export.export(jax.jit(prog.fn), platforms=platforms,
                                         disabled_checks=disabled)(*prog.groups)
        except (ValueError, NotImplementedError) as e:
            if program == "train" and len(platforms) > 1:
                # jax 0.10 differentiates a platform switch as a `switch` whose every branch is lowered for every
                # platform: a Mosaic or cuDNN kernel has no lowering on the others
                raise ValueError(f"the train step exports for one platform at a time with platform-specific "
                                 f"attention kernels (asked for {list(platforms)}): {type(e).__name__}: {e}") from e
            raise
    seconds = time.perf_counter() - t0
    text = exported.mlir_module()
    calls = custom_calls(text)
    none = [None] * len(exported.in_avals), [None] * len(exported.out_avals)
    in_shardings, out_shardings = none if device_mesh is None else (exported.in_shardings_jax(device_mesh),
                                                                    exported.out_shardings_jax(device_mesh))
    arg_names = _leaf_names(exported.in_tree, exported.in_avals, prog.group_names)
    out_names = _leaf_names(exported.out_tree, exported.out_avals, prog.result_names)
    manifest = {
        "format": FORMAT, "program": program, "model": label, "model_type": config.model_type,
        "platforms": list(exported.platforms), "dtype": str(np.dtype(dtype)), "mesh": mesh_sizes,
        "nr_devices": exported.nr_devices, "scan_layers": config.scan_layers,
        "layers": config.text_config.num_hidden_layers, "quantization": shapes.quantization,
        "attn_implementation": attn_implementation,
        "attention_by_platform": {p: platform_backend(attn_implementation, p) for p in platforms},
        "shapes": dataclasses.asdict(shapes), "argument_groups": list(prog.group_names),
        "arguments": _describe(exported.in_avals, in_shardings, arg_names),
        "results": _describe(exported.out_avals, out_shardings, out_names),
        "custom_calls": calls,
        "unguaranteed_custom_calls": [c for c in calls if c in (*CUDNN_CALLS, *CPU_KERNEL_CALLS)],
        "cudnn_fallbacks": _unique(fallbacks) if "cuda" in platforms else [],
        "assumed_cudnn_version": jax_nn.ASSUMED_CUDNN_VERSION if "cuda" in platforms else None,
        "module_bytes": len(exported.mlir_module_serialized), "calling_convention_version":
            exported.calling_convention_version, "jax_version": jax.__version__,
        "memory_plan_bytes_per_device": plan.total_per_device, "memory_plan": plan.as_dict(),
        "export_seconds": round(seconds, 3),
    }
    return Artifact(exported, manifest)


def _unique(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out
