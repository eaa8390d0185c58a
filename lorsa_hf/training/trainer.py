"""Training Lorsas on a frozen base model's attention blocks (docs/method.md §3), on one CPU or many GPUs.

Every process reads the same deterministic stream of packed rows and takes its slice of each global batch.
`distribute`:

- `ddp`: every process holds all Lorsa layers (wrapped by accelerate in DistributedDataParallel) and runs the
  base model on its slice; gradients are averaged. The loss is normalised by the global number of loss
  tokens, so the averaged gradient is that of one process on the whole batch.
- `layers`: each process owns a contiguous share of the layers. It runs the base model on its slice once,
  sends every layer's activations to the layer's owner, and trains its own layers on the whole batch (the
  way sparsify's `--distribute_modules` does); no gradient communication at all.
- `fsdp`: like `ddp`, with each Lorsa layer's parameters, gradients and Adam state sharded over the processes
  (PyTorch's FSDP2 `fully_shard`, one unit per layer; it works on gloo CPU processes as well as on GPUs).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .._io import atomic_save_directory, atomic_write_text
from .._sparse import kept_activations, select_top_k, sparse_decode
from ..configuration_lorsa import LorsaConfig
from ..modeling_lorsa import LorsaForReplacement, LorsaLayer
from .activations import (
    ActivationSource,
    FileTextSource,
    HFDatasetSource,
    LayerActivations,
    ListTextSource,
    PackerState,
    SequencePacker,
    SkipTextSource,
    TakeTextSource,
    TextSource,
    batches,
    loss_mask,
)
from .checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state, write_json_atomic
from .init import initialize_layer
from .recipe import Recipe, RecipeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Recipe keys that may change when a run is resumed: they do not affect the weights.
RESUMABLE_CHANGES = {
    "output_dir", "training.eval_every", "training.eval_sequences", "training.checkpoint_every",
    "training.keep_checkpoints", "training.log_every", "training.loggers", "training.progress_bar",
    "model.cache_dir", "model.attn_implementation",
}


def load_base_model(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The recipe's base model (frozen, eval mode, in `model.dtype`) and its tokenizer."""
    dtype = DTYPES[recipe.model.dtype]
    if recipe.model.name == "embedded":
        from ..embedded import load_embedded_model

        return load_embedded_model(dtype=dtype, cache_dir=recipe.model.cache_dir)
    kwargs: dict[str, Any] = {"revision": recipe.model.revision, "cache_dir": recipe.model.cache_dir}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name, revision=recipe.model.revision)
    return model, tokenizer


def text_sources(recipe: Recipe) -> tuple[TextSource, TextSource]:
    """(training, held-out) text for the recipe's `data` section; the two never share a document."""
    data = recipe.data
    if data.source == "embedded":
        from ..embedded import embedded_corpus

        return ListTextSource(embedded_corpus("train")), ListTextSource(embedded_corpus("heldout"))
    if data.source == "hf":
        train = HFDatasetSource(data.path, data.split, data.config_name, data.text_field, data.streaming)
        if data.heldout_split:
            heldout = HFDatasetSource(data.path, data.heldout_split, data.config_name, data.text_field, data.streaming)
            return train, heldout
    else:
        train = FileTextSource(data.files, data.text_field)
        if data.heldout_files:
            return train, FileTextSource(data.heldout_files, data.text_field)
    return SkipTextSource(train, data.heldout_documents), TakeTextSource(train, data.heldout_documents)


def top_k_at(step: int, total_steps: int, recipe: Recipe, target: int) -> int:
    """K annealed from `training.k_initial` to the target over `k_anneal_fraction` of the steps."""
    training = recipe.training
    if training.k_initial is None:
        return target
    anneal_steps = max(1, round(total_steps * training.k_anneal_fraction))
    if step >= anneal_steps:
        return target
    progress = step / anneal_steps
    start = training.k_initial
    if training.k_anneal == "linear":
        k = start + (target - start) * progress
    else:
        k = start * (target / start) ** progress
    return max(1, int(round(k)))


