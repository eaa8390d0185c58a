"""How the processes of a run share the work, one strategy per `training.distribute` mode.

Every process reads the same rows and runs the base model on its equal slice of each global batch.

- `SingleProcess`: one process (also `layers` and `fsdp` with one process): no communication.
- `Replicated` (`ddp`): every process holds all layers, wrapped by accelerate in DistributedDataParallel;
  gradients are averaged. The loss is normalised by the global number of loss tokens, so the averaged
  gradient is that of one process on the whole batch.
- `LayerOwned` (`layers`): each process owns a contiguous share of the layers, receives those layers'
  activations for the whole batch from every process, and trains them alone (the way sparsify's
  `--distribute_modules` does); no gradient communication at all.
- `Sharded` (`fsdp`): like `ddp`, with each layer's parameters, gradients and Adam state sharded over the
  processes (PyTorch's FSDP2 `fully_shard`, one unit per layer; it works on gloo CPU processes and on GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from ..configuration_lorsa import LorsaConfig
from ..modeling_lorsa import LorsaForReplacement, LorsaLayer
from .activations import LayerActivations
from .data import loss_mask
from .recipe import RecipeError, TrainingSection
from .step import Batch

ActivationsFn = Callable[[torch.Tensor, torch.Tensor], dict[int, LayerActivations]]


class SingleProcess:
    """The base strategy: this process trains every layer on its rows, with nothing to exchange."""

    joint_step = False
    """Whether all layers run in one forward/backward (processes must synchronise); else one at a time."""
    replicated = True
    """Whether every process trains every layer (rank 0 speaks for them)."""

    def __init__(self, accelerator: Accelerator, layers: list[int]) -> None:
        self.accelerator = accelerator
        self.world_size, self.rank = accelerator.num_processes, accelerator.process_index
        self.layers = list(layers)
        self.owners = self.assign_owners()
        self.owned = [layer for layer in self.layers if self.replicated or self.owners[layer] == self.rank]

    def assign_owners(self) -> dict[int, int]:
        """Layer -> the process that trains it (or speaks for those that do)."""
        return {layer: 0 for layer in self.layers}

    @property
    def loss_replicas(self) -> int:
        """Processes whose losses are averaged for the logged loss."""
        return self.world_size

    def shard(self, module: nn.Module) -> None:
        """Before the optimizer is built: split parameters over processes (FSDP)."""

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """After the optimizer is built: wrap for gradient averaging (DDP)."""
        return module, optimizer

    def batch(self, ids: torch.Tensor, attention: torch.Tensor, activations: ActivationsFn, bos: int | None) -> Batch:
        """Base-model activations of this process's slice of a global batch, for the layers it trains."""
        share = ids.shape[0] // self.world_size
        rows = slice(self.rank * share, (self.rank + 1) * share)
        ids, attention = ids[rows], attention[rows]
        device = self.accelerator.device
        found = activations(ids, attention)
        mask = loss_mask(ids, attention, bos).to(device)
        found, mask, attention = self.exchange(found, mask, attention.to(device))
        return Batch(found, mask, None if bool(attention.all()) else attention)

    def exchange(
        self, activations: dict[int, LayerActivations], mask: torch.Tensor, attention: torch.Tensor
    ) -> tuple[dict[int, LayerActivations], torch.Tensor, torch.Tensor]:
        return {layer: activations[layer] for layer in self.owned}, mask, attention

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes."""
        return self.accelerator.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    def loss_scale(self, mask: torch.Tensor, hidden_size: int) -> torch.Tensor:
        """1 / (loss tokens of the global batch x d), times the processes that average the gradient."""
        tokens = mask.sum().double()
        return 1 / (tokens.clamp(min=1) * hidden_size)

    @property
    def writes_training_state(self) -> bool:
        """Whether this process writes a `training_state-rank{r}.pt` (its optimizer state differs)."""
        return self.accelerator.is_main_process

    @property
    def state_shard(self) -> int:
        """The rank whose `training_state-rank{r}.pt` this process resumes from."""
        return 0

    def full_state_dict(self, lorsa: LorsaForReplacement, config: LorsaConfig) -> dict[str, torch.Tensor]:
        """All trained layers' weights on the CPU of every process that gets them (collective)."""
        return {k: v.detach().cpu() for k, v in lorsa.state_dict().items()}

    def optimizer_state(self, module: nn.Module, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()

    def load(
        self, lorsa: LorsaForReplacement, module: nn.Module, optimizer: Any, weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
    ) -> None:
        """Set the owned layers' weights and the optimizer state from a checkpoint."""
        lorsa.load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)


