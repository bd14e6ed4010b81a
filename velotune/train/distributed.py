"""Training on several processes: ranks from the environment, rows dealt to ranks, DDP or FSDP2.

Launch the way torch users already do; the launcher sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous address), and the same YAML runs on one process or many:

    torchrun --nproc_per_node 8 -m velotune train config.yaml
    accelerate launch --num_processes 8 -m velotune train config.yaml

Strategies (`training.parallel`):
    ddp    DistributedDataParallel. Only parameters with requires_grad get gradient buckets, so with LoRA
           or QLoRA only the adapter gradients are all-reduced, bucketed and overlapped with the backward.
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer is one unit, then the root
           (embeddings, final norm, LM head). Parameters, gradients and optimizer state are sharded.
    auto   ddp when the model has a LoRA adapter, fsdp for full fine-tuning.

How one optimizer step maps to ranks. The batch plan is a pure function of the seed, so every rank
builds the same plan with global micro-batches of batch_size x world_size rows (rows are packed
once over the whole data set, identically on every rank) and rank r takes rows
[r * batch_size, (r + 1) * batch_size) of each one, as a DistributedSampler would. The label count
of the whole global step is known from the plan on every rank without communication; each rank's
loss is its summed token loss over that count and its backward scales it by world_size, because DDP
and FSDP2 average gradients over ranks: the result is exactly the gradient one process would get
from batch_size x world_size rows. A rank left without rows at the short end of an epoch runs a row
whose labels are all ignored (zero loss, zero gradient) so that it still joins every collective.

Checkpoints hold the full (unsharded) trainable tensors and optimizer state in the one-process
layout, written by rank 0, so any world size resumes any checkpoint. The position in the data is
the global step: the continuation is exact when batch_size x world_size x accumulation stays the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from velotune.errors import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job, as torchrun / accelerate / deepspeed set it in the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    def get(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return default if value in (None, "") else int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}={value!r} is not an integer.") from None

    world = get("WORLD_SIZE", 1)
    rank = get("RANK", 0)
    if not 0 <= rank < max(world, 1):
        raise ConfigError(
            f"RANK={rank} is outside WORLD_SIZE={world}; start the job with torchrun or accelerate."
        )
    return Ranks(rank, world, get("LOCAL_RANK", rank))


def init_from_env() -> Ranks:
    """Joins the process group the launcher describes (nccl on CUDA, gloo on CPU) and picks this rank's GPU.

    With WORLD_SIZE unset or 1 nothing is initialised. Safe to call twice.
    """
    import torch.distributed as dist

    ranks = ranks_from_env()
    if ranks.world_size <= 1:
        return ranks
    if torch.cuda.is_available():
        # Before the model loads: device_map="auto" then means this rank's GPU.
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks


def shutdown() -> None:
    """Leaves the process group. Drop the trainer and the model first: DDP and FSDP2 hold the group, and
    a group still alive when the interpreter exits takes its worker threads down with an abort (gloo)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        # No rank tears its connections down while another still talks to it.
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def _full(t):
    """A sharded DTensor's whole value (a collective: every rank must call it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _FullTrainables:
    """What `checkpoint.save_checkpoint` / `trainable_state` read from a model: the gathered tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        for name, t in self.tensors.items():
            yield name, nn.Parameter(t, requires_grad=True)


class _FullOptimizerState:
    """What `checkpoint.save_checkpoint` reads from an optimizer (state_dict), or writes into one
    (load_state_dict): the one-process layout, resharded to the live parameters on the way in."""

    def __init__(self, optimizer: torch.optim.Optimizer, state: dict | None = None):
        self.optimizer, self.state = optimizer, state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        resharded = {}
        for index, values in state["state"].items():
            p = params[int(index)]
            resharded[index] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
                else v
                for k, v in values.items()
            }
        self.optimizer.load_state_dict({**state, "state": resharded})


