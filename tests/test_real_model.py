"""The bundled SmolLM2-135M-Instruct (offline): sampler equality and the whole command of the
README."""
import json
import os
import subprocess
import sys

import pytest
import torch

import grpo
import rundir
import reward
from model import to_hf
import weights
from conftest import logits

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is the capital of France?", "Is 17 a prime number? Answer Yes or No.",
             "Consider these statements:\n1. All cats are animals\n2. Some animals are "
             "pets\n\nDoes it logically follow that:\nSome cats are pets?\n(Answer Yes or No)"]


def test_our_model_gives_the_logits_of_transformers_on_the_real_model(real_model):
    from transformers import AutoModelForCausalLM
    model, tok = real_model
    hf = AutoModelForCausalLM.from_pretrained(weights.resolve("SmolLM-135M")[0],
                                              dtype=torch.float32)
    ids = torch.tensor([reward.encode_prompt(tok, q) for q in QUESTIONS[:1]])
    with torch.no_grad():
        assert torch.allclose(logits(model, ids), hf(ids).logits, atol=1e-4)


def test_greedy_sampler_matches_generate_on_the_real_model(real_model):
    model, tok = real_model
    prompts = [reward.encode_prompt(tok, q) for q in QUESTIONS]
    ours, truncated = grpo.generate(model, prompts, 1, 40, 0.0, 1.0, tok.eos_token_id)
    ids, mask = grpo.pad(prompts, tok.eos_token_id, left=True)
    out = to_hf(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=40,
                                  do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.eos_token_id)[:, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    assert ours == [row[:row.index(eos) + 1] if eos in row else row for row in out]
    assert not all(truncated)
    assert "Paris" in tok.decode(ours[0])


def test_greedy_sampler_matches_full_recompute_on_the_real_model(real_model):
    model, tok = real_model
    prompt = reward.encode_prompt(tok, QUESTIONS[2])
    (ours,), _ = grpo.generate(model, [prompt], 1, 24, 0.0, 1.0, tok.eos_token_id)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(ours)):
            seq.append(int(logits(model, torch.tensor([seq]))[0, -1].argmax()))
    assert ours == seq[len(prompt):]


def test_the_short_training_command_runs_offline_and_its_checkpoint_loads(tmp_path):
    out = tmp_path / "D"
    r = subprocess.run([sys.executable, "grpo.py", "--max_steps", "2", "--out_dir", str(out),
                        "--exploration_batchsize", "2", "--G", "2", "--max_new_tokens", "16",
                        "--buffer_size", "4",
                        "--batch_size", "2", "--gradient_accumulation_steps", "2", "--eval_size",
                        "4",
                        # the base model writes no tags: train it all the same
                        "--no_signal_steps", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model: SmolLM2-135M-Instruct" in r.stdout
    steps = [json.loads(line) for line in open(out / "log.jsonl") if '"reward_mean"' in line]
    assert [s["step"] for s in steps] == [1, 2]
    for key in ("reward_mean", "reward_std", "correct_rate", "format_rate", "completion_len_mean",
                "truncated_rate", "clip_frac", "loss", "step_s", "tokens_per_s"):
        assert all(key in s for s in steps)
    model, _ = weights.load("SmolLM-135M", "cpu", torch.float32)
    grpo.apply_lora(model, 32, 64.0, grpo.Config.lora_targets)
    ckpt = rundir.read_checkpoint(str(out / "ckpt.pt"), grpo.Config())
    rundir.load_weights(model, ckpt)
    assert ckpt["step"] == 2


def test_bench_json_reports_every_figure_the_readme_quotes():
    """A short bench.py run (4 new tokens, one GRPO step): every key is there and every figure is
    sane."""
    out = subprocess.run([sys.executable, "bench.py", "--json", "--new_tokens", "4", "--steps",
                          "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ["matmul_gflops", "sampler_tok_s", "hf_generate_tok_s", "sampler_vs_hf",
                "sampler_vs_limit", "train_tok_s", "train_vs_limit", "grpo_step_s", "peak_rss_mb",
                "sampler_default_rows_tok_s"]:
        assert r[key] > 0, key
    assert r["grpo_step_s"] == r["grpo_rollout_s"] + r["grpo_update_s"]
    assert r["sampler_vs_hf"] == r["sampler_tok_s"] / r["hf_generate_tok_s"]
    assert r["cpu"] and [run["dtype"] for run in r["runs"]][-1] == r["dtype"]


def test_the_base_model_without_a_warmup_is_stopped_at_once_with_the_warmup_command(tmp_path):
    r = subprocess.run([sys.executable, "grpo.py", "--out_dir", str(tmp_path / "D")], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: no greedy answer to held-out "
                                                        "questions was well-formed")
    assert "python sft.py --task 'syllogism:invalid_ratio=0.5'" in r.stderr
    assert not (tmp_path / "D").exists()
