"""The Batch handed from the data pipeline to the model and trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    """One micro-batch: inputs, next-token labels, the loss mask and (PrefixLM) prefix lengths."""

    tokens: torch.Tensor  # [b, s] input ids
    labels: torch.Tensor  # [b, s] ids to predict at each position (tokens shifted by one)
    loss_mask: torch.Tensor  # [b, s] float, 1 where the label counts in the loss
    prefix_lengths: Optional[torch.Tensor] = None  # [b] PrefixLM: bidirectional prefix length

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.tokens), move(self.labels), move(self.loss_mask), move(self.prefix_lengths))

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def prefix_loss_mask(prefix_lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, s] mask that is 0 where the label is a prefix token: label t is token t+1 of the sample."""
    positions = torch.arange(seq_length, device=prefix_lengths.device)
    return (positions.unsqueeze(0) + 1 >= prefix_lengths.unsqueeze(1)).float()
