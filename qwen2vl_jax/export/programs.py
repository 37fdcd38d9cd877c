"""The programs an export lowers, as functions of named argument groups, with abstract arguments.

Each program is the function the live model runs, called the way the live model calls it:

* `vision`: the vision tower on padded patch rows (`modeling.programs._vision`; `VisionTransformer.run_padded`):
  `(weights of model.visual, inputs) -> {"features": merged [M_pad, D]}` for one vision grid's layout
  (`vision_layout`).
* `prefill`: generation's prefill (`generation.decoding._prefill`): the prompt (with one grid's vision features in
  its placeholder slots, or text only) into an empty prompt-sized cache, `(weights, inputs) -> {"logits": last
  position [B, V], "cache.*": the filled cache}`.
* `decode`: one greedy decode step over a `cache_len`-slot cache (`generation.decoding._decode_step`, the streaming
  step: forward one token, the logits processors, pick, mark finished rows), `(weights, state, knobs) -> state`.
* `engine_step`: one step of the serving engine (`engine.step._step`): a prefill chunk of `prompt_len` tokens and
  one token for each of `batch` decode slots over a paged KV cache (pages of `ENGINE_PAGE_SIZE`, `cache_len`
  tokens per slot), then every slot's pick, `(weights, state, inputs, settings) -> (tokens, state)`. Its attention
  over pages is JAX's Pallas `ragged_paged_attention` on TPU (lowered under `pallas_paged.for_tpu_lowering`, which
  Mosaic needs off a TPU host). One device only: the kernel under `shard_map` on a mesh is not wired yet.
* `train`: one LoRA training step (`training.steps._train_step`: forward, loss, gradients of the adapters,
  AdamW update) on a batch of text rows, `(trainable, frozen, rest, opt_state, batch) -> (trainable, rest,
  opt_state, metrics)`.

Arguments and results cross the program's boundary as flat `{name: array}` dicts per group (names are the pytree
paths, `flatten`), so an artifact is called with plain dicts on any host: `Exported.call(*groups)`. With a mesh,
every argument carries the sharding the live model would give it: weights by `sharding.param_shardings`, batch
rows over "data" / "fsdp", the KV cache by `partitioning.KV_CACHE_AXES`, everything else replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..attention import PagedBatch
from ..engine import step as engine_step
from ..generation import decoding
from ..generation.sampling import Knobs
from ..lora import apply_lora
from ..modeling import programs as model_programs
from ..modeling.config import Qwen2VLConfig
from ..modeling.kv_cache import KVCache
from ..modeling.model import Qwen2VL
from ..modeling.parameters import abstract_model as abstract_of
from ..modeling.parameters import model_params
from ..modeling.partitioning import Partitioning, kv_cache_axes
from ..modeling.vision_layout import vision_layout
from ..quantization import quantize
from ..sharding.mesh import param_shardings, set_partitioning
from ..training.steps import Batch, _train_step, make_optimizer

PROGRAMS = ("vision", "prefill", "decode", "engine_step", "train")
ENGINE_PAGE_SIZE = 16  # the engine_step program's page size (the Engine's default)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What decides a program's shapes (the CLI's flags)."""

    batch: int = 1
    prompt_len: int = 1024  # prefill and train: tokens per row
    cache_len: int = 2048  # decode: the KV cache's slots
    vision_grid: tuple[int, int, int] | None = (1, 32, 32)  # (t, h, w) in patches: one 448x448 image
    lora_rank: int = 16  # train
    quantization: str | None = None  # "int8" / "int4": the text decoder's projections (`qwen2vl_jax.quantization`)


