"""Seed 000's chest landmarks placed by hand (cohort.landmarks): the table's checks, and how its points join the
CT-derived ones for the landmark detector."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bmdpipe.chest_landmarks import LANDMARKS
from bmdpipe.errors import ConfigError, InputError
from bmdpipe.io.xray import write_xray
from bmdpipe.samples import read_landmark_table
from bmdpipe.train.chest import load_landmark_views

SHEET = pd.DataFrame({"patient_id": ["p1", "p1", "p2"], "view": ["pa", "rot", "pa"]})


def _write(path, rows, sep=","):
    pd.DataFrame(rows, columns=["patient_id", "view", "landmark", "row", "col"]).to_csv(path, sep=sep, index=False)
    return path


def test_table_gives_each_view_its_points(tmp_path):
    table = read_landmark_table(_write(tmp_path / "marks.csv", [
        ("p1", "pa", "C7", "4.5", "60"), ("p1", "pa", "T12", 100, 62.25), ("p2", "pa", "clavicle_left_medial", 20, 70)]),
        SHEET)
    assert set(table) == {("p1", "pa"), ("p2", "pa")}
    p1 = table[("p1", "pa")]
    assert p1.shape == (16, 2)
    np.testing.assert_array_equal(p1[LANDMARKS.index("C7")], [4.5, 60.0])
    np.testing.assert_array_equal(p1[LANDMARKS.index("T12")], [100.0, 62.25])
    assert np.isnan(np.delete(p1, [LANDMARKS.index("C7"), LANDMARKS.index("T12")], axis=0)).all()
    tsv = read_landmark_table(_write(tmp_path / "marks.tsv", [("p1", "rot", "C7", 1, 2)], sep="\t"), SHEET)
    np.testing.assert_array_equal(tsv[("p1", "rot")][LANDMARKS.index("C7")], [1.0, 2.0])


@pytest.mark.parametrize("rows, message", [
    ([("p1", "pa", "C8", 1, 2)], r"row 1 \(line 2\): landmark 'C8' is not one of seed 000's 16"),
    ([("p1", "pa", "C7", 1, 2), ("p1", "lat", "C7", 1, 2)], r"row 2 \(line 3\): patient_id 'p1' with view 'lat' is not"),
    ([("p3", "pa", "C7", 1, 2)], r"row 1 \(line 2\): patient_id 'p3'"),
    ([("p1", "pa", "C7", -3, 2)], r"row 1 \(line 2\): row = '-3' is not a pixel coordinate"),
    ([("p1", "pa", "C7", 1, "12px")], r"row 1 \(line 2\): col = '12px' is not a pixel coordinate"),
    ([("p1", "pa", "C7", 1, 2), ("p1", "pa", "C7", 3, 4)], r"row 2 \(line 3\): C7 of patient 'p1' view 'pa' is "
                                                           r"already given in row 1"),
])
def test_bad_rows_are_named(tmp_path, rows, message):
    path = _write(tmp_path / "marks.csv", rows)
    with pytest.raises(ConfigError, match=rf"marks\.csv: {message}"):
        read_landmark_table(path, SHEET)


def test_missing_file_and_columns_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nothere\.csv: landmark table not found; set cohort\.landmarks"):
        read_landmark_table(tmp_path / "nothere.csv")
    pd.DataFrame({"patient_id": ["p1"], "view": ["pa"], "name": ["C7"], "x": [1], "y": [2]}).to_csv(
        tmp_path / "cols.csv", index=False)
    with pytest.raises(ConfigError, match=r"cols\.csv: column\(s\) landmark, row, col missing"):
        read_landmark_table(tmp_path / "cols.csv")


def _targets(root, patient, points, shape=(120, 100)):
    """One registered view ``pa`` of ``patient``: its targets (CT-derived landmarks) and its radiograph."""
    (root / "targets" / patient).mkdir(parents=True)
    (root / "targets" / patient / "targets.json").write_text(json.dumps({"status": "ok", "views": ["pa"]}))
    np.savez(root / "targets" / patient / "pa.npz", chest_landmarks_rows_cols=points)
    (root / "xray" / patient).mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_xray(rng.random(shape).astype(np.float32), (2.0, 2.0), root / "xray" / patient / "pa.nii.gz")


def test_hand_placed_points_replace_and_add_to_the_ct_ones(tmp_path):
    rng = np.random.default_rng(1)
    ct = np.column_stack([rng.uniform(5, 115, 16), rng.uniform(5, 95, 16)])
    _targets(tmp_path, "labelled", ct)  # CT labels naming every chest bone
    _targets(tmp_path, "unet", np.full((16, 2), np.nan))  # the U-Net's labels: no chest landmark
    roots = (tmp_path / "targets", tmp_path / "xray")
    assert [v.patient for v in load_landmark_views(["labelled", "unet"], *roots, 64)] == ["labelled"]
    hand = {("labelled", "pa"): np.full((16, 2), np.nan), ("unet", "pa"): ct[::-1].copy()}
    hand[("labelled", "pa")][LANDMARKS.index("C7")] = [3.0, 50.0]
    views = {v.patient: v for v in load_landmark_views(["labelled", "unet"], *roots, 64, manual=hand)}
    assert set(views) == {"labelled", "unet"}
    expected = ct.copy()
    expected[LANDMARKS.index("C7")] = [3.0, 50.0]
    np.testing.assert_array_equal(views["labelled"].truth, expected)  # the hand's C7, the CT's other 15
    np.testing.assert_array_equal(views["unet"].truth, ct[::-1])
    np.testing.assert_allclose(views["unet"].letterbox.from_grid(views["unet"].points), ct[::-1], atol=1e-9)
    # a point off the radiograph is an error naming the table, the view and the landmark
    hand[("unet", "pa")][LANDMARKS.index("T12")] = [130.0, 50.0]
    with pytest.raises(InputError, match=r"marks\.csv: T12 of patient 'unet' view 'pa' at row, col 130, 50 is outside "
                                         r"its radiograph \(120 × 100 pixels\)"):
        load_landmark_views(["labelled", "unet"], *roots, 64, manual=hand, manual_source="marks.csv")
