"""Programs lowered for TPU, CUDA and CPU on any host with `jax.export`: the vision tower, the prefill, a decode
step and a LoRA training step, with abstract weights, on one device or a mesh (`qwen2vl-jax export`).

    from qwen2vl_jax.export import Shapes, export_program, load_artifact
    art = export_program("7b", "prefill", platforms=("tpu",), mesh={"data": 2, "model": 4},
                         shapes=Shapes(batch=8, prompt_len=2048))
    art.manifest["custom_calls"]      # ['tpu_custom_call', ...]: the Mosaic flash attention is in the program
    art.save("prefill_7b_tpu/")

On the TPU host: `art = load_artifact("prefill_7b_tpu/")`, then `art.call(weights, inputs)` with the weights of
`nnx.state(model)` flattened by `flatten` (a model loaded with `from_pretrained(..., mesh=...)`) and the inputs
named in `manifest["arguments"]`. `programs` says what each program is; `artifact` what a manifest holds.
"""

from .artifact import Artifact, custom_calls, export_program, load_artifact, resolve_config
from .programs import PROGRAMS, Program, Shapes, build, flatten, unflattener

__all__ = ["PROGRAMS", "Artifact", "Program", "Shapes", "build", "custom_calls", "export_program", "flatten",
           "load_artifact", "resolve_config", "unflattener"]
