"""``autopar bench --compare BASELINE.json``: is this run a regression of the baseline run?

Pure Python on two bench records (docs/bench.md). A layout fails when

- its step time regressed: the median is more than ``max_regression`` above the baseline's **and** the
  middle halves of the two runs do not overlap (this run's 25th percentile is above the baseline's 75th),
  so a difference inside the measured noise is reported but does not fail;
- it stopped fitting: the baseline predicted it fits and this run does not, or it fails to run;
- its loss differs: any step's loss differs from the baseline's by more than ``loss_rtol`` relative
  (same code, seed and batches give the same losses to rounding);

and the run fails when autopar's chosen plan changed. Layouts are matched by name, the search's top-k by
their layout (the set may change), and the plain-DDP baseline by name (its change says how much the
machine itself moved).
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.errors import AutoparError

DEFAULT_LOSS_RTOL = 1e-4
"""Relative loss difference that fails: the same code on the same batches repeats its losses to about 1e-7
in fp32 (one summation order per layout), a changed kernel or step semantics moves them by far more."""


@dataclass(frozen=True)
class Finding:
    layout: str
    what: str
    """``slower``, ``slower (noise)``, ``faster``, ``fits no more``, ``loss``, ``chosen``, ``missing``."""
    message: str
    failed: bool


def parse_threshold(text: str) -> float:
    """``5%`` or ``0.05`` as 0.05.

    Raises:
        AutoparError: not a number, or outside (0, 10).
    """
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise AutoparError(f"--max-regression {text!r}: use a percentage such as 5% (or a fraction, 0.05)") from None
    if not 0 < value < 10:
        raise AutoparError(f"--max-regression {text!r}: use a percentage above 0 and below 1000%")
    return value


def _key(layout: dict) -> tuple[str, str]:
    return ("top", layout["layout"]) if layout["kind"] == "top" else ("name", layout["name"])


def _label(layout: dict) -> str:
    return f"{layout['name']} ({layout['layout']})" if layout.get("layout") else layout["name"]


def compare(current: dict, baseline: dict, *, max_regression: float,
            loss_rtol: float = DEFAULT_LOSS_RTOL) -> list[Finding]:
    """Every finding of ``current`` against ``baseline`` (see the module docstring)."""
    for name, record in (("this run", current), ("baseline", baseline)):
        if record.get("format") != "autopar-bench":
            raise AutoparError(f"--compare: {name} is not an autopar bench record (format "
                               f"{record.get('format')!r}); pass a file written by autopar bench --json")
    findings = _chosen(current, baseline)
    now = {_key(x): x for x in current["layouts"]}
    for base in baseline["layouts"]:
        cur = now.get(_key(base))
        if cur is None:
            findings.append(Finding(_label(base), "missing", f"{_label(base)} is in the baseline but was not "
                                    "benched in this run", failed=False))
            continue
        findings += _fits(cur, base) + _time(cur, base, max_regression) + _loss(cur, base, loss_rtol)
    return findings


def _chosen(current: dict, baseline: dict) -> list[Finding]:
    def chosen(record: dict) -> dict | None:
        return next((x for x in record["layouts"] if x["kind"] == "chosen"), None)

    cur, base = chosen(current), chosen(baseline)
    if cur is None or base is None or cur.get("plan_digest") == base.get("plan_digest"):
        return []
    return [Finding("autopar", "chosen", f"autopar's chosen plan changed: {base['layout']} (digest "
                    f"{base['plan_digest']}) in the baseline, {cur['layout']} (digest {cur['plan_digest']}) now",
                    failed=True)]


def _fits(cur: dict, base: dict) -> list[Finding]:
    if cur.get("error"):
        return [Finding(_label(cur), "fits no more", f"{_label(cur)} failed to run: {cur['error']}", failed=True)]
    was = (base.get("predicted") or {}).get("fits")
    now = (cur.get("predicted") or {}).get("fits")
    if was and now is False:
        over = cur["predicted"].get("over_bytes", 0) / 2**20
        return [Finding(_label(cur), "fits no more", f"{_label(cur)} is predicted to fit no more ({over:.0f} MiB "
                        "over its device); it fitted in the baseline", failed=True)]
    return []


def _time(cur: dict, base: dict, threshold: float) -> list[Finding]:
    c, b = cur["measured"]["step_time"], base["measured"]["step_time"]
    if not c.get("median_s") or not b.get("median_s"):
        return []
    ratio = c["median_s"] / b["median_s"]
    figures = (f"median step {c['median_s']:.4g} s (p25-p75 {c['p25_s']:.4g}-{c['p75_s']:.4g}) against "
               f"{b['median_s']:.4g} s ({b['p25_s']:.4g}-{b['p75_s']:.4g}) in the baseline: {ratio - 1:+.1%}")
    if ratio > 1 + threshold:
        beyond = c["p25_s"] > b["p75_s"]
        what = "slower" if beyond else "slower (noise)"
        why = (f"beyond the +{threshold:.0%} allowed and beyond the measured spread" if beyond else
               f"above the +{threshold:.0%} allowed but inside the measured spread (the middle halves overlap)")
        return [Finding(_label(cur), what, f"{_label(cur)} regressed: {figures}, {why}", failed=beyond)]
    if ratio < 1 - threshold and c["p75_s"] < b["p25_s"]:
        return [Finding(_label(cur), "faster", f"{_label(cur)} is faster: {figures}", failed=False)]
    return []


def _loss(cur: dict, base: dict, rtol: float) -> list[Finding]:
    for step, (x, y) in enumerate(zip(cur["measured"]["losses"], base["measured"]["losses"])):
        if x is None or y is None:
            continue
        if abs(x - y) > rtol * max(abs(y), 1e-12):
            return [Finding(_label(cur), "loss", f"{_label(cur)}: the loss differs at step {step}: {x:.7g} now, "
                            f"{y:.7g} in the baseline (relative {abs(x - y) / abs(y):.2e}, allowed {rtol:.0e})",
                            failed=True)]
    return []


def failed(findings: list[Finding]) -> bool:
    return any(f.failed for f in findings)
