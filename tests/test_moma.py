"""MoMA as a method: built by the builder, one step at a time, and through the trainer (resume)."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from moma.distill import get_method
from moma.distill.base import Batch
from moma.distill.key_pass import batchnorm_mode
from moma.engine.builder import build_task
from moma.engine.state import load_training_state
from moma.engine.runs import run_training
from moma.errors import ConfigError
from conftest import interrupt_run, write_teacher as save_teacher

CLASSES = ["immune", "stroma", "tumour"]  # the tile_folder fixture's classes, sorted



@pytest.fixture
def build(tmp_path, tile_folder, make_config):
    def factory(teacher_classes=CLASSES, teacher_arch="test_resnet", **params):
        teacher = save_teacher(tmp_path / "teacher.safetensors", teacher_classes, teacher_arch)
        cfg = make_config(tile_folder, distill={"method": "moma", "teacher": str(teacher),
                                                "params": {"queue_size": 32, **params}})
        torch.manual_seed(1)
        task, _ = build_task(cfg, CLASSES, 36, torch.device("cpu"))
        task.train()
        return task

    return factory


def batch_of(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % 3, torch.arange(n))


def count_calls(module):
    calls = {"n": 0}
    module.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def perturb(module, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_class_attributes_and_default_weights(build):
    cls = get_method("moma")
    assert not cls.needs_teacher_classes and not cls.requires_same_architecture(cls.Params())  # keys: auto
    assert cls.requires_same_architecture(cls.parse_params({"keys": "momentum"}))
    assert (cls.default_ce_weight, cls.default_kl_weight) == (1.0, 1.0)
    task = build()
    assert task.method.key_source == "momentum" and task.method.updates_teacher  # the student starts as the teacher
    assert task.loss_weights() == {"ce": 1.0, "kl": 1.0, "nce": 1.0}
    params = task.method.params
    assert (params.momentum, params.nce_temperature, params.feat_dim, params.num_heads) == ("auto", 0.15, 512, 4)
    assert (params.key_attention, params.attention, params.normalize, params.single_teacher_pass) == ("ema", "rezero", True, True)
    assert cls.Params().queue_size == "auto"
    official = cls.parse_params({"preset": "official-code"})
    assert (official.momentum, official.queue_size, official.key_attention, official.attention, official.normalize,
            official.single_teacher_pass) == (0.999, 16384, "frozen", "plain", False, False)


def test_explicit_parameters_override_the_preset(build):
    params = get_method("moma").parse_params({"preset": "official-code", "normalize": True})
    assert params.normalize is True and params.key_attention == "frozen"
    assert params.overridden() == {"normalize": True}


def test_momentum_auto_keeps_the_papers_run_to_horizon_ratio():
    from moma.distill.moma_params import resolve_momentum

    assert resolve_momentum("auto", 5000) == pytest.approx(0.999)  # the paper's ~5,000 steps
    assert resolve_momentum("auto", 200) == pytest.approx(0.975)
    assert resolve_momentum(0.9, 200) == 0.9


def test_a_momentum_teacher_of_another_architecture_is_a_config_error_and_auto_takes_frozen_teacher_keys(build):
    with pytest.raises(ConfigError, match="architecture"):
        build(teacher_arch="test_efficientnet", keys="momentum")
    task = build(teacher_arch="test_efficientnet")  # keys: auto
    assert task.method.key_source == "teacher" and not task.method.updates_teacher
    owners = {k.split(".")[1] for k in task.state_dict() if k.startswith("method.")}
    assert owners == {"embed_s", "atts_q", "key_head", "key_head_m", "queue", "ema_step"}


def test_state_dict_holds_method_state_once(build):
    task = build()
    owners = {k.split(".")[1] for k in task.state_dict() if k.startswith("method.")}
    assert owners == {"embed_s", "embed_t", "atts_q", "atts_k", "queue", "ema_step"}
    official = build(preset="official-code")
    owners = {k.split(".")[1] for k in official.state_dict() if k.startswith("method.")}
    assert owners == {"embed_s", "embed_t", "atts_q", "atts_k", "atts_queue", "queue", "ema_step"}
    assert any(k.startswith("teacher.") for k in task.state_dict())  # the EMA teacher is saved with the task


def test_kl_is_off_and_one_teacher_pass_when_label_sets_differ(build, caplog):
    caplog.set_level("INFO")
    task = build(teacher_classes=["benign", "malignant"], shuffle_bn="none")
    assert task.kl_weight == 0.0
    assert "label sets" in caplog.text and "KL" in caplog.text
    assert task.teacher.model.get_classifier().out_features == 3  # a student-shaped momentum classifier
    calls = count_calls(task.teacher)
    out = task(batch_of())
    assert {"ce", "nce"} <= set(out["terms"]) and "kl" not in out["terms"]
    assert calls["n"] == 1  # the key pass only


def test_kl_logits_come_from_the_teacher_before_the_update(build):
    task = build(preset="official-code", kl_teacher_bn="eval", shuffle_bn="none", momentum=0.9)
    student, teacher = task.student.model, task.teacher.model
    perturb(student)
    before = copy.deepcopy(teacher).eval()
    student_weights = {k: v.clone() for k, v in student.named_parameters()}
    x = batch_of().input
    with torch.no_grad():
        expected = before(x)
    calls = count_calls(task.teacher)
    out = task.method.teacher_forward(task.teacher, x)
    torch.testing.assert_close(out.logits, expected)
    assert calls["n"] == 2  # logits pass, then the key pass
    for name, param in teacher.named_parameters():  # ... and the teacher was updated in between
        torch.testing.assert_close(param, 0.9 * dict(before.named_parameters())[name] + 0.1 * student_weights[name])
    assert "kl" in task(batch_of())["terms"]


def test_single_teacher_pass_takes_kl_logits_after_the_update(build):
    task = build(shuffle_bn="none")  # the default: one teacher pass
    perturb(task.student.model)
    calls = count_calls(task.teacher)
    x = batch_of().input
    out = task.method.teacher_forward(task.teacher, x)
    assert calls["n"] == 1
    with torch.no_grad(), batchnorm_mode(task.teacher, training=True):
        updated = task.teacher(x).logits
    torch.testing.assert_close(out.logits, updated)
    assert {"ce", "kl", "nce"} <= set(task(batch_of())["terms"])


def test_momentum_update_of_teacher_and_head_by_hand(build):
    task = build(momentum=0.9)
    method, student, teacher = task.method, task.student.model, task.teacher.model
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        for p in method.embed_t.parameters():
            p.fill_(0.0)
        for p in method.embed_s.parameters():
            p.fill_(-2.0)
    method.momentum_update()
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.2))  # 0.9 * 1 + 0.1 * 3
    for p in method.embed_t.parameters():
        torch.testing.assert_close(p, torch.full_like(p, -0.2))  # 0.9 * 0 + 0.1 * -2
    assert int(method.ema_step) == 1


@pytest.mark.parametrize("mode, expected", [("keep", 0.0), ("copy", 5.0), ("ema", 0.5)])
def test_teacher_buffers_are_not_averaged_by_default(build, mode, expected):
    task = build(momentum=0.9, teacher_buffers=mode)
    student_bn = [m for m in task.student.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    teacher_bn = [m for m in task.teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for s, t in zip(student_bn, teacher_bn):
        s.running_mean.fill_(5.0)
        t.running_mean.fill_(0.0)
    task.method.momentum_update()
    for t in teacher_bn:
        torch.testing.assert_close(t.running_mean, torch.full_like(t.running_mean, expected))


def test_teacher_classifier_follows_the_student_class_order(build):
    task = build(teacher_classes=["tumour", "immune", "stroma"], momentum=0.0)
    order = [1, 2, 0]  # teacher row of immune, stroma, tumour
    perturb(task.student.model)
    task.method.momentum_update()
    student_fc, teacher_fc = task.student.model.get_classifier(), task.teacher.model.get_classifier()
    torch.testing.assert_close(teacher_fc.weight[order], student_fc.weight)
    torch.testing.assert_close(teacher_fc.bias[order], student_fc.bias)


@pytest.mark.parametrize("preset", ["default", "official-code"])
def test_only_student_head_and_query_attention_get_gradients(build, preset):
    task = build(preset=preset)
    out = task(batch_of())
    out["loss"].backward()
    method = task.method
    key_side = [method.embed_t, method.atts_k] + ([method.atts_queue] if preset == "official-code" else [])
    for p in task.teacher.parameters():
        assert not p.requires_grad and p.grad is None
    for module in key_side:
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    for module in (method.embed_s, method.atts_q, task.student):
        assert all(p.grad is not None for p in module.parameters())
    frozen = {id(p) for m in [task.teacher, *key_side] for p in m.parameters()}
    assert not frozen & {id(p) for p in task.trainable_parameters()}


def test_key_attention_is_an_ema_copy_of_the_query_attention(build):
    task = build(momentum=0.5)
    method = task.method
    assert not hasattr(method, "atts_queue")
    for a, b in zip(method.atts_k.parameters(), method.atts_q.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    perturb(method.atts_q)
    before = [p.clone() for p in method.atts_k.parameters()]
    method.momentum_update()
    for k, k0, q in zip(method.atts_k.parameters(), before, method.atts_q.parameters()):
        torch.testing.assert_close(k, 0.5 * k0 + 0.5 * q)


def test_split_bn_key_pass_normalises_sub_batches_and_updates_running_stats_once(build):
    task = build(teacher_classes=["benign", "malignant"], bn_splits=2)
    teacher, method = task.teacher, task.method
    first_bn = next(m for m in teacher.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = batch_of(8).input
    tracked = int(first_bn.num_batches_tracked)
    torch.manual_seed(123)
    method.teacher_forward(teacher, x)
    assert int(first_bn.num_batches_tracked) == tracked + 1
    torch.manual_seed(7)
    with torch.no_grad(), batchnorm_mode(teacher, training=True):
        split = method._shuffled_teacher_forward(teacher, x).logits
        torch.manual_seed(7)
        order = torch.randperm(8)
        by_hand = torch.cat([teacher(x[order][:4]).logits, teacher(x[order][4:]).logits])[torch.argsort(order)]
        whole = teacher(x).logits
    torch.testing.assert_close(split, by_hand)
    assert not torch.allclose(split, whole, atol=1e-4)


def test_eval_mode_changes_no_state(build):
    task = build()
    task.eval()
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    out = task(batch_of())
    assert torch.isfinite(out["terms"]["nce"])
    assert int(task.method.queue.ptr) == 0 and int(task.method.ema_step) == 0
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_step_under_bf16_autocast(build):
    task = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = task(batch_of(4))
    assert out["terms"]["nce"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert int(task.method.queue.ptr) == 0  # the keys enter the queue after the optimiser step
    task.method.after_step()
    assert task.method.queue.keys.dtype == torch.float32 and int(task.method.queue.ptr) == 4


def test_distillation_loss_goes_down_on_a_fixed_batch(build):
    task = build(queue_size=64, shuffle_bn="none")
    torch.manual_seed(0)
    colours = torch.tensor([[1.5, -1.0, 0.5], [-1.0, 1.5, -0.5], [0.0, -0.5, 1.5]])
    targets = torch.arange(6) % 3
    images = colours[targets][:, :, None, None] + 0.3 * torch.randn(6, 3, 32, 32)
    batch = Batch(images, targets, torch.arange(6))
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=0.05, momentum=0.9)
    terms = []
    for _ in range(30):
        out = task(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        task.method.after_step()
        terms.append({k: float(v) for k, v in out["terms"].items()})
    assert sum(t["ce"] for t in terms[-3:]) < 0.5 * sum(t["ce"] for t in terms[:3])
    # The queue fills with earlier keys of the same six images; a query's own earlier keys are masked,
    # so its negatives are the other five images' keys and their number grows as the queue fills.
    # Against that chance level InfoNCE still falls, and each query finds its own key or the key of
    # the image of the same colour (pairs of near-identical images: 1/2 is the best possible, chance 1/6).
    assert terms[0]["nce_chance"] == 0.0  # the first step: every slot unwritten, no negative at all
    share = [t["nce"] / t["nce_chance"] for t in terms[1:]]
    assert sum(share[-3:]) < sum(share[:3])
    assert all(t["nce_retrieval"] >= 0.5 for t in terms[-3:])
    assert int(task.method.queue.ptr) == (30 * 6) % 64 and int(task.method.ema_step) == 30


@pytest.mark.parametrize("teacher_arch", ["test_resnet", "test_efficientnet"])  # momentum teacher; frozen-teacher keys
def test_resume_gives_identical_student_teacher_and_queue(tmp_path, tile_folder, make_config, monkeypatch, teacher_arch):
    teacher = save_teacher(tmp_path / "teacher.safetensors", CLASSES, teacher_arch)
    cfg = make_config(tile_folder, optim={"epochs": 2, "batch_size": 12},
                      distill={"method": "moma", "teacher": str(teacher), "params": {"queue_size": 20}})
    reference = run_training(cfg).run_dir

    interrupt_run(cfg, monkeypatch)  # in the middle of the second epoch
    interrupted = f"{cfg.run.output_dir}/t-2"
    assert run_training(cfg, resume_dir=interrupted).run_dir == interrupted

    for name in ("last.safetensors", "best.safetensors"):
        a, b = load_file(f"{reference}/{name}"), load_file(f"{interrupted}/{name}")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load_training_state(f"{reference}/state.pt")["task"], load_training_state(f"{interrupted}/state.pt")["task"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(a["method.ema_step"]) >= 4  # one momentum update per step, restored with the task
    teacher_keys = [k for k in a if k.startswith("teacher.")]
    initial = load_file(str(teacher))
    changed = [not torch.equal(a[k], initial[k.removeprefix("teacher.model.")]) for k in teacher_keys
               if k.removeprefix("teacher.model.") in initial]
    assert any(changed) == (teacher_arch == "test_resnet")  # only a momentum teacher moves
    assert (int(a["method.queue.owners"].max()) >= 0)  # the memory was written, and restored with the rest


def test_query_and_keys_are_unit_vectors_after_the_attention_by_default(build):
    task = build(shuffle_bn="none")
    method = task.method
    teacher_side = method.teacher_forward(task.teacher, batch_of().input)
    positive, enqueued = method._attend_keys(teacher_side.keys, teacher_side.keys)
    torch.testing.assert_close(positive.norm(dim=1), torch.ones(8))
    assert enqueued is positive  # one key attention: the positive keys are what is enqueued
    out = task(batch_of())
    assert out["terms"]["nce_query_norm"] == pytest.approx(1.0, abs=1e-5)


def test_cosine_momentum_schedule_follows_the_step_counter(build):
    method = build(momentum=0.9, momentum_schedule="cosine", momentum_steps=4).method
    assert method.current_momentum() == pytest.approx(0.9)
    method.momentum_update()
    method.momentum_update()
    assert method.current_momentum() == pytest.approx(0.95)  # 1 - 0.1 * (cos(pi / 2) + 1) / 2
    with pytest.raises(ConfigError, match="momentum_steps"):
        get_method("moma").parse_params({"momentum_schedule": "cosine"})
    with pytest.raises(ConfigError, match="divisible"):
        get_method("moma").parse_params({"feat_dim": 130})


def test_keys_enter_the_queue_after_the_step_and_the_logits_read_it_in_place(build):
    task = build()
    before = task.method.queue.keys.clone()
    out = task(batch_of(4))
    pending, owners = (t.clone() for t in task.method.queue._staged)
    assert owners.tolist() == batch_of(4).index.tolist()  # each key is staged with its sample's row
    out["loss"].backward()  # would raise if the queue had been written in place before backward
    assert torch.equal(task.method.queue.keys, before) and int(task.method.queue.ptr) == 0
    task.method.after_step()
    assert torch.equal(task.method.queue.keys[:4], pending) and torch.equal(task.method.queue.keys[4:], before[4:])
    task.method.after_step()  # nothing pending: no second write
    assert int(task.method.queue.ptr) == 4
