"""`Qwen2VLJax`: lmms-eval's model interface (`lmms_eval.api.model.lmms`) over qwen2vl_jax, for Qwen2-VL and
Qwen2.5-VL checkpoints.

    --model qwen2vl_jax --model_args pretrained=DIR_OR_HUB_ID[,dtype=bfloat16][,max_pixels=602112][,min_pixels=3136]
        [,max_slots=8][,max_new_tokens=128][,adapter=DIR][,quantize=int8|int4][,attn_implementation=NAME]
        [,system_prompt=TEXT][,loglikelihood=auto|nll|logprob][,max_context=8192][,exact_fp32=true]

lmms-eval hands a "simple" model `Instance`s whose `args` are (lmms-eval 0.7.3, lmms_eval/api/task.py
`construct_requests`):

    generate_until              (context, gen_kwargs, doc_to_visual, doc_id, task, split)
    loglikelihood               (context, continuation, doc_to_visual, doc_id, task, split); `continuation` is the
                                option text (a `multiple_choice` task) or the task's `doc_to_target` function (a
                                `loglikelihood` task); ("", option) for `acc_mutual_info`'s unconditional terms
    generate_until_multi_round  (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)

and the documents in `self.task_dict[task][split][doc_id]` (set by lmms_eval/evaluator.py). The prompt is built as
lmms-eval's own HF Qwen2-VL class builds it (lmms_eval/models/simple/qwen2_vl.py `generate_until`): one user turn,
the document's visuals first (PIL images; a path ending in a video suffix is a video), then the context with any
"<image>" tag removed; the chat template's default system prompt unless `system_prompt` is given. Two differences:
images go to the processor as they are (their class re-encodes each as a JPEG data URL first, which is lossy), and
the pixel bounds are the processor's own (`min_pixels` / `max_pixels`, the same defaults 3136 / 602112).

`generate_until` runs on the serving engine through `evaluation.predict.Predictor` (continuous batching over
`max_slots` slots; rows in input order). `gen_kwargs` as their class reads them: `max_new_tokens` (default 128),
`temperature` (default 0 = greedy; > 0 samples, with `top_p`), `until` (stop strings; the answer is cut before the
first one), the checkpoint's generation_config.json for the rest (repetition_penalty 1.05 in the Instruct ones, as
transformers' `generate` applies it there too); the answer is stripped of surrounding whitespace as theirs is. An
item the engine cannot run (an unreadable image, a prompt longer than `max_context`) is answered "" with a warning,
so one bad document does not end a long run.

`loglikelihood` runs `evaluation.scoring.score` (the continuation's summed token log-probabilities after the
prompt rendered with the generation prompt, and whether every token is the argmax). Which number goes back: the
docstring of `lmms.loglikelihood` says the log-probability, but lmms-eval 0.7.3's `multiple_choice` scoring
picks `np.argmin` of the returned values (api/task.py `process_results`: "we return the actual loss in many model
loglikelihood"; its LLaVA class returns the loss), while a `loglikelihood` task's perplexity aggregation is
`exp(-mean(values))` (api/metrics.py), which wants log-probabilities. So `loglikelihood="auto"` (default) returns
the negative log-likelihood (-logprob, the summed loss) for an option given as text (multiple_choice: `acc` then
picks the likeliest option, `acc_norm` the likeliest per character) and the log-probability for a task's
`doc_to_target` (perplexity); "nll" and "logprob" force one sign for every request. (`acc_mutual_info`, which takes
the argmax of conditional minus unconditional values, cannot be right with either sign under argmin scoring.)
lmms-eval 0.7.3's evaluator turns a plain (float, bool) response into its str() (api/instance.py
`unwrap_generation_output`, applied to every request type), which breaks `multiple_choice` for its own models too; so
each pair goes back as the `text` of a `GenerationResult`, which that function returns untouched. Its `--use_cache`
cannot hold such responses (it calls `.text.strip()`): leave it off for likelihood tasks.

`generate_until_multi_round` follows their class: round 0 answers the context; each later round asks the task's
`doc_to_text(doc, previous_output=answers, round_idx=r, previous_round_info=info)` for (visuals, context, terminal,
answers, info) and stops at `terminal`; each round is a fresh single-turn prompt; `until` is not used (their class
drops it). Rounds run batched across the documents still going; the result is each document's list of answers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tqdm import tqdm

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # the module still imports (the package's import checks), the class refuses to start
    _MISSING = e
    Instance = Any

    class lmms:  # noqa: N801 (lmms-eval's name)
        def __init__(self) -> None:
            raise ImportError(f"the lmms-eval plugin needs lmms-eval (pip install lmms-eval==0.7.3): {_MISSING}")

try:  # lmms-eval >= 0.7: per-sample token counts in the results (older versions take plain strings)
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:  # pragma: no cover
    GenerationResult = TokenCounts = None

__all__ = ["Qwen2VLJax"]

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # lmms_eval/models/simple/qwen2_vl.py `default_gen_kwargs`
DEFAULT_BATCH_SIZE = 8  # score() rows per forward when lmms-eval's --batch_size is "auto"
SCORE_CHUNK = 64  # loglikelihood requests encoded at a time (their pixels are held until the chunk is scored)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")  # their class: .mp4 / .avi / .mov
GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")  # passed on to Predictor
IGNORED_GEN_KEYS = ("do_sample", "num_beams", "until")  # do_sample follows temperature, as in their class
LOGLIKELIHOOD_MODES = ("auto", "nll", "logprob")


def _flag(name: str, value: Any) -> bool:
    """A boolean model arg (lmms-eval turns "true" / "false" into bools, "1" / "0" into ints)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _positive_int(name: str, value: Any) -> int:
    """An integer model arg (lmms-eval passes "602112" as int, "6e5" as float, anything else as str)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= 1 and number == int(number)):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(number)


def _optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.lower() in ("", "none")) else value


def _auto_dtype(directory) -> str:
    """`--dtype auto` as the CLI decides it (qwen2vl_jax/cli/common.py `choose_dtype`): float32 when 4 bytes a
    parameter take at most 60% of the memory available now, else bfloat16."""
    from qwen2vl_jax.generation.memory import available_bytes, parameter_count
    from qwen2vl_jax.modeling.config import Qwen2VLConfig

    return "float32" if parameter_count(Qwen2VLConfig.from_hf(directory)) * 4 <= 0.6 * available_bytes() else "bfloat16"


def _visual_list(visuals: Any) -> list:
    """doc_to_visual's result as a flat list (None, one visual, or nested lists as their `_ensure_list` allows)."""
    if visuals is None:
        return []
    if not isinstance(visuals, list | tuple):
        return [visuals]
    return [v for item in visuals for v in _visual_list(item)]


