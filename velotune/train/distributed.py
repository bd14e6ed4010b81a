"""Training on several processes: ranks from the environment, rows dealt to ranks, DDP, FSDP2 or DeepSpeed.

Launch the way torch users already do; the launcher sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous address), and the same YAML runs on one process or many:

    torchrun --nproc_per_node 8 -m velotune train config.yaml
    accelerate launch --num_processes 8 -m velotune train config.yaml
    deepspeed --num_gpus 8 --module velotune train config.yaml     (with training.deepspeed: ds_config.json)

Strategies (`training.parallel`):
    ddp    DistributedDataParallel. Only parameters with requires_grad get gradient buckets, so with LoRA
           or QLoRA only the adapter gradients are all-reduced, bucketed and overlapped with the backward.
    fsdp   FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer is one unit, then the root
           (embeddings, final norm, LM head). Parameters, gradients and optimizer state are sharded. With
           LoRA the frozen base and the adapters share each layer's unit (only the adapters' gradients are
           reduce-scattered); with QLoRA the 4-bit codes and scales are sharded too, as frozen parameters
           (`NF4Weight.store_as_parameters`). Gradient checkpointing (offloaded too) and MLP tiling run each
           layer's recompute inside a forward method registered with FSDP2, on the gathered weights.
    auto   ddp when the model has a LoRA adapter, fsdp for full fine-tuning.
With `training.deepspeed` (a DeepSpeed config file) DeepSpeed's engine runs ZeRO instead: see
`velotune.train.zero`.

How one optimizer step maps to ranks. The batch plan is a pure function of the seed, so every rank
builds the same plan with global micro-batches of batch_size x world_size rows (rows are packed
once over the whole data set, identically on every rank) and rank r takes rows
[r * batch_size, (r + 1) * batch_size) of each one, as a DistributedSampler would. The label count
of the whole global step is known from the plan on every rank without communication; each rank's
loss is its summed token loss over that count and its backward scales it by world_size, because DDP,
FSDP2 and ZeRO average gradients over ranks: the result is exactly the gradient one process would get
from batch_size x world_size rows. A rank left without rows at the short end of an epoch runs a row
whose labels are all ignored (zero loss, zero gradient) so that it still joins every collective.

Checkpoints hold the full (unsharded) trainable tensors and optimizer state in the one-process
layout, written by rank 0 (gathered from FSDP2's shards or ZeRO's partitions first), so any world
size and strategy resumes any checkpoint. The position in the data is the global step: the
continuation is exact when batch_size x world_size x accumulation stays the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
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


class _WholeOptimizerState:
    """What `checkpoint.save_checkpoint` reads from an optimizer (state_dict), or writes into one
    (load_state_dict): the one-process layout, split into the live shards or partitions on the way in."""

    def __init__(self, parallel: Parallel, optimizer: torch.optim.Optimizer, state: dict | None = None):
        self.parallel, self.optimizer, self.state = parallel, optimizer, state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if self.parallel.strategy == "deepspeed":
            from velotune.train import zero

            zero.load_optimizer_state(self.parallel.engine, self.optimizer, self.parallel.param_groups, state)
            return
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


class _Trainables:
    """A stand-in model for `checkpoint.load_trainables`: named trainable parameters holding whole
    tensors, written into ZeRO's partitions afterwards (`zero.load_parameters`)."""

    def __init__(self, model: nn.Module):
        self.live = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.whole = {
            n: nn.Parameter(torch.empty(getattr(p, "ds_shape", p.shape), dtype=p.dtype), requires_grad=True)
            for n, p in self.live.items()
        }

    def named_parameters(self):
        yield from self.whole.items()


def _run_as_forward(layer: nn.Module, fn, *args):
    return fn(layer, *args)


