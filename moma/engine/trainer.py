"""The one training loop, for supervised training and every distillation method.

The optimiser and learning-rate schedule are :mod:`moma.engine.schedule`, the resumable state
:mod:`moma.engine.state`, and creating or reopening the run folder around a run
:mod:`moma.engine.runs`.

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
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from moma.config import Config
from moma.distill.base import UNLABELLED, Batch
from moma.engine import distributed
from moma.engine.builder import DataBundle, build_data, build_task, prepare_distillation
from moma.engine.checkpoint import ModelMetadata, save_model_checkpoint
from moma.engine.device import autocast, autocast_dtype, configure_determinism, epoch_seed, resolve_device, seed_everything
from moma.engine.evaluate import (PREFETCH_BATCHES, eval_loader, evaluate, metrics_from_probs, predict_probs,
                                  write_split_report)
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
from moma.errors import DataError, MomaError
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
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = sum(self._round_steps(epoch) for epoch in range(cfg.optim.epochs))
        self.task, self.setup_info = build_task(cfg, self.data.classes, len(self.data.train), self.device,
                                                train_targets=self.data.train.targets, setup=setup,
                                                total_steps=self.total_steps, num_unlabelled=self.data.num_unlabelled)
        # The frozen teacher's outputs read from a cache instead of computed every step (distill.teacher_cache).
        self.teacher_cache = None if setup.teacher is None else open_for_run(cfg, self.data, setup.teacher,
                                                                             self.task.method, self.device)
        if self.channels_last:
            self.task.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # In place: the tap's forward is compiled, its state-dict keys stay plain timm keys.
            log.info("train.compile: compiling the student with torch.compile (the first steps are slow)")
            self.task.student_tap.compile()
        self.global_batch = cfg.optim.batch_size * self.dist.world_size
        self.optimizer = build_optimizer(cfg, self.task.parameter_groups(), self.global_batch)
        self.base_lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.train_model = distributed.wrap_task(self.task, self.dist, self.device)
        self.writer = None
        self._sampler: distributed.EpochSampler | None = None
        self._loader: DataLoader | None = None
        self._pool_sampler: distributed.PoolSampler | None = None
        self._pool_loader: DataLoader | None = None
        self.pool_skipped: list[str] = []  # unreadable pool tiles met (data.skip_bad)

    # ----------------------------------------------------------------- setup helpers
    def _num_workers(self) -> int:
        workers = self.cfg.data.num_workers
        if workers == "auto":
            cores = (os.cpu_count() or 2) // max(1, self.dist.local_world_size)
            if self.device.type == "cpu" and self.data.train.cached:
                # Augmenting cached tiles is about a tenth of a CPU step's work (BENCHMARKS.md): one
                # worker overlaps it with the step and leaves the other cores to the model.
                return 1 if cores >= 2 else 0
            return min(8, max(1, cores - 1))
        return int(workers)

    def _eval_workers(self) -> int:
        return 0 if self.device.type == "cpu" and self.data.train.cached else self._num_workers()

    def _drop_last(self) -> bool:
        # A final batch of one sample breaks BatchNorm in train mode; drop only that case.
        per_rank = math.ceil(len(self.data.train) / self.dist.world_size)
        return per_rank % self.cfg.optim.batch_size == 1

    def _batches_per_pass(self) -> int:
        per_rank = math.ceil(len(self.data.train) / self.dist.world_size)
        batch = self.cfg.optim.batch_size
        return max(1, per_rank // batch if self._drop_last() else math.ceil(per_rank / batch))

    def _steps_per_epoch(self) -> int:
        total = self.cfg.optim.total_steps
        steps = self._batches_per_pass() if total is None else math.ceil(total / self.cfg.optim.epochs)
        if self.cfg.train.max_steps_per_epoch:
            steps = min(steps, self.cfg.train.max_steps_per_epoch)
        return max(1, steps)

    def _round_steps(self, epoch: int) -> int:
        """Steps of epoch ``epoch``: optim.total_steps spread evenly over the epochs when set."""
        total, epochs = self.cfg.optim.total_steps, self.cfg.optim.epochs
        if total is None:
            return self.steps_per_epoch
        return min(self.steps_per_epoch, (epoch + 1) * total // epochs - epoch * total // epochs)

    def _epoch_batches(self, epoch: int, limit: int) -> Iterator[tuple]:
        """``limit`` batches of epoch ``epoch``. Without optim.total_steps that is (at most) one pass
        over the training tiles, in the sampler's order for ``epoch``; with it, as many passes as the
        epoch's steps need, each with its own seeded order and augmentation (pass ids are unique per
        run and fixed per epoch, so a resume repeats them)."""
        if self.cfg.optim.total_steps is None:
            passes = [epoch]
        else:
            per_epoch = math.ceil(self.steps_per_epoch / self._batches_per_pass())
            passes = [epoch * per_epoch + j for j in range(per_epoch)]
        given = 0
        for pass_id in passes:
            for batch in self.train_loader(pass_id):
                if given >= limit:
                    return
                given += 1
                yield batch

    def train_loader(self, epoch: int) -> DataLoader:
        """The training loader, set to ``epoch``. One loader for the whole run, so its workers start
        once (``persistent_workers``); the order and every sample's augmentation are seeded from
        (run.seed, epoch, sample), so an epoch is the same with any number of workers and after a
        resume."""
        if self._loader is None:
            workers = self._num_workers()
            self._sampler = distributed.EpochSampler(len(self.data.train), self.cfg.run.seed, self.dist)
            self._loader = DataLoader(
                self.data.train, batch_size=self.cfg.optim.batch_size, sampler=self._sampler, num_workers=workers,
                pin_memory=self.device.type == "cuda", drop_last=self._drop_last(), persistent_workers=workers > 0,
                prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
                # Its own generator: starting the workers must not draw from the global one, which the
                # step's own randomness (dropout, shuffles) uses and a resume restores per epoch.
                generator=torch.Generator().manual_seed(self.cfg.run.seed),
            )
        self._sampler.set_epoch(epoch)
        return self._loader

    def pool_loader(self, epoch: int, steps: int) -> DataLoader:
        """Batches of ``distill.unlabelled_ratio`` x batch size pool tiles for the ``steps`` steps of
        round ``epoch`` (see :class:`~moma.engine.distributed.PoolSampler`)."""
        per_step = self.cfg.distill.unlabelled_ratio * self.cfg.optim.batch_size
        if self._pool_loader is None:
            workers = self._num_workers()
            self._pool_sampler = distributed.PoolSampler(len(self.data.unlabelled), self.cfg.run.seed, self.dist)
            self._pool_loader = DataLoader(
                self.data.unlabelled, batch_size=per_step, sampler=self._pool_sampler, num_workers=workers,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
                generator=torch.Generator().manual_seed(self.cfg.run.seed),
            )
        self._pool_sampler.set_round(epoch, steps * per_step)
        return self._pool_loader

    def close(self) -> None:
        """Stop the loaders' workers (a comparison grid trains many models in one process)."""
        self._loader = None
        self._pool_loader = None

    def _to_device(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student view, teacher's weak view or None) on the device; the loader gives one tensor,
        or a (strong, weak) pair with data.strong_augment."""
        views = list(images) if isinstance(images, (list, tuple)) else [images]
        views = [v.to(self.device, non_blocking=True) for v in views]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views[0], (views[1] if len(views) > 1 else None)

    def _make_batch(self, labelled: tuple, pool: tuple | None) -> Batch:
        """The step's batch: the labelled tiles, then the pool's (target UNLABELLED, index after the
        labelled rows) when there is a pool; with a teacher cache, the teacher's outputs for their views."""
        images, targets, index, *view = labelled
        student, weak = self._to_device(images)
        view = view[0] if view else None
        if pool is None:
            batch = Batch(student, targets.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True),
                          teacher_input=weak)
            return self._with_views(batch, index, view)
        pool_images, pool_rows, skipped, *pool_view = pool
        self._note_skipped(skipped)
        pool_student, pool_weak = self._to_device(pool_images)
        n = len(targets)
        rows = torch.cat([index, pool_rows + len(self.data.train)])
        batch = Batch(
            torch.cat([student, pool_student]),
            torch.cat([targets, torch.full_like(pool_rows, UNLABELLED)]).to(self.device, non_blocking=True),
            rows.to(self.device, non_blocking=True),
            teacher_input=None if weak is None else torch.cat([weak, pool_weak]),
            num_labelled=n,
        )
        return self._with_views(batch, rows, None if view is None else torch.cat([view, pool_view[0]]))

    def _with_views(self, batch: Batch, rows: torch.Tensor, view: torch.Tensor | None) -> Batch:
        """``batch`` with each row's view and, with a teacher cache, the teacher's outputs read from it
        (looked up on the host, from the loader's tensors, before anything waits for the device)."""
        if view is not None:
            batch.view = view.to(self.device, non_blocking=True)
        if self.teacher_cache is not None:
            batch.teacher_outputs = self.teacher_cache.outputs(rows, view, self.device)
        return batch

    def _note_skipped(self, skipped: list[str]) -> None:
        bad = [path for path in skipped if path]
        if not bad:
            return
        if not self.cfg.data.skip_bad:
            raise DataError(f"unlabelled tile {bad[0]}: cannot read image; fix or remove it, or pass --skip-bad")
        for path in bad:
            log.warning("skipped unreadable unlabelled tile %s", path)
        self.pool_skipped += bad

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
        restart_schedule(self.scheduler, self.optimizer, self.base_lr, epochs_done * self.steps_per_epoch,
                         self.scheduler.lr_lambdas[0])

    # ----------------------------------------------------------------- the loop
    def train_epoch(self, epoch: int) -> dict[str, float]:
        seed_everything(epoch_seed(self.cfg.run.seed, epoch) + self.dist.rank)
        self.train_model.train()
        self.task.method.on_epoch_start(epoch)
        sums: dict[str, float] = {}
        seen = 0
        times = StepTimes()
        limit = self._round_steps(epoch)
        bar = tqdm(total=limit, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", disable=not self.progress, leave=False)
        tick = time.perf_counter()
        pool = iter(self.pool_loader(epoch, limit)) if self.data.unlabelled is not None else None
        for step, labelled in enumerate(self._epoch_batches(epoch, limit)):
            batch = self._make_batch(labelled, next(pool) if pool is not None else None)
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
            log.info("profile, epoch %d: %s", epoch + 1, describe_times(times, self._loader.num_workers))
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
        loader = eval_loader(shard, batch_size, num_workers=self._eval_workers(), pin_memory=self.device.type == "cuda")
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
            log.info("profile, all epochs: %s", describe_times(self.state.times, self._num_workers()))
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
        result.skipped_unlabelled_tiles = len(self.pool_skipped)
        result.history = self.state.history
        result.skipped_tiles = sum(len(ds.skipped) for ds in (self.data.train, self.data.val, self.data.test) if ds is not None)
        result.write(self.run_dir)
        plot_curves(pd.DataFrame(self.state.history), self.run_dir / CURVES_NAME, self.cfg.train.select_metric)
        return result

    def _evaluate_split(self, model, split: str):
        dataset = self.data.val if split == "val" else self.data.test
        return evaluate(model, dataset, self.device, batch_size=max(64, self.cfg.optim.batch_size),
                        amp_dtype=self.amp_dtype, channels_last=self.channels_last)


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