def check_shapes(config: Qwen2VLConfig, shapes: Shapes) -> None:
    """Refuse, by name and before anything is traced, shapes no program can have: non-positive or non-integer
    sizes, a prompt or cache beyond the model's positions, a vision grid whose merged tokens could fill no prompt
    (its host layout would be that large), an unknown quantization."""
    from ..quantization import MODES

    limit = config.text_config.max_position_embeddings
    for name in ("batch", "prompt_len", "cache_len", "lora_rank"):
        value = getattr(shapes, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("prompt_len", "cache_len"):
        if getattr(shapes, name) > limit:
            raise ValueError(f"{name} {getattr(shapes, name)} is beyond the model's max_position_embeddings ({limit})")
    grid = shapes.vision_grid
    if grid is not None:
        if len(grid) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
            raise ValueError(f"vision_grid must be three positive integers (t, h, w), got {grid!r}")
        merged = grid[0] * grid[1] * grid[2] // config.vision_config.spatial_merge_size ** 2
        if merged > limit:
            raise ValueError(f"vision_grid {tuple(grid)} makes {merged} vision tokens, more than any prompt holds "
                             f"(max_position_embeddings {limit})")
    if shapes.quantization not in (None, *MODES):
        raise ValueError(f"unknown quantization {shapes.quantization!r}; choose one of {MODES}")


@dataclasses.dataclass(frozen=True)
class Program:
    """A program ready to lower: `fn(*groups)` on flat dicts, the abstract groups, and what the groups are."""

    name: str
    fn: Callable
    groups: tuple[dict[str, jax.ShapeDtypeStruct], ...]
    group_names: tuple[str, ...]
    result_names: tuple[str, ...]


# ------------------------------------------------------------------------------------------ flat boundaries
def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def flatten(tree) -> dict[str, jax.Array]:
    """`{path: leaf}` of a pytree (PRNG keys as their uint32 key data: artifacts hold plain arrays only)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf) if isinstance(leaf, jax.Array) else _key_data_struct(leaf)
        out[_name(path)] = leaf
    return out


def _key_data_struct(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, leaf)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def unflattener(template) -> Callable[[dict], object]:
    """The inverse of `flatten` for trees shaped like `template` (PRNG keys, of the default implementation, are
    wrapped back)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [_name(p) for p, _ in leaves]
    keys = [jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) for _, leaf in leaves]
    default_key = jax.eval_shape(lambda: jax.random.key(0)).dtype
    if any(k and leaf.dtype != default_key for k, (_, leaf) in zip(keys, leaves)):
        raise ValueError(f"only PRNG keys of the default implementation ({default_key}) can cross an artifact's "
                         "boundary")

    def unflatten(flat: dict):
        values = [jax.random.wrap_key_data(flat[n]) if key else flat[n] for n, key in zip(names, keys)]
        return jax.tree_util.tree_unflatten(treedef, values)

    return unflatten


