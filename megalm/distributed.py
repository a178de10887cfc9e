"""torch.distributed start-up and the ParallelGroups built from a Topology.

`ParallelGroups` is the one object that carries process groups; it is passed explicitly to every
layer, scheduler and optimizer. There is no module-level "current group" anywhere in megalm.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megalm.config import ConfigError
from megalm.topology import RankCoords, Topology

ProcessGroup = Optional[dist.ProcessGroup]
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the directory that holds megalm/


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the Topology and the process groups it belongs to.

    A group is None when its size is 1 (or torch.distributed is not running): collectives over a
    group of one rank are skipped by the callers, so a single process needs no process group.
    """

    topology: Topology
    rank: int
    device: torch.device
    tp_group: ProcessGroup = None
    dp_group: ProcessGroup = None
    pp_group: ProcessGroup = None
    embedding_group: ProcessGroup = None
    # All ranks over gloo with checkpoint.timeout_s: checkpoint coordination (save/stop decisions,
    # commit barriers, checksum verdicts) runs here, so a slow filesystem during a save waits on
    # this group's long timeout instead of tripping the training groups' (NCCL's) watchdog.
    control_group: ProcessGroup = None
    # This rank's dp group again, over gloo with checkpoint.timeout_s: at resume, one dp rank reads
    # each checkpoint file its (tp, pp) shard needs and shares the pieces with the others here.
    control_dp_group: ProcessGroup = None
    # Global ranks of this rank's groups (for p2p and for error messages).
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    group_timeout: Optional[datetime.timedelta] = None  # the training groups' timeout (new groups get it too)
    # Context parallelism (built only when cp > 1, else None and (rank,)): the ranks that split the same
    # samples' sequences, and the dp x cp group (same tp and pp coordinates) that reduces gradients.
    cp_group: ProcessGroup = None
    dp_cp_group: ProcessGroup = None
    cp_ranks: tuple[int, ...] = (0,)
    dp_cp_ranks: tuple[int, ...] = (0,)
    # tp_replica_group's groups, created on first use: {replicas: this rank's group}
    _replica_groups: dict = field(default_factory=dict, compare=False, repr=False)

    def tp_replica_group(self, replicas: int) -> ProcessGroup:
        """The group of the `replicas` consecutive tp ranks holding this rank's copy of a key/value head
        (None without torch.distributed or tensor parallelism). Every rank creates all of them, the first
        time a model asks (building a model is collective), in the Topology's order."""
        if self.tp_group is None or not dist.is_initialized() or replicas <= 1:
            return None
        if replicas not in self._replica_groups:
            groups = self.topology.tp_replica_groups(replicas)
            self._replica_groups[replicas] = _new_groups(groups, self.rank, self.group_timeout)[0]
        return self._replica_groups[replicas]

    @property
    def coords(self) -> RankCoords:
        return self.topology.coords(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def cp_rank(self) -> int:
        return self.coords.cp

    @property
    def cp_size(self) -> int:
        return self.topology.cp

    @property
    def grad_group(self) -> ProcessGroup:
        """The ranks holding the same weights (same tp and pp coordinates): dp, or dp x cp with context
        parallelism. Gradients are summed over it, ZeRO-1 shards over it and checkpoints split writes over it."""
        return self.dp_cp_group if self.topology.cp > 1 else self.dp_group

    @property
    def grad_ranks(self) -> tuple[int, ...]:
        """Global ranks of grad_group (dp-major, cp-minor)."""
        return self.dp_cp_ranks if self.topology.cp > 1 else self.dp_ranks

    @property
    def grad_rank(self) -> int:
        """This rank's index in grad_group: dp_rank x cp + cp_rank."""
        return self.dp_rank * self.topology.cp + self.cp_rank

    @property
    def grad_size(self) -> int:
        """Size of grad_group: dp x cp."""
        return self.topology.dp * self.topology.cp

    @property
    def tp_size(self) -> int:
        return self.topology.tp

    @property
    def dp_size(self) -> int:
        return self.topology.dp

    @property
    def pp_size(self) -> int:
        return self.topology.pp

    @property
    def is_first_stage(self) -> bool:
        return self.topology.is_first_stage(self.rank)

    @property
    def is_last_stage(self) -> bool:
        return self.topology.is_last_stage(self.rank)

    def group_name(self, group: ProcessGroup) -> str:
        """'tp' | 'dp' | 'pp' | 'cp' | 'dp_cp' | 'embedding' | 'world' | 'ranks[...]' for a process group argument."""
        if group is None:
            return "world"
        for name in ("tp", "dp", "pp", "cp", "dp_cp", "embedding", "control"):
            if group is getattr(self, f"{name}_group"):
                return name
        if dist.is_initialized() and group is dist.group.WORLD:
            return "world"
        try:
            return f"ranks{dist.get_process_group_ranks(group)}"
        except Exception:  # noqa: BLE001 - a name is all we need
            return repr(group)

    def describe_group(self, group: ProcessGroup) -> str:
        """e.g. 'the dp group (global ranks [0, 2])', for error messages."""
        name = self.group_name(group)
        ranks = {
            "tp": self.tp_ranks, "dp": self.dp_ranks, "pp": self.pp_ranks,
            "cp": self.cp_ranks, "dp_cp": self.dp_cp_ranks,
        }.get(name)  # fmt: skip
        if ranks is None and name in ("embedding", "control") and dist.is_initialized():
            ranks = tuple(dist.get_process_group_ranks(group))
        if name == "world":
            return "the world group"
        return f"the {name} group (global ranks {list(ranks)})" if ranks is not None else f"the group {name}"

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelGroups":
        """Groups of a single process: tp = pp = dp = 1, no torch.distributed needed."""
        return cls(topology=Topology(1, 1, 1), rank=0, device=torch.device(device))


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is present, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """Map a config's train.device ('auto' | 'cpu' | 'cuda') to this process's device."""
    if name == "auto":
        return default_device()
    if name == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else " (and this torch is a CPU build)"
            raise ConfigError(
                f"train.device=cuda but no GPU is visible{build}: use train.device=cpu or auto, or run where a GPU is"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} needs cuda:{local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                f"visible: launch at most {torch.cuda.device_count()} processes per node (--nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)


def allow_tf32(device: torch.device, precision: str) -> bool:
    """fp32 runs on CUDA: let matmuls and convolutions use TF32 tensor cores; True if set.

    TF32 rounds the inputs to a 10-bit mantissa and accumulates in fp32 (about 1e-3 relative
    error per product, the dynamic range of fp32), at up to 8x the throughput of fp32 FMA on
    Ampere and Hopper. bf16/fp16 runs do their matmuls in half precision and are left as they are.
    """
    if device.type != "cuda" or precision != "fp32":
        return False
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the per-backend API
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return True


STARTUP_TIMEOUT_S = 600.0  # how long the ranks of a job may take to reach init_distributed, one after another


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> tuple[int, int]:
    """Start torch.distributed from torchrun's environment (NCCL on GPU, gloo on CPU).

    Returns (rank, world_size); a process started without torchrun is rank 0 of 1 and starts nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        rank = int(os.environ["RANK"])
        # Under torchrun the rendezvous store outlives a restart of the workers; keys left by the
        # previous attempt (a dead rank's address) must not be read by the new one, so every
        # attempt gets its own key prefix.
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true",
            timeout=timeout,
        )
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"megalm/attempt_{attempt}", base)
        # Every rank arrives before the process group's rendezvous: ranks start minutes apart on a busy or large
        # cluster (imports, a slow filesystem), which is start-up, not a hang; a short train.collective_timeout_s
        # would otherwise fail the rendezvous itself. The collectives keep `timeout`.
        store.set(f"arrived/{rank}", "1")
        store.wait([f"arrived/{other}" for other in range(world_size)],
                    datetime.timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
        # device_id binds the NCCL communicator to this rank's GPU at init (eager init): no guess
        # of the device at the first collective, and barrier() knows which GPU to use.
        device_id = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **device_id
        )
        if "TORCHELASTIC_RUN_ID" in os.environ:
            exit_with_launcher(rank)
    return dist.get_rank(), dist.get_world_size()


def exit_with_launcher(rank: int, poll_s: float = 1.0) -> None:
    """Exit this worker when the torchrun agent that started it dies.

    torchrun starts every worker in a session of its own, so a SIGKILL to the agent's process group
    (a scheduler cancelling the job step, an operator's kill) leaves the workers running as orphans:
    they hold the GPUs, and a restarted job would find them still writing checkpoints into the same
    run directory. A daemon thread notices the re-parenting within `poll_s` and ends the process;
    the peers on other nodes then fail their next collective and exit with a message.
    """
    parent = os.getppid()
    if parent == 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(
            f"megalm: rank {rank}: the torchrun agent (pid {parent}) that started this worker is gone; "
            f"exiting so that no orphaned worker keeps training",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    threading.Thread(target=watch, name="megalm-launcher-watch", daemon=True).start()


def _new_groups(
    rank_lists: list[list[int]], rank: int, timeout: Optional[datetime.timedelta], backend: Optional[str] = None
) -> tuple[ProcessGroup, tuple[int, ...]]:
    """Create one process group per list (every rank must create all of them, in order)."""
    mine: ProcessGroup = None
    my_ranks: tuple[int, ...] = (rank,)
    for ranks in rank_lists:
        # new_group does not inherit the world's timeout: pass it, or a hang waits 30 minutes.
        group = dist.new_group(ranks, timeout=timeout, backend=backend) if len(ranks) > 1 else None
        if rank in ranks:
            mine, my_ranks = group, tuple(ranks)
    return mine, my_ranks


DEFAULT_CONTROL_TIMEOUT_S = 1800.0  # checkpoint.timeout_s's default: a save of a large model on a slow filesystem


def build_parallel_groups(
    topology: Topology,
    rank: int,
    device: torch.device,
    timeout_s: Optional[float] = None,
    control_timeout_s: float = DEFAULT_CONTROL_TIMEOUT_S,
) -> ParallelGroups:
    """Create the TP, DP, PP and embedding process groups of `topology` for this rank, and the
    control group (every rank, gloo, `control_timeout_s`) that checkpoint coordination uses."""
    if topology.world_size == 1:
        return ParallelGroups(topology=topology, rank=0, device=device)
    if not dist.is_initialized():
        raise RuntimeError(f"{topology.describe()} needs torch.distributed: launch with torchrun")
    if dist.get_world_size() != topology.world_size:
        raise RuntimeError(
            f"torch.distributed has {dist.get_world_size()} ranks but the topology expects "
            f"{topology.world_size}: launch {topology.world_size} processes (torchrun --nproc-per-node "
            f"x --nnodes) or change parallel.tp / parallel.pp / parallel.dp"
        )
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    tp_group, tp_ranks = _new_groups(topology.tp_groups(), rank, timeout)
    dp_group, dp_ranks = _new_groups(topology.dp_groups(), rank, timeout)
    pp_group, pp_ranks = _new_groups(topology.pp_groups(), rank, timeout)
    embedding_group, _ = _new_groups(topology.embedding_groups(), rank, timeout)
    if topology.embedding_group_ranks(rank) is None:
        embedding_group = None
    # A group of its own even where the world is gloo already (CPU): its timeout is separate.
    control_group = dist.new_group(
        list(range(topology.world_size)), timeout=datetime.timedelta(seconds=control_timeout_s), backend="gloo"
    )
    control_dp_group, _ = _new_groups(
        topology.dp_groups(), rank, datetime.timedelta(seconds=control_timeout_s), backend="gloo"
    )
    # Created after every 3D group, and only when cp > 1, so a cp = 1 run creates exactly the groups it always did.
    cp_group, cp_ranks, dp_cp_group, dp_cp_ranks = None, (rank,), None, (rank,)
    if topology.cp > 1:
        cp_group, cp_ranks = _new_groups(topology.cp_groups(), rank, timeout)
        dp_cp_group, dp_cp_ranks = _new_groups(topology.dp_cp_groups(), rank, timeout)
    return ParallelGroups(
        topology=topology,
        rank=rank,
        device=device,
        tp_group=tp_group,
        dp_group=dp_group,
        pp_group=pp_group,
        embedding_group=embedding_group,
        control_group=control_group,
        control_dp_group=control_dp_group,
        tp_ranks=tp_ranks,
        dp_ranks=dp_ranks,
        pp_ranks=pp_ranks,
        group_timeout=timeout,
        cp_group=cp_group,
        dp_cp_group=dp_cp_group,
        cp_ranks=cp_ranks,
        dp_cp_ranks=dp_cp_ranks,
    )


def all_reduce_(tensor: torch.Tensor, group: ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`; a no-op for a group of one (None)."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


# torch 2.13 renamed the single-tensor collectives; keep working on the older names too. Looked up at
# call time, not import time, so megalm.comm's counting wrappers on torch.distributed see them.
def all_gather_single(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """Gather every rank's `input` into `output` (group size times larger); the Work when async_op, else None."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """This rank's slice of `input` summed over the group, into `output`; the Work when async_op, else None."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


COLLECTIVE_NOTE = "megalm collective: "


def wait_for(work: Any, what: Callable[[], str]) -> None:
    """Wait for an asynchronous collective; if it fails, the error carries what it was (`what()`,
    called only then, so the hot path builds no message)."""
    try:
        work.wait()
    except RuntimeError as error:
        error.add_note(COLLECTIVE_NOTE + what())
        raise


def describe_failed_collective(error: BaseException, groups: ParallelGroups) -> str:
    """Which collective, over which group, and from where in megalm, for an error raised by one.

    An asynchronous wait says what it waited for (`wait_for`); for a blocking call the innermost
    torch.distributed frame of the traceback names the function and holds its `group` argument.
    """
    frames = list(traceback.walk_tb(error.__traceback__))
    # The innermost megalm frame that is not one of the small wrappers in this module.
    callers = [
        f"{Path(f.f_code.co_filename).relative_to(_PACKAGE_ROOT)}:{line} in {f.f_code.co_name}"
        for f, line in reversed(frames)
        if Path(f.f_code.co_filename).is_relative_to(_PACKAGE_ROOT / "megalm") and f.f_code.co_filename != __file__
    ]
    caller = callers[0] if callers else "outside megalm"
    for note in getattr(error, "__notes__", []):
        if note.startswith(COLLECTIVE_NOTE):
            return f"{note[len(COLLECTIVE_NOTE):]} (waited at {caller})"
    for frame, _ in reversed(frames):
        if frame.f_code.co_filename.endswith("distributed_c10d.py") and frame.f_code.co_name[0] != "_":
            group = frame.f_locals.get("group")
            return f"{frame.f_code.co_name} over {groups.describe_group(group)} (called at {caller})"
    return f"a collective (called at {caller})"

