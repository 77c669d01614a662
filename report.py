"""
report.py: what a run reports. Accuracies over held-out questions with their standard errors, the
paired gain of one eval over another on the same questions (with McNemar's test), the eval's one
line, and curves.png.

    python report.py BEFORE AFTER   # two `grpo.py --eval_only` out_dirs: AFTER's paired gain
"""
import json
import math
import os
import sys

from flags import BadInput, fail

NO_FORMAT = ("a model that never writes the tags gives GRPO nothing to learn from (every reward "
             "the same): warm it up first with python sft.py, then --init_from out-sft/ckpt.pt")
FEW_MIXED = ("GRPO learns only from groups whose answers differ, so it has little to learn from "
             "here: raise --temperature, pick a task of middling difficulty for this model, or "
             "warm up for fewer epochs")


def rate(name: str, values: list) -> dict:
    """The mean of per-question values (0/1, or fractions) and its standard error over questions."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {name: mean, f"{name}_se": math.sqrt(var / n)}


def paired_gain(before: list[bool], after: list[bool]) -> dict:
    """The change of accuracy on the same questions, with the standard error of the paired
    differences and McNemar's exact p-value (two-sided): of the questions whose verdict changed, how
    lopsided the changes are."""
    d = [int(a) - int(b) for a, b in zip(after, before)]
    up, down = d.count(1), d.count(-1)
    tail = sum(math.comb(up + down, i) for i in range(min(up, down) + 1)) / 2 ** (up + down)
    return {**rate("eval_gain", d), "eval_gain_up": up, "eval_gain_down": down,
            "eval_gain_p": min(1.0, 2 * tail)}


def eval_metrics(rows: list[dict], answers: list[str], samples: int = 0) -> dict:
    """An eval's numbers from its rows (one per question: the greedy answer's correct, format,
    length, truncated, work_lines, work_holds, source; with samples = K > 0 also sampled_correct,
    how many of K were right); answers: the reference answers, for the rate of always giving the
    most common one."""
    n = len(rows)
    metrics = {**rate("eval_accuracy", [r["correct"] for r in rows]),
               "eval_format_rate": sum(r["format"] for r in rows) / n,
               "eval_len_mean": sum(r["length"] for r in rows) / n,
               "eval_truncated_rate": sum(r["truncated"] for r in rows) / n,
               "eval_majority_rate": max(answers.count(a) for a in set(answers)) / n}
    right = [r for r in rows if r["correct"]]
    if right and any(r["work_lines"] for r in rows):  # the task's answers show checkable arithmetic
        metrics["eval_faithful_rate"] = sum(r["work_holds"] for r in right) / len(right)
    if samples:
        k = [r["sampled_correct"] for r in rows]
        metrics.update(eval_samples=samples, **rate("eval_mean_at_k", [c / samples for c in k]),
                       **rate("eval_pass_at_k", [c > 0 for c in k]),
                       eval_mixed_rate=sum(0 < c < samples for c in k) / n)
    sources = sorted({r["source"] for r in rows})
    for src in sources if len(sources) > 1 else []:  # a mix of tasks: accuracy on each
        mine = [r for r in rows if r["source"] == src]
        metrics[f"eval_accuracy/{src}"] = sum(r["correct"] for r in mine) / len(mine)
    return metrics


SAMPLE_STATS = ("reward", "correct", "format", "truncated", "length_reward", "overlong",
                "difficulty_bonus", "advantage", "score", "correctness")


def sample_stats(samples: list[dict]) -> dict:
    """A step's numbers from its samples (each: SAMPLE_STATS and the completion's length). Beside
    the means: completion lengths of right and of wrong answers (a shortcut shows as right answers
    getting shorter), and partial credit: the share of samples whose task score lies strictly
    between 0 and 1 (a guess that contains the answer), and its share of the correctness reward paid
    out."""
    n = len(samples)
    def mean(key, rows=samples):
        return sum(float(r[key]) for r in rows) / len(rows) if rows else math.nan
    right, wrong = [r for r in samples if r["correct"]], [r for r in samples if not r["correct"]]
    partial = [r for r in samples if 0 < r["score"] < 1]
    paid = sum(r["correctness"] for r in samples)
    reward_mean = mean("reward")
    squares = sum((r["reward"] - reward_mean) ** 2 for r in samples)
    return {"reward_mean": reward_mean,
            "reward_std": math.sqrt(squares / (n - 1)) if n > 1 else 0.0,
            "correct_rate": mean("correct"), "format_rate": mean("format"),
            "truncated_rate": mean("truncated"),
            "length_reward_mean": mean("length_reward"), "overlong_mean": mean("overlong"),
            "difficulty_bonus_mean": mean("difficulty_bonus"),
            "zero_adv_rate": sum(r["advantage"] == 0 for r in samples) / n,
            "completion_len_mean": mean("length"), "len_right_mean": mean("length", right),
            "len_wrong_mean": mean("length", wrong), "partial_credit_rate": len(partial) / n,
            "partial_credit_share": sum(r["correctness"] for r in partial) / paid if paid else 0.0,
            "n_samples": n, "n_tokens": sum(r["length"] for r in samples)}


def eval_line(m: dict) -> str:
    """The eval's one line: every accuracy with its standard error, next to what a constant answer
    scores."""
    line = (f"eval: accuracy {m['eval_accuracy']:.3f} ± {m['eval_accuracy_se']:.3f} (always "
            f"answering the most common answer: {m['eval_majority_rate']:.3f})")
    if "eval_mean_at_k" in m:
        k = m["eval_samples"]
        line += (f" | mean@{k} {m['eval_mean_at_k']:.3f} ± {m['eval_mean_at_k_se']:.3f} | "
                 f"pass@{k} {m['eval_pass_at_k']:.3f} ± {m['eval_pass_at_k_se']:.3f} | mixed "
                 f"{m['eval_mixed_rate']:.2f}")
    line += f" | format {m['eval_format_rate']:.3f} | len {m['eval_len_mean']:.0f}"
    if "eval_faithful_rate" in m:
        line += f" | work holds in {m['eval_faithful_rate']:.1%} of right answers"
    if "eval_gain" in m:
        line += (f" | vs step 0: {100 * m['eval_gain']:+.1f} ± {100 * m['eval_gain_se']:.1f} "
                 f"points (paired, {m['eval_gain_up']} right now / {m['eval_gain_down']} wrong "
                 f"now; McNemar p {m['eval_gain_p']:.2g})")
    return line


def before_training(m: dict) -> str:
    """What the first eval says about the learning signal to come ('' when all is well)."""
    if m["eval_format_rate"] == 0:
        return f"eval: no answer was well-formed; {NO_FORMAT}\n"
    if m.get("eval_mixed_rate", 1) < 0.1:
        return (f"eval: only {m['eval_mixed_rate']:.0%} of the questions got both right and wrong "
                f"sampled answers; {FEW_MIXED}\n")
    return ""


def no_signal(rows: list[dict], steps: int, task: str) -> str:
    """Why the run should stop, or '': its step-0 eval (the only row so far) had no well-formed
    answer, so every reward would be the same; or in each of its last `steps` training steps every
    group's rewards were equal, so every advantage was 0 and nothing was learned. steps 0: never."""
    warmup = (f"warm up first: python sft.py --task '{task}', then python grpo.py --init_from "
              "out-sft/ckpt.pt")
    if not steps or not rows:
        return ""
    if len(rows) == 1 and rows[0].get("eval_format_rate", 1) == 0:
        return ("no greedy answer to held-out questions was well-formed, so every reward would be "
                f"the same: {warmup}")
    last = [r for r in rows if "zero_adv_rate" in r][-steps:]
    if len(last) < steps or any(r["zero_adv_rate"] < 1 for r in last):
        return ""
    span = f"steps {last[0]['step']}-{last[-1]['step']}" if steps > 1 else f"step {last[0]['step']}"
    if max(r["format_rate"] for r in last) == 0:
        why = f"no completion was well-formed; {warmup}"
    elif max(r["correct_rate"] for r in last) == 0:
        why = ("no answer was right: the task is too hard for this model; an easier setting, or a "
               "longer warmup")
    else:
        why = ("each group's answers were all right or all wrong: raise --temperature or --G, or "
               "pick a harder task")
    return (f"{span}: every advantage was 0, nothing was learned ({why}); stopping "
            "(--no_signal_steps)")