def _content_part(visual: Any) -> dict:
    """One visual as a chat content part (the message format `predict` and `score` read)."""
    if isinstance(visual, str | os.PathLike):
        kind = "video" if str(visual).lower().endswith(VIDEO_SUFFIXES) else "image"
        return {"type": kind, kind: str(visual)}
    if isinstance(visual, dict):  # lmms-eval's audio: {"array", "sampling_rate"}
        raise ValueError(f"Qwen2-VL takes images and videos, not {sorted(visual)!r} (audio?)")
    return {"type": "image", "image": visual}  # a PIL image or an HWC array


class Qwen2VLJax(lmms):
    """A Qwen2-VL / Qwen2.5-VL checkpoint on qwen2vl_jax for lmms-eval (module docstring).

    Model args (strings from `--model_args`, converted here): `pretrained` a checkpoint directory or Hub id;
    `dtype` "auto" (float32 when it fits in memory, else bfloat16, as `qwen2vl-jax generate --dtype auto`),
    "float32" or "bfloat16"; `min_pixels` / `max_pixels` the processor's bounds per image or frame; `max_slots`
    concurrent generations on the engine; `batch_size` rows per scoring forward (lmms-eval's `--batch_size`, which
    it always passes: default 1; "auto" means 8); `max_new_tokens` when a task's gen_kwargs has none; `adapter` a
    PEFT LoRA directory; `quantize` "int8" / "int4" weight-only; `attn_implementation` the attention backend;
    `system_prompt`; `loglikelihood` (module docstring); `max_context` the engine's context per sequence (default
    8192); `exact_fp32` PyTorch-like float32 matmul accumulation on CPU (set before JAX starts); `compile_cache`
    the persistent XLA compilation cache (default on, as for the CLI; QWEN2VL_JAX_COMPILE_CACHE=0 turns it off);
    `offline` never download. `device` and `max_batch_size` (passed by lmms-eval) are ignored: JAX runs on its
    default backend (JAX_PLATFORMS chooses).
    """

    def __init__(self, pretrained: str, dtype: str = "auto", max_pixels: int = 602112, min_pixels: int = 3136,
                 max_slots: int = 8, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, adapter: str | None = None, quantize: str | None = None,
                 attn_implementation: str | None = None, system_prompt: str | None = None,
                 loglikelihood: str = "auto", max_context: int | None = None, exact_fp32: bool = False,
                 compile_cache: bool = True, offline: bool | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        if kwargs:  # their classes refuse unknown args too (`assert kwargs == {}`): a typo must not pass silently
            raise TypeError(f"qwen2vl_jax: unknown model_args {sorted(kwargs)}")
        if dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
        if loglikelihood not in LOGLIKELIHOOD_MODES:
            raise ValueError(f"loglikelihood must be one of {', '.join(LOGLIKELIHOOD_MODES)}, got {loglikelihood!r}")
        quantize = _optional(quantize)
        if quantize not in (None, "int8", "int4"):
            raise ValueError(f"quantize must be int8 or int4, got {quantize!r}")
        self.max_slots = _positive_int("max_slots", max_slots)
        self.batch_size = (DEFAULT_BATCH_SIZE if isinstance(batch_size, str) and batch_size.startswith("auto")
                           else _positive_int("batch_size", batch_size))
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.max_context = None if _optional(max_context) is None else _positive_int("max_context", max_context)
        self.system_prompt = _optional(system_prompt)
        if self.system_prompt and os.path.isfile(self.system_prompt):  # a file holding it, as lmms-eval allows
            with open(self.system_prompt, encoding="utf-8") as f:
                self.system_prompt = f.read().strip()
        self.loglikelihood_mode = loglikelihood
        self._predictor = None
        self._warned: set[str] = set()

        self.model, self.processor = self._load(
            str(pretrained), dtype, offline=None if _optional(offline) is None else _flag("offline", offline),
            exact_fp32=_flag("exact_fp32", exact_fp32), compile_cache=_flag("compile_cache", compile_cache),
            attn_implementation=_optional(attn_implementation), quantize=quantize, adapter=_optional(adapter),
            min_pixels=_positive_int("min_pixels", min_pixels), max_pixels=_positive_int("max_pixels", max_pixels))

    @staticmethod
    def _load(source: str, dtype: str, *, offline, exact_fp32, compile_cache, attn_implementation, quantize, adapter,
              min_pixels, max_pixels):
        """The model and processor as `qwen2vl-jax generate` loads them (qwen2vl_jax/cli/common.py
        `resolve_model`, `choose_dtype`, `load_model`, `load_processor`; that package sits above this one, so its
        steps are repeated here with the same library calls)."""
        from qwen2vl_jax.hub import resolve_source
        from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
        from qwen2vl_jax.processing.processor import Qwen2VLProcessor
        from qwen2vl_jax.runtime import enable_compilation_cache, use_exact_cpu_fp32_matmuls

        if compile_cache:
            enable_compilation_cache()  # before anything compiles; QWEN2VL_JAX_COMPILE_CACHE=0 turns it off
        directory = resolve_source(source, local_files_only=offline)
        if dtype == "auto":
            dtype = _auto_dtype(directory)
        if dtype == "float32" and exact_fp32:
            use_exact_cpu_fp32_matmuls()  # before JAX starts (it warns when too late)
        model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=dtype,
                                                                attn_implementation=attn_implementation,
                                                                quantization=quantize)
        if adapter:
            from qwen2vl_jax.lora import load_adapter

            load_adapter(model, adapter)  # kept unmerged, as the CLI keeps it
        return model, Qwen2VLProcessor.from_pretrained(directory, min_pixels=min_pixels, max_pixels=max_pixels)

    # ------------------------------------------------------------------------------------------ prompts
    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _messages(self, context: str, visuals: Sequence) -> list[dict]:
        """One user turn: the visuals, then the text (their class's order, "<image>" tags removed)."""
        content = [_content_part(v) for v in visuals] + [{"type": "text", "text": context.replace("<image>", "")}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _generation(self, gen_kwargs: dict | None, *, use_until: bool = True) -> dict:
        """A task's gen_kwargs as `Predictor` overrides (module docstring)."""
        gen = dict(gen_kwargs or {})
        out = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0}
        out.update({k: gen[k] for k in GEN_KEYS if gen.get(k) is not None})
        out["max_new_tokens"] = _positive_int("max_new_tokens", out["max_new_tokens"])
        out["temperature"] = float(out["temperature"])
        if out["temperature"] > 0:
            out["do_sample"] = True
        until = gen.get("until") if use_until else None
        stops = [until] if isinstance(until, str) else list(until or [])
        out["stop"] = [s for s in stops if s]  # their class skips empty stop terms too
        if gen.get("num_beams") not in (None, 1):
            self._warn_once("num_beams", f"qwen2vl_jax: num_beams={gen['num_beams']} ignored (no beam search: greedy "
                                         "or sampled decoding)")
        unknown = sorted(set(gen) - set(GEN_KEYS) - set(IGNORED_GEN_KEYS))
        if unknown:
            self._warn_once(f"unknown{unknown}", f"qwen2vl_jax: gen_kwargs {unknown} ignored")
        return out

    # ---------------------------------------------------------------------------------------- generation
    def predictor(self):
        """The `Predictor` (its engine and threads start on first use; `clean()` closes them)."""
        if self._predictor is None:
            from qwen2vl_jax.evaluation.predict import Predictor

            options = {"max_context": self.max_context} if self.max_context else {}
            self._predictor = Predictor(self.model, self.processor, max_slots=self.max_slots, **options)
        return self._predictor

    def _answer(self, row: dict, what: str):
        if "error" in row:
            log.warning(f"qwen2vl_jax: {what} failed, answered with an empty string: {row['error']}")
            return "" if GenerationResult is None else GenerationResult("", TokenCounts())
        answer = row["answer"].strip()
        if GenerationResult is None:
            return answer
        return GenerationResult(answer, TokenCounts(input_tokens=row["prompt_tokens"], output_tokens=row["new_tokens"]))

    def _run(self, items: Iterable[dict], total: int, desc: str) -> Iterator[dict]:
        with tqdm(total=total, disable=self.rank != 0, desc=desc) as bar:
            for row in self.predictor().run(items):
                bar.update(1)
                yield row

    def generate_until(self, requests: list[Instance]) -> list:
        def items():  # a generator: the engine pulls items (and their images) as it has room for them
            for i, request in enumerate(requests):
                context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
                visuals = _visual_list(doc_to_visual(self._doc(task, split, doc_id)))
                yield {"index": i, "messages": self._messages(context, visuals),
                       "generation": self._generation(gen_kwargs)}

        out = []
        for request, row in zip(requests, self._run(items(), len(requests), "Model Responding")):
            answer = self._answer(row, f"request {row['index']} (doc {request.args[3]} of {request.args[4]})")
            out.append(answer)
            context, gen_kwargs = request.args[:2]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs),
                                        answer if isinstance(answer, str) else answer.text)
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        states = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            states.append({"doc": doc, "doc_to_text": doc_to_text, "context": context, "answers": [], "info": None,
                           "visuals": _visual_list(doc_to_visual(doc)), "done": False,
                           "generation": self._generation(gen_kwargs, use_until=False)})
        round_idx = 0
        while True:
            if round_idx > 0:
                for s in (s for s in states if not s["done"]):
                    visuals, context, terminal, answers, info = s["doc_to_text"](
                        s["doc"], previous_output=list(s["answers"]), round_idx=round_idx,
                        previous_round_info=s["info"])
                    s["answers"] = list(answers) if answers is not None else s["answers"]
                    s["info"] = info
                    s["done"] = bool(terminal)
                    s["context"], s["visuals"] = context, _visual_list(visuals)
            active = [s for s in states if not s["done"]]
            if not active:
                break
            items = ({"index": round_idx * len(states) + j, "messages": self._messages(s["context"], s["visuals"]),
                      "generation": s["generation"]} for j, s in enumerate(active))
            for s, row in zip(active, self._run(items, len(active), f"Model Responding (round {round_idx})")):
                answer = self._answer(row, f"round {round_idx}")
                s["answers"].append(answer if isinstance(answer, str) else answer.text)
            round_idx += 1
        return [list(s["answers"]) for s in states]

    # ------------------------------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: list[Instance]) -> list:
        """(value, is_greedy) per request (module docstring), each wrapped in a `GenerationResult` where lmms-eval
        has one (its `.text` is the pair: see below)."""
        from qwen2vl_jax.evaluation.scoring import score

        out = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding") as bar:
            for start in range(0, len(requests), SCORE_CHUNK):
                chunk = requests[start:start + SCORE_CHUNK]
                prompts, continuations, negate = [], [], []
                for request in chunk:
                    prompt, continuation, as_loss = self._scoring_pair(request.args)
                    prompts.append(prompt)
                    continuations.append(continuation)
                    negate.append(as_loss)
                scores = score(self.model, self.processor, prompts, continuations, batch_size=self.batch_size)
                for request, s, as_loss in zip(chunk, scores, negate):
                    value = (-s.logprob if as_loss else s.logprob, s.is_greedy)
                    self.cache_hook.add_partial("loglikelihood", request.args[:2], value)
                    # lmms-eval 0.7.3's evaluator passes every response through `unwrap_generation_output`
                    # (api/instance.py), which turns a (float, bool) tuple into its str(); a GenerationResult's
                    # `text` comes back untouched, so the pair reaches `process_results` as a pair
                    out.append(value if GenerationResult is None else GenerationResult(value, None))
                bar.update(len(chunk))
        return out

    def _scoring_pair(self, args: tuple) -> tuple[list[dict], str, bool]:
        """(prompt messages, continuation text, whether to return the loss) for one request's args."""
        if len(args) == 2:  # acc_mutual_info's unconditional term: ("", option), no document
            (context, continuation), visuals, from_target = args, [], False
        else:
            context, continuation, doc_to_visual, doc_id, task, split = args
            doc = self._doc(task, split, doc_id)
            from_target = callable(continuation)
            if from_target:  # a `loglikelihood` task: the target comes from the document
                continuation = continuation(doc)
                continuation = continuation[0] if isinstance(continuation, list) else continuation
            visuals = _visual_list(doc_to_visual(doc)) if callable(doc_to_visual) else []
        as_loss = {"auto": not from_target, "nll": True, "logprob": False}[self.loglikelihood_mode]
        return self._messages(context, visuals), str(continuation), as_loss

    def clean(self):
        """lmms-eval's end of the model's requests: the engine's threads stop (a later request starts new ones)."""
        if self._predictor is not None:
            self._predictor.close()
            self._predictor = None
        super().clean()

    @property
    def tokenizer(self):
        return self.processor.tokenizer
