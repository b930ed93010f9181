"""The step's meaning in one process: deferred gradients, the user's loss, data semantics, the model surface."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from autopar.errors import AutoparError
from autopar.execute import batch as batch_mod
from autopar.execute.gradients import copies_of
from autopar.execute.semantics import PendingGrads, StepLoss, loss_with_backward


def _call(model, x, anchor):
    """What the step does: the call's own backward into fresh .grad slots, the loss returned deferred."""
    with PendingGrads(list(model.parameters())) as pending:
        loss = model(x).pow(2).mean()
        loss.backward()
    return loss_with_backward(loss.detach(), pending, anchor)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def test_backward_scales_accumulates_and_nothing_without_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    anchor = torch.zeros((), requires_grad=True)
    (model(x1).pow(2).mean() / 2 + model(x2).pow(2).mean() / 2).backward()  # one device, accumulated
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    loss1 = _call(model, x1, anchor)
    assert all(p.grad is None for p in model.parameters())  # no backward yet: no gradient
    (loss1 / 2).backward()
    loss2 = _call(model, x2, anchor)  # the earlier gradient is set aside during the call, then kept
    (loss2 / 2).backward()
    for got, ref in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    model.zero_grad(set_to_none=True)
    _call(model, x1, anchor)  # a loss never backpropagated leaves nothing
    assert all(p.grad is None for p in model.parameters())


def test_backward_twice_through_one_loss_is_refused():
    model = torch.nn.Linear(2, 1)
    loss = _call(model, torch.ones(1, 2), torch.zeros((), requires_grad=True))
    loss.backward(retain_graph=True)
    with pytest.raises(AutoparError, match="backward\\(\\) ran twice"):
        loss.backward()


def test_user_loss_fn_is_divided_by_the_global_count_of_its_labels():
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3:] = -100

    def summed(lg, lb):
        return torch.nn.functional.cross_entropy(lg.reshape(-1, 7), lb.reshape(-1), reduction="sum")

    fn = StepLoss(summed)
    fn.n_tokens = fn.count(labels)
    assert fn.n_tokens == 8  # labels as passed (10 less the 2 set to -100), not shifted
    torch.testing.assert_close(fn(logits, labels), summed(logits, labels) / 8)
    bad = StepLoss(lambda lg, lb: lg.sum(-1))
    with pytest.raises(AutoparError, match=r"loss_fn returned \(2, 5\); it must return a scalar tensor, the SUM"):
        bad(logits, labels)


def test_padding_rows_count_no_token():
    ids, mask = torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    labels = torch.full((3, 4), 5)
    p_ids, p_mask, p_labels = batch_mod.pad_rows(ids, mask, labels, 2)
    assert p_ids.shape == (5, 4) and (p_labels[3:] == -100).all() and (p_mask[3:] == 1).all()
    assert StepLoss().count(p_labels) == StepLoss().count(labels)


def test_fingerprints_tell_batches_apart():
    dev = torch.device("cpu")
    a = torch.randint(0, 50, (4, 8))
    b = a.clone()
    b[1, 2], b[1, 3] = a[1, 3], a[1, 2]  # two tokens swapped
    fa, fb = batch_mod.fingerprint(a, None, a, dev), batch_mod.fingerprint(b, None, a, dev)
    assert fa[:4] == fb[:4] and (fa != fb or torch.equal(a, b))
    assert batch_mod.fingerprint(a, None, a, dev) == batch_mod.fingerprint(a.clone(), None, a, dev)


def test_a_live_distributed_sampler_is_found():
    data = list(range(16))
    assert batch_mod.rank_aware_loader(4) is None or "DistributedSampler" not in batch_mod.rank_aware_loader(4)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=4, rank=1)
    assert batch_mod.rank_aware_loader(4).endswith("DistributedSampler")
    assert batch_mod.rank_aware_loader(2) is None  # another world: not this job's sharding
    del sampler


def test_copies_count_every_rank_holding_the_same_elements():
    plain = torch.nn.Parameter(torch.ones(3))
    assert copies_of(plain, {"dp": 2, "tp": 2}, tied=False) == 4  # replicated on every dp and tp rank
    assert copies_of(plain, {"dp": 1, "tp": 2}, tied=True) == 4  # tied embedding/head on two stages, x tp


def test_the_model_surface_refuses_what_the_plan_cannot_honour():
    from autopar.execute import surface
    from autopar.profile.types import Recompute

    model = torch.nn.Linear(2, 2)
    surface.guard(model, torch.device("cpu"), Recompute.NONE)
    assert model.to("cpu") is model and model.float() is model and model.to(torch.float32) is model
    with pytest.raises(AutoparError, match=r"model.to\(torch.bfloat16\) on a model autopar built in torch.float32.*"
                                           r"pass dtype=torch.bfloat16 to from_pretrained"):
        model.to(torch.bfloat16)
    with pytest.raises(AutoparError, match=r"model.to\(meta\) after autopar placed the model on cpu"):
        model.to("meta")
    with pytest.raises(AutoparError, match=r"recompute=none\); pass enable_advanced_parallelization\(recompute='full'\)"):
        model.gradient_checkpointing_enable()
    full = torch.nn.Linear(2, 2)
    surface.guard(full, torch.device("cpu"), Recompute.FULL)
    full.gradient_checkpointing_enable()  # already what the plan runs
