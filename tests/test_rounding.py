import pytest

from embshard.planner.rounding import nearest, round_width, step_up, width_problem


@pytest.mark.parametrize(
    "raw, rule, expected",
    [
        (2.7, "multiple4", 4),
        (5.9, "multiple4", 4),
        (6.0, "multiple4", 8),  # ties go up
        (5.999999999999999, "multiple4", 8),  # float noise does not decide a tie (it printed "6 -> 4")
        (23.999999999999996, "pow2", 32),
        (20.499999999999996, "none", 21),
        (20.24, "multiple4", 20),
        (24.79, "multiple4", 24),
        (0.3, "multiple4", 4),  # never below FBGEMM's smallest width
        (2.7, "pow2", 4),
        (20.24, "pow2", 16),
        (24.79, "pow2", 32),
        (24.0, "pow2", 32),  # tie between 16 and 32 goes up
        (47.0, "pow2", 32),
        (20.24, "none", 20),
        (20.5, "none", 21),
        (0.2, "none", 1),
    ],
)
def test_nearest(raw, rule, expected):
    assert nearest(raw, rule) == expected


def test_note_says_what_and_why():
    assert round_width(2.7, "multiple4", lo=4).note == "2.7 -> 4 (multiple4, FBGEMM needs widths divisible by 4)"
    assert round_width(20.24, "pow2", lo=4).note == "20.24 -> 16 (pow2, nearest power of two)"
    assert round_width(16.0, "multiple4", lo=4).note is None  # nothing happened
    assert round_width(16.0000000001, "multiple4", lo=4).note is None  # float noise is not news


def test_clamped_to_min_and_base_dim():
    low = round_width(2.7, "multiple4", lo=8, hi=32)
    assert low.value == 8 and "raised to min_dim 8" in low.note
    high = round_width(50.0, "multiple4", lo=4, hi=32)
    assert high.value == 32 and "capped at base dim 32" in high.note


def test_none_flags_widths_fbgemm_cannot_take():
    r = round_width(7, "none", lo=1)
    assert r.value == 7 and "not divisible by 4" in r.note
    assert round_width(8, "none", lo=1).note is None


def test_width_problem_and_step_up():
    assert width_problem(16, "multiple4") is None
    assert "not a multiple of 4" in width_problem(6, "multiple4")
    assert "not a power of two" in width_problem(24, "pow2")
    assert width_problem(7, "none") is None
    assert [step_up(8, r) for r in ("multiple4", "pow2", "none")] == [12, 16, 9]
