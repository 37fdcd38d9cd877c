"""What every named block of the model shares, kept out of the blocks' arithmetic: its place in the model (the
hook-point prefix), the one-line hook helper, and rematerialisation wrapped once.

A block's `__call__` reads as its formula; a step a researcher may read or replace is written

    x_BTD = self.hook("resid_mid", x_BTD + attn_out_BTD)

which is the value itself unless a hooked run asks for `text.layers.{i}.resid_mid` (`hook_points.point`: no hook,
no change to the compiled program).
"""

from __future__ import annotations

import functools

import jax
from flax import nnx

from .config import REMAT_POLICIES
from .hook_points import point, wants


class Block(nnx.Module):
    """A module with a place in the model: `name` (its hook points are `{name}.{suffix}`, e.g.
    `text.layers.3.attn.q`) and `layer` (the index hooks are told). A block without a name is an error, not
    layer 0: every constructor takes both."""

    def place(self, name: str, layer: int | None) -> None:
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"{type(self).__name__} needs its hook-point name (e.g. 'text.layers.0.attn'), "
                             f"got {name!r}")
        self.name, self.layer = name, layer

    def hook(self, suffix: str, value: jax.Array) -> jax.Array:
        """The hook point `{name}.{suffix}`: `value` itself unless the current run hooks or records it."""
        return point(f"{self.name}.{suffix}", value, self.layer)

    def hooked(self, *suffixes: str) -> bool:
        """Whether the current run hooks or records any of these points (a value that costs something to
        produce, like attention probabilities, is produced only then)."""
        return any(wants(f"{self.name}.{s}") for s in suffixes)


class MLPBlock(Block):
    """A row-wise block (an MLP, whose hook point is `{name}.act`): a caller may run it in row blocks
    (`layers.rowwise`) unless something needs the whole call at once."""

    def projections(self) -> tuple:
        """Its Linears."""
        raise NotImplementedError

    def row_blockable(self) -> bool:
        """Rows may run in blocks unless a hook wants the whole `act`, or a LoRA adapter sits on a projection (its
        dropout draws per call)."""
        return not self.hooked("act") and all(p.lora is None for p in self.projections())


def remat_policy(name: str):
    """The `jax.checkpoint` policy named by one of `config.REMAT_POLICIES`."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; use one of {REMAT_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


@functools.cache
def checkpointed(policy: str):
    """`block(*args)` under `nnx.remat` with the named policy: the backward pass recomputes what the policy did
    not keep (transformers' `GradientCheckpointingLayer`). Called as `checkpointed(policy)(block, *args)`."""
    return nnx.remat(lambda block, *args: block(*args), policy=remat_policy(policy))
