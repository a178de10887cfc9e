"""The vocab-parallel cross-entropy holds at most one fp32 copy of the logits, as the planner assumes.

At GPT vocabularies the logits of one micro-batch are the largest tensors of a step (gpt-125m, micro
batch 4 x 1024 tokens: 206 M elements, 0.77 GiB per fp32 copy), so each extra copy moves the peak. The
bytes are measured on CPU by tracking every storage the loss allocates (tests/parallel/
test_pipeline_memory.LiveStorages) after every op, forward and backward, and compared with the
planner's term for them, (activation bytes + 4) per element (megalm.plan.model.stage_memory). On an
H100/H200 the same shape was measured through the CUDA allocator by tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from megalm.distributed import ParallelGroups
from megalm.parallel.tensor import vocab_parallel_cross_entropy
from megalm.plan.layout import ACTIVATION_BYTES
from tests.parallel.test_pipeline_memory import LiveStorages


class PeakStorages(LiveStorages):
    """LiveStorages that also keeps the largest live total seen after any op."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak = max(self.peak, self.live(set())[0])
        return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("vocab,real_vocab", [(512, 512), (512, 500)])  # padded vocabulary: the masked tail
def test_cross_entropy_peak_is_the_planned_act_bytes_plus_4_per_logit(precision, vocab, real_vocab) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    s, b = 64, 2
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(s, b, vocab, generator=generator).to(dtype).requires_grad_(True)
    target = torch.randint(0, real_vocab, (s, b), generator=generator)
    elements = s * b * vocab
    planned = (ACTIVATION_BYTES[precision] + 4) * elements

    forward = PeakStorages()
    with forward:
        loss = vocab_parallel_cross_entropy(logits, target, ParallelGroups.single("cpu"), real_vocab).mean()
    # The caller's logits are alive throughout the forward (the model frees them once it returns).
    forward_peak = logits.untyped_storage().nbytes() + forward.peak
    backward = PeakStorages()
    saved = forward.live(set())[0]  # what the loss keeps for backward (the softmax)
    with backward:
        loss.backward()
    backward_peak = saved + backward.peak

    assert forward_peak == pytest.approx(planned, rel=0.02), (forward_peak / elements, planned / elements)
    assert backward_peak <= planned * 1.02, (backward_peak / elements, planned / elements)
    assert saved == pytest.approx(4 * elements, rel=0.02)  # one fp32 [s, b, v] kept, nothing more

    # Same values as a plain fp32 cross-entropy over the real vocabulary.
    reference = logits.detach().float()[..., :real_vocab].requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(reference.reshape(-1, real_vocab), target.reshape(-1))
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad.float()[..., :real_vocab], reference.grad.to(dtype).float())
    assert not logits.grad[..., real_vocab:].any()
