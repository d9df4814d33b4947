from __future__ import annotations

import numpy as np
import pytest

from focaltrack.models.metrics import combine, match


def test_perfect_match():
    pts = np.array([[0, 0, 0], [10, 0, 5], [0, 20, 50.0]])
    r = match(pts, pts, 1.0)
    assert (r.tp, r.fp, r.fn) == (3, 0, 0)
    assert r.jaccard == 1.0
    assert r.rmse_3d_um == 0.0


def test_shifted_within_and_beyond_tolerance():
    truth = np.array([[0, 0, 0], [50, 50, 50.0]])
    pred = truth + np.array([[0.3, 0.4, 0.0], [0, 0, 12.0]])
    r = match(pred, truth, 10.0)
    assert (r.tp, r.fp, r.fn) == (1, 1, 1)
    assert r.jaccard == pytest.approx(1 / 3)
    assert r.rmse_lateral_um == pytest.approx(0.5)
    assert r.rmse_axial_um == pytest.approx(0.0)


def test_missing_and_extra():
    truth = np.array([[0, 0, 0], [30, 0, 0], [60, 0, 0.0]])
    r = match(truth[:2], truth, 2.0)
    assert (r.tp, r.fp, r.fn) == (2, 0, 1)
    r = match(np.vstack([truth, [[90, 0, 0]]]), truth, 2.0)
    assert (r.tp, r.fp, r.fn) == (3, 1, 0)
    assert r.precision == pytest.approx(0.75)
    assert r.recall == 1.0


def test_duplicate_detection_counts_once():
    truth = np.array([[0, 0, 0.0]])
    pred = np.array([[0.1, 0, 0], [0.2, 0, 0.0]])
    r = match(pred, truth, 1.0)
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)
    assert r.errors_um[0, 0] == pytest.approx(0.1)  # the closer one is kept


def test_assignment_maximises_matches_not_greedy():
    # Greedy nearest matching would pair p0-t1 and leave t0 unmatched.
    truth = np.array([[0, 0, 0], [1.0, 0, 0]])
    pred = np.array([[0.9, 0, 0], [1.8, 0, 0]])
    r = match(pred, truth, 1.0)
    assert r.tp == 2


def test_empty_inputs_and_combine():
    r0 = match(np.zeros((0, 3)), np.zeros((0, 3)), 1.0)
    assert r0.jaccard == 1.0 and np.isnan(r0.rmse_3d_um)
    r1 = match(np.zeros((0, 3)), [[0, 0, 0]], 1.0)
    assert r1.fn == 1 and r1.jaccard == 0.0
    r2 = match([[0, 0, 0.5]], [[0, 0, 0]], 1.0)
    c = combine([r0, r1, r2])
    assert (c.tp, c.fp, c.fn) == (1, 0, 1)
    assert c.rmse_axial_um == pytest.approx(0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        match([[np.nan, 0, 0]], [[0, 0, 0]], 1.0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        match([[0, 0]], [[0, 0, 0]], 1.0)
    with pytest.raises(ValueError, match="tolerance"):
        match([[0, 0, 0]], [[0, 0, 0]], 0.0)


def test_score_frames_pools_sequences_and_mappings():
    from focaltrack.models.metrics import match_frames, pooled_summary, score_frames

    truth = [np.array([[0, 0, 0], [30, 0, 0.0]]), np.array([[5, 5, 5.0]])]
    pred = [truth[0] + [0, 0, 1.5], np.zeros((0, 3))]
    s = score_frames(pred, truth, (10.0, 1.0))
    assert s["frames"] == 2 and list(s["by_tolerance"]) == ["10um", "1um"]
    v = s["by_tolerance"]["10um"]
    assert (v["tp"], v["fp"], v["fn"], v["tolerance_um"]) == (2, 0, 1, 10.0)
    assert v["rmse_axial_um"] == pytest.approx(1.5)
    assert s["by_tolerance"]["1um"]["rmse_axial_um"] is None  # no match: strict JSON
    # the same as a mapping by frame index; frames in only one of the two are not scored
    s2 = score_frames({0: pred[0], 1: pred[1], 7: pred[0]}, {0: truth[0], 1: truth[1]}, (10.0, 1.0))
    assert s2 == s
    assert pooled_summary(match_frames(pred, truth, 10.0), 10.0) == v
    with pytest.raises(ValueError, match="frames"):
        score_frames(pred[:1], truth)


def test_match_in_region_counts_only_inside():
    from focaltrack.models.metrics import match_frames, match_in_region

    region = (0.0, 10.0, 0.0, 10.0)
    truth = np.array([[5, 5, 0], [20, 5, 0.0]])  # the second is outside
    pred = np.array([[5, 5, 0.5], [19, 5, 0], [8, 8, 0.0]])  # the third: FP inside
    m = match_in_region(pred, truth, 2.0, region)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert match_frames([pred], [truth], 2.0, region_um=region)[0].jaccard == m.jaccard
