"""
rundir.py: the files of one run, in its out_dir, and how they survive a crash.

    log.jsonl      one JSON object per step (and per eval)
    samples.jsonl  one group of completions per step and a few eval answers, with reward parts
    ckpt.pt        trained weights, optimizer, config, step, data position, RNG states, the
                   curriculum, the step-0 eval's verdicts; written to a temporary file and renamed,
                   so a crash never leaves a broken one
    curves.png     reward, train correctness and format, eval accuracy against the step
    config.toml    the run's resolved flags: --config repeats it
    tensorboard/, wandb/   with --report_to: every log.jsonl row, for a tracker (wandb offline
                           unless WANDB_MODE says otherwise)

An out_dir holds one run: a new run refuses an out_dir that holds one, unless told to --resume it or
to --overwrite it (the old run is then moved aside, never deleted); --resume refuses flags that
would make it another run. Only the first process writes. A file that cannot be written (a full
disk) stops the run with one line, and the last checkpoint stays as it was.
"""
import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import signal
import tempfile
import time

import torch

import ddp
import report
from flags import fail

SAMPLE_KEYS = ("question", "text", "reward", "score", "correctness", "format", "work_holds",
               "length_reward", "overlong", "difficulty_bonus", "advantage", "truncated")


# Flags that only steer the rest of a run: --resume may change them. Any other difference makes
# another run.
STEERING = ("max_steps", "eval_interval", "save_interval", "eval_only", "resume", "overwrite",
            "out_dir")


def claim(out_dir: str, resume: bool, overwrite: bool, markers=("ckpt.pt", "log.jsonl")) -> None:
    """Check, before any work, that this run may write in out_dir: a new run never mixes into or
    overwrites another (any of `markers` there means one is); --resume needs one to continue;
    --overwrite moves the old one aside."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir} is a file: give a folder")
    check_writable(out_dir)
    if resume:
        if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            fail(f"--resume: there is no {os.path.join(out_dir, 'ckpt.pt')} to resume from")
        return
    taken = any(os.path.exists(os.path.join(out_dir, f)) for f in markers)
    if taken and overwrite:
        aside = f"{out_dir.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(out_dir, aside)
        print(f"--overwrite: the run that was in {out_dir} is now in {aside}")
    elif taken:
        fail(f"{out_dir} holds a run already: --resume continues it, --overwrite starts again "
             f"(moving it aside), or pass another --out_dir")


def check_writable(out_dir: str) -> None:
    """One line now, rather than a traceback at the first write, for an out_dir that cannot be made
    or written. Folders made to find out are removed again: bad input leaves nothing behind."""
    made, folder = [], os.path.abspath(out_dir)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        for m in reversed(made):
            os.mkdir(m)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        fail(f"--out_dir {out_dir} cannot be written ({e.strerror}): pass a folder this user can "
             f"write")
    finally:
        for m in made:
            with contextlib.suppress(OSError):
                os.rmdir(m)


@contextlib.contextmanager
def writing(path: str):
    """A write that fails (a full disk, a folder gone) stops the run with one line; the last
    checkpoint is whole (it is written to a temporary file and renamed)."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"could not write {path} ({getattr(e, 'strerror', None) or str(e).splitlines()[0]}): "
             f"the last checkpoint is intact; free space, then continue with --resume")


def check_same_run(cfg, saved: dict, path: str) -> None:
    """--resume continues one run: each flag must be the checkpoint's, except those that only steer
    the rest of the run (STEERING), whose changes are named. A flag the checkpoint does not know
    (older code) is not compared. --init_from is where the run started: a recipe's own is its
    (--resume reads out_dir's checkpoint), another one starts another run."""
    if not cfg.init_from:
        cfg.init_from = saved.get("init_from", "")
    differ = [(k, saved[k], v) for k, v in dataclasses.asdict(cfg).items() if k in saved
              and saved[k] != v]
    other = [f"--{k} {v} (the run's: {was})" for k, was, v in differ if k not in STEERING]
    if other:
        fail(f"--resume: {path} is a run with other settings: {', '.join(other)}; pass the run's "
             f"own, or start a new run in another --out_dir")
    steer = [f"--{k} {v} (was {was})" for k, was, v in differ if k not in ("resume", "overwrite")]
    if steer:
        print(f"--resume with {', '.join(steer)}")


