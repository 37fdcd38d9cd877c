"""Activations on disk and sparse autoencoders on them: run a dataset through the model, store chosen hook points
one row per token, train an SAE on them, splice it back into the model.

    store.py   build_store (a prompts JSONL -> resumable safetensors shards + manifest), ActivationStore (shuffled
               batches across shards, per-row metadata: item, position, M-RoPE positions, image / video tokens)
    sae.py     SAE (ReLU or TopK), train_sae (optax Adam, unit-norm decoder rows), save_sae / load_sae,
               splice_sae (hooks, with SAELens' error term), sae_features
"""

from .sae import SAE, init_sae, load_sae, sae_features, save_sae, splice_sae, train_sae
from .store import GROUPS, MANIFEST, ActivationStore, StoreError, build_store

__all__ = ["GROUPS", "MANIFEST", "ActivationStore", "StoreError", "build_store", "SAE", "init_sae", "load_sae",
           "sae_features", "save_sae", "splice_sae", "train_sae"]
