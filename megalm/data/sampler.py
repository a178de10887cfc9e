"""The data-parallel sampler: this rank's micro-batches of each global batch.

The position in the data is one number, `consumed_samples`. Global batch number k holds sample
ids [k*G, (k+1)*G) of the source; data-parallel rank r reads only its contiguous share
[r*G/dp, (r+1)*G/dp) of it, cut into micro-batches. Because the global batch does not depend on
dp, resuming from `consumed_samples` with another dp size yields exactly the samples an
uninterrupted run would have seen. A resume (`resume_at`) continues at the checkpoint's
`consumed_samples`, so a changed global batch size G neither skips nor repeats samples.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from megalm.data.batch import Batch, document_ids, prefix_loss_mask
from megalm.data.dataset import Sample, SampleSource


class BatchSampler:
    """Builds this rank's micro-batches from a sample source."""

    def __init__(
        self,
        source: SampleSource,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        prefixlm: bool,
        eos_id: Optional[int] = None,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} x dp {dp_size}"
            )
        self.source = source
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.prefixlm = prefixlm
        self.eos_id = eos_id  # model.document_mask: each batch carries its document ids, split at this id
        self.start_step = 0  # step `start_step` begins at sample `start_samples` (a resume may move both)
        self.start_samples = 0

    def resume_at(self, step: int, consumed_samples: int) -> None:
        """Continue with step `step` at sample `consumed_samples`, whatever global batch size consumed them."""
        self.start_step, self.start_samples = step, consumed_samples

    def consumed_samples(self, step: int) -> int:
        """Samples consumed before optimizer step `step` (0-based): the data position after `step` steps."""
        return self.start_samples + (step - self.start_step) * self.global_batch_size

    def sample_ids(self, consumed_samples: int) -> list[range]:
        """Sample ids of this rank's micro-batches in the global batch starting at consumed_samples."""
        first = consumed_samples + self.dp_rank * self.per_rank
        return [
            range(first + start, first + start + self.micro_batch_size)
            for start in range(0, self.per_rank, self.micro_batch_size)
        ]

    def micro_batches_at(self, consumed_samples: int) -> list[Batch]:
        return [self._batch([self.source.sample(i) for i in ids]) for ids in self.sample_ids(consumed_samples)]

    def micro_batches(self, step: int) -> list[Batch]:
        """The micro-batches of optimizer step `step`: global batches follow on from the resume position."""
        return self.micro_batches_at(self.consumed_samples(step))

    def _batch(self, samples: list[Sample]) -> Batch:
        tokens = torch.from_numpy(np.stack([s.tokens for s in samples]))
        seq_length = tokens.shape[1] - 1
        prefix = None
        if self.prefixlm:
            prefix = torch.tensor([s.prefix_length for s in samples], dtype=torch.long)
        if samples[0].loss_mask is not None:
            loss_mask = torch.from_numpy(np.stack([s.loss_mask for s in samples])).float()
        elif prefix is not None:
            loss_mask = prefix_loss_mask(prefix, seq_length)
        else:
            loss_mask = torch.ones(len(samples), seq_length)
        inputs = tokens[:, :-1]
        documents = None if self.eos_id is None else document_ids(inputs, self.eos_id)
        return Batch(inputs, tokens[:, 1:], loss_mask, prefix, documents)
