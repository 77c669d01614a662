"""Every flag of every program: a bad value is one line on stderr and exit code 2, before anything
is written. The programs run in-process through flags.run (the code path of `python prog.py`);
test_cli runs a few as real commands."""
import dataclasses
import os
import sys

import pytest

import bench
import flags
import grpo
import sample
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_GRPO = [
    (["--G", "1"], "--G 1: must be at least 2"),
    (["--G", "six"], "argument --G: invalid int value"),
    (["--top_p", "0"], "--top_p 0.0: must be above 0"),
    (["--top_p", "1.5"], "--top_p 1.5: must be at most 1"),
    (["--temperature", "0"], "--temperature 0.0: must be above 0"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number"),
    (["--learning_rate=-1e-5"], "--learning_rate -1e-05: must be at least 0"),
    (["--lora_r=-4"], "--lora_r -4: must be at least 0"),
    (["--lora_alpha", "0"], "--lora_alpha 0.0: must be above 0"),
    (["--eps_low", "1"], "--eps_low 1.0: must be below 1"),
    (["--eps_high=-0.1"], "--eps_high -0.1: must be at least 0"),
    (["--beta=-1"], "--beta -1.0: must be at least 0"),
    (["--grad_clip=-1"], "--grad_clip -1.0: must be at least 0"),
    (["--weight_decay=-0.1"], "--weight_decay -0.1: must be at least 0"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (["--buffer_size", "0"], "--buffer_size 0: must be at least 1"),
    (["--exploration_batchsize", "0"], "--exploration_batchsize 0: must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--eval_size", "0"], "--eval_size 0: must be at least 1"),
    (["--eval_samples=-2"], "--eval_samples -2: must be at least 0"),
    (["--max_steps=-1"], "--max_steps -1: must be at least 0"),
    (["--seed=-1"], "--seed -1: must be at least 0"),
    (["--warmup_steps=-1"], "--warmup_steps -1: must be at least 0"),
    (["--overlong_buffer=-1"], "--overlong_buffer -1: must be at least 0"),
    (["--dynamic_sampling_bound", "0.5"], "--dynamic_sampling_bound 0.5: must be at least 1"),
    (["--pool_size=-3"], "--pool_size -3: must be at least 0"),
    (["--save_interval", "0"], "--save_interval 0: must be at least 1"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda"),
    (["--dtype", "fp8"], "--dtype fp8: choose auto, float32, bfloat16, float16"),
    (["--loss_agg", "mean"], "--loss_agg mean: choose seq, token, dr_grpo"),
    (["--scale_rewards", "batch"], "--scale_rewards batch: choose group, none"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    (["--task", "sylogism"], "did you mean syllogism"),
    (["--task", "syllogism:invalid_ratio"], "write key=value"),
    (["--task", "syllogism:no_such_setting=1"], "no_such_setting"),
    (["--task", "aiw:task_type_weights=[1.0,0"], "[1.0,0 is not valid JSON"),
    # 3 are needed
    (["--task", "aiw:task_type_weights=[1.0,0.5]"], "task 'aiw:task_type_weights=[1.0,0.5]'"),
    (["--task", "syllogism@x"], "task weight 'x'"),
    (["--task", "missing.jsonl"], "--task missing.jsonl: no such file"),
    (["--eval_task", "sylogism"], "did you mean syllogism"),
    (["--model", "./no/such/model"], "no such folder"),
    (["--init_from", "nope.pt"], "checkpoint nope.pt does not exist"),
    (["--resume"], "there is no"),
    (["--model", "{tiny}", "--max_new_tokens", "8", "--lora_targets", "nothing"],
     "--lora_targets nothing: no linear"),
    (["--model", "{tiny}", "--max_new_tokens", "100000"], "exceeds the model's context"),
    (["--out_dir", "{file}"], "is a file: give a folder"),
]
BAD_SFT = [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--n_examples", "0"], "--n_examples 0: must be at least 1"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number"),
    (["--lora_r=-1"], "--lora_r -1: must be at least 0"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--eval_temperature", "0"], "--eval_temperature 0.0: must be above 0"),
    (["--eval_top_p", "2"], "--eval_top_p 2.0: must be at most 1"),
    (["--source", "teacher"], "--source teacher: choose metadata, self"),
    (["--teacher_concurrency", "0"], "--teacher_concurrency 0: must be at least 1"),
    (["--teacher", "http://localhost:1/v1"], "--teacher needs --teacher_model"),
    (["--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--task", "sylogism"], "did you mean syllogism"),
    (["--model", "./no/such/model"], "no such folder"),
    (["--out_dir", "{file}"], "is a file: give a folder"),
    (["--out_dir", "/proc/no/such/run"], "--out_dir /proc/no/such/run cannot be written"),
    (["--out_dir", "{file}/run"], "cannot be written (Not a directory)"),
]
BAD_SAMPLE = [
    (["--ckpt", "nope.pt"], "checkpoint nope.pt does not exist"),
    (["--ckpt", "{file}"], "is not a checkpoint of grpo.py or sft.py"),
    (["--n", "0"], "--n 0: must be at least 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--temperature=-1"], "--temperature -1.0: must be at least 0"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda"),
]
BAD_BENCH = [
    (["--new_tokens", "0"], "--new_tokens 0: must be at least 1"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda"),
    (["--dtype", "half"], "--dtype half: choose auto, float32, bfloat16, float16"),
    (["--model", "./no/such/model"], "no such folder"),
]


def run_bad(program, cls, argv, tmp_path, tiny_model_dir, monkeypatch, capsys) -> str:
    """Run a program in tmp_path with bad input: exit code 2, one line on stderr, nothing written.
    Returns it."""
    junk = tmp_path / "junk.txt"
    junk.write_text("not a folder, not a checkpoint")
    argv = [a.replace("{tiny}", tiny_model_dir).replace("{file}", str(junk)) for a in argv]
    writes = program not in (sample.main, bench.main)
    out = ["--out_dir", str(tmp_path / "out")] if "--out_dir" not in argv and writes else []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prog", *argv, *out])
    with pytest.raises(SystemExit) as e:
        # as __main__ does
        flags.run(program, cls, "", program={grpo.main: "grpo", sft.main: "sft"}.get(program))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert sorted(os.listdir(tmp_path)) == ["junk.txt"]  # nothing written
    return err


@pytest.mark.parametrize("argv, message", BAD_GRPO, ids=[" ".join(a) for a, _ in BAD_GRPO])
def test_grpo_refuses_each_bad_value(argv, message, tmp_path, tiny_model_dir, monkeypatch, capsys):
    assert message in run_bad(grpo.main, grpo.Config, argv, tmp_path, tiny_model_dir, monkeypatch,
                              capsys)


@pytest.mark.parametrize("argv, message", BAD_SFT, ids=[" ".join(a) for a, _ in BAD_SFT])
def test_sft_refuses_each_bad_value(argv, message, tmp_path, tiny_model_dir, monkeypatch, capsys):
    assert message in run_bad(sft.main, sft.SFTConfig, argv, tmp_path, tiny_model_dir, monkeypatch,
                              capsys)


@pytest.mark.parametrize("argv, message", BAD_SAMPLE, ids=[" ".join(a) for a, _ in BAD_SAMPLE])
def test_sample_refuses_each_bad_value(argv, message, tmp_path, tiny_model_dir, monkeypatch,
                                       capsys):
    assert message in run_bad(sample.main, sample.SampleConfig, argv, tmp_path, tiny_model_dir,
                              monkeypatch, capsys)


@pytest.mark.parametrize("argv, message", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bench_refuses_each_bad_value(argv, message, tmp_path, tiny_model_dir, monkeypatch, capsys):
    assert message in run_bad(bench.main, bench.BenchConfig, argv, tmp_path, tiny_model_dir,
                              monkeypatch, capsys)


def test_a_setting_whose_value_is_a_json_list_reaches_reasoning_gym():
    import tasks as T
    task = T.make_task("aiw:task_type_weights=[1.0,0,0]@2,syllogism", 50, 0)
    assert {T.source(e) for e in task} == {"aiw", "syllogism"}
    assert {e["metadata"]["task_type"] for e in task if T.source(e) == "aiw"} == {"siblings"}


# --- recipes: --config FILE
# -----------------------------------------------------------------------------------

BAD_RECIPES = [
    ('lerning_rate = 1e-4', "recipe.toml: lerning_rate is not a flag of grpo.py"),
    ('[grpo]\nlerning_rate = 1e-4', "recipe.toml: [grpo] lerning_rate is not a flag of grpo.py"),
    ('epochs = 2', "recipe.toml: epochs is not a flag of grpo.py: put it under the section"),
    ('[grpo]\nlearning_rate = "1e-4"', 'recipe.toml: [grpo] learning_rate = "1e-4": must be float'),
    ('[grpo]\nG = 6.0', "recipe.toml: [grpo] G = 6.0: must be int"),
    ('[grpo]\nG = true', "recipe.toml: [grpo] G = true: must be int"),
    ('[grpo]\nG = 1', "recipe.toml: [grpo] --G 1: must be at least 2"),
    ('[grpo]\nloss_agg = "mean"',
     "recipe.toml: [grpo] --loss_agg mean: choose seq, token, dr_grpo"),
    ('[grpo]\nlearning_rate = nan',
     "recipe.toml: [grpo] --learning_rate nan: must be a finite number"),
    ('[grpo]\ntask = ["syllogism"]', "must be str"),
    ('[rl]\nG = 6', "recipe.toml: unknown section [rl]"),
    ('[grpo\nG = 6', "--config {recipe}: not valid TOML"),
    ('G = = 6', "not valid TOML"),
    (None, "--config {recipe}: no such file"),
]


@pytest.mark.parametrize("text, message", BAD_RECIPES, ids=[str(t) for t, _ in BAD_RECIPES])
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(text, message, tmp_path_factory, tmp_path,
                                                          tiny_model_dir, monkeypatch, capsys):
    recipe = tmp_path_factory.mktemp("recipes") / "recipe.toml"
    if text is not None:
        recipe.write_text(text + "\n")
    err = run_bad(grpo.main, grpo.Config, ["--config", str(recipe)], tmp_path, tiny_model_dir,
                  monkeypatch, capsys)
    assert message.replace("{recipe}", str(recipe)) in err


def test_a_recipe_sets_flags_and_the_command_line_overrides_it(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "chain_sum"\nseed = 3\n[sft]\nepochs = 1\n[grpo]\nlearning_rate = '
                      '1\nG = 4\n')
    cfg = flags.parse_config(grpo.Config, ["--config", str(recipe), "--G", "8"], program="grpo")
    # an int where a float goes
    assert (cfg.task, cfg.seed, cfg.learning_rate, cfg.G) == ("chain_sum", 3, 1.0, 8)
    assert cfg.max_steps == grpo.Config().max_steps  # what the recipe leaves out keeps its default
    warm = flags.parse_config(sft.SFTConfig, ["--config", str(recipe)], program="sft")
    # the shared keys, written once
    assert (warm.task, warm.seed, warm.epochs) == ("chain_sum", 3, 1)


def test_the_resolved_configuration_reads_back_as_the_same_run(tmp_path):
    cfg = dataclasses.replace(grpo.Config(), task='aiw:task_type_weights=[1.0,0,0]',
                              learning_rate=3e-5, dynamic_sampling=True, out_dir='runs/"quoted"')
    (tmp_path / "config.toml").write_text(flags.to_toml(cfg, "grpo"))
    assert flags.parse_config(grpo.Config, ["--config", str(tmp_path / "config.toml")],
                              program="grpo") == cfg


@pytest.mark.parametrize("recipe", sorted(os.listdir(os.path.join(ROOT, "recipes"))))
def test_every_recipe_parses_for_both_programs_and_says_what_it_is(recipe):
    path = os.path.join(ROOT, "recipes", recipe)
    # opens with what it is for
    assert recipe.endswith(".toml") and open(path).read().startswith("# ")
    for cls, program in ((grpo.Config, "grpo"), (sft.SFTConfig, "sft")):
        # every key a flag of its program
        flags.parse_config(cls, ["--config", path], program=program)


def test_the_quick_start_recipe_is_the_command_its_results_came_from():
    path = os.path.join(ROOT, "recipes", "quickstart.toml")
    task = ("simple_equations:min_terms=2:max_terms=2:min_value=1:max_value=10:"
            "operators_weights=[0.5,0.5,0]")
    grpo_flags = ["--init_from", "out-sft/ckpt.pt", "--task", task, "--max_steps", "30",
                  "--eval_interval", "10", "--buffer_size", "96", "--exploration_batchsize", "16",
                  "--gradient_accumulation_steps", "3", "--max_new_tokens", "96",
                  "--temperature", "1.0", "--learning_rate", "1e-4"]
    assert (flags.parse_config(grpo.Config, ["--config", path], program="grpo")
            == flags.parse_config(grpo.Config, grpo_flags, program="grpo"))
    sft_flags = ["--task", task, "--n_examples", "256", "--epochs", "1", "--no-eval_before",
                 "--no-eval_after"]
    assert (flags.parse_config(sft.SFTConfig, ["--config", path], program="sft")
            == flags.parse_config(sft.SFTConfig, sft_flags, program="sft"))
