"""The one training loop, for supervised training and every distillation method.

The loaders and each step's batch are :mod:`moma.engine.loaders`, the optimiser and learning-rate
schedule :mod:`moma.engine.schedule`, the resumable state :mod:`moma.engine.state`, and creating or
reopening the run folder around a run :mod:`moma.engine.runs`.

Per epoch: train (seeded per epoch, so a resumed run replays the same epoch exactly), validate,
write one row of ``history.csv``, keep the best-by-validation deployable checkpoint, and save the
full training state. At the end the best and the last model are evaluated on the test split;
the test split is never used for any choice.

Under ``torchrun`` every rank trains on its share of each epoch (``EpochSampler``), validation is
sharded and the predictions all-gathered, so every rank computes the same metrics and makes the
same best-checkpoint choice; only rank 0 writes files. The training state is saved without DDP's
``module.`` prefixes, so a run can be resumed with another number of processes.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from moma.config import Config
from moma.distill.base import Batch
from moma.engine import distributed
from moma.engine.builder import DataBundle, build_data, build_task, prepare_distillation
from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
from moma.engine.device import autocast, autocast_dtype, configure_determinism, epoch_seed, resolve_device, seed_everything
from moma.engine.evaluate import eval_loader, evaluate, metrics_from_probs, predict_probs, write_split_report
from moma.engine.loaders import RunLoaders
from moma.engine.layout import (
    BEST_NAME,
    CURVES_NAME,
    HISTORY_NAME,
    LAST_NAME,
    SPLIT_NAME,
    STATE_NAME,
    TENSORBOARD_DIR,
)
from moma.engine.plots import plot_curves
from moma.engine.result import ModelScores, RunResult
from moma.engine.schedule import build_optimizer, build_scheduler, restart_schedule
from moma.engine.state import (
    StepTimes,
    TrainState,
    load_matching,
    load_training_state,
    rng_state,
    save_training_state,
    set_rng_state,
)
from moma.engine.teacher_cache_run import open_for_run
from moma.errors import MomaError
from moma.metrics import summary
from moma.utils.collectives import all_gather_rows, unshuffle
from moma.utils.io import atomic_write_text

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.dist = distributed.DistInfo.from_env()
        self.device = resolve_device(cfg.run.device, self.dist.local_rank if self.dist.enabled else None)
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.channels_last = self.device.type == "cuda" if cfg.train.channels_last == "auto" else bool(cfg.train.channels_last)
        self.progress = cfg.train.progress and self.dist.is_main
        # Read (and check) the state to resume from before any data is scanned.
        self._saved_state = load_training_state(run_dir / STATE_NAME) if resume else None
        configure_determinism(cfg.run.deterministic)
        seed_everything(cfg.run.seed)

        setup = prepare_distillation(cfg)  # a bad teacher or method fails before the data scan
        self.data: DataBundle = build_data(cfg, run_dir / SPLIT_NAME, progress=self.progress)
        self.loaders = RunLoaders(cfg, self.data, self.dist, self.device, self.channels_last)
        self.total_steps = sum(self.loaders.round_steps(epoch) for epoch in range(cfg.optim.epochs))
        self.task, self.setup_info = build_task(cfg, self.data.classes, len(self.data.train), self.device,
                                                train_targets=self.data.train.targets, setup=setup,
                                                total_steps=self.total_steps, num_unlabelled=self.data.num_unlabelled)
        if setup.teacher is not None:  # the frozen teacher's outputs read from a cache (distill.teacher_cache)
            self.loaders.teacher_cache = open_for_run(cfg, self.data, setup.teacher, self.task.method, self.device)
        if self.channels_last:
            self.task.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # In place: the tap's forward is compiled, its state-dict keys stay plain timm keys.
            log.info("train.compile: compiling the student with torch.compile (the first steps are slow)")
            self.task.student_tap.compile()
        self.global_batch = cfg.optim.batch_size * self.dist.world_size
        self.optimizer = build_optimizer(cfg, self.task.parameter_groups(), self.global_batch)
        self.base_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.loaders.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.train_model = distributed.wrap_task(self.task, self.dist, self.device)
        self.writer = None

    def close(self) -> None:
        """Stop the loaders' workers (a comparison grid trains many models in one process)."""
        self.loaders.close()

    # ----------------------------------------------------------------- the loop
    def train_epoch(self, epoch: int) -> dict[str, float]:
        seed_everything(epoch_seed(self.cfg.run.seed, epoch) + self.dist.rank)
        self.train_model.train()
        self.task.method.on_epoch_start(epoch)
        sums: dict[str, float] = {}
        seen = 0
        times = StepTimes()
        limit = self.loaders.round_steps(epoch)
        bar = tqdm(total=limit, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", disable=not self.progress, leave=False)
        tick = time.perf_counter()
        for step, batch in enumerate(self.loaders.epoch(epoch, limit)):
            loaded = self._clock()
            out = self._step(batch, epoch, step)
            done = self._clock()
            times.data += loaded - tick
            times.compute += done - loaded
            times.extras += self.task.extras_seconds
            times.steps += 1
            times.images += len(batch.target)
            n = len(batch.target)
            seen += n
            for name, value in out["values"].items():
                sums[name] = sums.get(name, 0.0) + value * n
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2g}")
            tick = self._clock()
        bar.close()
        self._accumulate_times(times)
        means = distributed.mean_across_ranks({k: v / max(seen, 1) for k, v in sums.items()}, self.device, self.dist)
        means.update({f"time_{k}": v for k, v in times.as_dict().items()})
        if self.cfg.train.profile:
            log.info("profile, epoch %d: %s", epoch + 1, describe_times(times, self.loaders.num_workers()))
        return means

    def _clock(self) -> float:
        """Wall-clock time; with train.profile on CUDA, after the device has finished its queued work,
        so that waiting for data and computing are told apart."""
        if self.cfg.train.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _accumulate_times(self, times: StepTimes) -> None:
        total = self.state.times
        for name in ("data", "compute", "extras", "steps", "images"):
            setattr(total, name, getattr(total, name) + getattr(times, name))

    def _step(self, batch: Batch, epoch: int, step: int) -> dict:
        with autocast(self.device, self.amp_dtype):
            out = self.train_model(batch)
        loss = out["loss"]
        # One device-to-host copy per step for the loss and every term (each float() would wait once).
        names = ["loss", *out["terms"]]
        values = torch.stack([loss.detach().float(), *(v.float() for v in out["terms"].values())]).tolist()
        out["values"] = dict(zip(names, values))
        if not math.isfinite(values[0]):
            raise MomaError(
                f"the loss became {values[0]} at epoch {epoch + 1}, step {step + 1} "
                f"(terms: {', '.join(f'{k}={v:.3g}' for k, v in list(out['values'].items())[1:])}); "
                "lower optim.lr or the method's loss weights"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.sync_method_grads(self.task, self.dist)
        if self.cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.task.trainable_parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.task.method.after_step()
        return out

    def validate(self) -> dict:
        """Validation metrics. Several processes: each predicts every world_size-th tile, the
        predictions are all-gathered, and every rank computes the metrics from the same numbers (so
        all ranks make the same best-checkpoint choice)."""
        model = self.task.inference_model()
        batch_size = max(64, self.cfg.optim.batch_size)
        if not self.dist.enabled:
            metrics, _ = evaluate(model, self.data.val, self.device, batch_size=batch_size,
                                  amp_dtype=self.amp_dtype, channels_last=self.channels_last)
            return metrics
        val, rank, world = self.data.val, self.dist.rank, self.dist.world_size
        shard = Subset(val, range(rank, len(val), world))
        loader = eval_loader(shard, batch_size, num_workers=self.loaders.eval_workers(), pin_memory=self.device.type == "cuda")
        probs, _ = predict_probs(model, loader, self.device, amp_dtype=self.amp_dtype, channels_last=self.channels_last)
        gathered = all_gather_rows(torch.from_numpy(probs).to(self.device)).cpu()
        order = torch.cat([torch.arange(r, len(val), world) for r in range(world)])
        probs = unshuffle(gathered, order).numpy()
        return metrics_from_probs(val.targets.numpy(), probs, val.classes)

    def _log_epoch(self, epoch: int, seconds: float, train: dict, val: dict) -> dict:
        row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3),
               "train_loss": train["loss"]}
        row.update({f"train_{k}": v for k, v in train.items() if k != "loss" and not k.startswith("time_")})
        row.update({"val_loss": val["loss"], **{f"val_{k}": v for k, v in summary(val).items()}})
        row.update({k: v for k, v in train.items() if k.startswith("time_")})
        self.state.history.append(row)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / HISTORY_NAME, pd.DataFrame(self.state.history).to_csv(index=False))
            if self.writer is not None:
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, (int, float)) and np.isfinite(value):
                        self.writer.add_scalar(key.replace("_", "/", 1), value, epoch + 1)
                self.writer.flush()
        return row

    def fit(self) -> RunResult:
        if self.resume:
            self.load_state()
        if self.dist.is_main and self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
        epochs = self.cfg.optim.epochs
        bar = tqdm(total=epochs, initial=self.state.epoch, desc="training", unit="epoch", disable=not self.progress)
        for epoch in range(self.state.epoch, epochs):
            start = time.perf_counter()
            train = self.train_epoch(epoch)
            self.task.method.on_epoch_end(epoch, train)
            val = self.validate()
            row = self._log_epoch(epoch, time.perf_counter() - start, train, val)
            score = val[self.cfg.train.select_metric]
            # AUC is NaN on a validation split of one class: such an epoch ranks lowest, but some epoch is best.
            rank = score if math.isfinite(score) else -math.inf
            if rank > self.state.best_score or self.state.best_epoch == 0:
                self.state.best_score, self.state.best_epoch = rank, epoch + 1
                if self.dist.is_main:  # only rank 0 writes checkpoints and the training state
                    self.best_weights = {k: v.detach().cpu().clone() for k, v in self.deploy_state().items()}
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
            distributed.barrier(self.dist)
        bar.close()
        self.close()
        if self.writer is not None:
            self.writer.close()
        if self.cfg.train.profile:
            log.info("profile, all epochs: %s", describe_times(self.state.times, self.loaders.num_workers()))
        return self.finish()

    def finish(self) -> RunResult:
        """Test metrics of the best-by-validation and the last model; reports and plots."""
        result = RunResult(run_dir=str(self.run_dir), classes=self.data.classes, setup=self.setup_info,
                           best_epoch=self.state.best_epoch, epochs=self.state.epoch,
                           select_metric=self.cfg.train.select_metric)
        if not self.dist.is_main:
            return result
        last_state = {k: v.detach().cpu().clone() for k, v in self.deploy_state().items()}
        model = copy.deepcopy(self.task.inference_model())
        for tag, weights in (("best", self.best_weights), ("last", last_state)):
            model.load_deploy_state_dict(weights)
            scores = ModelScores(val=summary(self._evaluate_split(model, "val")[0]))
            if self.data.test is not None:
                metrics, probs = self._evaluate_split(model, "test")
                write_split_report(self.run_dir, f"test_{tag}", metrics, self.data.test, probs,
                             title=f"test, {tag} model (epoch {self.state.best_epoch if tag == 'best' else self.state.epoch})")
                scores.test = metrics
            setattr(result, tag, scores)
        total = self.state.times
        result.train_seconds = total.data + total.compute
        result.step_time = total.as_dict()
        result.optimizer_steps = total.steps
        result.peak_memory_mb = _peak_memory_mb(self.device)
        result.data = {name: len(ds) if ds is not None else 0 for name, ds in
                       (("train", self.data.train), ("val", self.data.val), ("test", self.data.test),
                        ("unlabelled", self.data.unlabelled))}
        result.skipped_unlabelled_tiles = len(self.loaders.pool_skipped)
        result.history = self.state.history
        result.skipped_tiles = sum(len(ds.skipped) for ds in (self.data.train, self.data.val, self.data.test) if ds is not None)
        result.write(self.run_dir)
        plot_curves(pd.DataFrame(self.state.history), self.run_dir / CURVES_NAME, self.cfg.train.select_metric)
        return result

    def _evaluate_split(self, model, split: str):
        dataset = self.data.val if split == "val" else self.data.test
        return evaluate(model, dataset, self.device, batch_size=max(64, self.cfg.optim.batch_size),
                        amp_dtype=self.amp_dtype, channels_last=self.channels_last)

    # ----------------------------------------------------------------- checkpoints
    def metadata(self, epoch: int, val_metrics: dict) -> ModelMetadata:
        cfg = self.cfg
        head = self.task.method.deploy_head_spec()
        return ModelMetadata(
            arch=cfg.model.arch, class_names=self.data.classes, image_size=cfg.data.image_size,
            mean=list(cfg.augment.mean), std=list(cfg.augment.std), mpp=cfg.data.mpp, method=self.task.method.name,
            head=None if head is None else {"method": self.task.method.name, "spec": head},
            stain_norm=None if self.data.stain is None else self.data.stain.to_dict(),
            epoch=epoch, val_metrics=summary(val_metrics) if val_metrics else {}, config=cfg.to_dict(),
        )

    def deploy_state(self) -> dict[str, torch.Tensor]:
        return self.task.inference_model().deploy_state_dict()

    def save_state(self) -> None:
        with distributed.unwrapped_student(self.task) as task:
            task_state = task.state_dict()
        state = {
            "epoch": self.state.epoch,
            "world_size": self.dist.world_size,
            "task": task_state,
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
        state, self._saved_state = self._saved_state, None
        with distributed.unwrapped_student(self.task) as task:
            load_matching(task, state["task"], self.run_dir / STATE_NAME)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            self._restart_schedule(state["epoch"], saved_world)
        set_rng_state(state["rng"])
        self.state = TrainState(
            epoch=state["epoch"], best_score=state["best_score"], best_epoch=state["best_epoch"],
            history=state["history"], times=StepTimes(**state["times"]),
        )
        self.best_weights = state["best_weights"]
        log.info("resumed %s after epoch %d", self.run_dir, self.state.epoch)

    def _restart_schedule(self, epochs_done: int, saved_world: int) -> None:
        """Another number of processes than the saved run: another global batch and number of steps
        per epoch. The learning rate follows this run's global batch (linear scaling rule) and the
        schedule continues at the start of the next epoch."""
        log.warning("resuming a run of %d process(es) with %d: global batch %d -> %d; the learning-rate schedule "
                    "continues at epoch %d with this run's steps per epoch", saved_world, self.dist.world_size,
                    self.cfg.optim.batch_size * saved_world, self.global_batch, epochs_done + 1)
        restart_schedule(self.scheduler, self.optimizer, self.base_lr, epochs_done * self.loaders.steps_per_epoch,
                         self.scheduler.lr_lambdas[0])


def describe_times(times: StepTimes, workers: int) -> str:
    """One line for ``--profile``: the share of step time spent waiting for data, and the rest."""
    d = times.as_dict()
    return (f"{d['data_wait_share']:.1%} of the step time waiting for data ({d['data_wait_ms']:.1f} ms/step, "
            f"{workers} loader worker(s)); student forward+backward and optimiser {d['forward_backward_ms']:.1f} ms, "
            f"teacher + method {d['distill_extras_ms']:.1f} ms; {d['images_per_second']:.1f} images/s per process")


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except (ImportError, AttributeError):
        return float("nan")
