"""Text generation from a (tensor-parallel) GPT: every tp rank runs the same forward.

The last position's vocab-split logits are gathered over tp, padded ids are masked, and the next
token is drawn with a generator seeded identically on every rank, so all ranks pick the same
token without another collective. No KV cache: this is for samples and smoke tests, not serving.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megalm.distributed import ParallelGroups
from megalm.model.gpt import GPTModel
from megalm.parallel.tensor import gather_from_tp


@torch.no_grad()
def generate(
    model: GPTModel,
    groups: ParallelGroups,
    prompt: Sequence[int],
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.7,
    top_k: int = 20,
    stop_id: Optional[int] = None,
) -> list[int]:
    """Continue `prompt` by up to max_new_tokens ids (top-k sampling; temperature 0 is greedy).

    A PrefixLM model treats the prompt as its bidirectional prefix.
    """
    if not (model.is_first and model.is_last):
        raise NotImplementedError("generation with pipeline parallelism is not supported yet")
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=groups.device).manual_seed(seed)
    window = model.cfg.seq_length
    tokens = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = tokens[-window:]
        ids = torch.tensor([context], device=groups.device)
        prefix = None
        if model.cfg.family == "prefixlm":
            prefix = torch.tensor([max(1, min(len(prompt), len(context)))], device=groups.device)
        if model.sequence_parallel and len(context) % groups.tp_size != 0:
            # sequence parallel splits the sequence: left-pad the context to a multiple of tp
            pad = groups.tp_size - len(context) % groups.tp_size
            ids = torch.cat([ids[:, :1].expand(1, pad), ids], dim=1)
            prefix = None if prefix is None else prefix + pad
        logits = model(ids, prefix_lengths=prefix)  # [s, 1, v/tp]
        last = gather_from_tp(logits[-1, 0].float().contiguous(), groups.tp_group)[: model.cfg.vocab_size]
        if temperature <= 0:
            next_id = int(last.argmax())
        else:
            values, indices = torch.topk(last / temperature, min(top_k, last.numel()))
            choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
            next_id = int(indices[choice])
        if stop_id is not None and next_id == stop_id:
            break
        tokens.append(next_id)
        new.append(next_id)
    model.train(was_training)
    return new