def _abstract(x, sharding=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    """An argument's template: shape and dtype only (a batch x vocabulary table is never allocated)."""
    return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


class _Placement:
    """Shardings of the live model's arguments on `mesh` (None: one device, no shardings)."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh
        self.partitioning = Partitioning.of(mesh) if mesh is not None else None

    def replicated(self, tree):
        sharding = NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else None
        return jax.tree.map(lambda x: _abstract(x, sharding), tree)

    def by_axes(self, tree, axes_of: Callable[[int], tuple]):
        """Each leaf sharded by the logical axes `axes_of(ndim)` (rows over the batch axes)."""
        if self.mesh is None:
            return jax.tree.map(_abstract, tree)
        return jax.tree.map(lambda x: _abstract(x, self.partitioning.sharding(axes_of(len(np.shape(x))),
                                                                               np.shape(x))), tree)

    def rows(self, tree):
        return self.by_axes(tree, lambda ndim: ("batch",) + (None,) * (ndim - 1))

    def cache(self, cache: KVCache) -> KVCache:
        kv = lambda x: self.by_axes(x, kv_cache_axes)
        return dataclasses.replace(cache, keys=kv(cache.keys), values=kv(cache.values),
                                   mask_BS=self.rows(cache.mask_BS), length=self.replicated(cache.length),
                                   rope_deltas_B=self.rows(cache.rope_deltas_B))


def _place_params(model, placement: _Placement, *, adapters: bool = False) -> None:
    """Give every (abstract) parameter of `model` its sharding on the mesh, and the model its partitioning."""
    if placement.mesh is None:
        return
    shardings = param_shardings(model, placement.mesh, adapters=adapters)
    for path, p in model_params(model, adapters=adapters).items():
        p.set_value(jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=shardings[path]))
    set_partitioning(model, placement.partitioning)


def _program(name: str, fn: Callable, groups: dict[str, object], result_names: tuple[str, ...]) -> Program:
    """Wrap `fn(*trees)` as a function of flat dicts, with the abstract groups flattened."""
    unflatteners = [unflattener(tree) for tree in groups.values()]

    def flat_fn(*flat_groups):
        out = fn(*(u(g) for u, g in zip(unflatteners, flat_groups)))
        return tuple(flatten(o) for o in out) if isinstance(out, tuple) else flatten(out)

    return Program(name, flat_fn, tuple(flatten(t) for t in groups.values()), tuple(groups), result_names)


# --------------------------------------------------------------------------------------------- programs
def _placed(config: Qwen2VLConfig, dtype, shapes: Shapes, placement: _Placement, attn_implementation: str | None):
    """The abstract (quantized) model with its parameters placed on the mesh."""
    model = abstract_model(config, dtype, attn_implementation=attn_implementation, quantization=shapes.quantization)
    _place_params(model, placement)
    return model


def _empty_cache(config: Qwen2VLConfig, dtype, batch: int, slots: int, placement: _Placement) -> KVCache:
    return placement.cache(jax.eval_shape(lambda: KVCache.init(config.text_config, batch, slots, jnp.dtype(dtype),
                                                               stacked=config.scan_layers)))


def abstract_model(config: Qwen2VLConfig, dtype, *, attn_implementation: str | None = None,
                   lora_rank: int | None = None, quantization: str | None = None):
    """The model (quantized with `quantization`; with `lora_rank`, its LoRA adapters: QLoRA when both) with shapes
    and dtypes only: nothing is allocated."""

    model = abstract_of(Qwen2VL, config, jnp.dtype(dtype))
    if quantization:
        model = nnx.eval_shape(lambda m: quantize(m, quantization), model)
    if lora_rank:
        model = nnx.eval_shape(lambda m: (apply_lora(m, lora_rank), m)[1], model)
    model.set_attn_implementation(attn_implementation)
    return model


def vision_program(config: Qwen2VLConfig, dtype, shapes: Shapes, placement: _Placement,
                   attn_implementation: str | None) -> Program:
    if shapes.vision_grid is None:
        raise ValueError("the vision program needs a vision grid (t, h, w)")
    graphdef, weights = nnx.split(_placed(config, dtype, shapes, placement, attn_implementation).visual)  # its own
    v = config.vision_config
    layout = vision_layout(np.asarray([shapes.vision_grid]), v.spatial_merge_size, window_tokens=v.window_tokens)
    inputs = {"pixels": _sds((layout.padded_patches, v.patch_dim), np.float32), "pos_hw": layout.pos_hw_P2,
              "segments": layout.segments()}

    def vision(weights, inputs):
        visual = nnx.merge(graphdef, weights)
        merged_MD, _, _ = model_programs._vision(visual, inputs["pixels"], inputs["pos_hw"], inputs["segments"])
        return {"features": merged_MD}

    return _program("vision", vision, {"weights": weights, "inputs": placement.replicated(inputs)}, ("outputs",))


def _vision_rows(config: Qwen2VLConfig, shapes: Shapes) -> int:
    """Merged vision feature rows the prefill's prompt holds (0: text only)."""
    if shapes.vision_grid is None:
        return 0
    t, h, w = shapes.vision_grid
    return t * h * w // config.vision_config.spatial_merge_size ** 2


def prefill_program(config: Qwen2VLConfig, dtype, shapes: Shapes, placement: _Placement,
                    attn_implementation: str | None) -> Program:
    graphdef, weights = nnx.split(_placed(config, dtype, shapes, placement, attn_implementation))
    B, T, M = shapes.batch, shapes.prompt_len, _vision_rows(config, shapes)
    if M > T:
        raise ValueError(f"a prompt of {T} tokens cannot hold the vision grid's {M} feature rows "
                         f"(raise --prompt-len or shrink --vision-grid)")
    inputs = {**placement.rows({"input_ids": _sds((B, T), np.int32), "attention_mask": _sds((B, T), np.int32)}),
              "offset": placement.replicated(_sds((), np.int32)),
              "position_ids": placement.by_axes(_sds((3, B, T), np.int32), lambda n: (None, "batch", None)),
              "cache": _empty_cache(config, dtype, B, T, placement)}
    if M:
        inputs["vision"] = placement.replicated(_sds((M, config.text_config.hidden_size), dtype))
        inputs["vision_index"] = placement.rows(_sds((B, T), np.int32))

    def prefill(weights, inputs):
        model = nnx.merge(graphdef, weights)
        logits_BV, cache, _ = decoding._prefill(model, inputs["input_ids"], inputs["attention_mask"],
                                                inputs["position_ids"], inputs.get("vision"),
                                                inputs.get("vision_index"), inputs["cache"], None, inputs["offset"])
        return {"logits": logits_BV, "cache": cache}

    return _program("prefill", prefill, {"weights": weights, "inputs": inputs}, ("outputs",))


def decode_program(config: Qwen2VLConfig, dtype, shapes: Shapes, placement: _Placement,
                   attn_implementation: str | None) -> Program:
    graphdef, weights = nnx.split(_placed(config, dtype, shapes, placement, attn_implementation))
    B, S, V = shapes.batch, shapes.cache_len, config.text_config.vocab_size
    rows = placement.rows
    state = decoding.DecodeState(
        cache=_empty_cache(config, dtype, B, S, placement), tokens_BR=rows(_sds((B, S), np.int32)),
        last_B=rows(_sds((B,), np.int32)), seen_BV=rows(_sds((B, V), bool)), finished_B=rows(_sds((B,), bool)),
        step=placement.replicated(_sds((), np.int32)),
        rng=placement.replicated(jax.eval_shape(lambda: jax.random.key(0))), logits_BRV=None,
        offset=placement.replicated(_sds((), np.int32)))
    scalar = lambda dt: _sds((), dt)
    knobs = placement.replicated(Knobs(
        temperature=scalar(np.float32), top_k=scalar(np.int32), top_p=scalar(np.float32),
        repetition_penalty=scalar(np.float32), min_new_tokens=scalar(np.int32), max_new_tokens=scalar(np.int32),
        eos_ids=_sds((2,), np.int32), pad_id=scalar(np.int32)))

    def decode(weights, state, knobs):
        return decoding._decode_step(nnx.merge(graphdef, weights), state, knobs, do_sample=False)

    return _program("decode", decode, {"weights": weights, "state": state, "knobs": knobs}, ("state",))


def engine_step_program(config: Qwen2VLConfig, dtype, shapes: Shapes, placement: _Placement,
                        attn_implementation: str | None) -> Program:
    if placement.mesh is not None:
        raise ValueError("the engine_step program exports for one device: its paged attention under shard_map on a "
                         "mesh is not wired yet")
    model = _placed(config, dtype, shapes, placement, attn_implementation)
    graphdef, weights = nnx.split(model)
    S, C, D, V = shapes.batch, shapes.prompt_len, config.text_config.hidden_size, config.text_config.vocab_size
    per_seq = -(-(shapes.cache_len + C) // ENGINE_PAGE_SIZE)
    pages = 1 + S * -(-shapes.cache_len // ENGINE_PAGE_SIZE)
    cache = jax.eval_shape(lambda: model.init_paged_cache(pages, ENGINE_PAGE_SIZE, jnp.dtype(dtype)))
    i32 = lambda *shape: _sds(shape, np.int32)
    batch = PagedBatch(i32(C + S), i32(S + 1), i32(S + 1, per_seq), i32(S + 2), i32(1), ((1, C), (S, 1)))
    state = {"cache": cache, "seen": _sds((S, V), bool)}
    inputs = {"ids": i32(C + S), "positions": i32(3, C + S), "vision": _sds((C, D), dtype),
              "vision_index": i32(C + S), "batch": batch, "logit_rows": i32(S), "emit": _sds((S,), bool)}
    settings = engine_step.SlotSettings(
        Knobs(temperature=_sds((S,), np.float32), top_k=i32(S), top_p=_sds((S,), np.float32),
              repetition_penalty=_sds((S,), np.float32), min_new_tokens=i32(S), max_new_tokens=i32(S),
              eos_ids=i32(S, 8), pad_id=i32(S)),
        _sds((S,), bool), _sds((S, 2), np.uint32), i32(S))

    def step(weights, state, inputs, settings):
        tokens, seen, cache, _ = engine_step._step(
            nnx.merge(graphdef, weights), state["cache"], state["seen"], inputs["ids"], inputs["positions"],
            inputs["vision"], inputs["vision_index"], inputs["batch"], inputs["logit_rows"], inputs["emit"], settings,
            keep_logits=False)
        return {"tokens": tokens}, {"cache": cache, "seen": seen}

    groups = {"weights": weights, "state": state, "inputs": inputs, "settings": settings}
    return _program("engine_step", step, groups, ("outputs", "state"))


def train_program(config: Qwen2VLConfig, dtype, shapes: Shapes, placement: _Placement,
                  attn_implementation: str | None) -> Program:
    import optax

    if config.scan_layers:
        raise ValueError("the train program applies LoRA, which needs scan_layers=False")
    model = abstract_model(config, dtype, attn_implementation=attn_implementation, lora_rank=shapes.lora_rank,
                           quantization=shapes.quantization)
    _place_params(model, placement, adapters=True)
    optimizer = nnx.eval_shape(lambda m: make_optimizer(m, optax.adamw(1e-4), "lora"), model)
    graphdef, trainable, frozen, rest = nnx.split(model, optimizer.wrt, nnx.Param, ...)
    opt_def, opt_state = nnx.split(optimizer)
    B, T = shapes.batch, shapes.prompt_len
    batch = Batch(*placement.rows((_sds((B, T), np.int32),) * 2),
                  placement.by_axes(_sds((3, B, T), np.int32), lambda n: (None, "batch", None)),
                  placement.rows(_sds((B, T), np.int32)))
    wrt = optimizer.wrt

    def train(trainable, frozen, rest, opt_state, batch):
        return _train_step(graphdef, opt_def, wrt, trainable, rest, opt_state, frozen, batch)

    groups = {"trainable": trainable, "frozen": frozen, "rest": rest, "opt_state": opt_state, "batch": batch}
    return _program("train", train, groups, ("trainable", "rest", "opt_state", "metrics"))


BUILDERS = {"vision": vision_program, "prefill": prefill_program, "decode": decode_program,
            "engine_step": engine_step_program, "train": train_program}


def build(program: str, config: Qwen2VLConfig, dtype, shapes: Shapes, mesh: Mesh | None = None,
          attn_implementation: str | None = None) -> Program:
    """The `program` (one of `PROGRAMS`) of `config` in `dtype`, placed on `mesh`."""
    if program not in BUILDERS:
        raise ValueError(f"unknown program {program!r}; choose one of {', '.join(PROGRAMS)}")
    check_shapes(config, shapes)
    return BUILDERS[program](config, dtype, shapes, _Placement(mesh), attn_implementation)
