"""The command line: flags, clear errors for bad input, and whole runs of grpo.py on a tiny
model."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import flags
import grpo
import report
import tasks
from conftest import ROOT, expect_usage_error, read_log, run_cli, small_config


def test_help_lists_every_config_field_with_its_default():
    out = " ".join(run_cli("--help").stdout.split())  # undo line wrapping
    for f in dataclasses.fields(grpo.Config):
        assert f"--{f.name}" in out
    assert "(default: 300)" in out
    assert "(default: syllogism:invalid_ratio=0.5)" in out
    assert "--config CONFIG" in out


@pytest.mark.parametrize("args, message", [
    (["--task", "sylogism"], "did you mean syllogism"),
    (["--task", "syllogism:invalid_ratio"], "write key=value"),
    (["--task", "syllogism:no_such_setting=1"], "no_such_setting"),
    (["--G", "1"], "--G 1: must be at least 2"),
    (["--top_p", "1.5"], "--top_p 1.5: must be at most 1"),
    (["--learning_rate=-1e-5"], "--learning_rate -1e-05: must be at least 0"),
    (["--warmup_steps=-1"], "--warmup_steps -1: must be at least 0"),
    (["--G", "six"], "argument --G: invalid int value"),
    (["--loss_agg", "mean"], "choose seq, token, dr_grpo"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(args, message, tmp_path):
    assert message in expect_usage_error(args, tmp_path)


def test_task_settings_reach_reasoning_gym():
    balanced = tasks.make_task("syllogism:invalid_ratio=0.5", 400, 0)
    assert balanced.config.invalid_ratio == 0.5
    assert 0.4 < sum(e["answer"] == "No" for e in balanced) / 400 < 0.6


def test_a_training_run_logs_every_step_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    grpo.main(small_config(tiny_model_dir, out, max_steps=2))
    log = read_log(out)
    assert [r["step"] for r in log] == [0, 1, 2]
    keys = {"step", "reward_mean", "reward_std", "correct_rate", "format_rate",
            "completion_len_mean", "truncated_rate",
            "clip_frac", "loss", "step_s", "tokens_per_s", "eval_accuracy", "eval_format_rate"}
    assert keys <= set(log[1]) and keys <= set(log[2])
    assert "eval_accuracy" in log[0] and "eval_majority_rate" in log[0]
    assert (out / "samples.jsonl").stat().st_size > 0 and (out / "curves.png").exists()
    resolved = flags.parse_config(grpo.Config, ["--config", str(out / "config.toml")],
                                  program="grpo")
    # the run can be repeated from its folder
    assert resolved == small_config(tiny_model_dir, out, max_steps=2)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and all("lora_" in k for k in ckpt["model"])
    # --resume continues at step 3 with the same weights, log and data position
    grpo.main(small_config(tiny_model_dir, out, max_steps=3, resume=True))
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3]
    assert torch.load(out / "ckpt.pt", weights_only=False)["data_index"] > ckpt["data_index"]


def test_a_model_that_never_writes_the_tags_is_told_to_warm_up_first(tiny_model_dir, tmp_path,
                                                                     capsys):
    # a random model: no tags, ever
    grpo.main(small_config(tiny_model_dir, tmp_path / "run", max_steps=1))
    out = capsys.readouterr().out
    assert "eval: no answer was well-formed; " + report.NO_FORMAT in out
    assert "step 1: no completion was well-formed; " + report.NO_FORMAT in out
    assert "python sft.py" in report.NO_FORMAT and read_log(tmp_path / "run")[1]["format_rate"] == 0


def test_eval_only_from_a_checkpoint_reports_the_same_accuracy(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    grpo.main(small_config(tiny_model_dir, out, max_steps=1))
    final = read_log(out)[-1]
    ev = tmp_path / "eval"
    grpo.main(small_config(tiny_model_dir, ev, eval_only=True, init_from=str(out / "ckpt.pt")))
    (row,) = read_log(ev)
    for k in ("eval_accuracy", "eval_format_rate", "eval_len_mean"):
        assert row[k] == final[k]
    answers = [json.loads(line) for line in open(ev / "samples.jsonl")]
    # every answer, for pairing
    assert len(answers) == 4 and {a["split"] for a in answers} == {"eval"}
    other = tmp_path / "other"
    grpo.main(small_config(tiny_model_dir, other, eval_only=True, eval_seed=7,
                           init_from=str(out / "ckpt.pt")))
    other_questions = {a["question"] for a in map(json.loads, open(other / "samples.jsonl"))}
    assert other_questions != {a["question"] for a in answers}


def test_report_pairs_two_eval_only_runs_on_their_questions(tmp_path):
    def eval_dir(name, verdicts):
        (tmp_path / name).mkdir()
        rows = [{"split": "eval", "question": f"q{i}", "correct": v}
                for i, v in enumerate(verdicts)]
        lines = "".join(json.dumps(r) + "\n" for r in reversed(rows))
        (tmp_path / name / "samples.jsonl").write_text(lines)
        return str(tmp_path / name)

    before, after = eval_dir("before", [0, 0, 1, 1, 0]), eval_dir("after", [1, 1, 1, 0, 0])
    r = subprocess.run([sys.executable, "report.py", before, after], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0
    assert "5 questions: 0.400 -> 0.600" in r.stdout
    assert "2 right now / 1 wrong now" in r.stdout
    r = subprocess.run([sys.executable, "report.py", before, eval_dir("fewer", [1, 1])], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "asked different questions" in r.stderr
    # an eval still running (no samples.jsonl yet), a training run's log, a torn file: one line
    (tmp_path / "running").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "samples.jsonl").write_text('{"split": "train", "question": "q"}\n')
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "samples.jsonl").write_text('{"split": "eval", "quest')
    for name, message in [("running", "does not exist"), ("train", "holds no eval answers"),
                          ("torn", "is not a samples.jsonl")]:
        r = subprocess.run([sys.executable, "report.py", before, str(tmp_path / name)], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_eval_samples_log_mean_pass_and_mixed_rate_and_leave_training_untouched(tiny_model_dir,
                                                                                tmp_path):
    grpo.main(small_config(tiny_model_dir, tmp_path / "plain", max_steps=2))
    grpo.main(small_config(tiny_model_dir, tmp_path / "sampled", max_steps=2, eval_samples=2))
    plain, sampled = read_log(tmp_path / "plain"), read_log(tmp_path / "sampled")
    for row in sampled:
        assert row["eval_samples"] == 2 and 0 <= row["eval_mixed_rate"] <= 1
        assert 0 <= row["eval_mean_at_k"] <= row["eval_pass_at_k"] <= 1
        assert row["eval_accuracy_se"] >= 0
    assert "eval_gain" not in sampled[0] and {"eval_gain", "eval_gain_se",
                                              "eval_gain_p"} <= set(sampled[1])
    timing = {"step_s", "sample_s", "tokens_per_s", "sample_tokens_per_s"}
    same = lambda row: {k: v for k, v in row.items() if not k.startswith("eval_")
                        and k not in timing}
    assert [same(r) for r in plain] == [same(r) for r in sampled]  # the eval's own random stream


def test_a_second_run_never_overwrites_or_mixes_into_the_first(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    grpo.main(small_config(tiny_model_dir, out, max_steps=1))
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "samples.jsonl")}
    r = run_cli("--model", tiny_model_dir, "--out_dir", str(out), "--max_new_tokens", "8")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "holds a run already: --resume continues it, --overwrite starts again" in r.stderr
    assert {f: (out / f).read_bytes() for f in before} == before  # the first run, byte for byte
    # moved aside, not deleted
    grpo.main(small_config(tiny_model_dir, out, max_steps=2, overwrite=True))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and {f: (aside[0] / f).read_bytes() for f in before} == before
    assert [row["step"] for row in read_log(out)] == [0, 1, 2]  # one run per log


def test_a_second_warmup_never_overwrites_the_first(tmp_path):
    import sft
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "ckpt.pt").write_bytes(b"a finished warmup")
    r = subprocess.run([sys.executable, "sft.py", "--out_dir", str(tmp_path / "sft")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "holds a run already" in r.stderr and "--overwrite" in r.stderr
    assert (tmp_path / "sft" / "ckpt.pt").read_bytes() == b"a finished warmup"
    assert sft.SFTConfig.__dataclass_fields__["overwrite"].default is False


def test_init_from_a_checkpoint_of_another_task_says_so_and_goes_on(tiny_model_dir, tmp_path,
                                                                    capsys):
    grpo.main(small_config(tiny_model_dir, tmp_path / "warm", max_steps=1))
    grpo.main(small_config(tiny_model_dir, tmp_path / "rl", task="chain_sum", eval_only=True,
                           init_from=str(tmp_path / "warm" / "ckpt.pt")))
    note = f"note: {tmp_path / 'warm' / 'ckpt.pt'} was trained on --task syllogism, this run on " \
           f"--task chain_sum"
    assert note in capsys.readouterr().out and read_log(tmp_path / "rl")


def test_a_fresh_model_that_never_writes_the_tags_stops_before_training_and_names_the_warmup(
        tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = run_cli("--model", tiny_model_dir, "--out_dir", str(out), "--max_new_tokens", "8",
                "--eval_size", "4", "--dtype", "float32", "--task", "chain_sum")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: no greedy answer to held-out questions was well-formed, so every reward would be "
        "the same: warm up first: python sft.py --task 'chain_sum', then python grpo.py "
        "--init_from out-sft/ckpt.pt")
    assert not out.exists()  # 32 greedy answers said it: nothing trained, nothing written


def test_steps_with_nothing_to_learn_stop_the_run_with_the_reason():
    def step(n, **kw):
        return {"step": n, "zero_adv_rate": 1.0, "format_rate": 0.9, "correct_rate": 0.0, **kw}

    rows = [{"step": 0, "eval_format_rate": 0.9}, step(1), step(2)]
    assert report.no_signal(rows, 3, "t") == ""  # two steps are not three
    assert report.no_signal(rows + [step(3)], 3, "t").startswith("steps 1-3: every advantage was 0")
    assert "no answer was right: the task is too hard" in report.no_signal(rows + [step(3)], 3, "t")
    assert "all right or all wrong" in report.no_signal(rows + [step(3, correct_rate=0.5)], 3, "t")
    assert "python sft.py --task 't'" in report.no_signal(rows + [step(3, format_rate=0.0)], 1, "t")
    # one group differed: signal
    assert report.no_signal(rows + [step(3, zero_adv_rate=0.9)], 3, "t") == ""
    assert report.no_signal(rows + [step(3)], 0, "t") == ""  # 0: never stop
    assert report.no_signal([{"step": 0, "eval_format_rate": 0.0}], 0, "t") == ""


def test_report_to_tensorboard_writes_every_log_row(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="an optional tracker: .ci/run installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    grpo.main(small_config(tiny_model_dir, out, max_steps=2, report_to="tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_accuracy")] == [0, 1, 2]
    logged = [r["reward_mean"] for r in read_log(out)[1:]]
    assert [e.value for e in events.Scalars("reward_mean")] == pytest.approx(logged)


def test_report_to_wandb_logs_offline(tiny_model_dir, tmp_path):
    pytest.importorskip("wandb", reason="an optional tracker: .ci/run installs it")
    out = tmp_path / "run"
    cfg = dataclasses.asdict(small_config(tiny_model_dir, out, max_steps=1))
    args = [f"--{k}={v}" for k, v in cfg.items()
            if v != getattr(grpo.Config, k, None) and not isinstance(v, bool)]
    r = run_cli(*args, "--report_to", "wandb", timeout=300)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))  # what `wandb sync` uploads


def test_report_to_without_its_package_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    no_wandb = lambda name, *a: None if name == "wandb" else real(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", no_wandb)
    with pytest.raises(flags.BadInput,
                       match="--report_to wandb needs its package: pip install wandb"):
        grpo.main(small_config(tiny_model_dir, tmp_path / "run", max_steps=1, report_to="wandb"))
    assert not (tmp_path / "run").exists()


def test_a_warmup_that_taught_no_tags_stops_after_the_step_0_eval(tiny_model_dir, tmp_path):
    # a checkpoint that writes no tags
    grpo.main(small_config(tiny_model_dir, tmp_path / "warm", max_steps=1))
    with pytest.raises(flags.BadInput,
                       match="no greedy answer to held-out questions was well-formed"):
        grpo.main(small_config(tiny_model_dir, tmp_path / "rl",
                               init_from=str(tmp_path / "warm" / "ckpt.pt"), no_signal_steps=3))
    assert [row["step"] for row in read_log(tmp_path / "rl")] == [0]  # the step-0 eval is kept
