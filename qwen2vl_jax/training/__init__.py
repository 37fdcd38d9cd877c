"""Training: the loss and the steps (`steps.py`: `causal_lm_loss`, `train_step`, `prepare_batch`, optimizers and
recipes), conversation data (`data.py`) and the fine-tuning loop with its checkpoints (`finetune.py`, the
`qwen2vl-jax finetune` command)."""

from .steps import (
    IGNORE_INDEX,
    TRAINABLE_PRESETS,
    Batch,
    accumulate_step,
    apply_gradients,
    batch_axes,
    batch_logits,
    batch_loss,
    causal_lm_loss,
    compiles,
    default_recipe,
    eval_step,
    finish_metrics,
    grad_step,
    loss_sums,
    make_optimizer,
    prepare_batch,
    recipe_schedule,
    shard_batch,
    token_losses,
    train_step,
    trainable_filter,
    trainable_params,
)

__all__ = ["Batch", "IGNORE_INDEX", "TRAINABLE_PRESETS", "accumulate_step", "apply_gradients", "batch_axes",
           "batch_logits", "batch_loss", "causal_lm_loss", "compiles", "default_recipe", "eval_step",
           "finish_metrics", "grad_step", "loss_sums", "make_optimizer", "prepare_batch", "recipe_schedule",
           "shard_batch", "token_losses", "train_step", "trainable_filter", "trainable_params"]
