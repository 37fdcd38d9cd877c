"""Evaluation: predictions over a dataset, the benchmarks' metrics, log-likelihood scoring, lmms-eval's plugin.

    scoring.py    score(model, processor, prompts, continuations): summed log-probabilities, greedy or not
    predict.py    read_items (prompts in the fine-tuning JSONL format), Predictor: answers on the serving engine
"""

from .predict import Item, Predictor, generation_config, read_items
from .scoring import Score, encode_prompt, score

__all__ = ["Item", "Predictor", "Score", "encode_prompt", "generation_config", "read_items", "score"]
