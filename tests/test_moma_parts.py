"""MoMA's building blocks against hand-computed numbers: EMA, queue, InfoNCE, batch attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moma.distill.batch_attention import BatchAttention, BatchAttentionBlock
from moma.distill.ema import copy_, cosine_momentum, ema_update_, paired_buffers
from moma.distill.contrast import (ProjectionHead, batch_negative_mask, contrast_diagnostics, infonce_logits, infonce_loss,
                                   key_agreement, mean_pairwise_cosine)
from moma.distill.moma_params import resolve_queue_size
from moma.distill.queue import KeyQueue


# ----------------------------------------------------------------------------- EMA


def test_ema_update_is_alpha_target_plus_one_minus_alpha_source():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    source = [torch.tensor([3.0, 5.0]), torch.tensor([[0.0]])]
    ema_update_(target, source, momentum=0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2 ; 0.9 * 2 + 0.1 * 5 = 2.3 ; 0.9 * 10 + 0.1 * 0 = 9
    torch.testing.assert_close(target[0], torch.tensor([1.2, 2.3]))
    torch.testing.assert_close(target[1], torch.tensor([[9.0]]))
    torch.testing.assert_close(source[0], torch.tensor([3.0, 5.0]))  # the source is untouched


def test_ema_of_modules_and_buffer_pairing_rejects_other_shapes():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        a.weight.fill_(1.0), a.bias.fill_(-1.0), b.weight.fill_(2.0), b.bias.fill_(1.0)
    ema_update_(list(a.parameters()), list(b.parameters()), momentum=0.75)
    torch.testing.assert_close(a.weight, torch.full((1, 2), 1.25))  # 0.75 * 1 + 0.25 * 2
    torch.testing.assert_close(a.bias, torch.tensor([-0.5]))  # 0.75 * -1 + 0.25 * 1
    with pytest.raises(ValueError, match="shape"):
        paired_buffers(nn.BatchNorm1d(2), nn.BatchNorm1d(3))


def test_buffer_copy_and_pairing():
    a, b = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    b.running_mean.fill_(4.0)
    b.num_batches_tracked.fill_(7)
    copy_(*paired_buffers(a, b))
    assert a.running_mean.tolist() == [4.0, 4.0] and int(a.num_batches_tracked) == 7


def test_cosine_momentum_rises_from_base_to_one():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)  # 1 - 0.01 * (cos(pi/2) + 1) / 2
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 500, 100) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- queue


def rows(*values):
    return torch.tensor([[float(v), -float(v)] for v in values])


def test_queue_starts_with_random_unit_vectors():
    torch.manual_seed(0)
    queue = KeyQueue(7, 3)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(7))
    assert queue.keys.std() > 0.1 and int(queue.ptr) == 0


def test_queue_is_fifo_and_wraps_around():
    queue = KeyQueue(5, 2)
    queue.enqueue(rows(1, 2))
    assert queue.keys[:2].tolist() == rows(1, 2).tolist() and int(queue.ptr) == 2
    queue.enqueue(rows(3, 4, 5))
    assert queue.keys.tolist() == rows(1, 2, 3, 4, 5).tolist() and int(queue.ptr) == 0
    queue.enqueue(rows(6, 7, 8))  # replaces the three oldest
    assert queue.keys.tolist() == rows(6, 7, 8, 4, 5).tolist() and int(queue.ptr) == 3
    queue.enqueue(rows(9, 10, 11))  # slots 3, 4, then wraps to 0
    assert queue.keys.tolist() == rows(11, 7, 8, 9, 10).tolist() and int(queue.ptr) == 1
    # More than K at once: as one-by-one writes from slot 1 (12->1, ..., 16->0, 17->1, 18->2).
    queue.enqueue(rows(12, 13, 14, 15, 16, 17, 18))
    assert queue.keys.tolist() == rows(16, 17, 18, 14, 15).tolist() and int(queue.ptr) == 3


def test_queue_state_is_persistent():
    queue = KeyQueue(4, 2)
    queue.enqueue(rows(1, 2, 3))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr", "owners"} and int(state["ptr"]) == 3
    restored = KeyQueue(4, 2)
    restored.load_state_dict(state)
    assert torch.equal(restored.keys, queue.keys) and int(restored.ptr) == 3


def test_staged_keys_are_written_once_on_commit():
    queue = KeyQueue(4, 2)
    queue.stage(rows(1, 2))
    assert int(queue.ptr) == 0 and queue.keys[:2].tolist() != rows(1, 2).tolist()
    queue.commit()
    assert queue.keys[:2].tolist() == rows(1, 2).tolist() and int(queue.ptr) == 2
    queue.commit()  # nothing staged: no second write
    assert int(queue.ptr) == 2
    queue.stage(rows(3))
    assert "_staged" not in queue.state_dict()  # a checkpoint is taken after the commit


def test_the_queue_masks_unwritten_slots_and_each_query_s_own_keys():
    queue = KeyQueue(5, 2)
    queue.enqueue(rows(1, 2, 3), owners=torch.tensor([7, 3, 7]))
    queue.enqueue(rows(4))  # an owner not known: never masked as anyone's own key
    mask = queue.negative_mask(torch.tensor([7, 3, 9]))
    assert mask.tolist() == [
        [False, True, False, True, False],  # sample 7: its two earlier keys and the unwritten slot 4 left out
        [True, False, True, True, False],
        [True, True, True, True, False],
    ]
    queue.enqueue(rows(5, 6), owners=torch.tensor([9, 9]))  # wraps: slot 4, then slot 0 (was sample 7's)
    assert queue.owners.tolist() == [9, 3, 7, -2, 9]
    assert queue.negative_mask(torch.tensor([9])).tolist() == [[False, True, True, True, False]]


def test_masked_negatives_leave_the_denominator():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    k = q.clone()
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    tau = 0.5
    loss = infonce_loss(q, k, queue, tau, mask)
    expected = 0.0
    for i, keep in enumerate(mask):
        logits = [float(q[i] @ k[i]) / tau] + [float(q[i] @ queue[j]) / tau for j in range(3) if keep[j]]
        expected += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert float(loss) == pytest.approx(expected / 2, rel=1e-6)
    assert float(loss) < float(infonce_loss(q, k, queue, tau))  # the masked slots were hard negatives


def test_queue_size_auto_is_clamped_to_the_training_set():
    assert resolve_queue_size("auto", 360, 64) == 320  # largest multiple of 64 not above 360
    assert resolve_queue_size("auto", 100_000, 64) == 16384  # the paper's K
    assert resolve_queue_size("auto", 40, 64) == 40
    assert resolve_queue_size(1000, 40, 64) == 1000  # an explicit size is kept


# ----------------------------------------------------------------------------- InfoNCE


def test_infonce_logits_and_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    # row i: [q_i.k_i, q_i.n_1, q_i.n_2] / tau
    expected = torch.tensor([
        [1.0, 0.0, -1.0],
        [0.8, 1.0, 0.0],
        [0.8, 0.8, -0.6],
    ]) / tau
    torch.testing.assert_close(infonce_logits(q, k, queue, tau), expected)
    per_row = [-(row[0] - math.log(sum(math.exp(v) for v in row))) for row in expected.tolist()]
    assert float(infonce_loss(q, k, queue, tau)) == pytest.approx(sum(per_row) / 3, rel=1e-6)


def test_infonce_is_float32_under_bf16_autocast():
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = infonce_logits(q.bfloat16(), k.bfloat16(), queue, 0.15)
    assert logits.dtype == torch.float32
    reference = infonce_logits(q.bfloat16().float(), k.bfloat16().float(), queue, 0.15)
    torch.testing.assert_close(logits, reference)


def test_projection_head_outputs_unit_vectors():
    head = ProjectionHead(6, 4)
    out = head(torch.randn(5, 6, 1, 1))
    assert out.shape == (5, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


# ----------------------------------------------------------------------------- batch attention


def manual_attention(x, attention: BatchAttention, heads: int) -> torch.Tensor:
    """Per head: softmax(Q K^T / sqrt(d)) V over the N samples, heads concatenated, then proj."""
    n, c = x.shape
    d = c // heads
    q, k, v = attention.qkv(x).split(c, dim=1)
    outputs = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[:, cols] @ k[:, cols].T / math.sqrt(d), dim=1)
        outputs.append(weights @ v[:, cols])
    return attention.proj(torch.cat(outputs, dim=1))


def test_batch_attention_matches_four_head_formula_without_residual():
    torch.manual_seed(0)
    attention = BatchAttention(dim=16, num_heads=4)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), manual_attention(x, attention, heads=4))
        one_head = manual_attention(x, attention, heads=1)
        assert not torch.allclose(attention(x), one_head, atol=1e-4)  # the head split matters
        # One token: softmax weight 1, so out = proj(W_v x + b_v) - no residual, no norm.
        single = x[:1]
        value = F.linear(single, attention.qkv.weight[32:], attention.qkv.bias[32:])
        torch.testing.assert_close(attention(single), attention.proj(value))


def test_batch_attention_mixes_samples_of_the_batch():
    torch.manual_seed(0)
    attention = BatchAttention(dim=8, num_heads=4)
    x = torch.randn(3, 8)
    changed = x.clone()
    changed[2] += 1.0
    with torch.no_grad():
        a, b = attention(x), attention(changed)
    assert not torch.allclose(a[0], b[0])  # sample 0's output depends on sample 2
    assert attention.qkv.bias is not None and attention.num_heads == 4
    with pytest.raises(ValueError, match="divisible"):
        BatchAttention(dim=10, num_heads=4)


def test_random_init_batch_attention_maps_all_samples_to_almost_one_vector():
    """A property of the code's design (reproduced by default, documented in docs/moma.md): on
    unit-norm embeddings the freshly initialised attention weights are nearly uniform, so every
    sample's output is close to the batch mean; a residual keeps the samples apart."""
    torch.manual_seed(0)
    attention = BatchAttention(dim=512, num_heads=4)
    x = F.normalize(torch.randn(16, 512), dim=1)
    with torch.no_grad():
        plain = F.normalize(attention(x), dim=1)
        residual = F.normalize(x + attention(x), dim=1)
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert (plain @ plain.T)[off_diagonal].min() > 0.99
    assert (residual @ residual.T)[off_diagonal].mean() < 0.9


