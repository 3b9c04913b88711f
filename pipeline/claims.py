"""The paper's claims, judged on the runs with the uncertainty a reader needs.

A claim compares settings on their final accuracy (in points), loss (in nats) or GLUE average
(in points, of a fine-tuned model: see `pipeline.glue_report`). Each
setting's run of replica r is paired with the other setting's run of the same replica (the same
seeds), and the claim is judged on the mean of the paired differences and its 95% t interval:

- holds: the interval lies wholly on the side the claim says;
- contradicted: it lies wholly on the other side;
- inconclusive: it straddles the line;
- one seed: a single pair gives no interval (its difference is still shown);
- —: a setting the claim names has no done run.

A claim over several comparisons (`better` with several settings, `best`) holds when every
comparison holds and is contradicted when any one is.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import scipy.stats

from pipeline.plan import Plan

HOLDS, CONTRADICTED, INCONCLUSIVE, ONE_SEED, UNDECIDED = (
    "holds", "contradicted", "inconclusive", "one seed", "—")


@dataclass(frozen=True)
class Measured:
    """What claims on one metric are judged on: the value per (label, replica), in the
    claim's unit, and each setting's saving per replica (None where it never reached the
    baseline)."""

    value: dict[tuple[str, int], float]
    savings: dict[str, list[float | None]]


def measured(rows: list[dict], metric: str) -> Measured:
    """The final accuracy (in points) or loss of the report's replica rows."""
    scale, key = (100, "acc") if metric == "accuracy" else (1, "loss")
    savings: dict[str, list[float | None]] = {}
    for r in rows:
        savings.setdefault(r["setting"], []).append(r[f"saving_to_baseline_{key}"])
    return Measured({(r["setting"], r["replica"]): scale * r[f"eval_{metric}"] for r in rows},
                    savings)


@dataclass(frozen=True)
class Interval:
    """The mean of paired differences and its 95% t interval (None with one pair)."""

    mean: float
    low: float | None
    high: float | None
    pairs: int

    def text(self, f: str) -> str:
        shown = f"{self.mean:+{f}}"
        return shown if self.low is None else f"{shown} [{self.low:+{f}}, {self.high:+{f}}]"


def interval(values: list[float], confidence: float = 0.95) -> Interval:
    """The mean of `values` and its two-sided t interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, None, None, len(values))
    t = scipy.stats.t.ppf(0.5 + confidence / 2, len(values) - 1)
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def side(iv: Interval, sign: int, bound: float = 0.0) -> str:
    """The verdict on "the mean is above `bound`" (sign +1) or "below it" (sign -1)."""
    if iv.low is None:
        return ONE_SEED
    low, high = (iv.low - bound, iv.high - bound) if sign > 0 else (bound - iv.high, bound - iv.low)
    return HOLDS if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """All of several comparisons: contradicted if any is, holds if all do."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return ONE_SEED if ONE_SEED in verdicts else INCONCLUSIVE


def check_claims(plan: Plan, rows: list[dict], glue: Measured | None = None) -> list[dict]:
    """Each claim of the stages file against the replica rows of the report (one per setting
    and replica) or, on GLUE, the fine-tuned models (`glue`): what was measured (paired
    differences, [95% interval]), the verdict and the number of seeds it rests on."""
    results = []
    for c in plan.stages.claims:
        unit, sign, f = (("nats", -1, ".3f") if c.metric == "loss" else ("points", 1, ".2f"))
        found = glue if c.metric == "glue" else measured(rows, c.metric)
        result = {"claim": c.claim, "metric": c.metric, "measured": "", "verdict": UNDECIDED,
                  "seeds": 0}
        if found is not None and all(any(label == k for label, _ in found.value)
                                     for k in c.settings()):
            result.update(_judge(c, found, sign, unit, f))
        results.append(result)
    return results


def _paired(value: dict, a: str, b: str) -> Interval:
    """The interval of a - b over the replicas both settings have."""
    replicas = sorted(r for k, r in value if k == a and (b, r) in value)
    return interval([value[a, r] - value[b, r] for r in replicas])


def _judge(c, found: Measured, sign: int, unit: str, f: str) -> dict:
    value = found.value
    if c.better is not None:
        ivs = {k: _paired(value, k, c.than) for k in c.better}
        return {"measured": "; ".join(f"{k}: {iv.text(f)}" for k, iv in ivs.items())
                + f" {unit} vs {c.than}",
                "verdict": combine([side(iv, sign) for iv in ivs.values()]),
                "seeds": min(iv.pairs for iv in ivs.values())}
    if c.best is not None:
        others = sorted({k for k, _ in value if k != c.best and "@" not in k})
        ivs = {k: _paired(value, c.best, k) for k in others}
        closest = min(others, key=lambda k: sign * ivs[k].mean)
        return {"measured": f"{c.best} - {closest} (the closest) = "
                            f"{ivs[closest].text(f)} {unit}",
                "verdict": combine([side(iv, sign) for iv in ivs.values()]),
                "seeds": min(iv.pairs for iv in ivs.values())}
    if c.close is not None:
        a, b = c.close
        iv = _paired(value, a, b)
        if iv.low is None:
            verdict = ONE_SEED
        elif -c.within < iv.low and iv.high < c.within:
            verdict = HOLDS
        elif iv.low > c.within or iv.high < -c.within:
            verdict = CONTRADICTED
        else:
            verdict = INCONCLUSIVE
        return {"measured": f"{a} - {b} = {iv.text(f)} {unit} (within ±{c.within:g}?)",
                "verdict": verdict, "seeds": iv.pairs}
    savings = found.savings.get(c.saving, [])
    reached = [s for s in savings if s is not None]
    claim = f"(claim: >= {100 * c.at_least:.0f}%)"
    if not reached:
        return {"measured": f"never reached the baseline's {c.metric}",
                "verdict": CONTRADICTED if len(savings) > 1 else ONE_SEED, "seeds": len(savings)}
    if len(reached) < len(savings):
        return {"measured": f"reached the baseline's {c.metric} in {len(reached)} of "
                            f"{len(savings)} seeds {claim}",
                "verdict": INCONCLUSIVE, "seeds": len(savings)}
    iv = interval([100 * s for s in reached])
    return {"measured": f"{c.saving} saves {iv.text('.0f')}% {claim}",
            "verdict": side(iv, +1, 100 * c.at_least), "seeds": len(savings)}