def stop_without_signal(rows: list[dict], steps: int, task: str) -> None:
    """One line and exit code 2 (flags.fail) where no_signal says why."""
    why = no_signal(rows, steps, task)
    if why:
        fail(why)


def step_line(row: dict, max_steps: int, max_new_tokens: int) -> str:
    """The step's one line, and a line for each silent failure: no well-formed completion, most of
    them cut off."""
    line = (f"step {row['step']}/{max_steps} | reward "
            f"{row['reward_mean']:.2f}±{row['reward_std']:.2f} | "
            f"correct {row['correct_rate']:.2f} | format {row['format_rate']:.2f} | "
            f"len {row['completion_len_mean']:.0f} (right "
            f"{row['len_right_mean']:.0f}, wrong {row['len_wrong_mean']:.0f}) | entropy "
            f"{row['entropy']:.3f} | clip {row['clip_frac']:.2f} | loss {row['loss']:.4f} | "
            f"{row['step_s']:.1f}s")
    if row["format_rate"] == 0:
        line += f"\nstep {row['step']}: no completion was well-formed; {NO_FORMAT}"
    if row["truncated_rate"] > 0.5:
        line += (f"\nstep {row['step']}: {row['truncated_rate']:.0%} of the completions were cut "
                 f"at --max_new_tokens {max_new_tokens} before their end (EOS): their answers are "
                 f"lost; raise --max_new_tokens, or make length cost something (--w_overlong 0.5)")
    return line