class Replicated(SingleProcess):
    """`ddp`: replicas on data slices, wrapped by accelerate."""

    @property
    def joint_step(self) -> bool:
        return self.world_size > 1

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return self.accelerator.prepare(module, optimizer)

    def loss_scale(self, mask: torch.Tensor, hidden_size: int) -> torch.Tensor:
        if self.world_size == 1:
            return super().loss_scale(mask, hidden_size)
        tokens = self.reduce(mask.sum().double())
        return self.world_size / (tokens.clamp(min=1) * hidden_size)


class Sharded(Replicated):
    """`fsdp` on several processes: one FSDP2 unit per layer step; checkpoints hold full (gathered) state."""

    def shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        for step in module.steps.values():
            fully_shard(step)
        fully_shard(module)

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        return module, optimizer

    def full_state_dict(self, lorsa: LorsaForReplacement, config: LorsaConfig) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(lorsa, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, module: nn.Module, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(module, optimizer, options=options)

    def load(
        self, lorsa: LorsaForReplacement, module: nn.Module, optimizer: Any, weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
    ) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(lorsa, weights, options=options)
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


class LayerOwned(SingleProcess):
    """`layers` on several processes: each trains its contiguous share of the layers on the whole batch."""

    replicated = False

    def assign_owners(self) -> dict[int, int]:
        if len(self.layers) < self.world_size:
            raise RecipeError(
                f"training.distribute 'layers' with {self.world_size} processes needs at least as many layers, "
                f"got lorsa.layers={self.layers}: train more layers, use fewer processes, or use 'ddp'."
            )
        count, world = len(self.layers), self.world_size
        return {
            layer: rank
            for rank in range(world)
            for layer in self.layers[rank * count // world : (rank + 1) * count // world]
        }

    @property
    def loss_replicas(self) -> int:
        return 1

    def exchange(
        self, activations: dict[int, LayerActivations], mask: torch.Tensor, attention: torch.Tensor
    ) -> tuple[dict[int, LayerActivations], torch.Tensor, torch.Tensor]:
        """Each layer's inputs and outputs from every process, gathered (in rank order) on its owner."""
        mine = {}
        for layer in self.layers:
            owner = self.owners[layer]
            gathered = []
            for tensor in (activations[layer].inputs.contiguous(), activations[layer].outputs.contiguous()):
                parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if owner == self.rank else None
                dist.gather(tensor, gather_list=parts, dst=owner)
                gathered.append(torch.cat(parts) if parts is not None else None)
            if owner == self.rank:
                mine[layer] = LayerActivations(*gathered)
        return mine, self.accelerator.gather(mask.long()).bool(), self.accelerator.gather(attention)

    @property
    def writes_training_state(self) -> bool:
        return True

    @property
    def state_shard(self) -> int:
        return self.rank

    def full_state_dict(self, lorsa: LorsaForReplacement, config: LorsaConfig) -> dict[str, torch.Tensor]:
        """Every layer broadcast from its owner."""
        state = {}
        for layer in self.layers:
            owner = self.owners[layer]
            template = LorsaLayer(config, layer).state_dict() if owner != self.rank else None
            for name in list(template or lorsa.layer(layer).state_dict()):
                if owner == self.rank:
                    tensor = lorsa.layer(layer).state_dict()[name].detach().contiguous()
                else:
                    tensor = torch.empty_like(template[name], device=self.accelerator.device)
                dist.broadcast(tensor, src=owner)
                state[f"layers.{layer}.{name}"] = tensor.cpu()
        return state


def make_accelerator(training: TrainingSection, output_dir: str) -> Accelerator:
    """An accelerator with the recipe's mixed precision and trackers; CPU processes when launched as several
    processes on a machine without GPUs (accelerate sets up gloo for them only when asked for the CPU)."""
    kwargs: dict[str, Any] = {"mixed_precision": training.mixed_precision}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        kwargs["cpu"] = True
    if training.loggers:
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
        missing = [name for name in training.loggers if not available[name]]
        if missing:
            raise RecipeError(
                f"training.loggers asks for {missing}, which is not installed: pip install {' '.join(missing)}, "
                "or remove it (metrics.jsonl is written either way)."
            )
        kwargs["log_with"] = list(training.loggers)
        kwargs["project_dir"] = output_dir
    return Accelerator(**kwargs)


STRATEGIES: dict[str, type[SingleProcess]] = {"ddp": Replicated, "layers": LayerOwned, "fsdp": Sharded}


def make_strategy(mode: str, accelerator: Accelerator, layers: list[int]) -> SingleProcess:
    """The strategy for `training.distribute` = `mode`; `layers` and `fsdp` on one process need none (`ddp`
    still goes through accelerate's `prepare`)."""
    single = accelerator.num_processes == 1 and mode != "ddp"
    return (SingleProcess if single else STRATEGIES[mode])(accelerator, layers)


__all__ = ["LayerOwned", "make_accelerator", "Replicated", "STRATEGIES", "Sharded", "SingleProcess", "make_strategy"]