class Parallel:
    """The few things the trainer does differently on several processes. With one process every method
    is the plain one-process behaviour, so the trainer calls them unconditionally.

    Args:
        strategy: "auto", "ddp" or "fsdp" (ignored with one process).
        ranks: this process's rank and the world size (default: from the environment).
        deepspeed: a DeepSpeed config (file or dict, see `velotune.train.zero`): DeepSpeed's engine runs the
            training instead, with one process or many.
    """

    def __init__(
        self, strategy: str = "auto", ranks: Ranks | None = None, deepspeed: str | dict | None = None
    ):
        if strategy not in STRATEGIES:
            raise ConfigError(f"parallel={strategy!r}: use one of {', '.join(STRATEGIES)}.")
        if deepspeed and strategy != "auto":
            raise ConfigError(
                f"training.deepspeed and parallel={strategy!r} both pick how to train on several processes; "
                "keep parallel: auto with a DeepSpeed config, or remove training.deepspeed."
            )
        self.ranks = ranks or ranks_from_env()
        self.requested = strategy
        self.deepspeed = deepspeed
        self.strategy = "none"
        self.wrapped: nn.Module | None = None
        self.model: nn.Module | None = None
        self.engine = None  # DeepSpeed's engine
        self._last_micro_batch = True
        self.param_groups: list[list[nn.Parameter]] = []  # the optimizer's groups before ZeRO flattened them

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

        FSDP2 replaces the model's parameters by sharded ones in place, so build the optimizer after this,
        then call `attach` with it.
        """
        if self.wrapped is not None:
            return self.wrapped
        self.model = model
        if self.ranks.world_size <= 1 and not self.deepspeed:
            self.wrapped = model
            return model
        import torch.distributed as dist

        if not dist.is_initialized():
            init_from_env() if self.ranks.world_size > 1 else _init_single_process()
        strategy = "deepspeed" if self.deepspeed else self.requested
        if strategy == "auto":
            strategy = "ddp" if has_adapter else "fsdp"
        self.strategy = strategy
        if hasattr(model, "keep_embedding_on_host"):
            # DDP, FSDP2 and ZeRO want every parameter on the rank's device.
            model.keep_embedding_on_host(False)
        if strategy == "ddp":
            self.wrapped = self._ddp(model)
        elif strategy == "fsdp":
            self.wrapped = self._fsdp(model)
        else:
            self.wrapped = model  # the engine needs the optimizer: see attach
        logger.info("rank %d of %d: %s", self.ranks.rank, self.ranks.world_size, strategy.upper())
        return self.wrapped

    def attach(self, optimizer: torch.optim.Optimizer, args) -> nn.Module:
        """After the optimizer is built: the module to call for forward passes from now on. Under DeepSpeed
        this creates the engine, which partitions the optimizer (its learning rates stay settable).

        Args:
            optimizer: the AdamW over the trainable parameters.
            args: the TrainingArguments (batch size, accumulation, clipping, precision for DeepSpeed's config).
        """
        if self.strategy != "deepspeed" or self.engine is not None:
            return self.wrapped
        from velotune.train import zero

        config = zero.build_config(
            self.deepspeed, batch_size=args.batch_size, accumulation=args.gradient_accumulation_steps,
            world_size=self.ranks.world_size, max_grad_norm=args.max_grad_norm,
            mixed_precision=args.mixed_precision, optim=args.optim,
        )  # fmt: skip
        self.param_groups = [list(group["params"]) for group in optimizer.param_groups]
        self.engine = zero.initialize(self.model, optimizer, config)
        self.wrapped = self.engine
        logger.info("DeepSpeed ZeRO stage %d", zero.stage_of(config))
        return self.engine

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
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from velotune.memory.checkpoint import SHARDED_CALL
        from velotune.quant.nf4_weight import NF4Weight

        # 4-bit weights: the packed codes and block scales shard like any frozen weight (uint8 and float32
        # parameters without gradients, gathered per layer with the rest); the code tables stay buffers.
        for module in model.modules():
            if isinstance(module, NF4Weight):
                module.store_as_parameters()
        for layer in model.layers:
            # One unit per decoder layer: its frozen base weights and its trainable ones (LoRA, or all of
            # them) are sharded and gathered together; only parameters with gradients are reduce-scattered.
            fully_shard(layer)
            # Checkpointing and MLP tiling run the layer's halves outside layer.forward; this method makes
            # those steps a forward of the layer too (see velotune.memory.checkpoint.SHARDED_CALL).
            setattr(layer, SHARDED_CALL, types.MethodType(_run_as_forward, layer))
            register_fsdp_forward_method(layer, SHARDED_CALL)
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

    # ------------------------------------------------------------------------------------ step

    def sync_gradients(self, last_micro_batch: bool):
        """Gradients are reduced after the last micro-batch of a step only (DDP no_sync / FSDP2's flag /
        DeepSpeed's accumulation boundary, set here because a step at the end of an epoch may have fewer
        micro-batches than gradient_accumulation_steps)."""
        self._last_micro_batch = last_micro_batch
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        if self.strategy == "ddp" and not last_micro_batch:
            return self.wrapped.no_sync()
        if self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    @property
    def loss_scale(self) -> int:
        """DDP, FSDP2 and DeepSpeed average gradients over ranks; the loss is already over the global label
        count."""
        return self.world_size

    def backward(self, loss: torch.Tensor, scaler=None) -> None:
        """The backward of one micro-batch (inside `sync_gradients`). Under DeepSpeed it is the engine's
        backward, and after the last micro-batch of a step the engine's step: it reduces, clips and steps
        the optimizer itself, and the trainer then skips its own clipping and step."""
        if self.world_size > 1:
            loss = loss * self.loss_scale
        if self.engine is not None:
            self.engine.backward(loss, scale_wrt_gas=False)
            if self._last_micro_batch:
                self.engine.step()
            return
        (scaler.scale(loss) if scaler is not None else loss).backward()

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

    def grad_norm(self, norm) -> float | torch.Tensor | None:
        """The step's gradient norm before clipping (DeepSpeed: the engine's)."""
        if self.engine is not None:
            return self.engine.get_global_grad_norm()
        return None if norm is None else _full(norm)

    # ------------------------------------------------------------------------------------ checkpoints

    def _whole(self, p: nn.Parameter) -> torch.Tensor:
        if self.strategy == "deepspeed":
            from velotune.train import zero

            return zero.whole_parameter(p)
        return _full(p.detach())

    @contextlib.contextmanager
    def whole_trainables(self, model: nn.Module):
        """Inside, the model's trainable parameters are whole tensors on the CPU, as one process holds them,
        so that saving code (`trainable_state`, `save_pretrained`) reads them unchanged. A collective under
        FSDP2 and DeepSpeed: every rank enters; nothing may run the model inside."""
        if self.strategy not in ("fsdp", "deepspeed"):
            yield model
            return
        whole: dict[int, nn.Parameter] = {}
        swapped = []
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or not p.requires_grad:
                    continue
                if id(p) not in whole:  # a tied parameter is gathered once
                    whole[id(p)] = nn.Parameter(self._whole(p).to("cpu").contiguous(), requires_grad=True)
                module._parameters[name] = whole[id(p)]
                swapped.append((module, name, p))
        try:
            yield model
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p

    def whole_optimizer(self, optimizer: torch.optim.Optimizer):
        """An optimizer stand-in whose state_dict() is the one-process layout (a collective under FSDP2 and
        DeepSpeed: every rank calls it; only rank 0 needs the result)."""
        if self.strategy == "deepspeed":
            from velotune.train import zero

            return _WholeOptimizerState(
                self, optimizer, zero.optimizer_state(self.engine, optimizer, self.param_groups)
            )
        if self.strategy != "fsdp":
            return optimizer
        saved = optimizer.state_dict()
        state = {
            index: {k: _full(v).to("cpu") if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            for index, values in sorted(saved["state"].items())
        }
        return _WholeOptimizerState(self, optimizer, {"state": state, "param_groups": saved["param_groups"]})

    @contextlib.contextmanager
    def loading(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Context for `checkpoint.load_checkpoint`: yields the (model, optimizer) to load into. Each rank
        reads the whole tensors on disk itself; under FSDP2 they are copied into the local shards, under
        DeepSpeed into ZeRO's partitions when the context closes."""
        if self.strategy == "deepspeed":
            from velotune.train import zero

            stand_in = _Trainables(model)
            yield stand_in, _WholeOptimizerState(self, optimizer)
            zero.load_parameters(
                self.engine, {stand_in.live[n]: p.detach() for n, p in stand_in.whole.items()}
            )
            return
        if self.strategy != "fsdp":
            yield model, optimizer
            return
        from torch.distributed.tensor.experimental import implicit_replication

        # Inside, plain tensors act as replicated DTensors: param.copy_(whole) keeps this rank's shard.
        with implicit_replication():
            yield model, _WholeOptimizerState(self, optimizer)


def _init_single_process() -> None:
    """A process group of one (DeepSpeed needs one even when it runs alone)."""
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