def collapse_warnings(rows: list[dict], window: int = 5, shrink: float = 2 / 3) -> str:
    """Lines that warn of a collapse, read from the log's training rows (the last one is this step):
    the mean completion length, or that of right answers, at `shrink` or less of its highest in the
    `window` steps before (answers that drop a step of the work: the shortcut a collapsed
    quick-start seed took, 64 -> 41 tokens); most of the correctness reward paid for partial credit
    (a guess that contains the answer, not the answer). '' when none applies. Entropy is logged but
    not warned about: in runs that learned, it fell from 0.39 to 0.1 within ten steps as the policy
    sharpened."""
    train = [r for r in rows if "reward_mean" in r]
    if not train:
        return ""
    now, before = train[-1], train[-1 - window:-1]
    lines = []
    for key, what in (("completion_len_mean", "the mean completion length"),
                      ("len_right_mean", "the length of right answers")):
        past = [r[key] for r in before if math.isfinite(r.get(key, math.nan))]
        if past and math.isfinite(now.get(key, math.nan)) and now[key] <= shrink * max(past):
            lines.append(f"step {now['step']}: {what} fell to {now[key]:.3g} from {max(past):.3g} "
                         f"within {len(before)} steps: the policy may be collapsing onto a "
                         f"shortcut; read samples.jsonl, and try a lower --learning_rate")
    if now.get("partial_credit_share", 0) > 0.5:
        lines.append(f"step {now['step']}: {now['partial_credit_share']:.0%} of the correctness "
                     f"reward was partial credit (answers that contain the reference without being "
                     f"it): drop --partial_credit")
    return "".join("\n" + line for line in lines)


def write_plot(out_dir: str, log: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    train = [r for r in log if "reward_mean" in r]
    ev = [r for r in log if "eval_accuracy" in r]
    ax[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="reward")
    ax[0].plot([r["step"] for r in train], [r["correct_rate"] for r in train],
               label="correct (train)")
    ax[0].plot([r["step"] for r in train], [r["format_rate"] for r in train],
               label="format (train)")
    ax[1].errorbar([r["step"] for r in ev], [r["eval_accuracy"] for r in ev],
                   [r["eval_accuracy_se"] for r in ev],
                   fmt="o-", capsize=3, label="eval accuracy (greedy, ± SE)")
    if ev and "eval_mean_at_k" in ev[0]:
        ax[1].plot([r["step"] for r in ev], [r["eval_mean_at_k"] for r in ev], "s-",
                   label="eval mean@k (sampled)")
    ax[1].plot([r["step"] for r in ev], [r["eval_majority_rate"] for r in ev], "--",
               label="most common answer")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=80)
    plt.close(fig)


def eval_verdicts(out_dir: str) -> dict:
    """question -> greedy verdict, from the samples.jsonl of a `grpo.py --eval_only` run."""
    path = os.path.join(out_dir, "samples.jsonl")
    if not os.path.isfile(path):
        fail(f"{path} does not exist: give the out_dir of a finished grpo.py --eval_only run")
    try:
        rows = [json.loads(line) for line in open(path)]
        verdicts = {r["question"]: r["correct"] for r in rows if r.get("split") == "eval"}
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{path} is not a samples.jsonl of grpo.py ({type(e).__name__}: {e})")
    if not verdicts:
        fail(f"{path} holds no eval answers: give the out_dir of a grpo.py --eval_only run")
    return verdicts


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python report.py BEFORE AFTER  (two grpo.py --eval_only out_dirs)")
    before, after = (eval_verdicts(d) for d in argv)
    if set(before) != set(after):
        fail("the two evals asked different questions: evaluate both with the same --task, "
             "--eval_size and --eval_seed")
    questions = sorted(before)
    m = {**rate("eval_accuracy", [after[q] for q in questions]),
         **paired_gain([before[q] for q in questions], [after[q] for q in questions])}
    print(f"{len(questions)} questions: {rate('a', [before[q] for q in questions])['a']:.3f} -> "
          f"{m['eval_accuracy']:.3f} ± {m['eval_accuracy_se']:.3f}, "
          f"{100 * m['eval_gain']:+.1f} ± {100 * m['eval_gain_se']:.1f} points (paired, "
          f"{m['eval_gain_up']} right now / "
          f"{m['eval_gain_down']} wrong now; McNemar p {m['eval_gain_p']:.2g})")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BadInput as e:
        sys.exit(f"error: {e}")
