"""lm-evaluation-harness adapter (the optional `lmeval` extra): its `LM` API backed by megalm.

Importing this module registers the model name `megalm` with lm_eval, so after `import
megalm.eval.harness`, `lm_eval.simple_evaluate(model="megalm", model_args="path=RUN_DIR", tasks=[...])`
runs the harness's tasks on a megalm checkpoint; from the command line, `megalm eval CKPT
--lm-eval-tasks T1,T2` (one process, or tp x pp x dp under torchrun), or lm_eval's own command line
with the model registered: `python -m megalm.eval.harness --model megalm --model_args path=RUN_DIR
--tasks T1,T2` (one process). The three request kinds:

- loglikelihood: (context, continuation) strings -> (log p, is_greedy). log p is
  Evaluator.loglikelihoods of the ids Evaluator.encode_pair gives (the same numbers `megalm eval
  --task` scores with); is_greedy is whether greedy decoding from the context (megalm.generate,
  KV cache) yields exactly the continuation's ids.
- loglikelihood_rolling: a whole text's log-likelihood after eos, each token predicted once, in
  windows of seq_length tokens, each window with as much preceding text as fits.
- generate_until: megalm.generate from the prompt encoded as training encoded prefixes (encode_prompt),
  greedy unless do_sample, stopping at eos, max_gen_toks or the first `until` string (cut off).

Several ranks (run_harness_tasks under torchrun): every rank runs lm_eval.simple_evaluate on all the
requests, and lm_eval sees one process (rank 0 of 1). The work is shared inside the model calls:
each forward runs on every rank in its tp and pp groups, data-parallel replicas take every dp-th
sequence (Evaluator.loglikelihoods) or batch of prompts (generation) and gather the results, so every
rank returns every answer and lm_eval's filters and metrics run alike everywhere; rank 0 reports.
Splitting the documents over ranks in lm_eval instead would need its padding of uneven shares and its
gathers over dp only, while the tp and pp ranks of a replica must still see the very same requests.

lm_eval's command line passes `device=cuda:0` unless told otherwise; on a machine without CUDA the
model then runs on the CPU and says so in a warning (as lm_eval's own Hugging Face model falls back),
rather than failing: the default command works anywhere, and `--device cpu` silences the warning.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from megalm.config import ConfigError
from megalm.distributed import ParallelGroups, resolve_device
from megalm.eval.evaluator import Evaluator, load_evaluator
from megalm.generate import Sampling, encode_prompt, generate_batches
from megalm.metrics import get_logger

NAME = "megalm"
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed"}


def harness_device(name: Optional[str]) -> torch.device:
    """The device of lm_eval's `device` argument: auto (None) as megalm's; cuda (lm_eval's command
    line default) without a visible GPU runs on the CPU with a warning."""
    name = str(name or "auto")
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise ConfigError(f"lm_eval device {name!r}: megalm runs on cpu or cuda (default: cuda if present); "
                          f"pass --device cpu or --device cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = "this torch is a CPU build" if not torch.version.cuda else "no GPU is visible"
        get_logger().warning(f"lm_eval device {name!r} (its command line's default) but {build}: running megalm on "
                             f"the cpu; pass --device cpu to choose it")
        return torch.device("cpu")
    return resolve_device(name)  # cuda:N as given


class MegalmLM(LM):
    """A megalm checkpoint as an lm_eval model: from `path` (a checkpoint or run directory) in one
    process, or from a loaded `evaluator` at any layout (every rank constructs one and runs alike)."""

    def __init__(self, path: Optional[str] = None, batch_size: int | str = 16, max_gen_toks: int = 32,
                 evaluator: Optional[Evaluator] = None, device: Optional[str] = None,
                 max_batch_size: Optional[int] = None) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ConfigError("lm_eval batch_size 'auto' is not supported by megalm: give a number")
        if evaluator is None:
            if path is None:
                raise ConfigError("the megalm lm_eval model needs model_args path=CHECKPOINT_OR_RUN_DIR")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("lm_eval's command line runs the megalm model in one process: under torchrun use "
                                  "`megalm eval CHECKPOINT --lm-eval-tasks T1,T2 --tp N --pp N`")
            evaluator = load_evaluator(path, ParallelGroups.single(harness_device(device)), batch_size=int(batch_size))
        elif device is not None and harness_device(device) != evaluator.trainer.groups.device:
            raise ConfigError(f"lm_eval device {device!r} is not the loaded model's {evaluator.trainer.groups.device}")
        if evaluator.tokenizer is None:
            raise ConfigError(f"the checkpoint {evaluator.checkpoint} has no tokenizer (data.tokenizer is unset): "
                              f"lm_eval tasks are text")
        self.evaluator = evaluator
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seq_length = evaluator.config.model.seq_length
        self.pairs = evaluator.pairs
        self._device = evaluator.trainer.groups.device

    @property
    def tokenizer(self):
        return self.evaluator.tokenizer

    def _generate(self, prompts: Sequence[list[int]], sampling: Sampling) -> list[list[int]]:
        trainer = self.evaluator.trainer
        return generate_batches(trainer.chunks, trainer.groups, prompts, sampling, self.batch_size)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.evaluator.encode_pair(*request.args) for request in requests]
        logliks = self.evaluator.loglikelihoods(pairs)
        greedy = [False] * len(pairs)
        by_length: dict[int, list[int]] = {}
        for index, (_, continuation) in enumerate(pairs):
            by_length.setdefault(len(continuation), []).append(index)
        for length, indices in by_length.items():
            # the context generate sees: as loglikelihoods keeps it, and room for the continuation
            prompts = []
            for i in indices:
                context = self.evaluator.context_ids(pairs[i][0])
                prompts.append(context[-(self.seq_length - length):] if length < self.seq_length else context[-1:])
            outputs = self._generate(prompts, Sampling(max_new_tokens=max(length, 1)))
            for i, ids in zip(indices, outputs):
                greedy[i] = ids[:length] == pairs[i][1]
        results = list(zip(logliks, greedy))
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) windows that predict every token of text once, after eos (after the BOS
        instead where the tokenizer starts every text with one, as in its training documents)."""
        ids = self.tokenizer.encode(text)
        if not (getattr(self.tokenizer, "add_bos", False) and ids and ids[0] == self.tokenizer.bos_id):
            ids = [self.tokenizer.eos_id] + ids
        seq, windows = self.seq_length, []
        for start in range(1, len(ids), seq):
            end = min(start + seq, len(ids))
            windows.append((ids[max(0, end - 1 - seq):start], ids[start:end]))
        return windows

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = [self.rolling_windows(request.args[0]) for request in requests]
        flat = [window for group in windows for window in group]
        logliks = iter(self.evaluator.loglikelihoods(flat))
        results = [sum(next(logliks) for _ in group) for group in windows]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def _sampling(self, kwargs: dict[str, Any]) -> tuple[Sampling, list[str]]:
        unknown = set(kwargs) - _GEN_KEYS
        if unknown:
            raise ConfigError(f"lm_eval generation arguments {sorted(unknown)} are not supported by megalm "
                              f"(supported: {sorted(_GEN_KEYS)})")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(kwargs.get("do_sample", False))
        sampling = Sampling(
            max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
            seed=int(kwargs.get("seed", 0)), stop_id=tuple(self.tokenizer.stop_ids),
        )
        return sampling, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            sampling, until = self._sampling(dict(request.args[1] or {}))
            groups.setdefault((sampling, tuple(until)), []).append(index)
        for (sampling, until), indices in groups.items():
            prompts = [encode_prompt(self.tokenizer, requests[i].args[0], self.pairs) for i in indices]
            for i, ids in zip(indices, self._generate(prompts, sampling)):
                text = self.tokenizer.decode(ids)
                cuts = [text.find(stop) for stop in until if stop and stop in text]
                results[i] = text[:min(cuts)] if cuts else text
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results  # type: ignore[return-value]