@pytest.mark.parametrize("wiring", ["plain", "rezero"])
def test_attention_block_wirings_by_hand(wiring):
    torch.manual_seed(0)
    block = BatchAttentionBlock(dim=8, num_heads=2, wiring=wiring)
    if wiring == "rezero":
        with torch.no_grad():
            block.gain.fill_(0.5)
    x = torch.randn(5, 8)
    a = block.attention
    layer_norm = (lambda v: F.layer_norm(v, (8,), block.norm.weight, block.norm.bias)) if wiring != "plain" else None
    expected = {
        "plain": lambda: a(x),
        "rezero": lambda: x + 0.5 * a(layer_norm(x)),
    }[wiring]
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected())


def test_rezero_block_starts_as_the_identity_and_normalize_gives_unit_vectors():
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(BatchAttentionBlock(16, 4, "rezero")(x), x)
        out = BatchAttentionBlock(16, 4, "rezero", normalize=True)(x)
    torch.testing.assert_close(out, F.normalize(x, dim=1))
    with pytest.raises(ValueError, match="wiring"):
        BatchAttentionBlock(16, 4, "sideways")


def test_attention_block_runs_in_float32_under_bf16_autocast():
    block = BatchAttentionBlock(16, 4, "rezero", normalize=True)
    with torch.no_grad():
        block.gain.fill_(1.0)
    x = F.normalize(torch.randn(6, 16), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, block(x))  # the same numbers as without autocast


