"""The paper's claims judged on paired differences per seed with a 95% interval, on synthetic
replica rows whose right verdict is known. The shipped stages.yaml's claims, in its order:
0/1 settings 2-6 beat 1 (accuracy/loss), 2 setting 5 is within 0.5 points of 3, 3/4 setting 5
beats 6, 5/6 setting 4 is the best, 7/8 setting 5 saves at least 15%."""

from pathlib import Path

import pytest
import scipy.stats

from pipeline.claims import check_claims, interval
from pipeline.plan import build_plan

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return build_plan(REPO / "stages.yaml", "smoke", tmp_path_factory.mktemp("runs"))


def rows(accuracy: dict[str, list[float]], loss: dict[str, list[float]] | None = None,
         saving: dict[str, list[float | None]] | None = None) -> list[dict]:
    """Replica rows: accuracy in %, loss in nats, saving as a fraction, per setting and seed."""
    out = []
    for setting, accs in accuracy.items():
        for replica, acc in enumerate(accs):
            s = (saving or {}).get(setting, [None] * len(accs))[replica]
            out.append({"setting": setting, "replica": replica, "eval_accuracy": acc / 100,
                        "eval_loss": (loss or {}).get(setting, [5.0] * len(accs))[replica],
                        "saving_to_baseline_acc": s, "saving_to_baseline_loss": None})
    return out


def test_the_interval_is_students_t_on_the_paired_differences():
    iv = interval([1.0, 1.2, 0.8, 1.5])
    sem = scipy.stats.sem([1.0, 1.2, 0.8, 1.5])
    low, high = scipy.stats.t.interval(0.95, 3, loc=1.125, scale=sem)
    assert (iv.mean, iv.low, iv.high, iv.pairs) == pytest.approx((1.125, low, high, 4))
    one = interval([2.0])
    assert (one.low, one.high, one.text(".2f")) == (None, None, "+2.00")


def test_a_consistent_win_holds_and_a_consistent_loss_contradicts(plan):
    claims = check_claims(plan, rows({"6": [30, 31, 29], "5": [31, 32.2, 29.8]},
                                     loss={"6": [4.0, 4.1, 3.9], "5": [4.1, 4.22, 3.98]}))
    by_accuracy, by_loss = claims[3], claims[4]
    # Differences 1.0, 1.2, 0.8: mean 1, t(0.975, 2) * 0.2 / sqrt(3) = 0.497.
    assert by_accuracy["measured"] == "5: +1.00 [+0.50, +1.50] points vs 6"
    assert by_accuracy["verdict"] == "holds" and by_accuracy["seeds"] == 3
    # The loss of 5 is higher in every seed: the claim that 5 is better is contradicted.
    assert by_loss["verdict"] == "contradicted" and by_loss["measured"].startswith("5: +0.100 [")


def test_a_difference_that_changes_sign_across_seeds_is_inconclusive(plan):
    claims = check_claims(plan, rows({"6": [30, 30, 30], "5": [31, 29, 30.5]}))
    assert claims[3]["verdict"] == "inconclusive"


def test_one_seed_gives_no_interval(plan):
    claims = check_claims(plan, rows({"6": [30], "5": [31]}))
    assert claims[3] == {"claim": claims[3]["claim"], "metric": "accuracy",
                         "measured": "5: +1.00 points vs 6", "verdict": "one seed", "seeds": 1}


def test_several_comparisons_hold_together_and_one_contradiction_decides(plan):
    base = [30, 31, 29]
    wins = {k: [b + 1 + k_i / 10 + j / 10 for j, b in enumerate(base)]
            for k_i, k in enumerate("2345")}
    claims = check_claims(plan, rows({"1": base, **wins, "6": [b + 1 for b in base]}))
    assert claims[0]["verdict"] == "holds"
    claims = check_claims(plan, rows({"1": base, **wins, "6": [b - 1 for b in base]}))
    assert claims[0]["verdict"] == "contradicted" and "6: -1.00 [-1.00, -1.00]" in \
        claims[0]["measured"]
    # Setting 4 is best by at least a point in every seed; 5 is the closest.
    best = {"1": base, "2": base, "3": base, "4": [b + 3 for b in base],
            "5": [b + 2 + n for b, n in zip(base, [0.1, -0.1, 0.2])], "6": base}
    claims = check_claims(plan, rows(best))
    assert claims[5]["verdict"] == "holds"
    assert claims[5]["measured"].startswith("4 - 5 (the closest) = ")


@pytest.mark.parametrize("differences,verdict", [
    ([0.1, 0.0, 0.2], "holds"),         # [-0.15, +0.35]: inside ±0.5
    ([2.0, 2.1, 1.9], "contradicted"),  # wholly above 0.5
    ([0.4, 0.6, 0.5], "inconclusive"),  # [+0.25, +0.75]: across the line
])
def test_close_settings_are_judged_against_the_tolerance(plan, differences, verdict):
    three = [30, 31, 29]
    claims = check_claims(plan, rows({"3": three, "5": [a + d for a, d in
                                                           zip(three, differences)]}))
    assert claims[2]["verdict"] == verdict, claims[2]


@pytest.mark.parametrize("savings,verdict,measured", [
    ([0.25, 0.27, 0.23], "holds", "5 saves +25 [+20, +30]% (claim: >= 15%)"),
    ([0.08, 0.10, 0.06], "contradicted", "5 saves +8 [+3, +13]% (claim: >= 15%)"),
    ([0.25, None, 0.23], "inconclusive",
     "reached the baseline's accuracy in 2 of 3 seeds (claim: >= 15%)"),
    ([None, None, None], "contradicted", "never reached the baseline's accuracy"),
])
def test_a_saving_is_judged_on_its_interval_and_on_the_seeds_that_reach(plan, savings, verdict,
                                                                        measured):
    claims = check_claims(plan, rows({"1": [30, 31, 29], "5": [30, 31, 29]},
                                     saving={"5": savings}))
    assert (claims[7]["verdict"], claims[7]["measured"]) == (verdict, measured)


def test_a_claim_on_a_setting_without_runs_is_undecided(plan):
    claims = check_claims(plan, rows({"1": [30]}))
    assert {c["verdict"] for c in claims} == {"—"}
