"""The one training loop, for supervised training and every distillation method.

Per epoch: train (seeded per epoch, so a resumed run replays the same epoch exactly), validate,
write one row of ``summary.csv``, keep the best-by-validation deployable checkpoint, and save the
full training state. At the end the best and the last model are evaluated on the test split;
the test split is never used for any choice.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from moma.config import Config
from moma.distill.base import Batch
from moma.distill.task import DistillationTask
from moma.engine import distributed as dist_utils
from moma.engine.builder import DataBundle, build_data, build_task
from moma.engine.checkpoint import (
    ModelMetadata,
    load_training_state,
    rng_state,
    save_model_checkpoint,
    save_training_state,
    set_rng_state,
)
from moma.engine.device import autocast, autocast_dtype, configure_determinism, epoch_seed, resolve_device, seed_everything
from moma.engine.evaluate import evaluate, write_report
from moma.engine.io import atomic_write_json, atomic_write_text
from moma.engine.plots import plot_curves
from moma.engine.runs import (
    BEST_NAME,
    LAST_NAME,
    METRICS_NAME,
    SPLIT_NAME,
    STATE_NAME,
    SUMMARY_NAME,
    attach_log_file,
    create_run_dir,
    write_run_info,
)
from moma.errors import MomaError
from moma.metrics import summary

log = logging.getLogger(__name__)


@dataclass
class StepTimes:
    """Wall-clock seconds per step, split into data wait, compute and the method's extras."""

    data: float = 0.0
    compute: float = 0.0
    extras: float = 0.0
    steps: int = 0
    images: int = 0

    def as_dict(self) -> dict[str, float]:
        n = max(self.steps, 1)
        total = self.data + self.compute
        return {
            "data_wait_ms": 1000 * self.data / n,
            "forward_backward_ms": 1000 * (self.compute - self.extras) / n,
            "distill_extras_ms": 1000 * self.extras / n,
            "data_wait_share": self.data / total if total else 0.0,
            "images_per_second": self.images / total if total else 0.0,
        }


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    times: StepTimes = field(default_factory=StepTimes)


