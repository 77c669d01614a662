"""
tasks.py: where the questions come from, and the curriculum that picks among them.

--task takes one of:
    syllogism                            a reasoning-gym task
    syllogism:invalid_ratio=0.5          ... with its settings (here: a balanced Yes/No set)
    syllogism@2,propositional_logic@1    several tasks, drawn with these weights (reasoning-gym's
                                         composite); each answer scored by its own task's verifier
    data/gsm8k.jsonl                     your own question/answer lines; GSM8K's "... #### 42"
                                         answers are understood; numbers are compared as numbers,
                                         other answers exactly
Every task is a dataset: task[i] is an entry {"question", "answer", "metadata": {"source_dataset",
...}} and task.score_answer(answer, entry) a score in [0, 1].
"""
import difflib
import json
import os
import random

from flags import fail

# the held-out questions: a seed far from any training seed, the same in every run
EVAL_SEED = 10**9
# training questions of a reasoning-gym task: made on demand (question i of a seed), a stream
TRAIN_QUESTIONS = 10**8


def split_top_level(spec: str) -> list[str]:
    """Split at the commas outside brackets: a setting's value may be a JSON list
    (weights=[1,0,0])."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(spec):
        depth += (c in "[{") - (c in "]}")
        if c == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    return items + [spec[start:]]


def parse_spec(spec: str) -> list[tuple[str, float, dict]]:
    """"a:k=v@2,b" -> [("a", 2.0, {"k": v}), ("b", 1.0, {})]."""
    parts = []
    for item in split_top_level(spec):
        item, _, weight = item.partition("@")
        name, *settings = item.strip().split(":")
        kwargs = {}
        for kv in settings:
            key, eq, value = kv.partition("=")
            if not eq:
                fail(f"task setting {kv!r} in {spec!r}: write key=value, e.g. "
                     f"syllogism:invalid_ratio=0.5")
            try:
                # numbers, true/false, [lists]; anything else stays a string
                kwargs[key] = json.loads(value)
            except json.JSONDecodeError:
                if value.startswith(("[", "{")):
                    fail(f"task setting {kv!r} in {spec!r}: {value} is not valid JSON (e.g. "
                         f"weights=[1.0,0,0])")
                kwargs[key] = value
        try:
            parts.append((name, float(weight or 1), kwargs))
        except ValueError:
            fail(f"task weight {weight!r} in {spec!r}: write name@2.5")
    return parts


def make_task(spec: str, size: int, seed: int):
    """The dataset named by a --task string (see the module docstring)."""
    if spec.endswith(".jsonl"):
        return JsonlTask(spec, seed)
    import reasoning_gym
    from reasoning_gym.factory import DATASETS
    parts = parse_spec(spec)
    for name, _, _ in parts:
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=3)
            fail(f"unknown task {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                 + " (list them: python -c 'import reasoning_gym.factory as f; "
                   "print(sorted(f.DATASETS))')")
    try:
        if len(parts) == 1:
            name, _, kwargs = parts[0]
            task = reasoning_gym.create_dataset(name, size=size, seed=seed, **kwargs)
        else:
            from reasoning_gym.composite import DatasetSpec
            specs = [DatasetSpec(name=n, weight=w, config=kw) for n, w, kw in parts]
            task = reasoning_gym.create_dataset("composite", size=size, seed=seed, datasets=specs)
        # a setting of the wrong kind often fails only when an item is made: now, not mid-run
        task[0]
        return task
    except (TypeError, AssertionError, ValueError, KeyError, IndexError) as e:
        fail(f"task {spec!r}: {e or 'invalid setting'}")


# --------------------------------------------------------------------------------------------------
# Your own data: one {"question": ..., "answer": ...} per line

def reference_answer(answer) -> str:
    """GSM8K writes the reasoning, then '#### 42': the reference is what follows the last ####."""
    answer = str(answer)
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else answer.strip()


