"""report.py: accuracies with standard errors, paired gains, the warnings a run prints."""
import pytest

import report


def test_rate_is_the_mean_with_the_standard_error_over_questions():
    r = report.rate("acc", [1, 0, 1, 1])
    # sample variance 0.25, n 4
    assert r["acc"] == 0.75 and r["acc_se"] == pytest.approx((0.25 / 4) ** 0.5)
    assert report.rate("acc", [1]) == {"acc": 1.0, "acc_se": 0.0}


def test_paired_gain_counts_the_questions_that_changed_and_mcnemar_p():
    before = [0] * 10 + [1] * 5 + [0] * 85
    after = [1] * 10 + [1] * 5 + [0] * 85  # 10 questions turned right, none wrong
    g = report.paired_gain(before, after)
    assert g["eval_gain"] == pytest.approx(0.10) and (g["eval_gain_up"],
                                                      g["eval_gain_down"]) == (10, 0)
    # two-sided exact binomial, 10 of 10 one way
    assert g["eval_gain_p"] == pytest.approx(2 / 2 ** 10)
    variance = sum((d - 0.1) ** 2 for d in [1] * 10 + [0] * 90) / 99
    assert g["eval_gain_se"] == pytest.approx((variance / 100) ** 0.5)
    # as many turned wrong as right: no evidence at all
    even = report.paired_gain([1, 0, 1, 0], [0, 1, 0, 1])
    assert even["eval_gain"] == 0 and even["eval_gain_p"] == 1.0


def train_row(step, **kw):
    row = {"step": step, "reward_mean": 0.5, "entropy": 0.6, "completion_len_mean": 60.0,
           "len_right_mean": 58.0, "partial_credit_share": 0.0}
    return {**row, **kw}


@pytest.mark.parametrize("key, what", [("completion_len_mean", "mean completion length"),
                                       ("len_right_mean", "length of right answers")])
def test_answers_a_third_shorter_within_five_steps_are_warned_about(key, what):
    rows = [train_row(s) for s in range(1, 6)]
    base = train_row(0)[key]
    assert report.collapse_warnings(rows + [train_row(6, **{key: 0.5 * base})]).count("\n") == 1
    assert what in report.collapse_warnings(rows + [train_row(6, **{key: 0.66 * base})])
    assert report.collapse_warnings(rows + [train_row(6, **{key: 0.7 * base})]) == ""
    slow = [train_row(1)] + [train_row(s, **{key: 0.8 * base}) for s in range(2, 8)]
    # step 1 is too old
    assert report.collapse_warnings(slow + [train_row(8, **{key: 0.6 * base})]) == ""


def test_entropy_falling_is_no_warning_and_a_first_step_warns_of_nothing():
    rows = [train_row(s) for s in range(1, 6)]
    assert report.collapse_warnings(rows + [train_row(6,
                                                      entropy=0.1 * train_row(0)["entropy"])]) == ""
    assert report.collapse_warnings([train_row(1)]) == ""
    assert report.collapse_warnings([train_row(1), train_row(2, len_right_mean=float("nan"))]) == ""
    assert report.collapse_warnings([{"step": 0, "eval_accuracy": 0.3}]) == ""


def test_most_correctness_from_partial_credit_is_warned_about():
    assert "--partial_credit" in report.collapse_warnings([train_row(1, partial_credit_share=0.6)])
    assert report.collapse_warnings([train_row(1, partial_credit_share=0.4)]) == ""
