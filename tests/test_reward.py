"""Specification of reward.py: answer extraction, format, correctness, length."""

import random

import pytest
import reasoning_gym as rg

from reward import (
    add_rewards, correctness_reward, extract_answer, format_reward,
    length_rewards, random_correctness, score_completion, total_reward,
    work_lines,
)

# (id, completion, extracted answer, format reward)
COMPLETIONS = [
    ("no_tags", "The answer is Yes.", None, 0.0),
    ("tight_tags", "<think>x</think><answer>Yes</answer>", "Yes", 1.0),
    ("newlines", "<think>\nAll cats are animals.\n</think>\n<answer>\nYes\n</answer>\n", "Yes",
     1.0),
    ("surrounding_ws", "  \n<think> x </think>  \n\n  <answer>  No  </answer>  \n", "No", 1.0),
    ("multiline_answer", "<think>x</think><answer>\nline 1\nline 2\n</answer>", "line 1\nline 2",
     1.0),
    ("upper_case_tags", "<THINK>x</THINK><ANSWER>Yes</ANSWER>", "Yes", 1.0),
    ("two_answers_last_wins", "<think>x</think><answer>No</answer><answer>Yes</answer>", "Yes",
     0.0),
    ("draft_answer_in_think", "<think>maybe <answer>No</answer>?</think><answer>Yes</answer>",
     "Yes", 0.0),
    ("empty_answer", "<think>x</think><answer> </answer>", "", 0.0),
    ("answer_without_think", "<answer>Yes</answer>", "Yes", 0.0),
    ("think_without_answer", "<think>I am still thinking</think>", None, 0.0),
    ("unclosed_answer", "<think>x</think><answer>Yes", None, 0.0),
    ("unclosed_think", "<think>x<answer>Yes</answer>", "Yes", 0.0),
    ("text_after_answer", "<think>x</think><answer>Yes</answer> Hope this helps!", "Yes", 0.0),
    ("text_before_think", "Sure! <think>x</think><answer>Yes</answer>", "Yes", 0.0),
    ("text_between_blocks", "<think>x</think> so: <answer>Yes</answer>", "Yes", 0.0),
    ("answer_before_think", "<answer>Yes</answer><think>x</think>", "Yes", 0.0),
    ("two_think_blocks", "<think>a</think><think>b</think><answer>Yes</answer>", "Yes", 0.0),
    ("logic_symbols", "<think>P, not S</think>\n<answer>¬(P ↔ S) ∨ (Q ∧ R) → P</answer>",
     "¬(P ↔ S) ∨ (Q ∧ R) → P", 1.0),
]
IDS = [c[0] for c in COMPLETIONS]


@pytest.mark.parametrize("_id, text, answer, _fmt", COMPLETIONS, ids=IDS)
def test_extract_takes_last_complete_answer_stripped(_id, text, answer, _fmt):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("_id, text, _answer, fmt", COMPLETIONS, ids=IDS)
def test_format_requires_exactly_think_then_answer(_id, text, _answer, fmt):
    assert format_reward(text) == fmt


def test_extract_empty_answer_is_empty_string_not_none():
    assert extract_answer("<answer></answer>") == ""


# --- correctness through the real reasoning-gym scorers ---------------------


@pytest.fixture(scope="module")
def syllogism():
    ds = rg.create_dataset("syllogism", size=5, seed=1)
    entry = ds[0]
    assert entry["answer"] == "Yes"
    return ds, entry


@pytest.fixture(scope="module")
def logic():
    ds = rg.create_dataset("propositional_logic", size=5, seed=1)
    entry = ds[4]
    # Oracle answer is None: the scorer checks that the answer follows from these.
    assert entry["answer"] is None
    assert entry["metadata"]["premises"] == ["¬(P ↔ S)", "P", "P"]
    return ds, entry


@pytest.mark.parametrize(
    "text, score, correct", [
        ("<think>x</think><answer>Yes</answer>", 1.0, True),
        ("<think>x</think><answer>\n  Yes \n</answer>", 1.0, True),  # stripped before scoring
        ("<think>x</think><answer>No</answer>", 0.0, False),
        ("<think>x</think><answer>yes</answer>", 0.0, False),  # scorer is case-sensitive
        ("<think>x</think><answer>Yes.</answer>", 0.75, False),  # partial credit is not "correct"
        ("The answer is Yes.", 0.0, False),  # no tags -> nothing to score
    ],
)
def test_syllogism_scored_with_real_scorer(syllogism, text, score, correct):
    ds, entry = syllogism
    result = score_completion(text, entry, ds.score_answer)
    assert result["score"] == pytest.approx(score)
    assert result["correct"] is correct
    assert result["correctness"] == float(correct)  # the reward's: full marks or nothing
    assert score_completion(text, entry, ds.score_answer,
                            partial_credit=True)["correctness"] == pytest.approx(score)


