"""Specification of tasks.py and the sampling methods: curriculum, dynamic sampling, mixes, JSONL
data."""
import json
import random

import pytest

import grpo
import reward
import tasks
from flags import BadInput
from conftest import entry, read_log, small_config


def test_curriculum_favours_questions_that_are_sometimes_solved():
    pool = tasks.Pool(size=3)
    counter = iter(range(100))
    pool.fill(lambda: entry(next(counter)))
    for rate in (1.0, 1.0, 0.0):
        pool.record(0, 1.0)  # always solved
        pool.record(1, 0.5)  # sometimes
        pool.record(2, 0.0)  # never
    first, middle, last = (pool.weight(q) for q in pool.active[:3])
    assert middle > first == last > 0
    draws = [pool.draw(1, random.Random(s))[0] for s in range(300)]
    assert draws.count(1) > draws.count(0) + draws.count(2)
    assert sorted(pool.draw(3, random.Random(0))) == [0, 1, 2]  # distinct questions


def test_curriculum_retires_questions_solved_on_their_last_visits_and_refills():
    pool = tasks.Pool(size=3, retire_after=2)
    counter = iter(range(100))
    pool.fill(lambda: entry(next(counter)))
    pool.record(0, 1.0)
    pool.record(0, 1.0)  # solved twice in a row: retired
    pool.record(1, 1.0)
    pool.record(1, 0.5)  # not every sample solved it last time: stays
    pool.record(2, 1.0)  # one visit only: stays
    pool.retire_solved()
    assert [q["entry"]["question"] for q in pool.active] == ["q1", "q2"] and pool.retired == 1
    pool.fill(lambda: entry(next(counter)))
    assert [q["entry"]["question"] for q in pool.active] == ["q1", "q2", "q3"]
    state = pool.state_dict()
    other = tasks.Pool(size=3)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.stats() == pool.stats()


@pytest.mark.parametrize("length, penalty", [(10, 0.0), (250, 0.0), (275, -0.5), (300, -1.0)])
def test_overlong_penalty_ramps_down_in_the_last_tokens(length, penalty):
    assert reward.overlong_penalty(length, 300, 50) == pytest.approx(penalty)


def test_a_mix_of_tasks_scores_each_answer_with_its_own_verifier():
    mix = tasks.make_task("syllogism@1,basic_arithmetic@1", 200, 0)
    sources = {tasks.source(e) for e in mix}
    assert sources == {"syllogism", "basic_arithmetic"}
    arithmetic = next(e for e in mix if tasks.source(e) == "basic_arithmetic")
    syllogism = next(e for e in mix if tasks.source(e) == "syllogism")
    assert mix.score_answer(arithmetic["answer"], arithmetic) == 1.0
    assert mix.score_answer(syllogism["answer"], syllogism) == 1.0
    assert mix.score_answer(syllogism["answer"], arithmetic) == 0.0


def test_jsonl_task_reads_gsm8k_answers_and_compares_numbers(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": "Two plus two.\n#### 4"}) + "\n"
                    + json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    task = tasks.make_task(str(path), 10**8, 0)
    by_q = {e["question"]: e for e in task}
    four, paris = by_q["2+2?"], by_q["Capital of France?"]
    assert four["answer"] == "4" and tasks.source(four) == "mine.jsonl"
    assert [task.score_answer(a, four) for a in ("4", "4.0", "1,0", "four")] == [1.0, 1.0, 0.0, 0.0]
    assert [task.score_answer(a, paris) for a in ("paris", " Paris ", "Lyon", None)] == [1.0, 1.0,
                                                                                         0.0, 0.0]


def test_a_bad_jsonl_line_gives_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b"}\n')
    with pytest.raises(BadInput, match="bad.jsonl:2:"):
        tasks.make_task(str(path), 10, 0)


def test_a_short_run_with_every_method_on_logs_its_metrics(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    grpo.main(small_config(tiny_model_dir, out, max_steps=2,
                           task="syllogism:invalid_ratio=0.5@2,basic_arithmetic",
                           eval_task="leg_counting,syllogism", dynamic_sampling=True,
                           dynamic_sampling_bound=2.0,
                           pool_size=6, w_length=0.1, w_overlong=0.5, overlong_buffer=4,
                           w_difficulty=0.2))
    log = read_log(out)
    for key in ("dropped_group_rate", "rollouts", "pool_active", "pool_retired", "pool_pass_rate",
                "overlong_mean",
                "length_reward_mean", "difficulty_bonus_mean", "eval_accuracy/leg_counting",
                "eval_accuracy/syllogism"):
        assert key in log[-1], key
    assert "eval_accuracy/syllogism" in log[0]


def test_eval_questions_are_distinct_even_where_the_task_repeats_itself():
    # 10 x 10 x 2 sums
    sums = "chain_sum:min_terms=2:max_terms=2:min_digits=1:max_digits=1"
    task = tasks.make_task(sums, 2000, 10**9)
    questions = [e["question"] for e in tasks.eval_entries(task, 150)]
    assert len(questions) == len(set(questions)) == 150
    assert len({e["question"] for e in list(task)[:150]}) < 150  # the first 150 items do repeat
    held_task, held = tasks.held_out(sums, 150, 10**9)
    # what grpo.py, sft.py and sample.py evaluate on
    assert [e["question"] for e in held] == questions