class Parallel:
    """The few things the trainer does differently on several processes. With one process every method
    is the plain one-process behaviour, so the trainer calls them unconditionally.

    Args:
        strategy: "auto", "ddp" or "fsdp" (ignored with one process).
        ranks: this process's rank and the world size (default: from the environment).
    """

    def __init__(self, strategy: str = "auto", ranks: Ranks | None = None):
        if strategy not in STRATEGIES:
            raise ConfigError(f"parallel={strategy!r}: use one of {', '.join(STRATEGIES)}.")
        self.ranks = ranks or ranks_from_env()
        self.requested = strategy
        self.strategy = "none"
        self.wrapped: nn.Module | None = None

    @property
    def world_size(self) -> int:
        """Processes sharing the training (1 until `wrap`: before it each process works alone)."""
        return self.ranks.world_size if self.strategy != "none" else 1

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    # ------------------------------------------------------------------------------------ setup

    def wrap(self, model: nn.Module, has_adapter: bool) -> nn.Module:
        """The module to call for forward passes (the model itself with one process).

        FSDP2 replaces the model's parameters by sharded ones in place, so build the optimizer after this.
        """
        if self.wrapped is not None:
            return self.wrapped
        if self.ranks.world_size <= 1:
            self.wrapped = model
            return model
        import torch.distributed as dist

        if not dist.is_initialized():
            init_from_env()
        strategy = self.requested
        if strategy == "auto":
            strategy = "ddp" if has_adapter else "fsdp"
        if strategy == "fsdp" and has_adapter:
            raise ConfigError(
                "parallel='fsdp' with a LoRA adapter is not supported yet; use parallel='ddp' (only the adapter "
                "gradients are all-reduced) or full_finetuning with fsdp."
            )
        self.strategy = strategy
        if hasattr(model, "keep_embedding_on_host"):
            # DDP and FSDP2 want every parameter on the rank's device.
            model.keep_embedding_on_host(False)
        if strategy == "ddp":
            self.wrapped = self._ddp(model)
        else:
            self.wrapped = self._fsdp(model)
        logger.info("rank %d of %d: %s", self.ranks.rank, self.world_size, strategy.upper())
        return self.wrapped

    def _ddp(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        # Every rank loaded the same weights from disk; only the trainable tensors (e.g. a LoRA
        # initialisation drawn from a seed) are made identical, never the whole frozen base model.
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        device_ids = [model.device.index] if model.device.type == "cuda" else None
        return DistributedDataParallel(
            model,
            device_ids=device_ids,
            init_sync=False,
            # The model's buffers (rotary tables, 4-bit weights) are the same on every rank by construction.
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )

    def _fsdp(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        if getattr(model, "gradient_checkpointing", False) or getattr(model, "mlp_tile_tokens", None):
            # velotune.memory's recompute hands the layer's parameters to its autograd function directly,
            # which FSDP2's sharded parameters do not support.
            raise ConfigError(
                "parallel='fsdp' does not work with gradient checkpointing or MLP sequence tiling yet; set "
                "training.gradient_checkpointing: false (and lora.gradient_checkpointing: false), or use ddp."
            )
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model

    # ------------------------------------------------------------------------------------ data

    def global_batch_size(self, batch_size: int) -> int:
        return batch_size * self.world_size

    def rows_of(self, rows: list, batch_size: int) -> tuple[list, bool]:
        """This rank's rows of a global micro-batch, and whether they stand in for none (labels to ignore)."""
        if self.world_size <= 1:
            return rows, False
        mine = rows[self.ranks.rank * batch_size : (self.ranks.rank + 1) * batch_size]
        return (mine, False) if mine else (rows[:1], True)

    def sync_gradients(self, last_micro_batch: bool):
        """Gradients are reduced after the last micro-batch of a step only (DDP no_sync / FSDP2's flag)."""
        if self.strategy == "ddp" and not last_micro_batch:
            return self.wrapped.no_sync()
        if self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> int:
        """DDP and FSDP2 average gradients over ranks; the loss is already over the global label count."""
        return self.world_size

    def sum(self, values: list[float], device) -> list[float]:
        """Sums numbers over ranks (one all-reduce)."""
        if self.world_size <= 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextlib.contextmanager
    def gathered_for_forward(self):
        """FSDP2 units unsharded for forwards that call layer halves directly (evaluation's tiled path)."""
        if self.strategy != "fsdp":
            yield
            return
        units = [layer for layer in self.wrapped.layers]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()

    def grad_norm(self, norm) -> float | torch.Tensor | None:
        return None if norm is None else _full(norm)

    # ------------------------------------------------------------------------------------ checkpoints

    def full_trainables(self, model: nn.Module):
        """A stand-in for `model` whose trainable tensors are whole (a collective under FSDP2)."""
        if self.strategy != "fsdp":
            return model
        return _FullTrainables(
            {
                n: _full(p.detach()).to("cpu").contiguous()
                for n, p in model.named_parameters()
                if p.requires_grad
            }
        )

    def full_views(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) stand-ins whose state is whole, in the one-process layout (a collective under
        FSDP2: every rank calls it; only rank 0 needs the result)."""
        if self.strategy != "fsdp":
            return model, optimizer
        tensors = self.full_trainables(model)
        saved = optimizer.state_dict()
        state = {
            index: {k: _full(v).to("cpu") if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            for index, values in sorted(saved["state"].items())
        }
        return tensors, _FullOptimizerState(optimizer, {"state": state,
                                                                        "param_groups": saved["param_groups"]})  # fmt: skip

    @contextlib.contextmanager
    def loading(self, optimizer: torch.optim.Optimizer):
        """Context for `checkpoint.load_checkpoint`: yields the optimizer to load into; under FSDP2 the whole
        tensors on disk are copied into the local shards (each rank reads the file itself)."""
        if self.strategy != "fsdp":
            yield optimizer
            return
        from torch.distributed.tensor.experimental import implicit_replication

        # Inside, plain tensors act as replicated DTensors: param.copy_(whole) keeps this rank's shard.
        with implicit_replication():
            yield _FullOptimizerState(optimizer)
