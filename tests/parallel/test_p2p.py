"""DistTransport: one batch_isend_irecv per exchange, global ranks, every work waited, failures described."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megalm.distributed import COLLECTIVE_NOTE, ParallelGroups
from megalm.parallel.p2p import DistTransport, Transfer
from megalm.topology import Topology


class FakeWork:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.waited = fail, False

    def wait(self) -> None:
        self.waited = True
        if self.fail:
            raise RuntimeError("connection reset")


def groups_at(pp_rank: int) -> ParallelGroups:
    # pp = 2 over dp = 2: the pp group of dp rank 1 holds global ranks 1 and 3
    topology = Topology(tp=1, pp=2, dp=2)
    return ParallelGroups(topology=topology, rank=topology.rank(pp_rank, 1, 0), device=torch.device("cpu"),
                          pp_ranks=(1, 3))


@pytest.fixture(autouse=True)
def plain_p2p_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """P2POp resolves its group at construction; without a process group, record its arguments instead."""
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer, group=None: SimpleNamespace(op=op, peer=peer, group=group))


def transfers() -> list[Transfer]:
    return [Transfer("send", 1, ("act", 0, 1), torch.ones(2)), Transfer("recv", 1, ("grad", 0, 0), torch.empty(2))]


def test_one_batched_call_addressed_by_global_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, works = [], [FakeWork(), FakeWork()]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: calls.append(ops) or works)
    transport = DistTransport(groups_at(0))
    transport.wait(transport.start(transfers()))
    (ops,) = calls
    assert [(op.op, op.peer) for op in ops] == [(dist.isend, 3), (dist.irecv, 3)]
    assert all(work.waited for work in works)


def test_first_exchange_on_nccl_creates_the_communicator_with_a_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    barriers = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "barrier", lambda group=None, device_ids=None: barriers.append(group))
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: [FakeWork()])
    transport = DistTransport(groups_at(0))
    for _ in range(3):
        transport.wait(transport.start(transfers()))
    assert len(barriers) == 1


def test_a_failed_wait_says_which_messages_and_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "batch_isend_irecv", lambda ops: [FakeWork(fail=True)])
    transport = DistTransport(groups_at(0))
    with pytest.raises(RuntimeError, match="connection reset") as error:
        transport.wait(transport.start(transfers()))
    (note,) = error.value.__notes__
    assert note == COLLECTIVE_NOTE + (
        "batched p2p [send of the activation of micro-batch 0 for virtual stage 1 to pipeline rank 1 (global rank 3); "
        "recv of the gradient of micro-batch 0 for virtual stage 0 from pipeline rank 1 (global rank 3)] over the world group"
    )
