"""DeepSpeed as an optional engine: ZeRO stage 1 or 2 (or plain stage 0) data parallelism over megalm's model.

megalm keeps the model, the tensor parallelism and the data; DeepSpeed takes over what happens to
gradients across data-parallel ranks (reduce-scatter into ZeRO partitions), the global-norm
clipping and AdamW on each rank's partition. The two meet in `DeepSpeedMPU`, which presents
megalm's `ParallelGroups` through the Megatron-style `mpu` interface that `deepspeed.initialize`
accepts, so DeepSpeed shards over the dp group only and sums gradient norms over the tp group.

DeepSpeed is imported only inside `build_deepspeed_engine` (install it with
`pip install megalm[deepspeed]`); `DeepSpeedMPU` and `deepspeed_config` need nothing but torch.

Size-1 dimensions. megalm represents a group of one rank as None. DeepSpeed passes the groups it
gets from `mpu` straight to torch.distributed collectives and `get_rank/get_world_size(group=...)`,
where None means the *whole world*: with a None data-parallel group at tp=2, dp=1,
`deepspeed.initialize` fails ("Group None is not registered", tried with DeepSpeed 0.19.8), and
paths that take the world instead would shard or sum norms over the wrong ranks (some DeepSpeed
paths guard with `pg_utils.is_parallel(group)`, others do not). So `DeepSpeedMPU` never
hands out None: every size-1 dimension gets a real process group holding only this rank, created
with `use_local_synchronization=True` (only this rank takes part, no global barrier).
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from megalm.config import Config, ConfigError, grad_accum_steps
from megalm.data.batch import Batch
from megalm.distributed import ParallelGroups, ProcessGroup, all_reduce_
from megalm.optim import global_grad_norm
from megalm.topology import Topology

INSTALL_HINT = "pip install megalm[deepspeed]"
ZERO_STAGES = (0, 1, 2)  # 0: DeepSpeed all-reduce, no sharding; 1/2: ZeRO


# ---- the mpu adapter ---------------------------------------------------------------------------------


def model_parallel_ranks(topology: Topology, rank: int) -> list[int]:
    """Global ranks of `rank`'s model-parallel group: every tp and pp rank at its dp coordinate.

    Megatron's "model parallel" group is tp x pp; its rank order (ascending global rank) is
    pp-major, so the model-parallel rank is pp_rank * tp + tp_rank.
    """
    dp_rank = topology.coords(rank).dp
    return [topology.rank(pp, dp_rank, tp) for pp in range(topology.pp) for tp in range(topology.tp)]


class DeepSpeedMPU:
    """megalm's ParallelGroups behind the `mpu` methods DeepSpeed calls (ZeRO 1/2, clipping, checkpoints).

    Ranks and sizes come from the Topology (no torch.distributed call); groups are megalm's, with a
    real one-rank group standing in for every size-1 dimension (see the module docstring). Build it
    with `DeepSpeedMPU.create(groups)` once torch.distributed runs; the constructor takes the
    one-rank and model-parallel groups explicitly so the adapter can be tested without processes.

    Deliberately absent: `initialize_sequence_parallel` (its presence switches DeepSpeed into
    Ulysses mode, where it ignores the mpu's groups) and the `get_sequence_parallel_*` family:
    megalm has no Ulysses sequence parallelism (its `sequence_parallel` lives inside the tp group).
    """

    def __init__(
        self,
        groups: ParallelGroups,
        self_group: Any = None,
        model_parallel_group: Any = None,
    ) -> None:
        self.groups = groups
        self.topology = groups.topology
        self._self_group = self_group
        self._model_parallel_group = model_parallel_group

    @classmethod
    def create(cls, groups: ParallelGroups) -> "DeepSpeedMPU":
        """Create the one-rank group (and, for pp > 1, the tp x pp group) and wrap `groups`."""
        if not dist.is_initialized():
            raise RuntimeError(
                "DeepSpeedMPU.create needs torch.distributed to be initialised (init_distributed, or "
                "torchrun): DeepSpeed cannot use megalm's size-1 'None' groups without a real process group"
            )
        if dist.get_rank() != groups.rank or dist.get_world_size() != groups.topology.world_size:
            raise RuntimeError(
                f"ParallelGroups describe rank {groups.rank} of {groups.topology.world_size} but "
                f"torch.distributed runs rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        self_group = dist.new_group([groups.rank], use_local_synchronization=True)
        model_parallel_group = None
        topology = groups.topology
        if topology.pp > 1:  # for pp = 1 the model-parallel group is the tp group
            model_parallel_group = dist.new_group(
                model_parallel_ranks(topology, groups.rank), use_local_synchronization=True
            )
        return cls(groups, self_group, model_parallel_group)

    def _group(self, group: ProcessGroup, size: int, name: str) -> Any:
        if size > 1:
            if group is None:
                raise RuntimeError(f"the {name} group has {size} ranks but ParallelGroups holds None for it")
            return group
        if self._self_group is None:
            raise RuntimeError(
                f"the {name} dimension has one rank and DeepSpeedMPU has no one-rank process group for it "
                f"(DeepSpeed reads a None group as the whole world): build the adapter with "
                f"DeepSpeedMPU.create(groups)"
            )
        return self._self_group

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tp_size

    def get_tensor_model_parallel_group(self) -> Any:
        return self._group(self.groups.tp_group, self.groups.tp_size, "tensor-parallel")

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tp rank 0 in this rank's tensor-parallel group."""
        coords = self.groups.coords
        return self.topology.rank(coords.pp, coords.dp, 0)

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.groups.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.pp_size

    def get_pipeline_model_parallel_group(self) -> Any:
        return self._group(self.groups.pp_group, self.groups.pp_size, "pipeline")

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.groups.dp_size

    def get_data_parallel_group(self) -> Any:
        return self._group(self.groups.dp_group, self.groups.dp_size, "data-parallel")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topology.dp_group_ranks(self.groups.rank)

    # model parallel = tensor x pipeline (Megatron's meaning, which DeepSpeed follows)
    def get_model_parallel_rank(self) -> int:
        return self.groups.pp_rank * self.groups.tp_size + self.groups.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.groups.tp_size * self.groups.pp_size

    def get_model_parallel_group(self) -> Any:
        if self.groups.pp_size == 1:
            return self.get_tensor_model_parallel_group()
        if self._model_parallel_group is None:
            raise RuntimeError(
                "pp > 1 needs a tensor x pipeline process group: build the adapter with DeepSpeedMPU.create(groups)"
            )
        return self._model_parallel_group


# ---- the DeepSpeed config ----------------------------------------------------------------------------


def check_supported(config: Config, groups: ParallelGroups, zero_stage: int) -> None:
    """Raise early, naming the setting, for what the DeepSpeed engine does not run."""
    if zero_stage not in ZERO_STAGES:
        raise ConfigError(
            f"the DeepSpeed engine runs ZeRO stage 0, 1 or 2, got zero_stage={zero_stage!r}: stage 3 "
            f"shards the parameters, which megalm's tensor-parallel layers do not expect"
        )
    if groups.pp_size > 1 or config.parallel.pp > 1:
        raise ConfigError(
            f"the DeepSpeed engine does not run pipeline parallelism (parallel.pp={config.parallel.pp}): "
            f"use parallel.pp=1, or train.engine=megalm for pipelines"
        )
    if config.parallel.virtual_stages > 1:
        raise ConfigError("parallel.virtual_stages > 1 is a pipeline setting: set it to 1 with the DeepSpeed engine")
    if config.parallel.sequence_parallel and config.parallel.tp > 1:
        raise ConfigError(
            "parallel.sequence_parallel is not supported with the DeepSpeed engine: its LayerNorm gradients "
            "need a tp all-reduce before DeepSpeed reduces them over dp; set parallel.sequence_parallel=false"
        )
    if config.train.precision not in ("fp32", "bf16"):
        raise ConfigError(
            f"the DeepSpeed engine runs train.precision fp32 or bf16, got {config.train.precision!r}: "
            f"ZeRO with torch autocast in fp16 has no loss scaling; use bf16 or train.engine=megalm"
        )


def deepspeed_config(config: Config, dp_size: int, zero_stage: int) -> dict:
    """The DeepSpeed config dict equivalent to megalm's config at data-parallel size `dp_size`.

    Mirrors megalm's numerics: fp32 parameters, gradients and AdamW (torch's own AdamW, so no
    DeepSpeed op is compiled); bf16 is torch.autocast around the forward, as in megalm, not
    DeepSpeed's bf16 mode (which would store bf16 weights). The learning rate is set by the caller
    every step from megalm's schedule, so there is no DeepSpeed scheduler.
    """
    train, optim, parallel = config.train, config.optim, config.parallel
    accum = grad_accum_steps(config, dp_size)
    bucket_elements = int(getattr(parallel, "bucket_size_mb", 25.0) * 2**20 / 4)  # fp32 gradients
    result: dict = {
        "train_batch_size": train.micro_batch_size * accum * dp_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.clip_grad,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": bucket_elements,
            "allgather_bucket_size": bucket_elements,
            "overlap_comm": bool(getattr(parallel, "overlap_grad_sync", False)),
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        # No module is "lower precision safe": gradients stay fp32 and are reduced in fp32, as in megalm.
        result["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return result


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as megalm makes them: matrices decayed, biases and LayerNorm (1-D) not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mark_tensor_parallel(model: nn.Module) -> None:
    """Tag tp-split parameters the way DeepSpeed recognises them, so norms count each shard once.

    DeepSpeed counts a gradient in the global norm when `param.tensor_model_parallel` is true or the
    rank is tensor-parallel rank 0 (replicated parameters), then sums over the model-parallel group.
    """
    for param in model.parameters():
        if getattr(param, "tp_split_dim", None) is not None:
            param.tensor_model_parallel = True


def import_deepspeed() -> Any:
    """Import DeepSpeed, or fail with the install command."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as error:
        raise ImportError(
            f"train.engine=deepspeed needs DeepSpeed, which is an optional extra: {INSTALL_HINT} "
            f"(import failed: {error})"
        ) from error


def _ensure_process_group(groups: ParallelGroups) -> None:
    """A single process still needs torch.distributed for DeepSpeed: start a one-rank group in memory."""
    # DeepSpeed asserts LOCAL_RANK is set (torchrun sets it; a plain `megalm train` does not).
    os.environ.setdefault("LOCAL_RANK", str(groups.device.index or 0))
    if dist.is_initialized():
        return
    if groups.topology.world_size != 1:
        raise RuntimeError(f"{groups.topology.describe()} needs torch.distributed: launch with torchrun")
    backend = "nccl" if groups.device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=300)
    )


# ---- the engine ------------------------------------------------------------------------------------


@dataclass
class DeepSpeedStep:
    """One optimizer step's results: the mean token loss and the global gradient norm before clipping."""

    loss: float
    grad_norm: float


def _hook_count(model: nn.Module) -> int:
    """Post-accumulate-grad hooks on the model's parameters (megalm's GradientSync registers them)."""
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


class DeepSpeedRunner:
    """megalm's step semantics on a DeepSpeed engine: forward, engine.backward and engine.step per micro-batch.

    The loss is normalised as in megalm, by the global number of loss tokens. DeepSpeed scales each
    micro-batch's loss by 1/accumulation and averages gradients over dp, so the loss handed to it is
    multiplied by dp x accumulation to give exactly megalm's gradient.
    """

    def __init__(self, engine: Any, mpu: DeepSpeedMPU, config: Config, groups: ParallelGroups, zero_stage: int) -> None:
        self.engine = engine
        self.mpu = mpu
        self.config = config
        self.groups = groups
        self.zero_stage = zero_stage
        self.model = engine.module  # the megalm GPTModel (same parameters: ZeRO 1/2 keep them whole)
        self.accum = grad_accum_steps(config, groups.dp_size)
        self._hooks = _hook_count(self.model)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, batches: list[Batch], lr: float) -> DeepSpeedStep:
        """One optimizer step over this rank's micro-batches (already on the device) at learning rate `lr`."""
        if len(batches) != self.accum:
            raise ValueError(
                f"the DeepSpeed engine was configured for {self.accum} micro-batches per step, got {len(batches)}"
            )
        if _hook_count(self.model) != self._hooks:
            raise RuntimeError(
                "gradient hooks were added to the model after DeepSpeed wrapped it (megalm's GradientSync?): "
                "they would reduce gradients a second time; with train.engine=deepspeed build no GradientSync"
            )
        device = self.groups.device
        local_tokens = sum(batch.loss_mask.sum() for batch in batches).to(device, torch.float32)
        global_tokens = all_reduce_(local_tokens.clone(), self.groups.dp_group)
        self.set_lr(lr)
        self.engine.train()
        scale = self.groups.dp_size * self.accum  # undoes DeepSpeed's 1/accumulation and dp average
        loss_sum = torch.zeros((), device=device)
        norm: Optional[float] = None
        for index, batch in enumerate(batches):
            losses = self.engine(batch.tokens, labels=batch.labels, prefix_lengths=batch.prefix_lengths,
                                 document_ids=batch.document_ids)  # [b, s]
            loss = (losses.float() * batch.loss_mask).sum() / global_tokens
            self.engine.backward(loss * scale)
            if self.zero_stage == 0 and index == len(batches) - 1:
                # Without ZeRO, DeepSpeed clips but does not keep the norm: measure it as megalm does
                # (gradients are already averaged over dp after the last backward).
                norm = float(global_grad_norm(list(self.model.parameters()), self.groups))
            self.engine.step()
            loss_sum += loss.detach()
        all_reduce_(loss_sum, self.groups.dp_group)
        if norm is None:
            reported = self.engine.get_global_grad_norm()
            norm = float(reported) if reported is not None else float("nan")
        return DeepSpeedStep(loss_sum.item(), norm)


def build_deepspeed_engine(
    config: Config, groups: ParallelGroups, chunks: list[nn.Module], zero_stage: int
) -> DeepSpeedRunner:
    """Wrap this rank's model (one chunk: pp = 1) in a DeepSpeed engine with ZeRO stage `zero_stage` (0, 1, 2).

    Call after `build_model_chunks` (and `rng.seed_replicated()`) and before anything hooks the
    parameters; the weights are megalm's, initialised from (seed, name), so every dp rank already
    holds the same model. Collective: every rank calls it.
    """
    check_supported(config, groups, zero_stage)
    if len(chunks) != 1:
        raise ConfigError(f"the DeepSpeed engine wraps one model chunk (pp = 1), got {len(chunks)}")
    model = chunks[0]
    if _hook_count(model):
        raise RuntimeError(
            "the model's parameters already have gradient hooks, most likely megalm's GradientSync: with "
            "train.engine=deepspeed DeepSpeed alone reduces gradients; build no GradientSync"
        )
    if groups.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is first imported
    deepspeed = import_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _ensure_process_group(groups)
    mark_tensor_parallel(model)
    mpu = DeepSpeedMPU.create(groups)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, config.optim.weight_decay),
        mpu=mpu,
        config=deepspeed_config(config, groups.dp_size, zero_stage),
    )
    return DeepSpeedRunner(engine, mpu, config, groups, zero_stage)