def test_raw_scorer_rejects_surrounding_whitespace(syllogism):
    # Why extract_answer must strip: the default scorer compares exact strings
    # and only gives len(oracle) / len(answer) for a containing string.
    ds, entry = syllogism
    assert ds.score_answer(" Yes ", entry) == pytest.approx(3 / 5)


@pytest.mark.parametrize(
    "answer, correctness", [
        ("¬(P ↔ S)", 1.0),  # a premise restated is a valid conclusion
        ("¬S", 1.0),  # follows from ¬(P ↔ S) and P
        ("(P ∧ ¬S)", 1.0),
        ("P", 0.25),  # a bare variable counts as "trivial", even though it is a premise
        ("(P ∨ ¬P)", 0.25),  # tautology: valid but trivial
        ("¬P", 0.05),  # parses but does not follow
        ("X", 0.0),  # unknown variable
    ],
)
def test_propositional_logic_scored_by_validity(logic, answer, correctness):
    ds, entry = logic
    text = f"<think>P holds and P differs from S.</think>\n<answer>\n{answer}\n</answer>"
    result = score_completion(text, entry, ds.score_answer, partial_credit=True)
    assert result["answer"] == answer
    assert result["format"] == 1.0
    assert result["score"] == result["correctness"] == pytest.approx(correctness)
    assert result["correct"] is (correctness == 1.0)


def test_score_fn_looked_up_by_source_dataset(logic):
    _, entry = logic
    score_answer = rg.get_score_answer_fn(entry["metadata"]["source_dataset"])
    assert correctness_reward("¬S", entry, score_answer) == 1.0


def test_correctness_is_zero_without_answer():
    def never_called(answer, entry):
        raise AssertionError("scorer must not be called")

    assert correctness_reward(None, {}, never_called) == 0.0


def test_scorer_that_raises_gives_zero():
    def broken(answer, entry):
        raise ValueError("cannot parse")

    assert correctness_reward("((", {}, broken) == 0.0
    assert score_completion("<think>x</think><answer>((</answer>", {}, broken)["correctness"] == 0.0


@pytest.mark.parametrize("raw, clamped", [(1.7, 1.0), (-0.3, 0.0), (float("nan"), 0.0),
                                          (None, 0.0)])
def test_correctness_is_clamped_to_unit_interval(raw, clamped):
    assert correctness_reward("a", {}, lambda answer, entry: raw) == clamped


def test_score_completion_returns_all_fields(syllogism):
    ds, entry = syllogism
    result = score_completion("<think>x</think><answer>Yes</answer>", entry, ds.score_answer)
    assert result == {"answer": "Yes", "score": 1.0, "correctness": 1.0, "format": 1.0,
                      "correct": True, "work_lines": 0, "work_holds": True}


# --- partial credit: reasoning-gym's substring scores, paid only when asked
# --------------------------------


@pytest.fixture(scope="module")
def equation():
    ds = rg.create_dataset("simple_equations", size=50, seed=3, min_terms=2, max_terms=2,
                           min_value=1, max_value=10, operators_weights=[0.5, 0.5, 0])
    entry = next(e for e in ds if e["answer"] == "8")
    return ds, entry


@pytest.mark.parametrize(
    "answer, score", [
        ("8", 1.0),
        # the reference is a substring: reasoning-gym's default scorer pays len(ref) / len(answer)
        ("58", 0.5),
        ("-8", 0.5),
        ("x = 8", 0.2),  # a right answer written out earns less than a wrong "58"
        ("7", 0.0),
    ],
)
def test_substring_partial_credit_is_not_paid_by_default(equation, answer, score):
    ds, entry = equation
    text = f"<think>work</think><answer>{answer}</answer>"
    assert score_completion(text, entry, ds.score_answer)["score"] == pytest.approx(score)
    assert score_completion(text, entry, ds.score_answer)["correctness"] == (1.0 if score == 1
                                                                             else 0.0)
    assert score_completion(text, entry, ds.score_answer,
                            partial_credit=True)["correctness"] == pytest.approx(score)


# --- worked lines: the arithmetic a completion shows, checked
# ------------------------------------------------


