"""The number watch's detector: abnormal for the number itself and for the population, or not flagged."""

from __future__ import annotations

from posguard_server.domain.watch import Thresholds, judge, next_usual

T = Thresholds(min_events=20, own_ratio=5.0, population_ratio=10.0)


def window(**numbers: dict[str, float]) -> dict[str, dict[str, float]]:
    return dict(numbers)


def test_a_number_far_above_itself_and_the_others_is_flagged_with_every_abnormal_count() -> None:
    counts = window(
        hot={"transactions": 40, "merchants": 30, "verifications": 3},
        a={"transactions": 2, "merchants": 1},
        b={"transactions": 1, "merchants": 1},
        c={"transactions": 3, "merchants": 2},
    )
    flagged = judge(counts, {}, T, window_words="in 60 s")
    assert set(flagged) == {"hot"}
    # Strongest first: 30 merchants is 30x the others' median 1; 40 transactions is 20x their median 2.
    assert [r.code for r in flagged["hot"]] == ["WATCH_MERCHANTS", "WATCH_TRANSACTIONS"]
    assert [r.weight for r in flagged["hot"]] == [1.0, round(20 / 30, 3)]
    assert flagged["hot"][1].message == (
        "40 transactions in 60 s: 40.0x this number's usual 0.0, "
        "20.0x the median 2 of the other numbers in use"
    )


def test_a_number_that_is_always_this_busy_is_not_flagged() -> None:
    counts = window(shop={"verifications": 50}, a={"verifications": 1}, b={"verifications": 2})
    assert judge(counts, {"shop": {"verifications": 45.0}}, T, window_words="") == {}
    assert set(judge(counts, {"shop": {"verifications": 5.0}}, T, window_words="")) == {"shop"}


def test_few_events_or_a_busy_population_flag_no_one() -> None:
    assert judge(window(x={"refused_codes": 19}), {}, T, window_words="") == {}
    busy = window(**{f"n{i}": {"verifications": 30} for i in range(5)})
    assert judge(busy, {}, T, window_words="") == {}
    # Alone in the window, the others' median is taken as none (1): a hammered number is still flagged.
    assert set(judge(window(x={"failed_verifications": 25}), {}, T, window_words="")) == {"x"}


def test_usual_counts_start_at_the_first_window_and_then_move_slowly() -> None:
    first = next_usual(None, {"verifications": 10})
    assert first["verifications"] == 10.0
    assert first["transactions"] == 0.0
    assert next_usual(first, {"verifications": 60})["verifications"] == 20.0
