"""
rundir.py: the files of one run, in its out_dir, and how they survive a crash.

    log.jsonl      one JSON object per step (and per eval)
    samples.jsonl  one group of completions per step and a few eval answers, with their reward parts
    ckpt.pt        trained weights, optimizer, config, step, data position, RNG states, curriculum, the step-0 eval's
                   verdicts; written to a temporary file and renamed, so a crash never leaves a broken one
    curves.png     reward, train correctness and format, eval accuracy against the step (report.py)

An out_dir holds one run: a new run refuses an out_dir that holds one, unless told to --resume it or to
--overwrite it (the old run is then moved aside, never deleted). Only the first process writes.
"""
import dataclasses
import json
import os
import random
import signal
import time

import torch

import ddp
import report
from flags import fail

SAMPLE_KEYS = ("question", "text", "reward", "score", "correctness", "format", "work_holds", "length_reward",
               "overlong", "difficulty_bonus", "advantage", "truncated")


def claim(out_dir: str, resume: bool, overwrite: bool, markers=("ckpt.pt", "log.jsonl")) -> None:
    """Check, before any work, that this run may write in out_dir: a new run never mixes into or overwrites another
    (any of `markers` there means one is); --resume needs one to continue; --overwrite moves the old one aside."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir} is a file: give a folder")
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
        fail(f"{out_dir} holds a run already: --resume continues it, --overwrite starts again (moving it aside), or "
             f"pass another --out_dir")


class Run:
    """log.jsonl, samples.jsonl, curves.png and ckpt.pt of one run (the folder is made at the first write)."""

    def __init__(self, out_dir: str, resume: bool, overwrite: bool, write: bool = True):
        if write:
            claim(out_dir, resume, overwrite)
        self.out_dir, self.write = out_dir, write
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.log_path, self.samples_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "samples.jsonl")
        self.rows = []
        if resume:  # steps logged after the checkpoint was written are done again: drop them
            step = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)["step"]
            self.rows = [r for r in read_jsonl(self.log_path) if r["step"] <= step]
            if write:
                with open(self.log_path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.write:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            report.write_plot(self.out_dir, self.rows)

    def samples(self, rows: list[dict]) -> None:
        if self.write:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.samples_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)

    def save_checkpoint(self, weights: dict, optimizer, cfg, step: int, questions, generator, pool=None,
                        eval_start=None) -> None:
        if self.write:
            os.makedirs(self.out_dir, exist_ok=True)
            save_checkpoint(self.ckpt_path, weights, optimizer, cfg, step, questions.index, generator, pool, eval_start)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def save_checkpoint(path: str, weights: dict, optimizer, cfg, step: int, data_index: int, generator, pool=None,
                    eval_start=None) -> None:
    """weights: what trains (grpo.trainable_state_dict). eval_start: each held-out question's greedy verdict at
    step 0, which later evals are paired with."""
    ckpt = {"step": step, "config": dataclasses.asdict(cfg), "model": weights,
            "optimizer": optimizer.state_dict(), "data_index": data_index, "pool": pool and pool.state_dict(),
            "eval_start": eval_start,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state()}}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path: str, cfg=None) -> dict:
    """A checkpoint of grpo.py or sft.py, checked against this run's model and LoRA shape (cfg) before any heavy
    work; cfg None: the checkpoint's own config is the run's (sample.py)."""
    if not os.path.exists(path):
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
        ckpt["model"]
    except Exception as e:
        fail(f"{path} is not a checkpoint of grpo.py or sft.py ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    for key in ("model", "lora_r", "lora_targets") if cfg is not None else ():
        if saved.get(key) != getattr(cfg, key):
            fail(f"{path} was trained with --{key} {saved.get(key)}, this run has --{key} {getattr(cfg, key)}: "
                 f"pass the same")
    return ckpt


def load_weights(model, ckpt: dict) -> None:
    """Put a checkpoint's trained weights (LoRA or full) into `model`."""
    missing = set(ckpt["model"]) - set(model.state_dict())
    if missing:
        fail(f"the checkpoint holds weights this model does not have (e.g. {sorted(missing)[0]})")
    model.load_state_dict(ckpt["model"], strict=False)


def restore(ckpt: dict, optimizer, questions, pool, generator, rank: int) -> tuple[int, list | None]:
    """--resume: the optimizer, data position, curriculum and every random state of the checkpoint.
    Returns (step, the step-0 eval's verdicts)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    questions.index = ckpt["data_index"]
    if pool:
        pool.load_state_dict(ckpt["pool"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if rank == 0:  # the checkpoint holds the first process's sampling state; the others start afresh
        generator.set_state(ckpt["rng"]["generator"])
    else:
        generator.manual_seed(ckpt["config"]["seed"] + rank + 1000 * ckpt["step"])
    return ckpt["step"], ckpt.get("eval_start")


class StopOnSignal:
    """SIGTERM (preemption) or Ctrl-C: the step in progress finishes and is checkpointed, then the run exits; a second
    signal stops at once."""

    def __init__(self):
        self.signals = 0
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.signals += 1
        if self.signals > 1:
            raise KeyboardInterrupt
        print(f"signal {signum}: finishing this step, then saving the checkpoint (again to stop now)", flush=True)

    def requested(self) -> bool:
        """Whether any process got a signal (all processes read it together, so they stop at the same step)."""
        return bool(ddp.all_sum(torch.tensor(self.signals)))
