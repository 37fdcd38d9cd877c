"""qwen2vl_jax"""