def lr_factor(step: int, total_steps: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine/linear decay to `final_lr_fraction` (or constant)."""
    training = recipe.training
    warmup = round(total_steps * training.warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    if training.lr_decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    final = training.final_lr_fraction
    if training.lr_decay == "linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LorsaLayerStep(nn.Module):
    """One Lorsa layer's training forward: its prediction, activations, and (given dead heads) the auxiliary
    reconstruction of the top `k_aux` dead heads. Everything that reads the layer's weights happens inside this
    forward, which makes it the unit FSDP gathers and shards."""

    def __init__(self, layer: LorsaLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, top_k: int,
        dead: torch.Tensor | None = None, k_aux: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = self.layer(hidden_states, attention_mask=attention_mask, output_activations=True, top_k=top_k)
        auxiliary = None
        if dead is not None:
            activation, W_O = self.layer.config.activation, self.layer.W_O.float()
            z = out.z.float().flatten(0, -2)  # [N, n_ov]
            indices = select_top_k(z, W_O.detach().norm(dim=-1), k_aux, activation, among=dead)
            auxiliary = sparse_decode(kept_activations(z, indices, activation), indices, W_O)
            auxiliary = auxiliary.view(*out.z.shape[:-1], -1)
        return out.hidden_states, out.top_k_values, out.top_k_indices, auxiliary


class LorsaTrainingModule(nn.Module):
    """Runs every trained Lorsa layer in one forward call (what DDP wraps; FSDP shards each `LorsaLayerStep`)."""

    def __init__(self, lorsa: LorsaForReplacement) -> None:
        super().__init__()
        self.steps = nn.ModuleDict({name: LorsaLayerStep(layer) for name, layer in lorsa.layers.items()})

    def forward(
        self, inputs: dict[str, torch.Tensor], attention_mask: torch.Tensor | None, top_k: int,
        auxiliary: dict[str, tuple[torch.Tensor, int]] | None = None,
    ) -> dict[str, tuple[torch.Tensor | None, ...]]:
        """`auxiliary` maps a layer to (dead-head mask, k_aux) for the layers whose dead heads get the
        auxiliary loss."""
        auxiliary = auxiliary or {}
        return {
            name: self.steps[name](hidden_states, attention_mask, top_k, *auxiliary.get(name, (None, 0)))
            for name, hidden_states in inputs.items()
        }


@dataclass
class _Batch:
    """Activations of the layers this process trains, for the rows it trains them on."""

    activations: dict[int, LayerActivations]
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None


class LorsaTrainer:
    """Train the Lorsa described by a recipe. `model`, `tokenizer` and the text sources default to what the
    recipe names; pass them to train on something else (tests use tiny random models and in-memory text)."""

    def __init__(
        self,
        recipe: Recipe,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        train_text: TextSource | None = None,
        heldout_text: TextSource | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.recipe = recipe
        training = recipe.training
        self.output_dir = Path(recipe.output_dir)
        self.accelerator = accelerator or self._make_accelerator()
        acc = self.accelerator
        self.world_size, self.rank = acc.num_processes, acc.process_index
        self.mode = training.distribute
        if recipe.data.batch_size % self.world_size:
            raise RecipeError(
                f"data.batch_size ({recipe.data.batch_size}) must be divisible by the number of processes "
                f"({self.world_size}): each process takes an equal slice of every batch."
            )
        set_seed(training.seed)
        if model is None or tokenizer is None:
            model, tokenizer = load_base_model(recipe)
        self.base_model = model.to(acc.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        if train_text is None or heldout_text is None:
            train_text, heldout_text = text_sources(recipe)
        self.train_text, self.heldout_text = train_text, heldout_text

        overrides = {k: v for k, v in recipe.lorsa.items() if k != "layers"}
        self.config = LorsaConfig.from_base_config(model.config, recipe.lorsa["layers"], **overrides)
        # The recipe's name ("embedded" for the embedded model, as lorsa_hf.evals accepts it), not a local path.
        self.config.base_model_name_or_path = recipe.model.name
        self.config.base_model_revision = recipe.model.revision
        self.layers = list(self.config.layers)
        self.owners = self._assign_owners()
        self.owned = [layer for layer in self.layers if self._trains(layer)]
        self.source = ActivationSource(self.base_model, self.layers)
        self.total_steps = recipe.total_steps
        self.k_aux = training.k_aux or self.config.hidden_size // 2

        for name, k in (("training.k_initial", training.k_initial), ("training.k_aux", training.k_aux)):
            if k is not None and not 0 < k <= self.config.n_ov_heads:
                raise RecipeError(f"{name} must be between 1 and lorsa n_ov_heads ({self.config.n_ov_heads}), got {k}.")
        owned_config = copy.deepcopy(self.config)
        owned_config.layers = self.owned
        self.lorsa = LorsaForReplacement(owned_config).to(acc.device)
        self._initialize()
        self.module = LorsaTrainingModule(self.lorsa)
        # Several layers in one forward/backward where processes must synchronise; otherwise one at a time.
        self.joint_step = self.mode in ("ddp", "fsdp") and self.world_size > 1
        self.sharded = self.mode == "fsdp" and self.world_size > 1
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for step in self.module.steps.values():
                fully_shard(step)
            fully_shard(self.module)
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameters, lr=training.lr, betas=tuple(training.betas))
        if self.mode == "ddp":
            self.module, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, recipe)
        )
        self.step = 0
        self.packer_state = PackerState()
        self.tokens_since_fired = torch.zeros(len(self.layers), self.config.n_ov_heads, dtype=torch.long)
        self.final_metrics: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------- setup

    def _make_accelerator(self) -> Accelerator:
        training = self.recipe.training
        kwargs: dict[str, Any] = {"mixed_precision": training.mixed_precision}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Launched as several processes (torchrun, accelerate launch --multi_gpu) on a machine without
            # GPUs: accelerate only sets up gloo for CPU processes when asked for the CPU explicitly.
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
            kwargs["project_dir"] = self.recipe.output_dir
        return Accelerator(**kwargs)

    def _assign_owners(self) -> dict[int, int]:
        """Layer -> process that trains it: everyone in ddp/fsdp (rank 0 speaks for them), contiguous shares
        in layers mode."""
        if self.mode != "layers":
            return {layer: 0 for layer in self.layers}
        if len(self.layers) < self.world_size:
            raise RecipeError(
                f"training.distribute 'layers' with {self.world_size} processes needs at least as many layers, "
                f"got lorsa.layers={self.layers}: train more layers, use fewer processes, or use 'ddp'."
            )
        count = len(self.layers)
        return {
            layer: rank
            for rank in range(self.world_size)
            for layer in self.layers[rank * count // self.world_size : (rank + 1) * count // self.world_size]
        }

    def _trains(self, layer: int) -> bool:
        return self.mode != "layers" or self.owners[layer] == self.rank

    def _initialize(self) -> None:
        """The recipe's initialisation, from calibration rows at the start of the training text."""
        options = self.recipe.init
        calibration = None
        if options.b_o == "mean" or options.match_norm:
            packer = SequencePacker(
                self.train_text, self.tokenizer, self.recipe.data.context_length, self.recipe.data.pack,
                self.recipe.data.prepend_bos,
            )
            rows = next(batches(packer, options.calibration_sequences), None)
            if rows is None:
                raise ValueError(
                    f"The training text has fewer than init.calibration_sequences={options.calibration_sequences} rows."
                )
            ids, attention, _ = rows
            activations = self.source(ids, attention)
            mask = loss_mask(ids, attention, self.tokenizer.bos_token_id).to(self.accelerator.device)
            calibration = {layer: activations[layer] for layer in self.owned}
        k0 = top_k_at(0, self.total_steps, self.recipe, self.config.top_k)
        for layer in self.owned:
            data = None
            if calibration is not None:
                attention_mask = None if bool(attention.all()) else attention.to(self.accelerator.device)
                data = (calibration[layer].inputs, calibration[layer].outputs, mask, attention_mask)
            initialize_layer(self.lorsa.layer(layer), options, self.base_model, self.recipe.training.seed, data, k0)

    # ------------------------------------------------------------------------------------------------ data

    def _local_rows(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        share = ids.shape[0] // self.world_size
        rows = slice(self.rank * share, (self.rank + 1) * share)
        return ids[rows], attention[rows]

    def _prepare_batch(self, ids: torch.Tensor, attention: torch.Tensor) -> _Batch:
        """Base-model activations for this process's slice of a global batch; in layers mode exchanged so each
        process ends up with its own layers' activations for the whole batch."""
        ids, attention = self._local_rows(ids, attention)
        device = self.accelerator.device
        activations = self.source(ids, attention)
        mask = loss_mask(ids, attention, self.tokenizer.bos_token_id).to(device)
        attention = attention.to(device)
        if self.mode == "layers" and self.world_size > 1:
            activations = self._send_to_owners(activations)
            mask = self.accelerator.gather(mask.long()).bool()
            attention = self.accelerator.gather(attention)
        else:
            activations = {layer: activations[layer] for layer in self.owned}
        return _Batch(activations, mask, None if bool(attention.all()) else attention)

    def _send_to_owners(self, activations: dict[int, LayerActivations]) -> dict[int, LayerActivations]:
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
        return mine

    def _heldout_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        data = self.recipe.data
        packer = SequencePacker(self.heldout_text, self.tokenizer, data.context_length, data.pack, data.prepend_bos)
        count = max(1, math.ceil(self.recipe.training.eval_sequences / data.batch_size))
        found = [(ids, attention) for ids, attention, _ in _take(batches(packer, data.batch_size), count)]
        if not found:
            raise ValueError(
                f"The held-out text gives fewer than data.batch_size={data.batch_size} rows of "
                f"{data.context_length} tokens: hold out more documents (data.heldout_documents)."
            )
        return found

    # -------------------------------------------------------------------------------------------- one step

    def _forward(self, batch: _Batch, top_k: int, with_auxiliary: bool = False) -> dict[int, tuple[Any, ...]]:
        """Per layer (prediction, selected values, their indices, auxiliary dead-head reconstruction or None)."""
        inputs = {str(layer): acts.inputs for layer, acts in batch.activations.items()}
        auxiliary = {}
        if with_auxiliary and self.recipe.training.aux_loss_coef > 0:
            for layer in batch.activations:
                dead = self._dead_heads(self.layers.index(layer))
                if dead.any():
                    auxiliary[str(layer)] = (dead.to(self.accelerator.device), min(self.k_aux, int(dead.sum())))
        with self.accelerator.autocast():
            outputs = self.module(
                inputs=inputs, attention_mask=batch.attention_mask, top_k=top_k, auxiliary=auxiliary
            )
        return {int(name): value for name, value in outputs.items()}

    def _stats(self, batch: _Batch, outputs: dict[int, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Per layer, float64, summed over this process's loss tokens: [squared error, sum |y|^2, tokens,
        active heads, sum y (d), times each head fired (n_ov)]; zeros for layers trained elsewhere."""
        d, n_ov = self.config.hidden_size, self.config.n_ov_heads
        stats = torch.zeros(len(self.layers), 4 + d + n_ov, dtype=torch.float64, device=self.accelerator.device)
        mask = batch.loss_mask
        for position, layer in enumerate(self.layers):
            if layer not in outputs:
                continue
            prediction, values, indices, _ = outputs[layer]
            target = batch.activations[layer].outputs[mask].double()
            error = prediction.detach()[mask].double() - target
            active = values.detach()[mask] != 0
            stats[position, 0] = error.pow(2).sum()
            stats[position, 1] = target.pow(2).sum()
            stats[position, 2] = mask.sum()
            stats[position, 3] = active.sum()
            stats[position, 4 : 4 + d] = target.sum(0)
            fired = torch.bincount(indices[mask][active], minlength=n_ov)
            stats[position, 4 + d :] = fired.double()
        return stats

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum") if self.world_size > 1 else tensor

    def _loss(self, batch: _Batch, outputs: dict[int, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """MSE per element over the loss tokens of the whole global batch, summed over layers, plus the
        auxiliary dead-head loss."""
        mask = batch.loss_mask
        tokens = mask.sum().double()
        replicated = self.mode in ("ddp", "fsdp") and self.world_size > 1
        if replicated:
            tokens = self._reduce(tokens)
        scale = (self.world_size if replicated else 1) / (tokens.clamp(min=1) * self.config.hidden_size)
        loss = torch.zeros((), device=self.accelerator.device)
        for layer, (prediction, _, _, auxiliary) in outputs.items():
            target = batch.activations[layer].outputs
            error = (prediction.float() - target)[mask]
            loss = loss + error.pow(2).sum() * scale.float()
            if auxiliary is not None:
                dead = self._dead_heads(self.layers.index(layer))
                aux = self._aux_loss(auxiliary[mask], error, target[mask], int(dead.sum()))
                loss = loss + self.recipe.training.aux_loss_coef * aux
        return loss

    def _aux_loss(
        self, reconstruction: torch.Tensor, error: torch.Tensor, target: torch.Tensor, dead_count: int
    ) -> torch.Tensor:
        """How well the top `k_aux` dead heads fit the (detached) residual error, over the target variance,
        scaled by min(dead / k_aux, 1) (sparsify's AuxK); all on the loss tokens."""
        residual = -error.detach()
        variance = (target - target.mean(0)).pow(2).sum().clamp(min=1e-12)
        scale = min(dead_count / self.k_aux, 1.0)
        return scale * (reconstruction.float() - residual).pow(2).sum() / variance

    def _dead_heads(self, position: int) -> torch.Tensor:
        """Boolean [n_ov]: the heads of the `position`-th layer not selected for `dead_tokens` loss tokens."""
        return self.tokens_since_fired[position] >= self.recipe.training.dead_tokens

    def _update_dead_tracker(self, stats: torch.Tensor) -> None:
        d = self.config.hidden_size
        for position in range(len(self.layers)):
            fired = stats[position, 4 + d :].cpu() > 0
            self.tokens_since_fired[position] += int(stats[position, 2])
            self.tokens_since_fired[position][fired] = 0

    def _metrics(self, stats: torch.Tensor, prefix: str = "") -> dict[str, float]:
        """FVU, L0 and dead fraction per layer (and their means) from summed stats."""
        d = self.config.hidden_size
        metrics: dict[str, float] = {}
        for position, layer in enumerate(self.layers):
            row = stats[position].cpu()
            tokens = max(float(row[2]), 1.0)
            variance = float(row[1]) - float(row[4 : 4 + d].pow(2).sum()) / tokens
            metrics[f"{prefix}layer{layer}/fvu"] = float(row[0]) / max(variance, 1e-30)
            metrics[f"{prefix}layer{layer}/l0"] = float(row[3]) / tokens
            if prefix:
                metrics[f"{prefix}layer{layer}/dead_fraction"] = float((row[4 + d :] == 0).double().mean())
            else:
                dead = self._dead_heads(position)
                metrics[f"layer{layer}/dead_fraction"] = float(dead.double().mean())
        for name in ("fvu", "l0", "dead_fraction"):
            values = [metrics[f"{prefix}layer{layer}/{name}"] for layer in self.layers]
            metrics[f"{prefix}{name}"] = sum(values) / len(values)
        return metrics

    def train_step(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a global batch; returns the step's summed stats (see `_stats`).

        Unwrapped (one process, or layers mode) each layer runs forward and backward on its own, so only one
        layer's graph is alive at a time; the layers are independent, so the gradients are the same.
        """
        batch = self._prepare_batch(ids, attention)
        top_k = top_k_at(self.step, self.total_steps, self.recipe, self.config.top_k)
        self.module.train()
        groups = [list(batch.activations)] if self.joint_step else [[layer] for layer in batch.activations]
        stats = torch.zeros(())
        total_loss = torch.zeros((), dtype=torch.float64)
        for group in groups:
            part = _Batch({layer: batch.activations[layer] for layer in group}, batch.loss_mask, batch.attention_mask)
            outputs = self._forward(part, top_k, with_auxiliary=True)
            loss = self._loss(part, outputs)
            self.accelerator.backward(loss)
            stats = stats + self._stats(part, outputs)
            total_loss += float(loss.detach())
            del outputs, loss
        clip = self.recipe.training.clip_grad_norm
        if clip is not None:
            for layer in self.owned:
                parameters = [p for p in self.lorsa.layer(layer).parameters() if p.requires_grad]
                torch.nn.utils.clip_grad_norm_(parameters, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = self._reduce(stats)
        self._update_dead_tracker(stats)
        self.step += 1
        replicas = self.world_size if self.mode != "layers" else 1
        self._last_loss = float(self._reduce(total_loss.to(self.accelerator.device))) / replicas
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out FVU, L0 and dead fraction (heads never active over the held-out tokens) at the target K."""
        self.module.eval()
        total = None
        for ids, attention in self._heldout:
            batch = self._prepare_batch(ids, attention)
            outputs = self._forward(batch, self.config.top_k)
            stats = self._stats(batch, outputs)
            total = stats if total is None else total + stats
        total = self._reduce(total)
        metrics = self._metrics(total, prefix="heldout/")
        metrics["heldout/tokens"] = float(total[0, 2])
        return metrics

    # --------------------------------------------------------------------------------------- checkpointing

    def full_lorsa(self) -> LorsaForReplacement | None:
        """All trained layers in one `LorsaForReplacement` on the main process (None elsewhere); collective."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.lorsa, options=options)
        elif self.mode == "layers" and self.world_size > 1:
            state = {}
            for layer in self.layers:
                owner = self.owners[layer]
                template = LorsaLayer(self.config, layer).state_dict() if owner != self.rank else None
                names = list(template or self.lorsa.layer(layer).state_dict())
                for name in names:
                    if owner == self.rank:
                        tensor = self.lorsa.layer(layer).state_dict()[name].detach().contiguous()
                    else:
                        tensor = torch.empty_like(template[name], device=self.accelerator.device)
                    dist.broadcast(tensor, src=owner)
                    state[f"layers.{layer}.{name}"] = tensor.cpu()
        else:
            state = {k: v.detach().cpu() for k, v in self.lorsa.state_dict().items()}
        if not self.accelerator.is_main_process:
            return None
        full = LorsaForReplacement(self.config)
        full.load_state_dict({k: v.cpu() for k, v in state.items()})
        return full

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.step * self.recipe.tokens_per_step,
            "total_steps": self.total_steps,
            "data": self.packer_state.to_dict(),
            "world_size": self.world_size,
            "distribute": self.mode,
            "recipe": self.recipe.to_dict(),
        }

    def _writes_training_state(self) -> bool:
        return self.accelerator.is_main_process or self.mode == "layers"

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N` (collective)."""
        full = self.full_lorsa()
        optimizer_state = self._optimizer_state()

        def write(folder: Path) -> None:
            if self.accelerator.is_main_process:
                full.save_pretrained(folder / "lorsa")
                write_json_atomic(folder / "trainer_state.json", self._trainer_state())
                save_file({"tokens_since_fired": self.tokens_since_fired}, str(folder / "dead_tracker.safetensors"))
            if self._writes_training_state():
                state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
                torch.save(state, folder / f"training_state-rank{self.rank}.pt")

        return save_checkpoint(
            self.output_dir / "checkpoints", self.step, write, self.accelerator.is_main_process,
            self.accelerator.wait_for_everyone, self.recipe.training.keep_checkpoints,
        )

    def _optimizer_state(self) -> dict[str, Any]:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.module, self.optimizer, options=options)
        return self.optimizer.state_dict()

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from `folder`: weights, optimizer, scheduler, data position, dead tracker, RNG."""
        state = json.loads((folder / "trainer_state.json").read_text())
        self._check_resumable(state)
        weights = folder / "lorsa" / "model.safetensors"
        with safe_open(str(weights), framework="pt") as handle:
            saved = {
                f"layers.{layer}.{name}": handle.get_tensor(f"layers.{layer}.{name}")
                for layer in self.owned
                for name in self.lorsa.layer(layer).state_dict()
            }
        shard = self.rank if self.mode == "layers" else 0
        training_state = torch.load(folder / f"training_state-rank{shard}.pt", weights_only=True, map_location="cpu")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.lorsa, saved, options=options)
            set_optimizer_state_dict(self.module, self.optimizer, training_state["optimizer"], options=options)
        else:
            self.lorsa.load_state_dict(saved)
            self.optimizer.load_state_dict(training_state["optimizer"])
        self.scheduler.load_state_dict(training_state["scheduler"])
        set_rng_state(training_state["rng"])
        self.tokens_since_fired = load_file(str(folder / "dead_tracker.safetensors"))["tokens_since_fired"]
        self.step = state["step"]
        self.packer_state = PackerState.from_dict(state["data"])

    def _check_resumable(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size and self.mode == "layers":
            raise RecipeError(
                f"The checkpoint was written by {state['world_size']} processes in {state['distribute']!r} mode; "
                f"resume it with the same number of processes (got {self.world_size})."
            )
        if state["distribute"] != self.mode:
            raise RecipeError(f"The checkpoint was written in {state['distribute']!r} mode, this run is {self.mode!r}.")
        old, new = _flatten(state["recipe"]), _flatten(self.recipe.to_dict())
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise RecipeError(f"Cannot resume with a different recipe ({details}); the weights would not match.")

    # ---------------------------------------------------------------------------------------------- train

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Run to `total_steps`, checkpointing, logging and evaluating on the way; save the final folder."""
        acc, training = self.accelerator, self.recipe.training
        if resume:
            found = latest_checkpoint(self.output_dir / "checkpoints")
            if found is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.output_dir / 'checkpoints'}.")
            self.load_checkpoint(found)
            if acc.is_main_process:
                self._truncate_log()
        self._heldout = self._heldout_batches()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if training.loggers:
            acc.init_trackers(self.recipe.name, config=_flatten(self.recipe.to_dict(), scalars_only=True))
        data = self.recipe.data
        packer = SequencePacker(
            self.train_text, self.tokenizer, data.context_length, data.pack, data.prepend_bos,
            state=PackerState.from_dict(self.packer_state.to_dict()),
        )
        tokens_per_step = self.recipe.tokens_per_step
        bar = tqdm(
            total=self.total_steps * tokens_per_step, initial=self.step * tokens_per_step, unit="tok",
            unit_scale=True, disable=not (acc.is_main_process and training.progress_bar), dynamic_ncols=True,
        )
        window, window_start, window_steps = None, time.perf_counter(), 0
        for ids, attention, state in batches(packer, data.batch_size):
            if self.step >= self.total_steps:
                break
            stats = self.train_step(ids, attention)
            self.packer_state = state
            window = stats if window is None else window + stats
            window_steps += 1
            bar.update(tokens_per_step)
            if self.step % training.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = self._metrics(window)
                metrics.update(
                    step=self.step, tokens=self.step * tokens_per_step, loss=self._last_loss,
                    lr=self.scheduler.get_last_lr()[0],
                    k=top_k_at(self.step - 1, self.total_steps, self.recipe, self.config.top_k),
                    tokens_per_s=window_steps * tokens_per_step / max(elapsed, 1e-9),
                )
                self._log(metrics)
                bar.set_postfix(
                    loss=f"{self._last_loss:.4g}", fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
                    dead=f"{metrics['dead_fraction']:.2f}", k=metrics["k"],
                )
                window, window_start, window_steps = None, time.perf_counter(), 0
            if self.step % training.eval_every == 0 and self.step < self.total_steps:
                self._log({"step": self.step, **self.evaluate()})
            if self.step % training.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        if self.step < self.total_steps:
            acc.print(f"The training text ran out after {self.step} of {self.total_steps} steps; finishing early.")
        final = {"step": self.step, "tokens": self.step * tokens_per_step, **self.evaluate()}
        final["train/loss"] = getattr(self, "_last_loss", None)
        self._log(final)
        self.final_metrics = final
        self.save_final(final)
        if training.loggers:
            acc.end_training()
        return final

    def _truncate_log(self) -> None:
        """Drop what the killed run logged after the checkpoint (and a line cut short by the kill)."""
        path = self.output_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("step", 0) <= self.step:
                kept.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.recipe.training.loggers:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=int(metrics.get("step", self.step)))

    def save_final(self, metrics: dict[str, Any]) -> Path:
        """`output_dir/final`: a `LorsaForReplacement` folder plus `training_recipe.json` and
        `final_metrics.json` (collective; the main process writes)."""
        full = self.full_lorsa()
        folder = self.output_dir / "final"
        if self.accelerator.is_main_process:
            with atomic_save_directory(folder) as staging:
                full.save_pretrained(staging)
                write_json_atomic(Path(staging) / "training_recipe.json", self.recipe.to_dict())
                write_json_atomic(Path(staging) / "final_metrics.json", metrics)
        self.accelerator.wait_for_everyone()
        return folder


def _take(iterator: Iterator, count: int) -> Iterator:
    return itertools.islice(iterator, count)


def _flatten(values: dict[str, Any], prefix: str = "", scalars_only: bool = False) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "lorsa":
            flat.update(_flatten(value, f"{name}.", scalars_only))
        elif isinstance(value, dict):
            for sub, item in value.items():
                keep = not scalars_only or isinstance(item, (int, float, str, bool))
                flat[f"{name}.{sub}"] = item if keep else str(item)
        elif scalars_only and not isinstance(value, (int, float, str, bool)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def train_from_recipe(recipe: Recipe, resume: bool = False) -> dict[str, Any]:
    """Build a trainer for `recipe` and run it (what `lorsa-hf train` does); the final metrics on the main
    process, an empty dict on the others."""
    trainer = LorsaTrainer(recipe)
    metrics = trainer.train(resume=resume)
    return metrics if trainer.accelerator.is_main_process else {}


__all__ = ["LorsaTrainer", "LorsaTrainingModule", "load_base_model", "lr_factor", "text_sources", "top_k_at",
           "train_from_recipe"]