def task_manager(names: Sequence[str], include: Optional[str] = None):
    """lm_eval's TaskManager for `names`: the `include` folder's alone when it defines each of them as a
    plain task (indexing lm_eval's thousands of built-in task files takes seconds in every process),
    else the built-in tasks and the folder's."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local
        return TaskManager(include_path=include)
    return TaskManager()


def run_harness_tasks(evaluator: Evaluator, names: Sequence[str], include: Optional[str] = None, shots: int = 0,
                      limit: Optional[float] = None, seed: int = 0) -> list[dict]:
    """lm_eval.simple_evaluate of the harness tasks `names` (plus the task YAMLs under `include`) on the
    loaded checkpoint, every rank together: one result line per task (`megalm eval --lm-eval-tasks`) where
    LOCAL_RANK is 0 (rank 0 prints them), none elsewhere."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=MegalmLM(evaluator=evaluator, batch_size=evaluator.batch_size), tasks=list(names),
        task_manager=task_manager(names, include),
        num_fewshot=shots or None, limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, log_samples=False,
    )
    if results is None:  # lm_eval aggregates where LOCAL_RANK is 0 only (its rule for tp launchers)
        return []
    return [{"eval": "lm_eval", "task": task, "checkpoint": str(evaluator.checkpoint),
             **{key: value for key, value in metrics.items() if key != "alias"}}
            for task, metrics in results["results"].items()]


if __name__ == "__main__":  # lm_eval's command line, the model "megalm" registered by the import below
    import megalm.eval.harness  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
else:
    register_model(NAME)(MegalmLM)
