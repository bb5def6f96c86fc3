"""The training loop: protocol, schedules, data parallelism, evaluation, checkpoints, resume.

One optimizer step (docs/method.md §4–§7):

1. ``GateSchedule.apply`` sets the global gate (and, on the first tapering step,
   freezes every ``c``); the ``ScaleAnchor`` target is frozen at the same step.
2. ``grad_accum`` micro-batches of loss ``CE + λ·L_scale`` are back-propagated.
3. A non-finite loss or gradient stops the run (``TrainingDiverged``); otherwise the
   gradients are clipped and AdamW steps with a warmup-then-cosine learning rate.

Under ``torchrun`` every rank draws its own batches and accumulates its own
calibration statistics; ``start_taper`` and ``ScaleAnchor.freeze`` average them
across ranks, so all ranks freeze the same ``c`` and ``s*``. DDP must therefore not
broadcast buffers from rank 0 (that would discard the other ranks' statistics).

Resume restores weights, optimizer, LR schedule, the per-rank data generators and
the anchor, so a resumed CPU run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from taperfx.atomic import remove_stale, write_text
from taperfx.convert import convert, gate_of, is_calibrated, set_gate, tapernorms
from taperfx.errors import BadInput, Diverged, InputNotFound
from taperfx.kinds import Protocol
from taperfx.locks import hold_directory
from taperfx.scale_loss import ScaleAnchor
from taperfx.schedule import GateSchedule
from taperfx.train.checkpoint import (
    CHECKPOINTS_DIR,
    list_checkpoints,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
)
from taperfx.train.config import TrainConfig
from taperfx.train.metrics import MetricsLog, grad_norms, weight_types
from taperfx.train.tokens import open_data

__all__ = ["Trainer", "TrainingDiverged", "train", "lr_factor"]


class TrainingDiverged(Diverged, RuntimeError):
    """A loss or gradient became NaN/Inf; the message names the step and the last good checkpoint."""


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then a cosine decay reaching 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {name!r} requested but CUDA is not available")
    return device


class Trainer:
    """A training run of ``config``; ``resume=True`` continues from the run's latest checkpoint.

    The constructor reads in the order the data flows: the process's environment,
    the data (and with it the model source and the effective config), the process
    group, the model, its conversion, the optimizer (restored when resuming), the
    DDP wrapper and the logs. Everything that can be wrong with the inputs is
    checked before anything is written.
    """

    def __init__(self, config: TrainConfig, resume: bool = False) -> None:
        self._environment(config.device)
        self._data(config)
        resume_from = self._resume_checkpoint(resume)
        self._process_group()
        self._model()
        self._conversion()
        self._optimizer()
        if resume_from is not None:
            self._restore(resume_from)
        self._distributed()
        self._logging(resumed=resume_from is not None)

    def _environment(self, device: str) -> None:
        """Rank, world size and device, from torchrun's environment variables (one process without them)."""
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = _pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))

    def _data(self, config: TrainConfig) -> None:
        """The prepared data, and what the config means for it: model source, context, effective config."""
        self.data = open_data(config.data)
        self.plan = config.plan(self.data.vocab_size, self.world)
        self.config = self.plan.config
        self.out = Path(self.config.out)
        self.train_stream = self.data.stream("train", self.plan.context)
        self.val_stream = self.data.stream("val", self.plan.context)

    def _process_group(self) -> None:
        """Join torchrun's process group (gloo on CPU, nccl on GPU) unless the caller already has."""
        self._owns_process_group = self.world > 1 and not dist.is_initialized()
        if self._owns_process_group:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _model(self) -> None:
        """The source's model, seeded so every rank starts from the same weights."""
        torch.manual_seed(self.config.seed)
        self.model = self.plan.source.build()

    def _conversion(self) -> None:
        """Norms -> TaperNorms per the protocol, the scale anchor and the gate schedule."""
        config = self.config
        self.tapered = config.protocol != Protocol.BASELINE
        if self.tapered:
            convert(self.model, config.protocol)
            for norm in tapernorms(self.model):
                norm.ema_alpha = config.calibration_alpha
        self.model.to(self.device)
        self.anchor = ScaleAnchor.attach(self.model, ema_alpha=config.calibration_alpha)
        self.schedule = GateSchedule(config.taper_start_step, config.taper_end_step) if self.tapered else None
        # The scale target freezes when the taper starts (a baseline with the scale loss: at the same step).
        self.anchor_freeze_step = config.taper_start_step if config.anchored else None
        self.groups = weight_types(self.model)

    def _optimizer(self) -> None:
        """AdamW with a warmup-then-cosine LR, and this rank's data generator, at step 0."""
        config = self.config
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps)
        )
        self.data_rng = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.step = 0
        self.last_checkpoint: Path | None = None

    def _distributed(self) -> None:
        """The module each step calls: DDP-wrapped across ranks, compiled when asked."""
        self.ddp = self._wrap_ddp() if self.world > 1 else self.model
        self.forward = torch.compile(self.ddp) if self.config.compile else self.ddp

    def _logging(self, resumed: bool) -> None:
        """Rank 0 records the effective config and opens the metrics log (truncated to the step resumed from)."""
        self.log = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "run.json", json.dumps(self.config.to_dict(), indent=2) + "\n")
            self.log = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resumed else None)

    def _wrap_ddp(self) -> DistributedDataParallel:
        with warnings.catch_warnings():
            # torch suggests forward_sync_buffers, which still syncs at init; rank-local
            # calibration statistics need broadcast_buffers=False, as its own message says.
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            # A TaperNorm at g = 1 does not use γ̃, at g = 0 not γ: unused parameters are expected.
            return DistributedDataParallel(self.model, broadcast_buffers=False, find_unused_parameters=self.tapered)

    # -- resume ---------------------------------------------------------------------------
    def _resume_checkpoint(self, resume: bool) -> Path | None:
        found = list_checkpoints(self.out)
        if not resume:
            if found:
                raise BadInput(
                    f"{self.out} already holds checkpoints; pass --resume to continue it or choose a new --out"
                )
            return None
        if not found:
            raise InputNotFound(f"--resume: {self.out} holds no checkpoint to resume from")
        changed = self.config.resume_conflicts(read_meta(found[-1])["train"])
        if changed:
            raise BadInput(
                f"--resume: the config differs from the checkpoint's in {changed}; resume with the same settings"
            )
        return found[-1]

    def _restore(self, path: Path) -> None:
        state = load_trainer_state(path)
        if len(state["data_rng"]) != self.world:
            raise BadInput(
                f"--resume: {path} was written by {len(state['data_rng'])} processes, this run has {self.world}"
            )
        load_weights(self.model, path, self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.data_rng.set_state(state["data_rng"][self.rank])
        self.anchor.load_state_dict(state["anchor"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])
        self.last_checkpoint = path

    # -- one step -------------------------------------------------------------------------
    def _micro_batches(self):
        """(inputs, targets, sync context) for each micro-batch; DDP syncs on the last only."""
        for i in range(self.config.grad_accum):
            x, y = self.train_stream.sample(self.config.batch_size, self.data_rng)
            last = i == self.config.grad_accum - 1
            sync = contextlib.nullcontext() if self.world == 1 or last else self.ddp.no_sync()
            yield x.to(self.device), y.to(self.device), sync

    def train_step(self, with_stats: bool) -> dict:
        c = self.config
        gate = None
        if self.schedule is not None:
            gate = self.schedule.apply(self.model, self.step)
        if self.anchor_freeze_step is not None and self.step >= self.anchor_freeze_step:
            self.anchor.freeze()
        self.model.train()
        ce_sum = torch.zeros((), device=self.device)
        scale_sum = torch.zeros((), device=self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for x, y, sync in self._micro_batches():
            with sync:
                with autocast:
                    logits, _ = self.forward(x)
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                scale_loss = self.anchor.loss()
                ((ce + c.scale_loss_weight * scale_loss) / c.grad_accum).backward()
            ce_sum += ce.detach()
            scale_sum += scale_loss.detach()
        step = self.step
        loss = float(ce_sum) / c.grad_accum
        stats = grad_norms(self.groups) if with_stats else {}
        total_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), c.grad_clip if c.grad_clip > 0 else math.inf
        )
        if not (math.isfinite(loss) and math.isfinite(float(scale_sum)) and torch.isfinite(total_norm)):
            where = self.last_checkpoint or "none was written yet"
            raise TrainingDiverged(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
                f"(loss {loss}, grad norm {float(total_norm)}); stopped. Last good checkpoint: {where}"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "loss": loss, "gate": gate, "lr": lr}
        if with_stats:
            record.update(
                scale_loss=float(scale_sum) / c.grad_accum,
                logit_norm=float(logits.detach().float().norm(dim=-1).mean()),
                prelogit_scale=float(self.anchor.last_scale.detach().mean()),
                # The target exists (frozen) only where a scale loss uses it.
                scale_target=float(self.anchor.target)
                if bool(self.anchor.frozen) and c.scale_loss_weight > 0
                else None,
                grad_norm=float(total_norm),
                grad_norms=stats,
            )
        return record

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def _val_loss(self) -> float:
        total = 0.0
        batches = self.val_stream.evaluation_batches(self.config.batch_size, self.config.eval_batches)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for x, y in batches:
            with autocast:
                logits, _ = self.model(x.to(self.device))
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(self.device).flatten()))
        return total / self.config.eval_batches

    def evaluate(self) -> dict:
        """Val loss at the live gate and, once c is calibrated, at g = 0 (tapered models are judged at 0,
        docs/method.md §5)."""
        self.model.eval()
        try:
            result = {"val_loss_live": self._val_loss()}
            if not self.tapered:
                result["val_loss"] = result["val_loss_live"]
            elif is_calibrated(self.model):
                live = gate_of(self.model)
                set_gate(self.model, 0.0)
                result["val_loss"] = self._val_loss()
                set_gate(self.model, live)
            else:
                result["val_loss"] = None  # not calibrated yet: no g = 0 model exists
        finally:
            self.model.train()
        return result

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, val_loss: float | None, final: bool) -> None:
        data_rngs = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(data_rngs, self.data_rng.get_state())
        else:
            data_rngs = [self.data_rng.get_state()]
        if self.rank != 0:
            return
        meta = {
            "model": self.plan.source.to_dict(),
            "protocol": self.config.protocol,
            "final": final,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "val_loss": val_loss,
            "train": self.config.to_dict(),
        }
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "data_rng": data_rngs,
            "anchor": self.anchor.state_dict(),
            "schedule": meta["schedule"],
        }
        self.last_checkpoint = save_checkpoint(self.out, self.step, self.model, meta, self.data.tokenizer_path, state)
        prune_checkpoints(self.out, self.config.keep_last)

    # -- the run --------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to ``config.steps`` and return the final checkpoint (rank 0; None elsewhere)."""
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.rank == 0), unit="step")
        try:
            while self.step < c.steps:
                t0 = time.perf_counter()
                with_stats = (self.step + 1) % c.log_interval == 0 or self.step + 1 == c.steps
                record = self.train_step(with_stats)
                record["tokens_per_s"] = self.plan.tokens_per_step / (time.perf_counter() - t0)
                due_eval = self.step % c.eval_interval == 0 or self.step % c.checkpoint_interval == 0
                if due_eval and self.step < c.steps:
                    record.update(self.evaluate())
                    if self.step % c.checkpoint_interval == 0:
                        self.save(record["val_loss"], final=False)
                if self.log is not None and (with_stats or "val_loss" in record):
                    self.log.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    gate=f"{record['gate'] if record['gate'] is not None else 1:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False,
                )
                bar.update(1)
            if self.schedule is not None:
                self.schedule.apply(self.model, c.steps)  # taper_end <= steps, so this is exactly g = 0
            final = self.evaluate()
            if self.log is not None:
                self.log.write({"step": self.step, "final": True, "gate": gate_of(self.model), **final})
            self.save(final["val_loss"], final=True)
        finally:
            bar.close()
            if self._owns_process_group:
                dist.destroy_process_group()
        return self.last_checkpoint


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Run ``config`` to the end and return the final checkpoint directory.

    Rank 0 holds ``config.out``'s lock for the whole run (a second writer is refused,
    ``taperfx.errors.Locked``) and first removes checkpoints a killed run left half-written.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return Trainer(config, resume=resume).run()
    with hold_directory(config.out, "train"):
        remove_stale(config.out, legacy_prefixes=(".run.json.", ".metrics.jsonl."))
        remove_stale(Path(config.out) / CHECKPOINTS_DIR, legacy_prefixes=(".step-",))
        return Trainer(config, resume=resume).run()
