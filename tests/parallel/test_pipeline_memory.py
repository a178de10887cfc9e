"""What a pipeline stage holds during a 1F1B step does not grow with the number of micro-batches.

Every storage allocated during the step is tracked (a TorchDispatchMode sees every op's new
output, receive buffers included; a weak reference says when the storage is freed), each storage
counted once; the subset autograd saved for backward (saved-tensor hooks) is the activations.
The live bytes are sampled right after every chunk forward, before its output is sent; the old
executor's held sends and kept outputs show up there. Parameter gradients (fixed size) and
scalars (the loss accumulators) are left out. A single forward of the same chunk, measured the
same way, gives one micro-batch's bytes P (what backward keeps, its input buffer included) and
the output's bytes O; the step's peak must equal in-flight(stage) x P + O for m = 8 and m = 64.
Sampled at the start of every backward instead, early receives hold exactly one message more than
the protocol without them (the receive posted ahead; what the planner's p2p buffers must count).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megalm.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megalm.data.pipeline import build_sampler, build_sources
from megalm.distributed import build_parallel_groups
from megalm.model.gpt import build_model_chunks
from megalm.parallel.pipeline import PipelineExecutor, activation_shape
from megalm.parallel.schedules import build_schedule, simulate
from megalm.testing import run_distributed
from megalm.topology import Topology

PP, SEQ, HIDDEN, MICRO = 4, 16, 32, 1
MICROBATCHES = (8, 64)
SCALAR_BYTES = 8  # storages this small (the loss accumulators) are left out


class LiveStorages(TorchDispatchMode):
    """Every storage allocated while active (op outputs, new buffers), counted once while it is alive."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list] = {}  # data pointer -> [weak reference, bytes, saved for backward]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view or an in-place op returns a storage that existed before
            leaves = pytree.tree_leaves((args, kwargs))
            inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
            for leaf in pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.untyped_storage().data_ptr() not in inputs:
                    self.add(leaf)
        return out

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        entry = self.storages.get(storage.data_ptr())
        if entry is None or entry[0].expired():
            self.storages[storage.data_ptr()] = [StorageWeakRef(storage), storage.nbytes(), False]

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        entry = self.storages.get(tensor.untyped_storage().data_ptr())
        if entry is not None and not entry[0].expired():
            entry[2] = True
        return tensor

    def live(self, exclude: set[int]) -> tuple[int, int]:
        """(all live bytes, of which saved for backward), leaving out the storages in `exclude`."""
        total = saved = 0
        for ptr, (ref, nbytes, is_saved) in self.storages.items():
            if ptr not in exclude and nbytes > SCALAR_BYTES and not ref.expired():
                total += nbytes
                saved += nbytes if is_saved else 0
        return total, saved


def grad_storages(chunk: torch.nn.Module) -> set[int]:
    return {p.grad.untyped_storage().data_ptr() for p in chunk.parameters() if p.grad is not None}


def one_microbatch(chunk: torch.nn.Module, batch, shape: tuple, is_first: bool, is_last: bool) -> tuple[int, int]:
    """(P, O): bytes one forward keeps for backward (input buffer included), and its output's bytes."""
    tracker = LiveStorages()
    with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
        inputs = batch.tokens if is_first else torch.empty(shape).requires_grad_()
        if is_last:
            output = chunk(inputs, labels=batch.labels)
            kept = output.sum()
        else:
            output = chunk(inputs)
            kept = torch.autograd.graph.get_gradient_edge(output)  # the graph, as the executor keeps it
        out_bytes = output.untyped_storage().nbytes()
        del output  # the executor keeps the graph, not the output
        kept_bytes, _ = tracker.live(grad_storages(chunk))
    del kept, inputs
    return kept_bytes, out_bytes


def backward_peaks(groups, batches, config: Config, m: int) -> dict[bool, int]:
    """The most live bytes at the start of a chunk backward, with early receives (True) and without (False)."""
    peaks = {}
    for early in (True, False):
        (chunk,) = build_model_chunks(config, groups)
        shape = activation_shape(SEQ, MICRO, HIDDEN, groups, False)
        executor = PipelineExecutor([chunk], groups, "1f1b", m, shape, early_receives=early)
        tracker, samples = LiveStorages(), []
        hook = chunk.register_full_backward_pre_hook(lambda *_: samples.append(tracker.live(grad_storages(chunk))[0]))
        with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            executor.run(batches, lambda losses, batch: (losses * batch.loss_mask).sum())
        hook.remove()
        peaks[early] = max(samples)
    return peaks