def test_mean_pairwise_cosine_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # pairs: (1,2) 0, (1,3) 1/sqrt2, (2,3) 1/sqrt2; the mean over distinct pairs
    assert float(mean_pairwise_cosine(x)) == pytest.approx(2 / math.sqrt(2) / 3)
    assert float(mean_pairwise_cosine(torch.ones(4, 3))) == pytest.approx(1.0)


def test_contrast_diagnostics_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positive = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.0, 1.0]])  # query 3 scores key 2 as high as its own
    out = contrast_diagnostics(query, positive, negatives=99)
    assert float(out["nce_chance"]) == pytest.approx(math.log(100))
    per_query = contrast_diagnostics(query, positive, negatives=torch.tensor([99, 9, 0]))  # a masked memory
    assert float(per_query["nce_chance"]) == pytest.approx((math.log(100) + math.log(10) + 0.0) / 3)
    assert float(out["nce_retrieval"]) == pytest.approx(2 / 3)  # argmax takes the first of a tie
    assert float(out["nce_query_norm"]) == pytest.approx((1 + 1 + math.sqrt(2)) / 3)
    assert float(out["nce_key_cos"]) == pytest.approx(float(mean_pairwise_cosine(positive)))


def test_key_agreement_is_matched_minus_unmatched_cosine_by_hand():
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cosines: q0.k0 = 1, q0.k1 = 1/sqrt2, q1.k0 = 0, q1.k1 = 1/sqrt2
    matched, unmatched = (1 + 1 / math.sqrt(2)) / 2, (1 / math.sqrt(2) + 0) / 2
    assert float(key_agreement(query, keys)) == pytest.approx(matched - unmatched)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(key_agreement(same, same)) == pytest.approx(0.0)  # every key alike: no per-sample agreement


def test_in_batch_negatives_leave_out_the_query_s_own_sample_wherever_it_occurs():
    mask = batch_negative_mask(torch.tensor([4, 7, 4]))
    assert mask.tolist() == [[False, True, False], [True, False, True], [False, True, False]]


def test_an_ema_key_head_caps_the_auto_queue_within_half_its_horizon():
    assert resolve_queue_size("auto", 1000, 48) == 960  # no EMA head: the training set, rounded to the batch
    assert resolve_queue_size("auto", 1000, 48, momentum=0.9) == 48 * 5  # horizon 10 steps -> 5 batches
    assert resolve_queue_size("auto", 100, 48, momentum=0.99) == 96  # the training set is smaller still
    assert resolve_queue_size(500, 1000, 48, momentum=0.9) == 500  # an explicit size is kept


def test_auto_keys_use_the_momentum_teacher_only_when_the_student_starts_as_the_teacher():
    from moma.distill.moma_params import resolve_key_source

    assert resolve_key_source("auto", student_from_teacher=True) == "momentum"
    assert resolve_key_source("auto", student_from_teacher=False) == "teacher"
    assert resolve_key_source("momentum", student_from_teacher=False) == "momentum"
