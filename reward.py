"""Reward functions for GRPO on reasoning-gym tasks.

The policy is asked (SYSTEM_PROMPT, encode_prompt) to write

    <think> ...reasoning... </think>
    <answer> ...final answer... </answer>

and every completion is scored by plain functions over strings:

* ``extract_answer``      - pull the final answer out of the completion
* ``format_reward``       - 1.0 for exactly the think-then-answer layout, else 0.0
* ``correctness_reward``  - reasoning-gym's own scorer, made crash-proof
* ``work_lines``          - which worked lines ``a op b = c`` of the completion hold
* ``length_rewards``      - Kimi 1.5 length penalty, computed per GRPO group
* ``total_reward``        - weighted sum of the above
* ``score_completion``    - the per-completion part bundled into one dict
* ``add_rewards``         - the group's terms and each completion's total reward
* ``random_correctness``  - the control: correctness replaced by coins at the real rate

No torch here on purpose: these run on CPU over decoded text and are easy
to unit test.
"""

import ast
import math
import operator
import re
from typing import Callable

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process and then give the "
    "answer. The reasoning is enclosed in <think> </think> tags and the answer in <answer> "
    "</answer> tags, i.e. <think> reasoning here </think> <answer> answer here </answer>.")


def encode_prompt(tok, question: str) -> list[int]:
    """The prompt's token ids: the system prompt that asks for the format, the question, the chat
    template."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


ScoreFn = Callable[[str, dict], float]

# Non-greedy + DOTALL: each <answer> pairs with the nearest </answer>, and the
# answer may span several lines.
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)

# Text that contains none of the four tags; used for think/answer bodies so a
# second <think> or <answer> block cannot hide inside the first one.
_NO_TAGS = r"(?:(?!</?(?:think|answer)>).)*"
_FORMAT_RE = re.compile(
    rf"\s*<think>{_NO_TAGS}</think>\s*<answer>({_NO_TAGS})</answer>\s*",
    re.DOTALL | re.IGNORECASE,
)


def extract_answer(text: str) -> str | None:
    """Stripped content of the LAST complete <answer>...</answer> pair.

    The last pair wins because models sometimes draft an answer while
    thinking and then revise it. Stripping matters: reasoning-gym compares
    strings, so " Yes " only earns 0.6 partial credit where "Yes" earns 1.0.
    Returns None when there is no complete pair, "" for an empty one.
    """
    matches = _ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def format_reward(text: str) -> float:
    """1.0 iff the completion is exactly one think block then one answer block.

    Only whitespace may surround the blocks and the answer must be non-empty.
    Binary on purpose: partial credit for emitting tags is easy to farm (the
    model learns to spam tags instead of solving the task).
    """
    match = _FORMAT_RE.fullmatch(text)
    return 1.0 if match and match.group(1).strip() else 0.0


def correctness_reward(answer: str | None, entry: dict, score_answer: ScoreFn) -> float:
    """Task score in [0, 1] from reasoning-gym's scorer for this entry.

    ``score_answer`` is ``dataset.score_answer`` or
    ``reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])``.
    Some scorers raise on odd strings; a crash in reward code would kill a
    long training run, so any exception just means "wrong".
    """
    if answer is None:
        return 0.0
    try:
        score = float(score_answer(answer, entry))
    except Exception:
        return 0.0
    if not math.isfinite(score):  # NaN would otherwise poison the advantages
        return 0.0
    return min(1.0, max(0.0, score))


def length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    """Kimi 1.5 length reward for one GRPO group (completions of one prompt).

    lam = 0.5 - (len - min_len) / (max_len - min_len), in [-0.5, 0.5].
    Correct answers get lam (shorter is better); wrong answers get min(0, lam),
    so being short is never rewarded when the answer is wrong, but rambling
    still is penalised. With all lengths equal there is nothing to compare.
    """
    if len(lengths) != len(correct):
        raise ValueError("lengths and correct must have the same size")
    if not lengths or max(lengths) == min(lengths):
        return [0.0] * len(lengths)
    lo, hi = min(lengths), max(lengths)
    rewards = []
    for length, ok in zip(lengths, correct):
        lam = 0.5 - (length - lo) / (hi - lo)
        rewards.append(lam if ok else min(0.0, lam))
    return rewards


def total_reward(
    correctness: float, fmt: float, length: float = 0.0, w_correct: float = 0.85,
    w_format: float = 0.15, w_length: float = 0.0, overlong: float = 0.0,
    w_overlong: float = 0.0, difficulty: float = 0.0, w_difficulty: float = 0.0,
) -> float:
    """The reward: one weighted sum, here and nowhere else. Correctness dominates; format is a small
    nudge that mostly matters early, before the model reliably emits the tags; the other terms are
    off by default."""
    return (w_correct * correctness + w_format * fmt + w_length * length + w_overlong * overlong
            + w_difficulty * difficulty)


def score_completion(text: str, entry: dict, score_answer: ScoreFn, partial_credit: bool = False,
                     check_work: bool = False) -> dict:
    """Everything that can be scored from one completion alone.

    The length reward needs the whole group, so the trainer adds it later.
    "score" is the task's own score in [0, 1]; "correct" means full marks.
    The reward's "correctness" is binary unless partial_credit: reasoning-gym
    gives len(reference) / len(answer) when the reference is a substring of
    the answer ("58" earns 0.5 against "8"), and the group's normalisation
    turns such a fraction into a full-size advantage where no sample is
    right, a shortcut GRPO learns. check_work: correctness is 0 unless every
    checkable line of the work holds (work_lines).
    """
    answer = extract_answer(text)
    score = correctness_reward(answer, entry, score_answer)
    lines = work_lines(text)
    correctness = score if partial_credit else float(score >= 1.0)
    if check_work and not all(lines):
        correctness = 0.0
    return {
        "answer": answer, "score": score, "correctness": correctness,
        "format": format_reward(text), "correct": score >= 1.0, "work_lines": len(lines),
        "work_holds": all(lines),
    }


def add_rewards(parts: list[dict], lengths: list[int], cfg,
                pass_rate: float | None = None) -> list[dict]:
    """The group-dependent terms and the total reward of each of one question's G parts
    (score_completion's), from its "correctness" and "correct". `cfg` (grpo.py's Config) gives the
    weights (w_correct, w_format, w_length, w_overlong, w_difficulty), max_new_tokens and
    overlong_buffer. pass_rate: the question's pass rate from the curriculum pool; without one,
    the group's own."""
    correct = [p["correct"] for p in parts]
    length = length_rewards(lengths, correct) if cfg.w_length else [0.0] * len(parts)
    pass_rate = sum(correct) / len(correct) if pass_rate is None else pass_rate
    for p, lam, n in zip(parts, length, lengths):
        p["length_reward"] = lam
        p["overlong"] = overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_buffer)
        p["difficulty_bonus"] = (1 - pass_rate) * p["correct"]
        p["reward"] = total_reward(
            p["correctness"], p["format"], length=lam, w_correct=cfg.w_correct,
            w_format=cfg.w_format, w_length=cfg.w_length, overlong=p["overlong"],
            w_overlong=cfg.w_overlong, difficulty=p["difficulty_bonus"],
            w_difficulty=cfg.w_difficulty)
    return parts