def _worker(rank: int, world_size: int) -> dict:
    topology = Topology(tp=1, pp=PP, dp=1)
    groups = build_parallel_groups(topology, rank, torch.device("cpu"))
    out: dict = {"stage": groups.pp_rank}
    for m in MICROBATCHES:
        config = Config(
            model=ModelConfig(num_layers=PP, hidden_size=HIDDEN, num_heads=4, vocab_size=200, seq_length=SEQ),
            parallel=ParallelConfig(pp=PP, schedule="1f1b"),
            train=TrainConfig(micro_batch_size=MICRO, global_batch_size=MICRO * m, seed=3),
        )
        (chunk,) = build_model_chunks(config, groups)
        batches = build_sampler(config, build_sources(config).train, 0, 1).micro_batches(0)
        shape = activation_shape(SEQ, MICRO, HIDDEN, groups, False)
        executor = PipelineExecutor([chunk], groups, "1f1b", m, shape)
        tracker = LiveStorages()
        samples: list[tuple[int, int]] = []
        previous_output: list[Optional[StorageWeakRef]] = [None]
        outputs_alive_at_next_forward = []

        def before_forward(module, args) -> None:
            if previous_output[0] is not None:
                outputs_alive_at_next_forward.append(not previous_output[0].expired())

        def after_forward(module, args, output) -> None:
            samples.append(tracker.live(grad_storages(chunk)))
            previous_output[0] = StorageWeakRef(output.untyped_storage())

        hooks = [chunk.register_forward_pre_hook(before_forward), chunk.register_forward_hook(after_forward)]
        with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            executor.run(batches, lambda losses, batch: (losses * batch.loss_mask).sum())
        for hook in hooks:
            hook.remove()
        per_microbatch, output_bytes = one_microbatch(
            chunk, batches[0], shape, groups.is_first_stage, groups.is_last_stage
        )
        peak = max(samples)
        out[m] = {
            "backward_peaks": backward_peaks(groups, batches, config, m),
            "peak": peak[0],
            "peak_saved": peak[1],
            "per_microbatch": per_microbatch,
            "output": output_bytes,
            "outputs_alive_at_next_forward": sum(outputs_alive_at_next_forward),
            "forwards": len(samples),
        }
    return out


@functools.lru_cache(maxsize=None)
def results() -> list[dict]:
    return run_distributed(_worker, PP, timeout=300)


def test_live_bytes_per_stage_do_not_grow_with_microbatches() -> None:
    for result in results():
        small, large = (result[m] for m in MICROBATCHES)
        assert (small["forwards"], large["forwards"]) == MICROBATCHES
        assert small["peak"] == large["peak"], result
        assert small["peak_saved"] == large["peak_saved"], result


def test_live_bytes_equal_in_flight_times_one_microbatch() -> None:
    for result in results():
        stage = result["stage"]
        for m in MICROBATCHES:
            in_flight = simulate(build_schedule("1f1b", PP, m)).max_in_flight[stage]
            assert in_flight == min(PP - stage, m)
            got = result[m]
            assert got["peak"] == in_flight * got["per_microbatch"] + got["output"], (stage, m, got)


def test_a_receive_posted_early_holds_one_message_more_during_backward() -> None:
    """The receive a stage posts ahead (the next forward's activation, or in cool-down the next gradient) is
    one message buffer live while a backward runs; without early receives it is not there. On every stage,
    the peak at the start of a backward is the reference's plus exactly one message (a fixed amount)."""
    message = SEQ * MICRO * HIDDEN * 4
    for result in results():
        for m in MICROBATCHES:
            peaks = result[m]["backward_peaks"]
            assert peaks[True] == peaks[False] + message, (result["stage"], m, peaks)


def test_sent_outputs_are_freed_before_the_next_forward() -> None:
    for result in results():
        if result["stage"] < PP - 1:  # the last stage sends nothing
            for m in MICROBATCHES:
                assert result[m]["outputs_alive_at_next_forward"] == 0, (result["stage"], m, result[m])


if __name__ == "__main__":  # print the figures
    for r in results():
        print(r)