class Run:
    """log.jsonl, samples.jsonl, curves.png and ckpt.pt of one run (the folder is made at the first
    write). --resume: cfg must be the run's own (check_same_run); the rows of steps after the
    checkpoint, and a line a kill left half-written, are dropped, so every step is logged exactly
    once."""

    def __init__(self, out_dir: str, resume: bool, overwrite: bool, write: bool = True, cfg=None):
        if write:
            claim(out_dir, resume, overwrite)
        self.out_dir = out_dir
        self.write = write  # rank 0 writes; the other processes only read
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.log_path = os.path.join(out_dir, "log.jsonl")
        self.samples_path = os.path.join(out_dir, "samples.jsonl")
        self.rows = []  # every logged row, this run's and (resumed) the earlier ones
        self.tracker = None  # --report_to's writer, opened at the first logged row
        self.report_to = getattr(cfg, "report_to", "")
        self.config = dataclasses.asdict(cfg) if cfg else {}
        if self.report_to and importlib.util.find_spec(self.report_to) is None:
            fail(f"--report_to {self.report_to} needs its package: pip install {self.report_to}")
        if resume:
            ckpt = read_checkpoint(self.ckpt_path)
            if cfg is not None:
                check_same_run(cfg, ckpt["config"], self.ckpt_path)
            self.rows = self.keep_until(self.log_path, ckpt["step"])
            self.keep_until(self.samples_path, ckpt["step"])

    def keep_until(self, path: str, step: int) -> list[dict]:
        """The rows of path up to `step`, written back; says what was dropped."""
        rows, torn = read_rows(path)
        kept = [r for r in rows if r["step"] <= step]
        if torn or len(kept) < len(rows):
            print(f"--resume from step {step}: dropped from {os.path.basename(path)} "
                  f"{len(rows) - len(kept)} rows of later steps" + (" and a half-written last line"
                                                                    if torn else ""))
            if self.write:  # a new file renamed over the old: a kill now loses nothing
                with writing(path):
                    with open(path + ".tmp", "w") as f:
                        f.writelines(json.dumps(r) + "\n" for r in kept)
                    os.replace(path + ".tmp", path)
        return kept

    def save_config(self, text: str) -> None:
        """The resolved configuration (flags.to_toml): --config repeats the run from it."""
        if self.write:
            path = os.path.join(self.out_dir, "config.toml")
            with writing(path):
                os.makedirs(self.out_dir, exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.write:
            with writing(self.log_path):
                os.makedirs(self.out_dir, exist_ok=True)
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                report.write_plot(self.out_dir, self.rows)
            # opened at the first row: bad input leaves nothing
            if self.report_to and self.tracker is None:
                self.tracker = tracker(self.report_to, self.out_dir, self.config)
            if self.tracker:
                self.tracker(row)

    def samples(self, rows: list[dict]) -> None:
        if self.write:
            with writing(self.samples_path):
                os.makedirs(self.out_dir, exist_ok=True)
                with open(self.samples_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)

    def save_checkpoint(self, weights: dict, optimizer, cfg, step: int, questions, generator,
                        pool=None, start_verdicts=None) -> None:
        if self.write:
            os.makedirs(self.out_dir, exist_ok=True)
            with writing(self.ckpt_path):
                save_checkpoint(self.ckpt_path, weights, optimizer, cfg, step=step,
                                data_index=questions.index, generator=generator, pool=pool,
                                start_verdicts=start_verdicts)


def tracker(name: str, out_dir: str, config: dict):
    """--report_to: a function that sends a log row's numbers to tensorboard or wandb (offline
    unless WANDB_MODE says otherwise; `wandb sync` uploads later). The package is imported here,
    only when asked for."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

        def log(row: dict) -> None:
            for key, value in numbers(row):
                writer.add_scalar(key, value, row["step"])
            writer.flush()
        return log
    import wandb
    run = wandb.init(project="grpo", name=os.path.basename(os.path.abspath(out_dir)), dir=out_dir,
                     config=config, mode=os.environ.get("WANDB_MODE", "offline"))
    return lambda row: run.log(dict(numbers(row)), step=row["step"])


def numbers(row: dict) -> list[tuple[str, float]]:
    return [(k, v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)]


def read_rows(path: str) -> tuple[list[dict], bool]:
    """The rows of a JSONL file this run wrote, and whether its last line was torn (a kill in
    mid-write): that line is left out. A bad line anywhere else is damage no resume should guess
    around."""
    lines = open(path).read().split("\n") if os.path.exists(path) else []
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the write was cut
                return rows, True
            fail(f"{path}, line {i + 1}, is not JSON: the file is damaged; move it aside to "
                 f"continue without it")
        rows.append(row)
    return rows, False


def save_checkpoint(path: str, weights: dict, optimizer, cfg, step: int, data_index: int, generator,
                    pool=None, start_verdicts=None) -> None:
    """weights: what trains (grpo.trainable_state_dict). start_verdicts: each held-out question's
    greedy verdict at step 0, which later evals are paired with."""
    ckpt = {"step": step, "config": dataclasses.asdict(cfg), "model": weights,
            "optimizer": optimizer.state_dict(), "data_index": data_index,
            "pool": pool and pool.state_dict(), "start_verdicts": start_verdicts,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "generator": generator.get_state()}}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path: str, cfg=None) -> dict:
    """A checkpoint of grpo.py or sft.py, checked against this run's model and LoRA shape (cfg)
    before any heavy work; cfg None: the checkpoint's own config is the run's (sample.py)."""
    if not os.path.exists(path):
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
        ckpt["model"]
    except Exception as e:
        fail(f"{path} is not a checkpoint of grpo.py or sft.py "
             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    for key in ("model", "lora_r", "lora_alpha", "lora_targets") if cfg is not None else ():
        if saved.get(key) != getattr(cfg, key):
            fail(f"{path} was trained with --{key} {saved.get(key)}, this run has --{key} "
                 f"{getattr(cfg, key)}: pass the same")
    # a transfer may be meant: go on
    if cfg is not None and saved.get("task", cfg.task) != cfg.task:
        print(f"note: {path} was trained on --task {saved['task']}, this run on --task {cfg.task}")
    return ckpt


def load_weights(model, ckpt: dict) -> None:
    """Put a checkpoint's trained weights (LoRA or full) into `model`."""
    missing = set(ckpt["model"]) - set(model.state_dict())
    if missing:
        fail(f"the checkpoint holds weights this model does not have (e.g. {sorted(missing)[0]})")
    model.load_state_dict(ckpt["model"], strict=False)


def restore(ckpt: dict, optimizer, questions, pool, generator, rank: int) -> tuple:
    """--resume: the optimizer, data position, curriculum and every random state of the checkpoint.
    Returns (step, the step-0 eval's verdicts)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    questions.index = ckpt["data_index"]
    if pool:
        pool.load_state_dict(ckpt["pool"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    # the checkpoint holds the first process's sampling state; the others start afresh, on a seed
    # of their own for each step resumed at (1000 apart: never another rank's or another step's)
    if rank == 0:
        generator.set_state(ckpt["rng"]["generator"])
    else:
        generator.manual_seed(ckpt["config"]["seed"] + rank + 1000 * ckpt["step"])
    # checkpoints written before the key was named start_verdicts keep them as eval_start
    return ckpt["step"], ckpt.get("start_verdicts", ckpt.get("eval_start"))


class StopOnSignal:
    """SIGTERM (preemption) or Ctrl-C: the step in progress finishes and is checkpointed, then the
    run exits; a second signal stops at once."""

    def __init__(self):
        self.signals = 0
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.signals += 1
        if self.signals > 1:
            raise KeyboardInterrupt
        print(f"signal {signum}: finishing this step, then saving the checkpoint (again to stop "
              f"now)", flush=True)

    def requested(self) -> bool:
        """Whether any process got a signal (all processes read it together, so they stop at the
        same step)."""
        return bool(ddp.all_sum(torch.tensor(self.signals)))
