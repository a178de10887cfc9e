"""The Batch handed from the data pipeline to the model and trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    """One micro-batch: inputs, next-token labels, the loss mask, (PrefixLM) prefix lengths and (model.document_mask)
    each input token's document."""

    tokens: torch.Tensor  # [b, s] input ids
    labels: torch.Tensor  # [b, s] ids to predict at each position (tokens shifted by one)
    loss_mask: torch.Tensor  # [b, s] float, 1 where the label counts in the loss
    prefix_lengths: Optional[torch.Tensor] = None  # [b] PrefixLM: bidirectional prefix length
    document_ids: Optional[torch.Tensor] = None  # [b, s] model.document_mask: document index (document_ids)

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.loss_mask), move(self.prefix_lengths),
                     move(self.document_ids))

    def cp_split(self, cp: int, cp_rank: int) -> "Batch":
        """This context-parallel rank's part of the micro-batch (megalm.parallel.context.cp_split): tokens,
        labels and loss mask are cut to chunks r and 2cp-1-r of the sequence; prefix lengths and document ids
        stay whole (the masks and per-document positions are built from global positions). cp = 1: itself."""
        if cp == 1:
            return self
        from megalm.parallel.context import cp_split  # here: the data tools need not load the parallel package

        part = lambda t: cp_split(t, cp, cp_rank, dim=1)  # noqa: E731
        return Batch(part(self.tokens), part(self.labels), part(self.loss_mask), self.prefix_lengths,
                     self.document_ids)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def prefix_loss_mask(prefix_lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, s] mask that is 0 where the label is a prefix token: label t is token t+1 of the sample."""
    positions = torch.arange(seq_length, device=prefix_lengths.device)
    return (positions.unsqueeze(0) + 1 >= prefix_lengths.unsqueeze(1)).float()


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[b, s] index of each input token's document in its packed sample: 0 from the first token, one more after
    each eos (the eos belongs to the document it ends; a sample's first document may have begun earlier)."""
    ends = (tokens == eos_id).long()
    return torch.cumsum(ends, dim=1) - ends
