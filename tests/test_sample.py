"""sample.py: export a merged model that plain transformers loads, and the adapter in PEFT's
layout."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import grpo
import reward
import rundir
import sample
import weights
from conftest import ROOT, logits


@pytest.fixture
def trained_ckpt(tiny_model_dir, tmp_path):
    """A checkpoint whose LoRA weights are far from zero, as after training."""
    cfg = dataclasses.replace(grpo.Config(), model=tiny_model_dir, lora_r=4, lora_alpha=8.0)
    model, _ = weights.load(tiny_model_dir, "cpu", torch.float32)
    grpo.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    path = str(tmp_path / "ckpt.pt")
    rundir.save_checkpoint(path, grpo.trainable_state_dict(model),
                           torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                           cfg, 1, 0, torch.Generator())
    return path


def test_merged_export_gives_the_logits_of_base_plus_adapter(trained_ckpt, tmp_path):
    model, tok, cfg = sample.load(trained_ckpt, dtype="float32")
    ids = torch.tensor([reward.encode_prompt(tok, "Is 7 prime?")])
    with torch.no_grad():
        adapted = logits(model, ids)
        with grpo.lora_disabled(model):
            base = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", trained_ckpt, "--export", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, none of our code
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA"
    assert adapter_cfg["r"] == 4
    assert adapter_cfg["lora_alpha"] == 8.0
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 7 * 2  # A and B of 7 projections in 2 layers


def test_sample_answers_held_out_questions_with_reward_parts(trained_ckpt):
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", trained_ckpt, "--n", "2",
                        "--max_new_tokens", "8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("reference ") == 2 and "score" in r.stdout


def test_peft_loads_the_exported_adapter(trained_ckpt, tmp_path):
    # not a dependency of the project: checked where it is installed
    peft = pytest.importorskip("peft")
    model, tok, cfg = sample.load(trained_ckpt, dtype="float32")
    ids = torch.tensor([reward.encode_prompt(tok, "Is 7 prime?")])
    with torch.no_grad():
        adapted = logits(model, ids)
    sample.export_peft_adapter(model, cfg, cfg.model, str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    with torch.no_grad():
        peft_logits = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(ids).logits
    assert torch.allclose(peft_logits, adapted, atol=1e-4)
