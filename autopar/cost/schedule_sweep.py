"""The longest path of a schedule's step DAG, by a vectorised sweep: the planner's fast path.

[Note: schedule sweeps]
autopar.cost.pipeline.simulate walks the step DAG ([Note: pipeline step DAG])
task by task in Python, O(pp * v * m) steps: 0.1-0.5 s for the 1T model's
layouts, and the planner costs dozens of them. Each schedule's order is
regular, so the same longest path can be swept with numpy over the pipeline
ranks, one "global step" at a time, every dependency of a step coming from
earlier steps (or, for 1F1B's forwards, from a prefix scan over the ranks):

* GPipe: forwards, then backwards, are flow shops of identical jobs; each rank
  is one running maximum over its micro-batches (x_i = max(y_i, x_{i-1}) + t
  is x_i = (i + 1) t + max_{k<=i} (y_k - k t)). O(pp) numpy calls.
* 1F1B (m >= pp, torch's rule): at step u rank d runs B(d, u - (pp - d)) then
  F(d, u). B(d, j) needs B(d + 1, j), which rank d + 1 ran at step u - 1; F(d, u)
  needs F(d - 1, u) of the same step: a max-plus prefix scan over the ranks.
* Interleaved 1F1B (rounds of R >= pp micro-batches, warm-ups not capped):
  rank d runs its op o at step o + d: its o-th forward, then its (o - W_d)-th
  backward (W_d = (v - 1) R + 2 (pp - 1 - d), the warm-up). With R >= pp every
  cross-rank dependency was produced 1 or R - pp + 1 steps earlier.

Long steps: once every rank runs both a forward and a backward each step (the
steady phase), one step is a fixed max-plus map of the last ``period`` steps
(1F1B: 1; interleaved: R v, the order's period). When the values produced
over ``period`` consecutive steps equal those ``period`` steps earlier plus one
constant (within ``PERIOD_RTOL``), every later steady step repeats them shifted
by that constant (max-plus maps commute with adding a constant), so the sweep
jumps to the end of the steady phase and runs the drain. Where no period shows,
it sweeps every step. tests/test_schedule_sweep.py checks the result equal to
``simulate`` on random uneven chunks, short and long steps.

Pure numpy; sends are free here, as in the cost model's DAG (it adds them apart).
"""

from __future__ import annotations

import numpy as np

from autopar.plan.types import Schedule

PERIOD_RTOL = 1e-12
"""Relative tolerance for "the same shift on every value" when detecting the steady period (float sums of
the same durations in different orders differ by a few ulps)."""