def random_correctness(groups: list[list[dict]], coins: list[float]) -> None:
    """The spurious-reward control: each part's correctness becomes 1 with the probability that the
    real correctness had over all `groups` (one coin in [0, 1) per part, in order), else 0. Whatever
    then differs between a control run and a real one is the verifier's information."""
    parts = [p for group in groups for p in group]
    rate = sum(p["correctness"] for p in parts) / len(parts)
    for p, coin in zip(parts, coins):
        p["correctness"] = float(coin < rate)


# Worked arithmetic that can be checked: numbers joined by + - * / then "= number" ("61 - 5 = 56",
# "e = 56 / 8 = 7", "13 + 45 - 7 = 51"), within one line. A match may not start inside a number or a
# word.
_NUMBER = r"-?\d+(?:\.\d+)?"
_WORK_RE = re.compile(rf"(?<![\w.])({_NUMBER}(?:[ \t]*[-+*/][ \t]*{_NUMBER})+)"  # a op b ...
                      rf"[ \t]*=[ \t]*({_NUMBER})(?![\w.])")  # = c
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _arithmetic(node) -> float:
    """The value of a parsed expression of numbers, + - * / and unary minus (nothing else reaches
    here)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp):
        return -_arithmetic(node.operand)
    return _OPS[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))


def work_lines(text: str) -> list[bool]:
    """Whether each checkable piece of arithmetic in `text` holds. Checkable: numbers joined by
    + - * / and then "= number", not preceded by an operator or a bracket (in "2*x - 3 + 4 = 8" or
    "(4 + 5) * 2 = 18" the left side is not all there). An integer result must be exact
    ("54 / 7 = 8" fails); a result with d decimals must be the value rounded to d decimals
    ("10 / 3 = 3.33" holds)."""
    checks = []
    for m in _WORK_RE.finditer(text):
        before = text[:m.start()].rpartition("\n")[2].rstrip()  # what precedes it on its own line
        if before.endswith(tuple("+-*/^()")):
            continue
        expression, result = m.group(1), m.group(2)
        decimals = len(result.partition(".")[2])
        tolerance = 0.5 * 10 ** -decimals + 1e-9 if decimals else 1e-9
        try:
            value = _arithmetic(ast.parse(expression, mode="eval").body)
            checks.append(abs(value - float(result)) <= tolerance)
        except ZeroDivisionError:
            checks.append(False)
        # not plain arithmetic: not checked
        except (SyntaxError, ValueError, OverflowError, RecursionError):
            pass
    return checks


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then a linear ramp down to
    -1 at max_len, so that a completion cut off at the limit is penalised smoothly rather than all
    at once."""
    if buffer <= 0:
        return -1.0 if length >= max_len else 0.0
    return min(0.0, max(-1.0, (max_len - buffer - length) / buffer))
