"""`platform_dependent`: `jax.lax.platform_dependent` whose branches are each lowered for their own platforms only.

jax 0.10's `jax.lax.platform_dependent` stages a `switch` on the platform index. Lowered for one platform, only
that platform's branch is emitted. Lowered for several at once (`jax.export(..., platforms=("tpu", "cuda",
"cpu"))`), every branch is emitted for *every* platform of the module, so a branch holding a kernel only one
platform can lower fails the whole export: a Mosaic `pallas_call` has no CPU or GPU lowering, cuDNN attention no
TPU or CPU lowering.

Here the branches are traced to jaxprs held by one primitive whose lowering (`mlir.lower_per_platform`) emits a
branch per platform group, and each branch's jaxpr is lowered in a module context narrowed to the platforms that
select it. One program exported for TPU, CUDA and CPU then carries Mosaic for the TPU, cuDNN for CUDA and the CPU
kernels for the CPU, and each platform's compiler sees only its own branch.

Differentiation goes through `jax.lax.platform_dependent` (a `custom_jvp`): gradients are the branches' own, as
they were, and a differentiated program (the training step) is exported for one platform at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax._src import core as jax_core
from jax._src.interpreters import batching, mlir

platform_dependent_p = jax_core.Primitive("qwen2vl_platform_dependent")
platform_dependent_p.multiple_results = True


def platform_dependent(*args, default: Callable, **per_platform: Callable):
    """`per_platform[p](*args)` on platform `p` ("cpu", "cuda", "rocm", "tpu"), `default(*args)` elsewhere; the
    choice is made when the program is lowered, and a multi-platform lowering carries each platform's branch
    lowered for that platform alone. `args` may be pytrees; the branches must return the same tree."""
    platforms, branches = _join(per_platform, default)
    flat_args, in_tree = jax.tree.flatten(args)

    @jax.custom_jvp
    def choose(*flat):
        return _bind(flat, in_tree, platforms, branches)

    @choose.defjvp
    def choose_jvp(primals, tangents):
        switch = lambda *flat: jax.lax.platform_dependent(*jax.tree.unflatten(in_tree, flat), default=default,
                                                          **per_platform)
        return jax.jvp(switch, primals, tangents)

    return choose(*flat_args)


def _join(per_platform: dict[str, Callable], default: Callable):
    """((platforms of branch 0), ..., None for the default), branches): identical branches joined."""
    groups: list[tuple[list[str], Callable]] = []
    for name, fn in per_platform.items():
        if name == "gpu":
            raise ValueError("platform_dependent: use 'cuda' or 'rocm', not 'gpu'")
        for names, other in groups:
            if other is fn:
                names.append(name)
                break
        else:
            groups.append(([name], fn))
    return (*(tuple(n) for n, _ in groups), None), (*(fn for _, fn in groups), default)


def _bind(flat_args, in_tree, platforms, branches):
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat_args]
    jaxprs, out_tree = [], None
    for fn in branches:
        closed, shape = jax.make_jaxpr(lambda *flat, fn=fn: fn(*jax.tree.unflatten(in_tree, flat)),
                                       return_shape=True)(*avals)
        tree = jax.tree.structure(shape)
        if out_tree is not None and tree != out_tree:
            raise TypeError(f"platform_dependent: branches return different trees: {out_tree} vs {tree}")
        out_tree = tree
        jaxprs.append(closed)
    outs = platform_dependent_p.bind(*flat_args, jaxprs=tuple(jaxprs), platforms=platforms)
    return jax.tree.unflatten(out_tree, outs)


@platform_dependent_p.def_effectful_abstract_eval
def _abstract_eval(*avals, jaxprs, platforms):
    del avals, platforms
    return jaxprs[0].out_avals, jax_core.join_effects(*(j.effects for j in jaxprs))


@platform_dependent_p.def_impl
def _impl(*args, jaxprs, platforms):
    return jax.jit(functools.partial(platform_dependent_p.bind, jaxprs=jaxprs, platforms=platforms))(*args)


def _batch(args, dims, *, jaxprs, platforms):
    mapped = [d is not None and d is not getattr(batching, "not_mapped", None) for d in dims]
    size = next(x.shape[d] for x, d, m in zip(args, dims, mapped) if m)
    args = [jax.numpy.moveaxis(x, d, 0) if m else x for x, d, m in zip(args, dims, mapped)]
    in_axes = [0 if m else None for m in mapped]
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    batched = tuple(jax.make_jaxpr(jax.vmap(jax_core.jaxpr_as_fun(j), in_axes=in_axes, axis_size=size))(*avals)
                    for j in jaxprs)
    return platform_dependent_p.bind(*args, jaxprs=batched, platforms=platforms), [0] * len(batched[0].out_avals)


batching.primitive_batchers[platform_dependent_p] = _batch


def _lower_branch(ctx: mlir.LoweringRuleContext, *args, jaxpr: jax_core.ClosedJaxpr):
    """Lower one branch in a module context narrowed to the platforms this rule serves (fresh lowering caches:
    a function lowered for several platforms takes a platform index the narrowed one does not)."""
    module = ctx.module_context
    platforms = tuple(mlir._platforms_for_eqn(ctx))
    state = module.shape_poly_state
    dim_vars = state.dim_vars[1:] if state.has_platform_index_argument else state.dim_vars
    dim_values = list(ctx.dim_var_values)
    narrowed_state = mlir.ShapePolyLoweringState(dim_vars, platforms)
    if state.has_platform_index_argument and not narrowed_state.has_platform_index_argument:
        dim_values = dim_values[1:]
    narrowed = module.replace(platforms=platforms, shape_poly_state=narrowed_state, lowering_cache={},
                                   cached_primitive_lowerings={})
    consts = mlir.ir_consts(jaxpr.consts, [v.aval for v in jaxpr.jaxpr.constvars])
    outs, tokens = mlir.jaxpr_subcomp(narrowed, jaxpr.jaxpr, ctx.name_stack, ctx.tokens_in, consts, *args,
                                      dim_var_values=dim_values, const_lowering=ctx.const_lowering,
                                      outer_traceback=ctx.traceback)
    ctx.set_tokens_out(tokens)
    return outs


def _lowering(ctx: mlir.LoweringRuleContext, *args, jaxprs, platforms):
    rules, default = {}, None
    for jaxpr, names in zip(jaxprs, platforms):
        rule = functools.partial(_lower_branch, jaxpr=jaxpr)
        if names is None:
            default = rule
        else:
            rules.update((name, rule) for name in names)
    effects = jax_core.join_effects(*(j.effects for j in jaxprs))
    return mlir.lower_per_platform(ctx, "qwen2vl_jax platform_dependent", rules, default, effects, *args)


mlir.register_lowering(platform_dependent_p, _lowering)
