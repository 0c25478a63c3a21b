"""T-score reference tables (bmdpipe.tscore)."""

import pytest

from bmdpipe import tscore


def test_seed000_table_reproduces_the_seed_class_ranges():
    # seed 000 §IV-A-3: L1 osteopenia 0.81 ± 0.08 g/cm², i.e. T = −2.5 at 0.73 and T = −1 at 0.89
    for site, centre in (("L1", 0.81), ("L2", 0.85), ("L3", 0.90), ("L4", 0.88)):
        for sex in ("F", "M"):
            assert tscore.t_score(centre - 0.08, site, sex) == pytest.approx(-2.5, abs=2e-3)
            assert tscore.t_score(centre + 0.08, site, sex) == pytest.approx(-1.0, abs=2e-3)


def test_biology_direct_table_is_sex_specific():
    t_f = tscore.t_score(0.64, "L1", "F", "biology_direct_2025")
    t_m = tscore.t_score(0.64, "L1", "M", "biology_direct_2025")
    assert t_f == pytest.approx((0.64 - 0.960) / 0.128)
    assert t_m < t_f


def test_user_table_and_errors():
    table = {"F": {"L1": [1.0, 0.1]}}
    assert tscore.t_score(0.75, "L1", "F", table) == pytest.approx(-2.5)
    with pytest.raises(KeyError, match="site 'L5'"):
        tscore.t_score(0.75, "L5", "F", table)
    with pytest.raises(KeyError, match="unknown T-score reference"):
        tscore.reference_table("nope")


@pytest.mark.parametrize(("t", "cls"), [(-2.5, "osteoporosis"), (-2.49, "osteopenia"), (-1.0, "normal")])
def test_who_class(t, cls):
    assert tscore.who_class(t) == cls