@pytest.mark.parametrize(
    "text, holds", [
        ("Subtract 5 from both sides: 8*e = 61 - 5 = 56\nDivide both sides by 8: e = 56 / 8 = 7",
         [True, True]),
        # right answers, wrong work (a real completion)
        ("7*u = 60 - 4 = 54\nu = 54 / 7 = 8", [False, False]),
        ("Add 9 to both sides: -6*i = -27 - 9 = -35", [False]),
        ("-27 - 9 = -36", [True]),
        ("13 + 45 - 7 = 51\n51 + 8 = 59", [True, True]),  # a chain is evaluated whole
        ("Then 3 - -2 = 5", [True]),
        ("10 / 3 = 3.33", [True]),  # rounded to the decimals written
        ("10 / 3 = 3", [False]),  # an integer result must be exact
        ("5 / 0 = 1", [False]),
        ("2*x - 3 + 4 = 8", []),  # the left side has a variable: not checkable
        ("(4 + 5) * 2 = 18", []),
        ("x = 7", []),
        ("e = 5.5.5 + 1 = 2", []),
        # a line's work ends with the line (a real completion)
        ("5 + 3 = 8 -\n-28 - 15 = -43", [True, True]),
        ("13 +\n-28 - 15 = -43", [True]),
        ("7 - 2\n= 5", []),
    ],
)
def test_work_lines_check_each_worked_step(text, holds):
    assert work_lines(text) == holds


def test_work_lines_never_raise_on_odd_text():
    rng = random.Random(0)
    noise = ["".join(rng.choice("0123456789 +-*/=.\n\tx()") for _ in range(rng.randint(1, 40)))
             for _ in range(20000)]
    for text in ["1" + " + 1" * 2000 + " = 2001", "3 -\t\n- 2 = 1", "1 / 0.0 = 0", "0 - -0 = 0",
                 "9" * 400 + " + 1 = 1", *noise]:
        assert all(isinstance(h, bool) for h in work_lines(text))


def test_check_work_pays_a_right_answer_only_with_right_work(equation):
    ds, entry = equation
    good = "<think>\n2 + 6 = 8\n</think>\n<answer>8</answer>"
    bad = "<think>\n2 + 5 = 8\n</think>\n<answer>8</answer>"
    # by default only the answer counts
    assert score_completion(bad, entry, ds.score_answer)["correctness"] == 1.0
    assert score_completion(bad, entry, ds.score_answer, check_work=True)["correctness"] == 0.0
    assert score_completion(good, entry, ds.score_answer, check_work=True)["correctness"] == 1.0
    # metrics: the task's verdict
    assert score_completion(bad, entry, ds.score_answer, check_work=True)["correct"]


def test_random_correctness_keeps_the_rate_and_forgets_the_verdicts():
    groups = [[{"correctness": c} for c in (1.0, 0.0, 0.0)],
              [{"correctness": c} for c in (1.0, 0.0, 0.0)]]
    # real rate 2/6: a coin below 1/3 is right
    random_correctness(groups, coins=[0.9, 0.1, 0.5, 0.2, 0.4, 0.3])
    assert [p["correctness"] for g in groups for p in g] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_add_rewards_totals_from_the_parts_correctness():
    class W:
        w_correct, w_format, w_length, w_overlong, w_difficulty = 0.85, 0.15, 0.0, 0.0, 0.0
        max_new_tokens, overlong_buffer = 100, 10

    parts = add_rewards([{"correctness": 1.0, "format": 1.0, "correct": False}], [5], W)
    assert parts[0]["reward"] == pytest.approx(1.0)


# --- length reward (Kimi 1.5), per GRPO group ------------------------------


@pytest.mark.parametrize(
    "lengths, correct, expected", [
        ([50, 50, 50], [True, False, True], [0.0, 0.0, 0.0]),  # nothing to compare
        ([10, 20, 30], [True, True, True], [0.5, 0.0, -0.5]),  # shortest +0.5, longest -0.5
        ([10, 20, 30], [False, False, False], [0.0, 0.0, -0.5]),  # short but wrong clipped to 0
        ([30, 10, 20], [True, False, False], [-0.5, 0.0, 0.0]),  # order does not matter
        ([100, 200], [True, False], [0.5, -0.5]),
        ([], [], []),
    ],
)
def test_length_rewards_kimi(lengths, correct, expected):
    assert length_rewards(lengths, correct) == pytest.approx(expected)


def test_length_rewards_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        length_rewards([1, 2], [True])


# --- total reward ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, expected", [
        ((1.0, 1.0), {}, 1.0),  # default weights 0.85 + 0.15
        ((1.0, 0.0), {}, 0.85),
        ((0.0, 1.0), {}, 0.15),
        ((1.0, 1.0, 0.5), {}, 1.0),  # length weight defaults to 0
        ((1.0, 1.0, -0.5), {"w_length": 0.2}, 0.9),
        ((0.5, 1.0), {"w_correct": 1.0, "w_format": 0.0}, 0.5),
    ],
)
def test_total_reward_is_weighted_sum(args, kwargs, expected):
    assert total_reward(*args, **kwargs) == pytest.approx(expected)
