"""MoMA: momentum contrastive distillation with multi-head attention across the batch.

Vuong & Kwak, "MoMA: Momentum contrastive learning with multi-head attention-based knowledge
distillation for histopathology image analysis", Medical Image Analysis 101 (2025) 103421,
arXiv 2308.16561. Official code: github.com/trinhvg/MoMA (``train_student_moma.py``,
``helper/loops_moma.py``, ``MoMA/mem_moco.py``, ``MoMA/criterion_moco_att.py``,
``learning/contrast_trainer.py``).

The teacher network starts from the pre-trained teacher checkpoint and is then a momentum (EMA)
average of the student, as MoCo's key encoder. One step (docs/moma.md has the equations):

1. student forward (the task);
2. ``teacher_forward`` returns a :class:`KeyPass`: the EMA update of teacher, key head (and key
   attention), then the key pass (teacher BatchNorm in train mode, split-batch "shuffle BN")
   giving L2-normalised keys ``embed_t(f_t)`` and the teacher's logits for the shared KL term
   (the official-code preset takes those from a second pass before the update, as the code);
3. ``forward`` receives it: query ``atts_q(embed_s(f_s))``, positive keys ``atts_k(k)``, keys to
   enqueue (the same, or ``atts_queue(k)`` in the official code), InfoNCE over [positive, queue]
   at temperature tau, plus diagnostics; the keys are staged in the queue;
4. ``after_step`` (after the optimiser step) writes the staged keys into the queue.

The default preset differs from the published code in the batch attention (docs/moma.md, "Which
MoMA you get"): with the code's two frozen random key attentions the contrastive term collapses
to a shortcut after one epoch; ``distill.params.preset=official-code`` reproduces the code.

Everything stateful (projection heads, attention, queue, pointer, EMA step) is a submodule or
buffer of this method, and the teacher is a submodule of the task, so the task's state_dict is
the whole resumable state. Only the student is the deliverable.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from moma.distill.base import Batch, DistillMethod, MethodContext
from moma.distill.batch_attention import BatchAttentionBlock
from moma.distill.contrast import (ProjectionHead, batch_negative_mask, contrast_diagnostics, in_batch_retrieval,
                                   infonce_loss)
from moma.distill.ema import copy_, cosine_momentum, ema_update_, paired_buffers
from moma.distill.key_pass import (KeyPass, batchnorm_mode, gather_keys, pooled_features, shuffle_across_ranks,
                                   split_batch_forward)
from moma.distill.moma_params import MoMAParams, resolve_key_source, resolve_momentum, resolve_queue_size
from moma.distill.queue import KeyQueue
from moma.distill.registry import register_method
from moma.utils import collectives
from moma.utils.collectives import unwrap_parallel
from moma.errors import ConfigError
from moma.models.taps import FeatureTap, TapOutputs

log = logging.getLogger(__name__)

def _classifier_names(model: nn.Module) -> set[str]:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None:
        return set()
    ids = {id(p) for p in classifier.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


# ----------------------------------------------------------------------------- the method

@register_method
class MoMA(DistillMethod):
    name = "moma"
    summary = ("InfoNCE against a memory of keys from a momentum teacher (EMA of the student) or, for any teacher, "
               "from the frozen teacher through a momentum key head; multi-head attention across the batch")
    reference = "Vuong & Kwak, MoMA, Medical Image Analysis 101 (2025) 103421, arXiv 2308.16561"
    Params = MoMAParams
    requires_teacher = True
    needs_teacher_classes = False  # works across label sets; the KL term is then switched off by the builder
    default_ce_weight = 1.0  # -c 1
    default_kl_weight = 1.0  # -d 1 (same task only)

    @classmethod
    def requires_same_architecture(cls, params: MoMAParams) -> bool:
        return params.keys == "momentum"

    def __init__(self, params: MoMAParams, ctx: MethodContext):
        super().__init__(params, ctx)
        if ctx.teacher is None:
            raise ConfigError("distill.method 'moma' needs a teacher checkpoint (distill.teacher)")
        # References only: both networks belong to the task (a tuple is not registered as submodules).
        self._taps: tuple[FeatureTap, FeatureTap] = (unwrap_parallel(ctx.student), unwrap_parallel(ctx.teacher))
        student, teacher = self._student_model, self._teacher_model
        self.key_source = resolve_key_source(params.keys, ctx.student_from_teacher)
        self.updates_teacher = self.key_source == "momentum"
        teacher.requires_grad_(False)
        self.momentum = resolve_momentum(params.momentum, ctx.total_steps)
        with torch.no_grad():
            in_dim = pooled_features(student, ctx.student_probe).shape[1]
        self.embed_s = ProjectionHead(in_dim, params.feat_dim)
        block = dict(dim=params.feat_dim, num_heads=params.num_heads, wiring=params.attention, normalize=params.normalize)
        self.atts_q = BatchAttentionBlock(**block)
        if self.key_source == "momentum":
            self._build_momentum_teacher(ctx, in_dim, block)
        else:
            self._build_teacher_key_head(ctx)
        self.queue = KeyQueue(self._queue_size(params, ctx, self.momentum if self.key_source == "teacher" else None),
                              params.feat_dim)
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self.loss_weights = {"nce": params.beta}

        self._log_memory_turnover(ctx.batch_size)
        self._separate_logits_pass = bool(ctx.kl_weight) and not params.single_teacher_pass
        if params.overridden():
            log.info("moma: preset %s with %s", params.preset,
                     ", ".join(f"{k}={v}" for k, v in params.overridden().items()))
        log.info(
            "moma: keys from %s; preset %s; queue %d x %d, tau %g, alpha %.5g%s (%s), %d-head batch attention (%s, key attention %s%s), "
            "key pass %s, teacher passes per step: %d", self._key_source_description(), params.preset, self.queue.size, params.feat_dim,
            params.nce_temperature, self.momentum, " (auto)" if params.momentum == "auto" else "",
            params.momentum_schedule, params.num_heads, params.attention, params.key_attention,
            ", L2-normalised" if params.normalize else "", self._key_pass_description(),
            2 if self._separate_logits_pass else 1,
        )

    def _build_momentum_teacher(self, ctx: MethodContext, in_dim: int, block: dict) -> None:
        """The paper's key encoder: the teacher becomes an EMA of the student, with its own key head
        and key attention."""
        teacher, params = self._teacher_model, self.params  # same architecture: checked by the builder
        if not ctx.same_label_space:
            _match_teacher_classifier(teacher, ctx.num_classes)
        self._classifier = _classifier_names(teacher)
        # Teacher classifier row i is student row inverse[i] when the same classes come in another order.
        order = ctx.teacher_class_order
        self.register_buffer("class_inverse", torch.argsort(torch.as_tensor(order or [], dtype=torch.long)), persistent=False)
        self.embed_t = ProjectionHead(in_dim, params.feat_dim).requires_grad_(False)  # independent init, as the code
        self.atts_k = BatchAttentionBlock(**block).requires_grad_(False)
        if params.key_attention == "frozen":  # the code: a second random module for the enqueued keys
            self.atts_queue = BatchAttentionBlock(**block).requires_grad_(False)
        else:
            self.atts_k.load_state_dict(self.atts_q.state_dict())  # MoCo: the momentum copy starts equal

    def _build_teacher_key_head(self, ctx: MethodContext) -> None:
        """Keys for any teacher: the frozen teacher's pooled features through a key head learnt by
        gradient (the in-batch keys) whose EMA copy writes the memory, so the memory's keys change
        slowly (MoCo's consistency) while all knowledge comes from the teacher."""
        with torch.no_grad():
            teacher_dim = pooled_features(self._teacher_model, ctx.teacher_probe).shape[1]
        self.key_head = ProjectionHead(teacher_dim, self.params.feat_dim)
        self.key_head_m = ProjectionHead(teacher_dim, self.params.feat_dim).requires_grad_(False)
        self.key_head_m.load_state_dict(self.key_head.state_dict())
        if not ctx.teacher_num_classes:
            log.info("moma: the teacher has no classifier (features only): no KL term, the keys carry its knowledge")

    def _key_source_description(self) -> str:
        if self.key_source == "momentum":
            return "a momentum teacher (EMA of the student, started as the teacher)"
        return (f"the frozen teacher ({_arch_name(self._teacher_model)}) through a key head; its EMA copy writes the "
                "memory; in-batch negatives")

    def _key_pass_description(self) -> str:
        if self.key_source == "teacher":
            return "frozen teacher, eval-mode BN"
        if self.params.shuffle_bn == "none":
            return "plain BN" + (" (keys all-gathered across processes)" if collectives.is_distributed() else "")
        if collectives.is_distributed():
            return "shuffle BN across processes (keys all-gathered)"
        return f"split-batch BN ({self.params.bn_splits} sub-batches)"

    def _log_memory_turnover(self, batch_size: int | None) -> None:
        """Say how often a queue slot is rewritten against the key encoder's EMA horizon 1/(1 - alpha):
        keys older than the horizon come from a key encoder that no longer exists."""
        refill = math.ceil(self.queue.size / max(batch_size or 1, 1))
        horizon = 1.0 / max(1.0 - self.momentum, 1e-12)
        masked = "never-written slots and a query's own key masked" if self.params.mask_memory else "no slot masked"
        log.info("moma: every queue slot is rewritten every %d steps; the key encoder's EMA horizon is %.0f steps (%s)",
                 refill, horizon, masked)
        if refill > horizon:
            log.warning("moma: the queue (%d keys) takes %d steps to refill, longer than the EMA horizon (%.0f steps): "
                        "its oldest keys are stale; a smaller distill.params.queue_size keeps them current",
                        self.queue.size, refill, horizon)

    # --------------------------------------------------------------- setup helpers
    @property
    def _student_model(self) -> nn.Module:
        return unwrap_parallel(self._taps[0]).model

    @property
    def _teacher_model(self) -> nn.Module:
        return unwrap_parallel(self._taps[1]).model

    @staticmethod
    def _queue_size(params: MoMAParams, ctx: MethodContext, momentum: float | None) -> int:
        size = resolve_queue_size(params.queue_size, ctx.num_train_samples, ctx.batch_size, momentum)
        if params.queue_size == "auto":
            log.info("moma: queue_size=auto -> %d keys (%d training tiles%s)", size, ctx.num_train_samples,
                     ", every slot rewritten within half the key head's EMA horizon" if momentum is not None else "")
        elif size > ctx.num_train_samples:
            log.warning(
                "moma: the queue (%d keys) is larger than the training set (%d tiles): it will hold about %.1f keys "
                "per tile, older keys of the same tiles (a tile's own earlier key among its negatives), and random "
                "initial vectors for the first %d epochs; distill.params.queue_size=auto would use %d",
                size, ctx.num_train_samples, size / max(ctx.num_train_samples, 1),
                -(-size // max(ctx.num_train_samples, 1)),
                resolve_queue_size("auto", ctx.num_train_samples, ctx.batch_size),
            )
        return size

    # --------------------------------------------------------------- momentum update
    def current_momentum(self) -> float:
        p = self.params
        if p.momentum_schedule == "cosine":
            return cosine_momentum(self.momentum, int(self.ema_step), p.momentum_steps)
        return self.momentum

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(targets, sources) of the momentum update: teacher <- student, embed_t <- embed_s (and the
        key attention <- atts_q with key_attention=ema); for keys from the frozen teacher only the key
        head's copy <- the key head."""
        if self.key_source == "teacher":
            return list(self.key_head_m.parameters()), list(self.key_head.parameters())
        teacher = dict(self._teacher_model.named_parameters())
        student = dict(self._student_model.named_parameters())
        targets, sources = [], []
        for name, param in teacher.items():
            source = student[name]
            if name in self._classifier and self.class_inverse.numel():
                source = source[self.class_inverse]
            targets.append(param)
            sources.append(source)
        heads = [(self.embed_t, self.embed_s)]
        if self.params.key_attention == "ema":
            heads.append((self.atts_k, self.atts_q))
        for target, source in heads:
            targets += list(target.parameters())
            sources += list(source.parameters())
        return targets, sources

    @torch.no_grad()
    def momentum_update(self) -> None:
        r""":math:`\theta_t \leftarrow \alpha\theta_t + (1-\alpha)\theta_s` over parameters, one fused op
        (the code's ``ContrastTrainer.momentum_update``); buffers per ``teacher_buffers``."""
        ema_update_(*self._ema_pairs(), self.current_momentum())
        mode = self.params.teacher_buffers
        if mode != "keep" and self.key_source == "momentum":
            targets, sources = paired_buffers(self._teacher_model, self._student_model)
            floats = [(t, s) for t, s in zip(targets, sources) if t.is_floating_point()]
            others = [(t, s) for t, s in zip(targets, sources) if not t.is_floating_point()]
            if mode == "ema":
                ema_update_([t for t, _ in floats], [s for _, s in floats], self.current_momentum())
            else:
                copy_([t for t, _ in floats], [s for _, s in floats])
            copy_([t for t, _ in others], [s for _, s in others])
        self.ema_step += 1

    # --------------------------------------------------------------- teacher side of a step
    def teacher_forward(self, teacher: FeatureTap, images: torch.Tensor) -> KeyPass:
        """The teacher side of a step: the momentum update, then the key pass.

        The update comes right before the key pass, as in the code, so the keys are computed by the
        code's teacher weights. With the KL term on and ``single_teacher_pass`` off (the
        official-code preset) the KL logits come from a separate pass *before* the update, as in
        the code; otherwise from the key pass (a teacher one update further along)."""
        if self.key_source == "teacher":
            return super().teacher_forward(teacher, images)  # the plain pass, then from_teacher_outputs
        before_update = None
        if self._separate_logits_pass:
            bn_train = self.training and self.params.kl_teacher_bn == "train"
            with torch.no_grad(), batchnorm_mode(teacher, training=bn_train):
                before_update = teacher(images)
        if self.training:
            self.momentum_update()
        key_pass = self._key_pass(teacher, images)
        if before_update is not None:
            key_pass.logits = before_update.logits
        return key_pass

    def teacher_pass_is_plain(self) -> bool:
        """Keys from the frozen teacher need only its plain outputs, so a teacher cache serves them."""
        return self.key_source == "teacher"

    def from_teacher_outputs(self, outputs: TapOutputs) -> KeyPass:
        """Keys from the frozen teacher (eval mode, set by the task), from its plain outputs, live or
        read from a teacher cache: its logits for the KL term, its pooled features for the key head,
        and the memory's keys from the head's EMA copy (updated first, as before the teacher pass)."""
        if self.training:
            self.momentum_update()
        with torch.no_grad():
            features = pooled_features(self._teacher_model, outputs).float()
            with torch.autocast(features.device.type, enabled=False):
                keys = self.key_head_m(features)
        return KeyPass(logits=outputs.logits, embedding=features, keys=keys)

    def _key_pass(self, teacher: FeatureTap, images: torch.Tensor) -> KeyPass:
        """L2-normalised keys ``embed_t(f_t)`` with the teacher's outputs, in the batch's order.
        Teacher BatchNorm in train mode (the code's ``set_bn_train``) while training."""
        with torch.no_grad(), batchnorm_mode(teacher, training=self.training):
            out = self._shuffled_teacher_forward(teacher, images)
            with torch.autocast(images.device.type, enabled=False):
                out.keys = self.embed_t(out.embedding.float())
        return out

    def _shuffled_teacher_forward(self, teacher: FeatureTap, images: torch.Tensor) -> KeyPass:
        """The key pass's teacher forward: shuffle BN across processes, split-batch BN in one process
        (``shuffle_bn=split``), or one plain pass (``none``, and in evaluation)."""
        if self.training and self.params.shuffle_bn != "none" and collectives.is_distributed():
            return shuffle_across_ranks(teacher, images)
        return split_batch_forward(teacher, images, self._bn_splits(images.shape[0]))

    def _bn_splits(self, batch_size: int) -> int:
        if self.params.shuffle_bn == "none" or not self.training:
            return 1
        return max(1, min(self.params.bn_splits, batch_size // 2))  # BatchNorm needs 2+ samples per sub-batch

    @torch.no_grad()
    def _attend_keys(self, keys: torch.Tensor, all_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive keys, keys to enqueue) after the key attention, which never learns by gradient:
        in the code both are detached (key_attention=frozen: two modules at their random init)."""
        positive = self.atts_k(keys)
        if self.params.key_attention == "frozen":
            return positive, self.atts_queue(all_keys)
        return positive, positive if all_keys is keys else self.atts_k(all_keys)

    # --------------------------------------------------------------- the loss term
    def forward(self, student: TapOutputs, teacher: KeyPass, batch: Batch) -> dict[str, torch.Tensor]:
        """The InfoNCE term and its diagnostics, from the :class:`KeyPass` of :meth:`teacher_forward`."""
        self.queue.commit()  # the previous step's keys, if after_step was not called
        with torch.autocast(batch.input.device.type, enabled=False):
            embedded = self.embed_s(pooled_features(self._student_model, student).float())
            query = self.atts_q(embedded)
            if self.key_source == "teacher":
                positive, enqueued = self.key_head(teacher.embedding.float()), teacher.keys
            else:
                positive, enqueued = self._attend_keys(teacher.keys, gather_keys(teacher.keys, teacher.key_order))
            negatives, mask = self._negatives(positive, batch.index)
            loss = infonce_loss(query, positive, negatives, self.params.nce_temperature, mask)
        if self.training:  # written after the optimiser step: backward still reads the queue
            self.queue.stage(enqueued, gather_keys(batch.index, teacher.key_order))
        counts = mask.sum(dim=1) if mask is not None else negatives.shape[0]
        return {"nce": loss, **contrast_diagnostics(query, positive, counts), **self._attention_diagnostics(embedded, positive)}

    def _negatives(self, positive: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The memory, with the batch's other keys in front for keys from the frozen teacher (they
        carry the key head's gradient); the mask leaves out unwritten slots and a query's own keys."""
        memory = self.queue.keys.detach()
        mask = self.queue.negative_mask(index) if self.params.mask_memory else None
        if self.key_source == "momentum":
            return memory, mask
        memory_mask = mask if mask is not None else torch.ones(len(index), self.queue.size, dtype=torch.bool,
                                                               device=memory.device)
        return torch.cat([positive, memory]), torch.cat([batch_negative_mask(index), memory_mask], dim=1)

    def _attention_diagnostics(self, embedded: torch.Tensor, positive: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the batch attention adds: in-batch retrieval before it (compare nce_retrieval, after
        it) and the mean absolute gain of its residual branch (0 = the attention is switched off)."""
        gain = getattr(self.atts_q, "gain", None)
        gain = gain.detach().abs().mean() if gain is not None else torch.tensor(float("nan"), device=embedded.device)
        return {"nce_retrieval_pre_attention": in_batch_retrieval(embedded, positive), "attention_gain": gain}

    def after_step(self) -> None:
        self.queue.commit()

    def _warn_teacher_without_signal(self, epoch: int, agreement: float | None) -> None:
        """Keys from the frozen teacher that the student cannot follow at all after its first epoch
        come from a teacher without per-sample signal (random or untrained weights, a collapsed
        network): the contrastive term then only adds noise."""
        if self.key_source != "teacher" or agreement is None or epoch < 1 or agreement >= NO_SIGNAL_AGREEMENT:
            return
        log.warning("moma: epoch %d: the student's embedding follows the teacher's (%s) keys no better than chance "
                    "(key agreement %.3f; a trained teacher gives 0.1 or more): the teacher seems to carry no per-sample "
                    "signal. Check distill.teacher (random or untrained weights?)", epoch + 1,
                    _arch_name(self._teacher_model), agreement)

    def no_weight_decay(self) -> list[nn.Parameter]:
        """The attention's residual gain: decay would pull it to 0 whatever the loss says, so the
        logged gain would measure the decay, not the attention's use."""
        gain = getattr(self.atts_q, "gain", None)
        return [gain] if gain is not None else []

    def on_epoch_end(self, epoch: int, train_means: dict[str, float]) -> None:
        """Warn when the epoch's mean InfoNCE says the contrastive term distils nothing."""
        self._warn_teacher_without_signal(epoch, train_means.get("nce_agreement"))
        nce, chance = train_means.get("nce"), train_means.get("nce_chance")
        if nce is None or not chance:
            return
        share = nce / chance
        if share < SHORTCUT_SHARE:
            log.warning(
                "moma: epoch %d: L_NCE %.3g is %.2g %% of its chance level ln(K+1) = %.3g: the query finds its key "
                "by a shortcut that carries no per-sample information. Likely cause: the key attention maps every "
                "key of a batch to nearly one vector (key_attention=frozen, attention=plain, as preset official-code);"
                " the default preset avoids it", epoch + 1, nce, 100 * share, chance)
        elif share > UNINFORMATIVE_SHARE:
            log.warning(
                "moma: epoch %d: L_NCE %.3g is %.0f %% of its chance level ln(K+1) = %.3g: the keys carry almost no "
                "per-sample signal. Likely causes: a temperature too high for the key spread (nce_temperature), "
                "keys that collapse after the attention (see train_nce_key_cos in history.csv), or too few steps",
                epoch + 1, nce, 100 * share, chance)


NO_SIGNAL_AGREEMENT = 0.02  # a trained teacher gives 0.1-0.3 after a few epochs on the shipped tiles, a random one 0.00
SHORTCUT_SHARE = 0.01  # L_NCE below 1 % of ln(K+1): a shortcut
UNINFORMATIVE_SHARE = 0.95  # above 95 %: no per-sample signal


def _match_teacher_classifier(teacher: nn.Module, num_classes: int) -> None:
    """Other label set: the teacher gets a fresh classifier of the student's shape, as in the code
    (teacher built with the student's class count, ``--tec_strict`` dropping its classifier)."""
    device = next(teacher.parameters()).device
    teacher.reset_classifier(num_classes)
    teacher.get_classifier().to(device)
    teacher.get_classifier().train(teacher.training)
    log.info("moma: teacher classes differ from the data's: the momentum teacher's classifier is re-initialised "
             "with %d classes (it becomes an EMA of the student's; its logits are not used)", num_classes)
