"""The step's arithmetic, in one process: loss scaling over pieces, micro-batching, batch errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from autopar.errors import AutoparError
from autopar.execute.options import ParallelOptions
from autopar.execute.runtime import Runtime
from autopar.execute.semantics import StepLoss, token_loss_sum
from autopar.execute.step import ParallelRuntime, _micro_batching, padded_rows
from autopar.plan.types import Plan, Schedule
from autopar.profile.types import Recompute


def _plan(dp=1, pp=1, mb=2, m=4) -> Plan:
    return Plan(dp=dp, tp=1, pp=pp, micro_batch_size=mb, num_microbatches=m, schedule=Schedule.ONE_F_ONE_B,
                virtual_stages=1, recompute=Recompute.NONE, zero_stage=0, sequence_parallel=False, stages=(),
                global_batch_size=dp * mb * m, seq_len=16)


def _padded(batch=8, seq=16, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    labels[torch.arange(seq)[None] >= lengths[:, None]] = -100
    return logits, labels


def test_pieces_sum_to_the_single_device_mean():
    """sum(token losses)/global real tokens per piece, summed over any split = transformers' mean loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = _padded()
    want = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    fn = StepLoss()
    fn.n_tokens = fn.count(labels)
    for pieces in (1, 2, 4, 8):
        got = sum(fn(lg, lb) for lg, lb in zip(logits.chunk(pieces), labels.chunk(pieces), strict=True))
        assert torch.allclose(got, want, rtol=1e-6), (pieces, got, want)
    per_piece_mean = sum(token_loss_sum(lg, lb) / fn.count(lb)
                         for lg, lb in zip(logits.chunk(4), labels.chunk(4), strict=True)) / 4
    assert not torch.allclose(per_piece_mean, want, rtol=1e-4)  # the naive mean is wrong with padding


@pytest.mark.parametrize("plan,per_dp,expected", [
    (_plan(mb=2, m=4), 8, (2, 4)),        # as planned
    (_plan(mb=4, m=2), 6, (3, 2)),        # 4 does not divide 6: the largest divisor below it
    (_plan(pp=2, mb=4, m=2), 4, (2, 2)),  # a pipeline needs at least pp micro-batches
    (_plan(pp=4, mb=1, m=4), 2, (1, 2)),  # cannot: reported by the runtime (too few)
])
def test_micro_batching_follows_the_real_batch(plan, per_dp, expected):
    assert _micro_batching(plan, per_dp) == expected


def _runtime(plan: Plan) -> ParallelRuntime:
    rt = Runtime(rank=0, world_size=plan.world_size, local_rank=0, local_world_size=plan.world_size,
                 device=torch.device("cpu"))
    return ParallelRuntime(model=None, family=None, plan=plan, layout=None, rt=rt, stages={},
                           options=ParallelOptions(), model_flops_per_token=0.0)


def test_a_batch_the_layout_cannot_split_is_padded_with_rows_that_count_nothing():
    """A smaller last batch trains as one device would: padded rows (labels -100) add no loss or gradient."""
    with pytest.warns(UserWarning, match=r"global batch of 6 sequences does not split over dp=4; .* padded with 2 "
                                         r"row\(s\).*global_batch_size=6"):
        assert _runtime(_plan(dp=4))._refine(6, 16) == 2
    with pytest.warns(UserWarning, match=r"x at least pp=2 micro-batches.*padded with 1 row"):
        assert _runtime(_plan(pp=2, mb=1, m=2))._refine(1, 16) == 1
    assert [padded_rows(_plan(dp=2, pp=2), n) for n in (1, 3, 4, 5)] == [4, 4, 4, 6]
    runtime = _runtime(_plan(dp=2, mb=2, m=2))
    runtime._refine(12, 16)
    assert (runtime.micro_batch_size, runtime.num_microbatches) == (2, 3)
