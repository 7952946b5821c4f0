"""TAR at FAR (TMR at FMR): the largest true-accept rate any threshold reaches with a false-accept
rate no higher than the target, on hand-computed score lists.

Every expected figure below is worked out by counting in the comments; none comes from the code.
A threshold ``t`` accepts a pair when its score is ``>= t``.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.pipeline import pairs
from training.evaluate import tar_at_far

# The example of issue 13: ten genuine and ten impostor scores.
GENUINE = [0.95, 0.93, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.05]
IMPOSTOR = [0.90, 0.50, 0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.10]


def _scores(genuine, impostor):
    scores = np.array(genuine + impostor, dtype=np.float64)
    same = np.array([True] * len(genuine) + [False] * len(impostor))
    return scores, same


def _counted(scores, same, threshold):
    """(TAR, FAR) of a threshold, by counting."""
    accepted = scores >= threshold
    return float(np.mean(accepted[same])), float(np.mean(accepted[~same]))


def test_issue_example_tar_is_0_9_at_far_0_1():
    # One impostor (0.90) may be accepted at FAR 0.1; any threshold in (0.50, 0.55] accepts it
    # and the nine genuine scores >= 0.55: TAR 9/10.  (The nearest-FAR ROC point gave 0.2.)
    scores, same = _scores(GENUINE, IMPOSTOR)
    point = tar_at_far(scores, same, [0.1])["1e-01"]
    assert point["tar"] == pytest.approx(0.9)
    assert point["far"] == pytest.approx(0.1)
    assert 0.50 < point["threshold"] <= 0.55
    assert _counted(scores, same, point["threshold"]) == pytest.approx((0.9, 0.1))


@pytest.mark.parametrize(
    "far,tar,measured",
    [
        # below 1/10, the smallest nonzero FAR: no impostor may pass, the threshold exceeds 0.90,
        # and only 0.95 and 0.93 remain: TAR 0.2 at FAR 0
        (0.01, 0.2, 0.0),
        (0.0999, 0.2, 0.0),
        # two impostors (0.90, 0.50) allowed: threshold in (0.45, 0.50]; genuine 0.05 still fails
        (0.2, 0.9, 0.2),
        # 0.25 allows two impostors (2/10 <= 0.25 < 3/10): same point as 0.2
        (0.25, 0.9, 0.2),
        # every impostor allowed: any threshold, the lowest accepts every genuine score
        (1.0, 1.0, 1.0),
    ],
)
def test_issue_example_at_other_targets(far, tar, measured):
    scores, same = _scores(GENUINE, IMPOSTOR)
    point = next(iter(tar_at_far(scores, same, [far]).values()))
    assert point["tar"] == pytest.approx(tar)
    assert point["far"] == pytest.approx(measured)
    assert point["far"] <= far
    assert _counted(scores, same, point["threshold"]) == pytest.approx((tar, measured))


def test_a_genuine_score_tied_with_an_impostor_cannot_be_taken_without_it():
    # genuine 0.9 0.8 0.7 0.6, impostors 0.8 0.5 0.4 0.3: the genuine 0.8 and the impostor 0.8
    # pass or fail together.  FAR 0.2 < 1/4 allows no impostor: threshold > 0.8, TAR 1/4.
    # (The nearest ROC point to 0.2 is FAR 0.25, TAR 0.5: above the target.)
    scores, same = _scores([0.9, 0.8, 0.7, 0.6], [0.8, 0.5, 0.4, 0.3])
    point = tar_at_far(scores, same, [0.2])["2e-01"]
    assert (point["tar"], point["far"]) == pytest.approx((0.25, 0.0))
    assert point["threshold"] > 0.8
    # FAR 0.25 admits the impostor 0.8, and with it the threshold drops to (0.5, 0.6]: TAR 1
    point = tar_at_far(scores, same, [0.25])["2e-01"]
    assert (point["tar"], point["far"]) == pytest.approx((1.0, 0.25))
    assert 0.5 < point["threshold"] <= 0.6


def test_tied_impostors_at_the_boundary_are_all_excluded():
    # ten impostors, two tied at the top (0.7): FAR 0.1 allows one, but no threshold accepts
    # exactly one of the pair, so FAR must be 0: threshold > 0.7, TAR = genuine above 0.7 = 2/5
    scores, same = _scores([0.95, 0.8, 0.7, 0.65, 0.2], [0.7, 0.7] + [0.3] * 8)
    point = tar_at_far(scores, same, [0.1])["1e-01"]
    assert (point["tar"], point["far"]) == pytest.approx((0.4, 0.0))
    assert point["threshold"] > 0.7
    # at FAR 0.2 both tied impostors may pass: threshold in (0.3, 0.65], TAR 4/5
    point = tar_at_far(scores, same, [0.2])["2e-01"]
    assert (point["tar"], point["far"]) == pytest.approx((0.8, 0.2))


def test_no_genuine_score_above_every_impostor_gives_tar_zero_at_far_zero():
    scores, same = _scores([0.4, 0.3], [0.9, 0.2, 0.1, 0.0])
    point = tar_at_far(scores, same, [1e-3])["1e-03"]
    assert (point["tar"], point["far"]) == (0.0, 0.0)
    assert point["threshold"] > 0.9
    assert point["resolvable"] is False  # 4 impostors cannot measure a FAR of 1e-3


def test_separable_scores_give_tar_one_at_every_far():
    scores, same = _scores([0.9, 0.8, 0.7], [0.3, 0.2, 0.1])
    for point in tar_at_far(scores, same).values():
        assert (point["tar"], point["far"]) == (1.0, 0.0)
        assert 0.3 < point["threshold"] <= 0.7


def test_eval_pairs_tmr_is_an_achievable_point_not_an_interpolation():
    # 100 impostors: one at 0.8 (tied with a genuine score), 99 at 0.1; genuine 0.9 0.8 0.7 0.6.
    # FMR 1e-2 allows the impostor 0.8: TMR 1.  FMR 1e-3 allows none: threshold > 0.8, TMR 1/4.
    # (Interpolating the ROC between (0, 0.25) and (0.01, 0.5) reported 0.275 at 1e-3, a rate no
    # threshold reaches.)
    scores, same = _scores([0.9, 0.8, 0.7, 0.6], [0.8] + [0.1] * 99)
    points = pairs.tmr_at_fmr_points(scores, same)
    assert points == {
        "tmr_at_fmr_0.001": pytest.approx(0.25),
        "tmr_at_fmr_0.01": pytest.approx(1.0),
    }


def test_calibrated_thresholds_report_the_same_operating_point():
    # the card's calibration and TAR@FAR are one rule: at FMR 1e-2 on the example above
    scores, same = _scores([0.9, 0.8, 0.7, 0.6], [0.8] + [0.1] * 99)
    calibrated = pairs.fmr_thresholds(scores[~same], scores[same])
    point = pairs.operating_point(scores[~same], scores[same], 1e-2)
    assert calibrated["fmr_1e-2"]["tmr"] == point["tmr"] == 1.0
    assert calibrated["fmr_1e-2"]["fmr"] == point["fmr"] == 0.01
    assert calibrated["fmr_1e-3"]["tmr"] == 0.25
    with pytest.raises(ValueError, match="impostor"):
        pairs.operating_point(np.array([]), scores[same], 1e-2)


def test_the_target_is_read_as_the_decimal_it_is_written_as():
    # 0.29 of 100 impostors allows 29 (in binary floating point 0.29 * 100 = 28.999999999999996):
    # impostors 0.01 ... 1.00, so the 29 highest (0.72 ... 1.00) may pass: threshold in
    # (0.71, 0.72], which accepts the genuine 0.715 and not 0.705 (28 allowed would put it in
    # (0.72, 0.73] and accept neither)
    impostor = [i / 100 for i in range(1, 101)]
    scores, same = _scores([0.715, 0.705], impostor)
    point = pairs.operating_point(scores[~same], scores[same], 0.29)
    assert point["fmr"] == pytest.approx(0.29)
    assert 0.71 < point["threshold"] <= 0.72
    assert point["tmr"] == 0.5