def build_optimizer(cfg: Config, params, global_batch: int) -> torch.optim.Optimizer:
    lr = cfg.optim.effective_lr(global_batch)
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def cosine_factor(progress: float, base_lr: float, min_lr: float) -> float:
    """Cosine from base_lr to min_lr, as a multiplier of base_lr."""
    floor = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.dist = dist_utils.DistInfo.from_env()
        self.device = resolve_device(cfg.run.device, self.dist.local_rank if self.dist.enabled else None)
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.channels_last = self.device.type == "cuda" if cfg.train.channels_last == "auto" else bool(cfg.train.channels_last)
        self.progress = cfg.train.progress and self.dist.is_main
        configure_determinism(cfg.run.deterministic)
        seed_everything(cfg.run.seed)

        self.data: DataBundle = build_data(cfg, run_dir / SPLIT_NAME, progress=self.progress)
        self.task, self.setup_info = build_task(cfg, self.data.classes, len(self.data.train), self.device,
                                                train_targets=self.data.train.targets)
        if self.channels_last:
            self.task.to(memory_format=torch.channels_last)
        self.global_batch = cfg.optim.batch_size * self.dist.world_size
        self.optimizer = build_optimizer(cfg, self.task.trainable_parameters(), self.global_batch)
        self.base_lr = self.optimizer.param_groups[0]["lr"]
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.train_model = dist_utils.wrap_task(self.task, self.dist, self.device)
        self.writer = None

    # ----------------------------------------------------------------- setup helpers
    def _lr_lambda(self, step: int) -> float:
        o = self.cfg.optim
        warmup = o.warmup_epochs * self.steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        if o.scheduler == "constant":
            return 1.0
        if o.scheduler == "step":
            return 0.1 ** sum(step // self.steps_per_epoch >= e for e in o.step_epochs)
        total = max(1, o.epochs * self.steps_per_epoch - warmup)
        return cosine_factor(min(1.0, (step - warmup) / total), self.base_lr, o.min_lr)

    def _num_workers(self) -> int:
        workers = self.cfg.data.num_workers
        if workers == "auto":
            # Cached tiles on a CPU run: augmenting in the main process is cheaper than worker IPC.
            if self.device.type == "cpu" and self.cfg.data.cache:
                return 0
            return min(8, max(1, (os.cpu_count() or 2) // max(1, self.dist.local_world_size) - 1))
        return int(workers)

    def _drop_last(self) -> bool:
        # A final batch of one sample breaks BatchNorm in train mode; drop only that case.
        per_rank = math.ceil(len(self.data.train) / self.dist.world_size)
        return per_rank % self.cfg.optim.batch_size == 1

    def _steps_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.data.train) / self.dist.world_size)
        steps = per_rank // self.cfg.optim.batch_size if self._drop_last() else math.ceil(per_rank / self.cfg.optim.batch_size)
        if self.cfg.train.max_steps_per_epoch:
            steps = min(steps, self.cfg.train.max_steps_per_epoch)
        return max(1, steps)

    def train_loader(self, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(epoch_seed(self.cfg.run.seed, epoch))
        sampler = dist_utils.train_sampler(self.data.train, self.dist, self.cfg.run.seed, epoch, generator)
        workers = self._num_workers()
        return DataLoader(
            self.data.train, batch_size=self.cfg.optim.batch_size, sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=self._drop_last(), generator=generator,
            persistent_workers=False,
        )

    # ----------------------------------------------------------------- checkpoints
    def metadata(self, epoch: int, val_metrics: dict) -> ModelMetadata:
        cfg = self.cfg
        head = self.task.method.deploy_head_spec()
        return ModelMetadata(
            arch=cfg.model.arch, class_names=self.data.classes, image_size=cfg.data.image_size,
            mean=list(cfg.augment.mean), std=list(cfg.augment.std), mpp=cfg.data.mpp, method=self.task.method.name,
            head=None if head is None else {"method": self.task.method.name, "spec": head},
            epoch=epoch, val_metrics=summary(val_metrics) if val_metrics else {}, config=cfg.to_dict(),
        )

    def deploy_state(self) -> dict[str, torch.Tensor]:
        return self.task.inference_model().deploy_state_dict()

    def save_state(self) -> None:
        state = {
            "epoch": self.state.epoch,
            "task": self.task.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_score": self.state.best_score,
            "best_epoch": self.state.best_epoch,
            "history": self.state.history,
            "times": self.state.times.__dict__,
            "best_weights": self.best_weights,
        }
        save_training_state(self.run_dir / STATE_NAME, state)

    def load_state(self) -> None:
        state = load_training_state(self.run_dir / STATE_NAME)
        self.task.load_state_dict(state["task"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.state = TrainState(
            epoch=state["epoch"], best_score=state["best_score"], best_epoch=state["best_epoch"],
            history=state["history"], times=StepTimes(**state["times"]),
        )
        self.best_weights = state["best_weights"]
        log.info("resumed %s after epoch %d", self.run_dir, self.state.epoch)

    # ----------------------------------------------------------------- the loop
    def train_epoch(self, epoch: int) -> dict[str, float]:
        seed_everything(epoch_seed(self.cfg.run.seed, epoch) + self.dist.rank)
        self.train_model.train()
        self.task.method.on_epoch_start(epoch)
        loader = self.train_loader(epoch)
        sums: dict[str, float] = {}
        seen = 0
        times = StepTimes()
        limit = self.steps_per_epoch
        bar = tqdm(total=limit, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", disable=not self.progress, leave=False)
        tick = time.perf_counter()
        for step, (images, targets, index) in enumerate(loader):
            if step >= limit:
                break
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            batch = Batch(images, targets.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))
            loaded = time.perf_counter()
            out = self._step(batch, epoch, step)
            done = time.perf_counter()
            times.data += loaded - tick
            times.compute += done - loaded
            times.extras += self.task.extras_seconds
            times.steps += 1
            times.images += len(images)
            n = len(images)
            seen += n
            sums["loss"] = sums.get("loss", 0.0) + float(out["loss"].detach()) * n
            for name, value in out["terms"].items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2g}")
            tick = time.perf_counter()
        bar.close()
        self._accumulate_times(times)
        means = dist_utils.mean_across_ranks({k: v / max(seen, 1) for k, v in sums.items()}, self.device, self.dist)
        means.update({f"time_{k}": v for k, v in times.as_dict().items()})
        return means

    def _accumulate_times(self, times: StepTimes) -> None:
        total = self.state.times
        for name in ("data", "compute", "extras", "steps", "images"):
            setattr(total, name, getattr(total, name) + getattr(times, name))

    def _step(self, batch: Batch, epoch: int, step: int) -> dict:
        with autocast(self.device, self.amp_dtype):
            out = self.train_model(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise MomaError(
                f"the loss became {float(loss)} at epoch {epoch + 1}, step {step + 1} "
                f"(terms: {', '.join(f'{k}={float(v):.3g}' for k, v in out['terms'].items())}); "
                "lower optim.lr or the method's loss weights"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        dist_utils.sync_method_grads(self.task, self.dist)
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.task.trainable_parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.task.method.after_step()
        return out

    def validate(self) -> dict:
        model = self.task.inference_model()
        metrics, _ = evaluate(model, self.data.val, self.device, batch_size=max(64, self.cfg.optim.batch_size),
                              amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        return metrics

    def _log_epoch(self, epoch: int, seconds: float, train: dict, val: dict) -> dict:
        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
               "train_loss": train["loss"]}
        row.update({f"train_{k}": v for k, v in train.items() if k != "loss" and not k.startswith("time_")})
        row.update({"val_loss": val["loss"], **{f"val_{k}": v for k, v in summary(val).items()}})
        row.update({k: v for k, v in train.items() if k.startswith("time_")})
        self.state.history.append(row)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / SUMMARY_NAME, pd.DataFrame(self.state.history).to_csv(index=False))
            if self.writer is not None:
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, (int, float)) and np.isfinite(value):
                        self.writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
                self.writer.flush()
        return row

    def fit(self) -> dict:
        if self.resume:
            self.load_state()
        if self.dist.is_main and self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        epochs = self.cfg.optim.epochs
        bar = tqdm(total=epochs, initial=self.state.epoch, desc="training", unit="epoch", disable=not self.progress)
        for epoch in range(self.state.epoch, epochs):
            start = time.perf_counter()
            train = self.train_epoch(epoch)
            val = self.validate()
            row = self._log_epoch(epoch, time.perf_counter() - start, train, val)
            score = val[self.cfg.train.select_metric]
            if score > self.state.best_score:
                self.state.best_score, self.state.best_epoch = score, epoch + 1
                self.best_weights = {k: v.detach().cpu().clone() for k, v in self.deploy_state().items()}
                if self.dist.is_main:
                    save_model_checkpoint(self.run_dir / BEST_NAME, self.best_weights, self.metadata(epoch + 1, val))
            self.state.epoch = epoch + 1
            if self.dist.is_main:
                save_model_checkpoint(self.run_dir / LAST_NAME, self.deploy_state(), self.metadata(epoch + 1, val))
                self.save_state()
            bar.update(1)
            bar.set_postfix(train_loss=f"{row['train_loss']:.3f}",
                            **{f"val_{self.cfg.train.select_metric}": f"{score:.3f}"}, best=self.state.best_epoch)
            log.info("epoch %d/%d  train loss %.4f  val %s %.4f  acc %.4f  (%.1fs)", epoch + 1, epochs,
                     row["train_loss"], self.cfg.train.select_metric, score, val["accuracy"], row["seconds"])
            dist_utils.barrier(self.dist)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        return self.finish()

    def finish(self) -> dict:
        """Test metrics of the best-by-validation and the last model; reports and plots."""
        results = {"run_dir": str(self.run_dir), "classes": self.data.classes, "setup": self.setup_info,
                   "best_epoch": self.state.best_epoch, "epochs": self.state.epoch,
                   "select_metric": self.cfg.train.select_metric}
        if not self.dist.is_main:
            return results
        last_state = {k: v.detach().cpu().clone() for k, v in self.deploy_state().items()}
        model = copy.deepcopy(self.task.inference_model())
        for tag, weights in (("best", self.best_weights), ("last", last_state)):
            _load_deploy_state(model, weights)
            results[tag] = {"val": summary(self._evaluate_split(model, "val", tag)[0])}
            if self.data.test is not None:
                metrics, probs = self._evaluate_split(model, "test", tag)
                write_report(self.run_dir, f"test_{tag}", metrics, self.data.test, probs,
                             title=f"test, {tag} model (epoch {self.state.best_epoch if tag == 'best' else self.state.epoch})")
                results[tag]["test"] = metrics
        total = self.state.times
        results["train_seconds"] = total.data + total.compute
        results["step_time"] = total.as_dict()
        results["peak_memory_mb"] = _peak_memory_mb(self.device)
        results["data"] = {name: len(ds) if ds is not None else 0 for name, ds in
                           (("train", self.data.train), ("val", self.data.val), ("test", self.data.test))}
        results["skipped_tiles"] = sum(len(ds.skipped) for ds in (self.data.train, self.data.val, self.data.test) if ds is not None)
        atomic_write_json(self.run_dir / METRICS_NAME, results)
        plot_curves(pd.DataFrame(self.state.history), self.run_dir / "curves.png", self.cfg.train.select_metric)
        return results

    def _evaluate_split(self, model, split: str, tag: str):
        dataset = self.data.val if split == "val" else self.data.test
        return evaluate(model, dataset, self.device, batch_size=max(64, self.cfg.optim.batch_size),
                        amp_dtype=self.amp_dtype, channels_last=self.channels_last)


def _load_deploy_state(model, weights: dict[str, torch.Tensor]) -> None:
    backbone = {k: v for k, v in weights.items() if not k.startswith("deploy_head.")}
    model.backbone.load_state_dict(backbone)
    if model.head is not None:
        model.head.load_state_dict({k.removeprefix("deploy_head."): v for k, v in weights.items() if k.startswith("deploy_head.")})


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except (ImportError, AttributeError):
        return float("nan")


def _remove_unused_run_dir(run_dir: Path) -> None:
    """A run that failed before training leaves no empty folder behind (only its log was written)."""
    leftovers = [p.name for p in run_dir.iterdir()]
    if set(leftovers) <= {"train.log"}:
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()


def run_training(cfg: Config, resume_dir: Path | None = None, run_dir: Path | None = None) -> dict:
    """Create (or reopen) the run folder and train. Returns the final results dict.

    ``resume_dir`` continues an interrupted run there; ``run_dir`` names a new, empty folder to use
    instead of one derived from run.output_dir/run.name (the comparison grid names its cells)."""
    dist = dist_utils.DistInfo.from_env()
    dist_utils.init_process_group(dist)
    try:
        if resume_dir is not None:
            run_dir = Path(resume_dir)
        elif run_dir is not None:
            run_dir = Path(run_dir)
            if dist.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                if any(run_dir.iterdir()):
                    raise MomaError(f"run folder {run_dir} is not empty; runs never overwrite each other")
        else:
            run_dir = dist_utils.broadcast_run_dir(
                lambda: create_run_dir(cfg.run.output_dir, cfg.run.name), dist)
        handler = attach_log_file(run_dir) if dist.is_main else None
        try:
            trainer = Trainer(cfg, run_dir, resume=resume_dir is not None)
        except BaseException:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
            if resume_dir is None and dist.is_main:
                _remove_unused_run_dir(run_dir)
            raise
        if dist.is_main and resume_dir is None:
            from moma.data.splits import save_split

            write_run_info(run_dir, cfg, {"setup": trainer.setup_info, "world_size": dist.world_size,
                                          "device": str(trainer.device)})
            save_split(trainer.data.split, run_dir / SPLIT_NAME)
        try:
            return trainer.fit()
        finally:
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()
    finally:
        dist_utils.destroy_process_group(dist)
