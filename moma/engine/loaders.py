"""The training run's loaders: the labelled and the pool loader, how many steps each epoch takes
from them, and each step's `Batch` on the device.

Both loaders live for the whole run, so their workers start once; their order and every sample's
augmentation are seeded from (run.seed, epoch, sample), so an epoch is the same with any number of
workers and after a resume. Under ``torchrun`` each rank reads its share (``EpochSampler``,
``PoolSampler``).

With ``data.augment_on: device`` the loaders hand out uint8 tiles in their views, and each batch is
augmented and normalised on the device (:class:`~moma.data.device_augment.DeviceAugment`) with a
generator seeded from (run.seed, epoch, step, rank), so that too is the same after a resume.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from moma.config import Config
from moma.data.device_augment import DeviceAugment, step_seed
from moma.distill.base import UNLABELLED, Batch
from moma.engine import distributed
from moma.engine.builder import DataBundle
from moma.engine.evaluate import PREFETCH_BATCHES
from moma.engine.teacher_cache_run import RunTeacherCache
from moma.errors import DataError

log = logging.getLogger(__name__)


class RunLoaders:
    """The loaders of one run and the batches they make, for :class:`~moma.engine.trainer.Trainer`."""

    def __init__(self, cfg: Config, data: DataBundle, dist: distributed.DistInfo, device: torch.device,
                 channels_last: bool):
        self.cfg = cfg
        self.data = data
        self.dist = dist
        self.device = device
        self.channels_last = channels_last
        self.steps_per_epoch = self._steps_per_epoch()
        # The frozen teacher's outputs read from a cache instead of computed every step
        # (distill.teacher_cache); set by the trainer once the run's task is built.
        self.teacher_cache: RunTeacherCache | None = None
        self._sampler: distributed.EpochSampler | None = None
        self._loader: DataLoader | None = None
        self._pool_sampler: distributed.PoolSampler | None = None
        self._pool_loader: DataLoader | None = None
        self.pool_skipped: list[str] = []  # unreadable pool tiles met (data.skip_bad)
        # data.augment_on=device: the photometric augmentation and normalisation of each batch
        self.augment = DeviceAugment(cfg.augment, cfg.data.strong_augment) if cfg.data.augment_on == "device" else None

    def num_workers(self) -> int:
        workers = self.cfg.data.num_workers
        if workers == "auto":
            cores = (os.cpu_count() or 2) // max(1, self.dist.local_world_size)
            if self.device.type == "cpu" and self.data.train.cached:
                # Augmenting cached tiles is about a tenth of a CPU step's work (BENCHMARKS.md): one
                # worker overlaps it with the step and leaves the other cores to the model.
                return 1 if cores >= 2 else 0
            return min(8, max(1, cores - 1))
        return int(workers)

    def eval_workers(self) -> int:
        return 0 if self.device.type == "cpu" and self.data.train.cached else self.num_workers()

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

    def round_steps(self, epoch: int) -> int:
        """Steps of epoch ``epoch``: optim.total_steps spread evenly over the epochs when set."""
        total, epochs = self.cfg.optim.total_steps, self.cfg.optim.epochs
        if total is None:
            return self.steps_per_epoch
        return min(self.steps_per_epoch, (epoch + 1) * total // epochs - epoch * total // epochs)

    def epoch(self, epoch: int, limit: int) -> Iterator[Batch]:
        """The ``limit`` batches of epoch ``epoch`` on the device, each with its share of the pool's
        tiles when there is a pool."""
        pool = iter(self.pool_loader(epoch, limit)) if self.data.unlabelled is not None else None
        for step, labelled in enumerate(self._labelled_batches(epoch, limit)):
            yield self.make_batch(labelled, next(pool) if pool is not None else None, epoch, step)

    def _labelled_batches(self, epoch: int, limit: int) -> Iterator[tuple]:
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
            workers = self.num_workers()
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
            workers = self.num_workers()
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

    def _to_device(self, images, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student view, teacher's weak view or None) on the device; the loader gives one tensor,
        or a (strong, weak) pair with data.strong_augment; with data.augment_on=device one uint8
        tensor, which ``self.augment`` turns into those views."""
        views = list(images) if isinstance(images, (list, tuple)) else [images]
        views = [v.to(self.device, non_blocking=True) for v in views]
        if self.augment is not None:
            made = self.augment(views[0], generator)
            views = list(made) if isinstance(made, tuple) else [made]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views[0], (views[1] if len(views) > 1 else None)

    def step_generator(self, epoch: int, step: int) -> torch.Generator | None:
        """data.augment_on=device: the generator of step ``step`` of epoch ``epoch``'s augmentation."""
        if self.augment is None:
            return None
        seed = step_seed(self.cfg.run.seed, epoch, step, self.dist.rank, self.dist.world_size)
        return torch.Generator(device=self.device).manual_seed(seed)

    def make_batch(self, labelled: tuple, pool: tuple | None, epoch: int = 0, step: int = 0) -> Batch:
        """The step's batch: the labelled tiles, then the pool's (target UNLABELLED, index after the
        labelled rows) when there is a pool; with a teacher cache, the teacher's outputs for their views.
        ``epoch`` and ``step`` seed data.augment_on=device's augmentation."""
        images, targets, index, *view = labelled
        generator = self.step_generator(epoch, step)
        student, weak = self._to_device(images, generator)
        view = view[0] if view else None
        if pool is None:
            batch = Batch(student, targets.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True),
                          teacher_input=weak)
            return self._with_views(batch, index, view)
        pool_images, pool_rows, skipped, *pool_view = pool
        self._note_skipped(skipped)
        pool_student, pool_weak = self._to_device(pool_images, generator)
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