def sweep_step_s(schedule: Schedule, fwd_s, bwd_s, pp: int, v: int, m: int) -> float | None:
    """Longest path of the step DAG with free sends, as ``simulate`` gives it; None where no sweep applies
    (pp = 1, 1F1B with m < pp, interleaved with rounds shorter than pp or a capped warm-up)."""
    if pp == 1 or len(fwd_s) != pp * v:
        return None
    f, b = np.asarray(fwd_s, dtype=float), np.asarray(bwd_s, dtype=float)
    if schedule is Schedule.GPIPE and v == 1:
        return _gpipe(f, b, pp, m)
    if schedule is Schedule.ONE_F_ONE_B and v == 1:
        return _one_f_one_b(f, b, pp, m) if m >= pp else None
    if schedule is Schedule.INTERLEAVED_1F1B and v >= 2:
        rounds = max(1, m // pp)
        per_round = m // rounds
        if m % rounds or per_round < pp or (v - 1) * per_round + 2 * (pp - 1) > m * v:
            return None
        return _interleaved(f, b, pp, v, m, per_round)
    return None


def interleaved_peak_inflight(pp: int, v: int, m: int) -> tuple[float, ...]:
    """Per chunk, the most micro-batches whose forward is done and backward is not, in torch's interleaved
    1F1B order: autopar.cost.pipeline.peak_inflight of that order, counted from the order's rule without
    building it (rank d's op o runs forward o, then backward o - W_d; tests/test_schedule_sweep.py)."""
    rounds = max(1, m // pp)
    per_round, n = m // rounds, m * v
    out = np.zeros(pp * v)
    locals_ = np.arange(v)[:, None]

    def done(k: np.ndarray, group: np.ndarray) -> np.ndarray:
        """Ops of local chunk ``group`` among a rank's first k forwards (or backwards, groups reversed)."""
        return (k // (per_round * v)) * per_round + np.clip(k % (per_round * v) - group * per_round, 0, per_round)

    for d in range(pp):
        warm = min((v - 1) * per_round + 2 * (pp - 1 - d), n)
        # After the warm-up the count repeats every round (per_round * v ops) and only falls in the
        # cool-down, so its maximum lies in the first two rounds past the warm-up: O(pp v) memory, not O(m).
        op = np.arange(min(n + warm, warm + 2 * per_round * v))[None, :]
        live = done(np.minimum(op + 1, n), locals_) - done(np.clip(op - warm, 0, n), v - 1 - locals_)
        out[np.arange(v) * pp + d] = live.max(axis=1)
    return tuple(float(x) for x in out)


def _gpipe(f: np.ndarray, b: np.ndarray, pp: int, m: int) -> float:
    """All forwards, then all backwards, on every rank: two flow shops of identical jobs."""
    idx = np.arange(m, dtype=float)
    y = np.zeros(m)  # ends of the previous rank's forwards (none before rank 0)
    last_f = []
    for d in range(pp):
        y = np.maximum.accumulate(y - idx * f[d]) + (idx + 1) * f[d]
        last_f.append(y[-1])
    y, end = np.zeros(m), 0.0  # ends of the next rank's backwards (none after the last rank)
    for d in reversed(range(pp)):  # rank d's first backward follows its last forward
        y = np.maximum(np.maximum.accumulate(y - idx * b[d]), last_f[d]) + (idx + 1) * b[d]
        end = max(end, y[-1])
    return float(end)


def _one_f_one_b(f: np.ndarray, b: np.ndarray, pp: int, m: int) -> float:
    """Step u: B(d, u - (pp - d)) then F(d, u) on each rank d (autopar.cost.pipeline._one_f_one_b_rank)."""
    cum = np.cumsum(f)
    before = cum - f  # forward time of the ranks before d
    last = np.zeros(pp)  # end of each rank's last task
    last_b = np.zeros(pp + 1)  # end of the backward each rank ran last step; none after the last rank
    prev = None
    u, total = 0, m + pp
    while u < total:
        lo, hi = max(0, pp - u), min(pp, pp - u + m)
        if lo < hi:  # B(d, j) after the rank's last task and B(d + 1, j), run last step
            ends = np.maximum(last[lo:hi], last_b[lo + 1:hi + 1])
            ends += b[lo:hi]
            last[lo:hi] = ends
            last_b[lo:hi] = ends
        if u < m:  # F(d, u) after the rank's last task and F(d - 1, u): x_d = max(x_{d-1}, last_d) + f_d
            last = np.maximum.accumulate(last - before) + cum
        if pp <= u < m - 1:  # steady: the state is (last, last_b) of this step
            state = np.concatenate((last, last_b[:pp]))
            if prev is not None:
                shift = _same_shift(state, prev)
                if shift is not None:  # every later steady step adds the same shift
                    jump = m - 1 - u
                    last += jump * shift
                    last_b[:pp] += jump * shift
                    u += jump
                    prev = None
                    u += 1
                    continue
            prev = state
        u += 1
    return float(last.max())


def _same_shift(now: np.ndarray, before: np.ndarray) -> float | None:
    """The constant c with now == before + c (within PERIOD_RTOL of the values), or None."""
    diff = now - before
    lo, hi = diff.min(), diff.max()
    return float(diff.mean()) if hi - lo <= PERIOD_RTOL * max(1.0, float(np.abs(now).max())) else None


def _interleaved(f: np.ndarray, b: np.ndarray, pp: int, v: int, m: int, per_round: int) -> float:
    """Rank d runs op o at step o + d: forward o (if o < m v), then backward o - W_d (if o >= W_d).

    Forward k of a rank is micro-batch (k // (R v)) R + k % R of local chunk (k // R) % v; backward k of
    local chunk v - 1 - (k // R) % v (autopar.cost.pipeline._interleaved_rank). Ends are kept flat, rank d's
    k-th at d n + k, so that a step's indices are a fixed array plus the step.
    """
    n, period = m * v, per_round * v
    warm0 = (v - 1) * per_round + 2 * (pp - 1)
    ranks = np.arange(pp)
    k = np.arange(n)
    # Duration of each rank's k-th forward and backward, in the flat layout.
    f_dur = f[((k[None, :] // per_round) % v) * pp + ranks[:, None]].ravel()
    b_dur = b[(v - 1 - (k[None, :] // per_round) % v) * pp + ranks[:, None]].ravel()
    f_end, b_end = np.zeros(pp * n), np.zeros(pp * n)
    f_at = ranks * (n - 1)  # + g: rank d's forward g - d
    b_at = ranks * (n + 1) - warm0  # + g: rank d's backward g - warm0 + d
    last = np.zeros(pp)
    steady_from, steady_to = warm0, n  # steps where every rank runs a forward and a backward
    check = steady_from + 2 * period - 1
    g, total = 0, n + warm0
    while g < total:
        lo, hi = max(0, g - n + 1), min(pp, g + 1)
        if lo < hi:  # forwards: F(d, k) after F(d - 1, k); rank 0's after rank pp - 1's, R steps back
            at = f_at[lo:hi] + g
            dep = f_end[at - n]  # rank d - 1's forward k
            if lo == 0:  # rank 0's local chunk l >= 1 follows rank pp - 1's chunk l - 1, R forwards back
                dep[0] = f_end[(pp - 1) * n + g - per_round] if (g // per_round) % v >= 1 else 0.0
            ends = np.maximum(last[lo:hi], dep)
            ends += f_dur[at]
            last[lo:hi] = ends
            f_end[at] = ends
        lo, hi = max(0, warm0 - g), min(pp, warm0 - g + n)
        if lo < hi:  # backwards: B(d, k) after B(d + 1, k); rank pp - 1's after rank 0's, R backwards back
            at = b_at[lo:hi] + g
            dep = b_end[np.minimum(at + n, pp * n - 1)]  # rank d + 1's backward k
            if hi == pp:
                kb = g - warm0 + pp - 1
                dep[-1] = b_end[kb - per_round] if v - 1 - (kb // per_round) % v <= v - 2 else 0.0
            ends = np.maximum(last[lo:hi], dep)
            ends += b_dur[at]
            last[lo:hi] = ends
            b_end[at] = ends
        if g == check and g < steady_to - 1:  # once a period: do the last two periods repeat?
            check += period
            jumps = (steady_to - 1 - g) // period
            window = (np.arange(-period + 1, 1)[None, :] + g)
            f_idx, b_idx = (f_at[:, None] + window).ravel(), (b_at[:, None] + window).ravel()
            now = np.concatenate((f_end[f_idx], b_end[b_idx]))
            shift = _same_shift(now, np.concatenate((f_end[f_idx - period], b_end[b_idx - period])))
            if jumps and shift is not None:  # every later steady step repeats, shifted: jump whole periods
                f_end[f_idx + jumps * period] = f_end[f_idx] + jumps * shift
                b_end[b_idx + jumps * period] = b_end[b_idx] + jumps * shift
                last += jumps * shift
                g += jumps * period
                check = total
        g += 1
    return float(last.max())
