"""Training Lorsas on a frozen base model's attention blocks (docs/method.md §3), on one CPU or many GPUs.

Every process reads the same deterministic stream of packed rows (`data`), or of the batches an activation
store holds (`store`, with their activations), and takes its slice of each global batch; how the processes
share the layers is the `training.distribute` strategy (`distributed`).
A step runs each layer's forward and loss (`step`), measures it (`metrics`), and follows the LR and K
schedules (`schedules`); checkpoints resume a killed run bit for bit (`checkpoint`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..configuration_lorsa import LorsaConfig
from ..modeling_lorsa import LorsaForReplacement
from . import checkpoint
from .activations import ActivationSource, load_base_model
from .checks import check_batch_split, check_k, check_model_fits
from .data import PackerState, TextSource, batches, first_batch, heldout_batches, loss_mask, packer, text_sources
from .distributed import ActivationsFn, make_accelerator, make_strategy
from .history import earlier_stages
from .init import continue_layer, initialize_layer, load_start
from .metrics import DeadHeadTracker, LayerStats, MetricsLog, Stats, add_stats, reduce_stats, summarize
from .recipe import Recipe
from .schedules import lr_factor, top_k_at
from .step import AuxiliaryLoss, Batch, LayerOutput, LorsaTrainingModule, run_layers, training_loss
from .store import SPLITS, ActivationStore


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
        self.accelerator = acc = accelerator or make_accelerator(training, recipe.output_dir)
        self.world_size, self.rank = acc.num_processes, acc.process_index
        check_batch_split(recipe, self.world_size)
        set_seed(training.seed)
        if model is None or tokenizer is None:
            model, tokenizer = load_base_model(recipe)
        check_model_fits(recipe, model)
        self.base_model = model.to(acc.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = self._lorsa_config(model)
        self.layers = list(self.config.layers)
        self.store: ActivationStore | None = None
        if recipe.store.path:
            self.store = ActivationStore(recipe.store.path)
            self.store.check(recipe)
        elif train_text is None or heldout_text is None:
            train_text, heldout_text = text_sources(recipe.data)
        self.train_text, self.heldout_text = train_text, heldout_text
        self.strategy = make_strategy(training.distribute, acc, self.layers)
        self.owned = self.strategy.owned
        self.sources = self._activation_sources()
        self.source = self.sources["train"]
        self.total_steps = recipe.total_steps
        self.k_aux = training.k_aux or self.config.hidden_size // 2
        check_k(training, self.config.n_ov_heads)
        owned_config = copy.deepcopy(self.config)
        owned_config.layers = self.owned
        self.lorsa = LorsaForReplacement(owned_config).to(acc.device)
        self.history: list[dict[str, Any]] = []
        """The earlier training stages of the Lorsa `init.from_pretrained` names (empty for a run from scratch)."""
        self._initialize()
        self.module = LorsaTrainingModule(self.lorsa)
        self.strategy.shard(self.module)
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameters, lr=training.lr, betas=tuple(training.betas))
        self.module, self.optimizer = self.strategy.prepare(self.module, self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, training)
        )
        self.step = 0
        self.packer_state = PackerState()
        self.dead_heads = DeadHeadTracker(self.layers, self.config.n_ov_heads, training.dead_tokens)
        self.auxiliary = AuxiliaryLoss(training.aux_loss_coef, self.k_aux, self.dead_heads)
        tracker_log = acc.log if training.loggers else None
        self.log = MetricsLog(self.output_dir / "metrics.jsonl", acc.is_main_process, tracker_log)
        self.last_loss: float | None = None
        self.final_metrics: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------- setup

    def _lorsa_config(self, model: PreTrainedModel) -> LorsaConfig:
        lorsa = self.recipe.lorsa
        config = LorsaConfig.from_base_config(model.config, lorsa.layers, **lorsa.config_overrides())
        # The recipe's name ("embedded" for the embedded model, as lorsa_hf.evals accepts it), not a local path.
        config.base_model_name_or_path = self.recipe.model.name
        config.base_model_revision = self.recipe.model.revision
        return config

    def _activation_sources(self) -> dict[str, ActivationsFn]:
        """Per split (calibration, heldout, train), what gives the base-model activations of rows: the live
        model, or the store, looking in that split first (the same rows may sit in two forward batches)."""
        if self.store is None:
            live = ActivationSource(self.base_model, self.layers)
            return {split: live for split in SPLITS}
        device = self.accelerator.device
        return {split: self.store.activations(self.layers, device, prefer=split) for split in SPLITS}

    def _initialize(self) -> None:
        """The recipe's initialisation, from calibration rows at the start of the training text."""
        options, device = self.recipe.init, self.accelerator.device
        if options.from_pretrained is not None:
            start = load_start(options.from_pretrained, self.lorsa)
            self.history = earlier_stages(options.from_pretrained)
            for layer in self.owned:
                continue_layer(self.lorsa.layer(layer), start, options)
            return
        calibration = None
        if options.b_o == "mean" or options.match_norm:
            if self.store is not None:
                rows = next(self.store.batches("calibration"), None)
                rows = None if rows is None else rows[:2]
            else:
                rows = first_batch(self.train_text, self.tokenizer, self.recipe.data, options.calibration_sequences)
            if rows is None:
                raise ValueError(
                    f"The training text has fewer than init.calibration_sequences={options.calibration_sequences} rows."
                )
            ids, attention = rows
            activations = self.sources["calibration"](ids, attention)
            mask = loss_mask(ids, attention, self.tokenizer.bos_token_id).to(device)
            attention_mask = None if bool(attention.all()) else attention.to(device)
            calibration = {layer: activations[layer] for layer in self.owned}
        k0 = top_k_at(0, self.total_steps, self.recipe.training, self.config.top_k)
        for layer in self.owned:
            data = None
            if calibration is not None:
                data = (calibration[layer].inputs, calibration[layer].outputs, mask, attention_mask)
            initialize_layer(self.lorsa.layer(layer), options, self.base_model, self.recipe.training.seed, data, k0)

    @cached_property
    def heldout(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out batches every evaluation runs on."""
        data, sequences = self.recipe.data, self.recipe.training.eval_sequences
        if self.store is not None:
            count = max(1, math.ceil(sequences / data.batch_size))
            return [(ids, attention) for ids, attention, _ in self.store.batches("heldout", 0, count)]
        return heldout_batches(self.heldout_text, self.tokenizer, data, sequences)

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, PackerState]]:
        """The global batches from the current step on, with the packer position after each."""
        if self.store is not None:
            return self.store.batches("train", start=self.step)
        position = PackerState.from_dict(self.packer_state.to_dict())
        rows = packer(self.train_text, self.tokenizer, self.recipe.data, position)
        return batches(rows, self.recipe.data.batch_size)

    # -------------------------------------------------------------------------------------------- one step

    def prepare_batch(self, ids: torch.Tensor, attention: torch.Tensor, split: str = "train") -> Batch:
        """The activations this process trains on for a global batch of `split` (see `distributed`)."""
        return self.strategy.batch(ids, attention, self.sources[split], self.tokenizer.bos_token_id)

    def forward(self, batch: Batch, top_k: int, with_auxiliary: bool = False) -> dict[int, LayerOutput]:
        """Every layer of `batch`, with the dead heads' reconstruction where they get the auxiliary loss."""
        device = self.accelerator.device
        auxiliary = self.auxiliary.inputs(list(batch.activations), device) if with_auxiliary else {}
        return run_layers(self.module, batch, top_k, self.accelerator.autocast, auxiliary)

    def measure(self, batch: Batch, outputs: dict[int, LayerOutput]) -> Stats:
        """Per layer of the run, this process's sums; zeros for layers trained elsewhere."""
        d, n_ov, device = self.config.hidden_size, self.config.n_ov_heads, self.accelerator.device
        stats = {}
        for layer in self.layers:
            if layer not in outputs:
                stats[layer] = LayerStats.zeros(d, n_ov, device)
                continue
            output = outputs[layer]
            target = batch.activations[layer].outputs
            stats[layer] = LayerStats.measure(output.prediction, target, output.values, output.indices,
                                              batch.loss_mask, n_ov)
        return stats

    def train_step(self, ids: torch.Tensor, attention: torch.Tensor) -> Stats:
        """One optimizer step on a global batch; returns the step's stats summed over processes.

        Unless the processes must synchronise (`joint_step`), each layer runs forward and backward on its own,
        so only one layer's graph is alive at a time; the layers are independent, so the gradients are the same.
        """
        batch = self.prepare_batch(ids, attention)
        top_k = top_k_at(self.step, self.total_steps, self.recipe.training, self.config.top_k)
        self.module.train()
        layers = list(batch.activations)
        groups = [layers] if self.strategy.joint_step else [[layer] for layer in layers]
        stats, total_loss = None, torch.zeros((), dtype=torch.float64)
        scale = self.strategy.loss_scale(batch.loss_mask, self.config.hidden_size)
        for group in groups:
            part = batch.only(group)
            outputs = self.forward(part, top_k, with_auxiliary=True)
            loss = training_loss(part, outputs, scale, self.auxiliary)
            self.accelerator.backward(loss)
            stats = add_stats(stats, self.measure(part, outputs))
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
        stats = reduce_stats(stats, self.strategy.reduce)
        self.dead_heads.update(stats)
        self.step += 1
        self.last_loss = float(self.strategy.reduce(total_loss.to(self.accelerator.device)))
        self.last_loss /= self.strategy.loss_replicas
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out FVU, L0 and dead fraction (heads never active over the held-out tokens) at the target K."""
        self.module.eval()
        total = None
        for ids, attention in self.heldout:
            batch = self.prepare_batch(ids, attention, "heldout")
            total = add_stats(total, self.measure(batch, self.forward(batch, self.config.top_k)))
        total = reduce_stats(total, self.strategy.reduce)
        metrics = summarize(total, prefix="heldout/")
        metrics["heldout/tokens"] = float(total[self.layers[0]].tokens.cpu())
        return metrics

    # --------------------------------------------------------------------------------------- checkpointing

    def full_lorsa(self) -> LorsaForReplacement | None:
        """All trained layers in one `LorsaForReplacement` on the main process (None elsewhere); collective."""
        state = self.strategy.full_state_dict(self.lorsa, self.config)
        if not self.accelerator.is_main_process:
            return None
        full = LorsaForReplacement(self.config)
        full.load_state_dict({k: v.cpu() for k, v in state.items()})
        return full

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N` (collective)."""
        acc = self.accelerator
        full = self.full_lorsa()
        optimizer_state = self.strategy.optimizer_state(self.module, self.optimizer)

        def write(folder: Path) -> None:
            if acc.is_main_process:
                state = checkpoint.trainer_state(
                    self.step, self.recipe, self.world_size, self.packer_state, self.history
                )
                checkpoint.write_main_files(folder, full, state, self.dead_heads.tokens_since_fired)
            if self.strategy.writes_training_state:
                checkpoint.write_training_state(folder, self.rank, optimizer_state, self.scheduler.state_dict())

        return checkpoint.save_checkpoint(
            self.output_dir / "checkpoints", self.step, write, acc.is_main_process, acc.wait_for_everyone,
            self.recipe.training.keep_checkpoints,
        )

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from `folder`: weights, optimizer, scheduler, data position, dead tracker, RNG."""
        state = checkpoint.read_trainer_state(folder)
        checkpoint.check_resumable(state, self.recipe, self.world_size)
        names = [f"layers.{layer}.{name}" for layer in self.owned for name in self.lorsa.layer(layer).state_dict()]
        weights = checkpoint.read_weights(folder, names)
        training_state = checkpoint.read_training_state(folder, self.strategy.state_shard)
        self.strategy.load(self.lorsa, self.module, self.optimizer, weights, training_state["optimizer"])
        self.scheduler.load_state_dict(training_state["scheduler"])
        checkpoint.set_rng_state(training_state["rng"])
        self.dead_heads.tokens_since_fired = checkpoint.read_dead_tracker(folder)
        self.step = state["step"]
        self.packer_state = PackerState.from_dict(state["data"])
        self.history = state.get("history", self.history)

    def save_final(self, metrics: dict[str, Any]) -> Path:
        """`output_dir/final`: a `LorsaForReplacement` folder plus `training_recipe.json` and
        `final_metrics.json` (collective; the main process writes)."""
        full = self.full_lorsa()
        folder = self.output_dir / "final"
        if self.accelerator.is_main_process:
            checkpoint.save_final_folder(folder, full, self.recipe, metrics, self.history)
        self.accelerator.wait_for_everyone()
        return folder

    # ---------------------------------------------------------------------------------------------- train

    def train(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Run to `total_steps`, checkpointing, logging and evaluating on the way; save the final folder.

        A new run (not `resume`) into an `output_dir` that holds a run is refused unless `overwrite`, which
        clears it first."""
        acc, training = self.accelerator, self.recipe.training
        if resume:
            self._resume()
        else:
            checkpoint.prepare_output_dir(self.output_dir, overwrite, acc.is_main_process)
            acc.wait_for_everyone()
        self.heldout  # noqa: B018 (built before the first step, so a too-short held-out text fails early)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if training.loggers:
            config = checkpoint.flatten_recipe(self.recipe.to_dict(), scalars_only=True)
            acc.init_trackers(self.recipe.name, config=config)
        tokens_per_step = self.recipe.tokens_per_step
        bar = tqdm(
            total=self.total_steps * tokens_per_step, initial=self.step * tokens_per_step, unit="tok",
            unit_scale=True, disable=not (acc.is_main_process and training.progress_bar), dynamic_ncols=True,
        )
        window, window_start, window_steps = None, time.perf_counter(), 0
        for ids, attention, state in self.train_batches():
            if self.step >= self.total_steps:
                break
            window = add_stats(window, self.train_step(ids, attention))
            self.packer_state = state
            window_steps += 1
            bar.update(tokens_per_step)
            if self.step % training.log_every == 0 or self.step == self.total_steps:
                self._log_window(window, window_steps, time.perf_counter() - window_start, bar)
                window, window_start, window_steps = None, time.perf_counter(), 0
            if self.step % training.eval_every == 0 and self.step < self.total_steps:
                self.log.write({"step": self.step, **self.evaluate()}, self.step)
            if self.step % training.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        if self.step < self.total_steps:
            acc.print(
                f"The training text ran out after {self.step} of {self.total_steps} steps; finishing early "
                "(data.epochs sets how many passes over it a run makes)."
            )
        final = {"step": self.step, "tokens": self.step * tokens_per_step, **self.evaluate()}
        final["train/loss"] = self.last_loss
        self.log.write(final, self.step)
        self.final_metrics = final
        self.save_final(final)
        if training.loggers:
            acc.end_training()
        return final

    def _resume(self) -> None:
        found = checkpoint.latest_checkpoint(self.output_dir / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.output_dir / 'checkpoints'}.")
        self.load_checkpoint(found)
        if self.accelerator.is_main_process:
            self.log.truncate_after(self.step)

    def _log_window(self, window: Stats, steps: int, elapsed: float, bar: tqdm) -> None:
        """Log the training metrics of the steps since the last log line."""
        tokens_per_step = self.recipe.tokens_per_step
        metrics: dict[str, Any] = summarize(window, tracker=self.dead_heads)
        metrics.update(
            step=self.step, tokens=self.step * tokens_per_step, loss=self.last_loss,
            lr=self.scheduler.get_last_lr()[0],
            k=top_k_at(self.step - 1, self.total_steps, self.recipe.training, self.config.top_k),
            tokens_per_s=steps * tokens_per_step / max(elapsed, 1e-9),
        )
        self.log.write(metrics, self.step)
        bar.set_postfix(
            loss=f"{self.last_loss:.4g}", fvu=f"{metrics['fvu']:.3f}", l0=f"{metrics['l0']:.1f}",
            dead=f"{metrics['dead_fraction']:.2f}", k=metrics["k"],
        )


def train_from_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Build a trainer for `recipe` and run it (what `lorsa-hf train` does); the final metrics on the main
    process, an empty dict on the others. See `LorsaTrainer.train` for `resume` and `overwrite`."""
    trainer = LorsaTrainer(recipe)
    metrics = trainer.train(resume=resume, overwrite=overwrite)
    return metrics if trainer.accelerator.is_main_process else {}


__all__ = ["LorsaTrainer", "load_base_model", "make_accelerator", "train_from_recipe"]