def as_number(text: str):
    try:
        return float(text.replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def score_exact_or_numeric(answer, entry: dict) -> float:
    """1 when answer and reference are equal as numbers ("1,000" == "1000.0"), or else as strings
    ignoring case and surrounding space; 0 otherwise."""
    if answer is None:
        return 0.0
    a, b = as_number(answer), as_number(entry["answer"])
    if a is not None and b is not None:
        return float(abs(a - b) <= 1e-6 * max(1.0, abs(b)))
    return float(answer.strip().lower() == entry["answer"].strip().lower())


class JsonlTask:
    """A finite dataset from a JSONL file, visited in a seeded random order (round after round)."""

    def __init__(self, path: str, seed: int):
        if not os.path.exists(path):
            fail(f"--task {path}: no such file")
        self.entries, name = [], os.path.basename(path)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, answer = row["question"], reference_answer(row["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                fail(f"{path}:{n}: each line must be a JSON object with \"question\" and "
                     f"\"answer\" ({type(e).__name__})")
            self.entries.append({"question": question, "answer": answer,
                                 "metadata": {"source_dataset": name,
                                              "source_index": len(self.entries)}})
        if not self.entries:
            fail(f"{path}: no questions in it")
        self.order = list(range(len(self.entries)))
        random.Random(seed).shuffle(self.order)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        return self.entries[self.order[i % len(self.entries)]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    score_answer = staticmethod(score_exact_or_numeric)


def eval_entries(task, size: int) -> list[dict]:
    """The first `size` distinct questions of the task (all of a shorter task): a small task repeats
    questions, and a question counted twice would weigh twice in every accuracy."""
    entries, seen = [], set()
    for i in range(len(task)):
        if len(entries) == size:
            break
        entry = task[i]  # a reasoning-gym entry is generated anew at each index
        if entry["question"] not in seen:
            seen.add(entry["question"])
            entries.append(entry)
    return entries


def held_out(spec: str, size: int, seed: int = EVAL_SEED) -> tuple:
    """The held-out task and its first `size` distinct questions; the task is built 4x larger to
    leave room for the questions a small task repeats (a JSONL file is read whole)."""
    task = make_task(spec, 4 * size, seed)
    return task, eval_entries(task, size)


def source(entry: dict) -> str:
    return entry.get("metadata", {}).get("source_dataset", "task")


class Questions:
    """The training questions in order, skipping the held-out ones; `index` is where the next one is
    read (a checkpoint keeps it, so --resume goes on where the run was)."""

    def __init__(self, task, held_out: set, index: int = 0):
        self.task = task
        self.held_out = held_out
        self.index = index

    def next(self) -> dict:
        start = self.index
        while self.task[self.index]["question"] in self.held_out:
            self.index += 1
            if self.index - start > 10**5:
                fail("every training question is also an eval question: lower --eval_size or use a "
                     "larger task")
        self.index += 1
        return self.task[self.index - 1]


def draw_questions(questions: Questions, pool, n: int) -> tuple:
    """n questions in order, or from the curriculum pool: (entries, pass rates, pool indices)."""
    if not pool:
        return [questions.next() for _ in range(n)], None, None
    pool.fill(questions.next)
    picks = pool.draw(n, random)  # the global random state, which checkpoints keep
    return [pool.active[i]["entry"] for i in picks], [pool.pass_rate(i) for i in picks], picks


# --------------------------------------------------------------------------------------------------
# Curriculum by pass rate (after Kimi 1.5): a pool of questions, each with the pass rates of its
# GRPO groups.

class Pool:
    """`size` active questions drawn from a task. Each rollout draws questions with weight
    p (1 - p) + FLOOR, p being the question's recent pass rate (0.5 for an unseen one), so questions
    that are sometimes solved come up most. A question every sample solved on each of its last
    `retire_after` visits is retired and replaced."""

    FLOOR = 0.05  # a question solved always or never still comes up now and then: rates change
    RECENT = 4  # the pass rate is that of the question's last 4 visits

    def __init__(self, size: int, retire_after: int = 2):
        self.size = size
        self.retire_after = retire_after
        self.active: list[dict] = []  # {"entry", "history": [pass rates]}
        self.retired = 0

    def fill(self, next_entry) -> None:
        while len(self.active) < self.size:
            self.active.append({"entry": next_entry(), "history": []})

    def weight(self, q) -> float:
        recent = q["history"][-self.RECENT:]
        p = sum(recent) / len(recent) if recent else 0.5
        return p * (1 - p) + self.FLOOR

    def draw(self, n: int, rng: random.Random) -> list[int]:
        """Indices of n distinct active questions."""
        weights = [self.weight(q) for q in self.active]
        chosen = []
        for _ in range(min(n, len(self.active))):
            i = rng.choices(range(len(self.active)), weights=weights)[0]
            chosen.append(i)
            weights[i] = 0.0
        return chosen

    def record(self, index: int, pass_rate: float) -> None:
        self.active[index]["history"].append(pass_rate)

    def retire_solved(self) -> None:
        solved = lambda q: (len(q["history"]) >= self.retire_after
                            and all(p == 1.0 for p in q["history"][-self.retire_after:]))
        keep = [q for q in self.active if not solved(q)]
        self.retired += len(self.active) - len(keep)
        self.active = keep

    def pass_rate(self, index: int) -> float:
        h = self.active[index]["history"]
        return sum(h) / len(h) if h else 0.5

    def stats(self) -> dict:
        rates = [sum(q["history"]) / len(q["history"]) for q in self.active if q["history"]]
        return {"pool_active": len(self.active), "pool_retired": self.retired,
                "pool_pass_rate": sum(rates) / len(rates) if rates else 0.0}

    def state_dict(self) -> dict:
        return {"active": self.active, "retired": self.retired}

    def load_state_dict(self, state: dict) -> None:
        self.active, self.retired = state["active"], state["retired"]

