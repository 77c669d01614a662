"""bf16 on CPU: the same algorithm within bf16's rounding. Each comparison is against float64 on the
same (bf16-rounded) weights, with a tolerance that a wrong position, prompt or mask would exceed;
the tests check that too. The tiny models use initializer_range 0.05: at 0.2 their activations are
so large that bf16's error reaches the size of those mistakes."""
import pytest
import torch

import grpo
import packed
import weights
from conftest import (EOS, PROMPTS, SHARED_PREFIX, cfg_for, logits, make_buffer, on_policy,
                      tiny_model)

TOL = 0.05  # largest bf16 error seen here 0.023; the nearest mistake 0.12


def pair(arch="llama", lora=False):
    """The same weights in bf16 and in float64 (the bf16 values, widened); LoRA weights random, fp32
    in both."""
    models = []
    for dtype in (torch.bfloat16, torch.float64):
        m = tiny_model(arch, dtype=torch.bfloat16, initializer_range=0.05).to(dtype)
        if lora:
            grpo.apply_lora(m, 4, 8.0, "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj")
            g = torch.Generator().manual_seed(1)
            for p in m.parameters():
                if p.requires_grad:
                    p.data = (torch.randn(p.shape, generator=g,
                                          dtype=torch.float64) * 0.05).to(p.dtype)
        models.append(m)
    return models


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("prompts", [PROMPTS, SHARED_PREFIX], ids=["prompts", "shared_prefix"])
def test_bf16_sampler_draws_from_the_full_model_s_logits(arch, prompts, monkeypatch):
    m16, m64 = pair(arch)
    seen, sample_next = [], grpo.sample_next
    spy = lambda scores, *a: seen.append(scores.clone()) or sample_next(scores, *a)
    monkeypatch.setattr(grpo, "sample_next", spy)
    G = 4
    completions, _ = grpo.generate(m16, prompts, G, 16, 1.0, 1.0, EOS,
                                   torch.Generator().manual_seed(0))
    for i, c in enumerate(completions):
        prompt, other = prompts[i // G], prompts[(i // G + 1) % len(prompts)]
        for t in range(len(c)):
            want = logits(m64, torch.tensor([prompt + c[:t]]))[0, -1]
            # one of step t's rows is row i
            assert (seen[t].double() - want).abs().max(-1).values.min() < TOL
            mistakes = [other + c[:t], prompt[1:] + c[:t]] + ([prompt + c[:t - 1]] if t else [])
            # a wrong prompt, a dropped token, the previous position: all beyond TOL
            for wrong in mistakes:
                assert (logits(m64, torch.tensor([wrong]))[0, -1] - want).abs().max() > TOL


def test_bf16_log_probs_and_lora_gradients_match_float64():
    m16, m64 = pair(lora=True)
    # fp32 master weights
    assert {p.dtype for p in m16.parameters() if p.requires_grad} == {torch.float32}
    buffer = make_buffer(m64)
    with torch.no_grad():
        lp16, lp64 = (grpo.completion_logprobs(m, buffer, EOS, 0.7)[0] for m in (m16, m64))
    assert lp16.dtype == torch.float32 and (lp16.double() - lp64).abs().max() < 0.03

    def grads(m):
        grpo.accumulate_gradients(m, [on_policy(buffer)], cfg_for(), EOS)
        return torch.cat([p.grad.double().flatten() for p in m.parameters() if p.requires_grad])

    g16, g64 = grads(m16), grads(m64)
    assert (g16 - g64).norm() < 0.02 * g64.norm()


def test_lora_weights_stay_fp32_in_a_bf16_model_so_small_steps_are_kept():
    model = tiny_model("llama", dtype=torch.bfloat16, initializer_range=0.05)
    grpo.apply_lora(model, 4, 8.0, "q_proj")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.merged_weight().dtype == torch.bfloat16
    with torch.no_grad():  # as after some training: both matrices far from 0
        layer.lora_A.normal_(0, 0.1)
        layer.lora_B.normal_(0, 0.1)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-5, weight_decay=0.0)
    before = layer.lora_B.detach().clone()
    logits(model, torch.tensor([PROMPTS[0]])).float().square().mean().backward()
    opt.step()
    moved = (layer.lora_B - before).abs()
    assert moved.max() > 5e-6  # AdamW's first step moves each weight by about lr
    # the same step on bf16 weights would be lost: most of them round back to where they were
    same = layer.lora_B.detach().to(torch.bfloat16) == before.to(torch.bfloat16)
    assert same.float().mean() > 0.9


def test_a_bf16_update_runs_and_changes_only_lora_weights():
    model = tiny_model("llama", dtype=torch.bfloat16, initializer_range=0.05)
    grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj,down_proj")
    cfg = cfg_for(batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.learning_rate)
    stats = grpo.update(model, opt, make_buffer(model), cfg, EOS, torch.Generator().manual_seed(0))
    assert stats["optimizer_steps"] == 2 and stats["grad_norm"] > 0 and stats["skipped_steps"] == 0


@pytest.mark.skipif(not packed.packing_works(torch.bfloat16),
                    reason="oneDNN's packed bf16 ops are not in this torch")
def test_packed_bf16_weights_multiply_like_f_linear():
    w, x = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
    frozen = packed.FrozenLinear(w, None, rows=5)
    assert frozen.packed is not None
    assert torch.allclose(frozen(x).float(), torch.nn.functional.linear(x, w).float(), rtol=1e-2,
                          atol=1e-2)


@pytest.mark.parametrize("flag, dtype", [("avx512_bf16", torch.bfloat16),
                                         ("amx_bf16", torch.bfloat16), (None, torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_makes_it_fast(flag, dtype, monkeypatch):
    monkeypatch.setattr(weights, "fast_bf16_flag", lambda: flag)
    device, chosen, why = weights.resolve_device("cpu", "auto")
    assert chosen == dtype and (flag or "neither") in why
    assert weights.resolve_device("cpu", "float32")[1] == torch.float32  # asked for: as asked
