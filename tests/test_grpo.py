"""Specification of grpo.py on tiny random models: sampler, log-probs, buffer, advantages, loss,
LoRA."""
import contextlib
import dataclasses
import math
import platform
import types

import pytest
import torch
import torch.nn.functional as F

import grpo
import packed
import report
import rundir
import tasks
from conftest import (EOS, ListTask, PROMPTS, SHARED_PREFIX, cfg_for, entry, hf_twin, logits,
                      make_buffer, on_policy, padded_sequences, tiny_model)
from flags import BadInput


def greedy_full_recompute(model, prompt, max_new_tokens):
    """The simplest possible decoder: one prompt, no padding, no cache, the whole sequence re-run
    each token."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(logits(model, torch.tensor([seq]))[0, -1].argmax()))
        if seq[-1] == EOS:
            break
    return seq[len(prompt):]


def hf_generate_greedy(model, prompts, max_new_tokens):
    ids, mask = grpo.pad(prompts, EOS, left=True)
    out = hf_twin(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False,
                         eos_token_id=EOS, pad_token_id=EOS)[:, ids.shape[1]:]
    completions = []
    for row in out.tolist():  # HF pads finished rows with EOS: cut after the first one
        completions.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return completions


def test_kv_cache_sampling_matches_full_recompute_and_generate(any_tiny_model):
    model = any_tiny_model
    ours, truncated = grpo.generate(model, PROMPTS, 1, 24, 0.0, 1.0, EOS)
    assert ours == [greedy_full_recompute(model, p, 24) for p in PROMPTS]
    assert ours == hf_generate_greedy(model, PROMPTS, 24)
    assert truncated == [c[-1] != EOS for c in ours]
    assert not all(truncated)  # the comparison covers rows that stop at EOS
    assert all(len(c) <= 24 for c in ours)


def test_sampling_with_an_adapter_merges_it_and_matches_the_unmerged_model(tiny):
    grpo.apply_lora(tiny, 4, 8.0, "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj")
    for p in tiny.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    q_proj, lm_head = tiny.model.layers[0].self_attn.q_proj, tiny.lm_head
    seen = []  # the linear layers that run while sampling: FrozenLinear copies only
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: seen.append(m) if isinstance(m, (torch.nn.Linear, grpo.LoRALinear,
                                                      packed.FrozenLinear)) else None)
    ours, _ = grpo.generate(tiny, PROMPTS, 1, 24, 0.0, 1.0, EOS)
    handle.remove()
    assert seen and {type(m).__name__ for m in seen} == {"FrozenLinear"}
    # per block: q, k and v as one product, o, gate and up as one, down; and the vocabulary
    # projection
    assert len({id(m) for m in seen}) == 2 * 4 + 1
    assert {tuple(m.weight.shape) for m in seen} == {(128, 64), (64, 64), (256, 64), (64, 128),
                                                     (128, 64)}
    assert tiny.model.layers[0].self_attn.q_proj is q_proj and tiny.lm_head is lm_head  # put back
    # the unmerged adapter, token for token
    assert ours == [greedy_full_recompute(tiny, p, 24) for p in PROMPTS]


def test_packed_weights_are_used_on_x86_64():
    """Else the packed-weight tests below would only cover the F.linear fallback."""
    if platform.machine() in ("x86_64", "AMD64"):
        assert packed.packing_works()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_fp32_sampling_matches_the_unpacked_model(kind):
    """In fp32 on CPU, FrozenLinear multiplies by oneDNN-packed weights: same greedy tokens as the
    plain model."""
    model = tiny_model(kind).float()
    grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj,down_proj")
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.no_grad():
        # q, v and down with LoRA, k, gate and up plain, the vocabulary projection
        expected = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), mlp.gate_proj(x),
                    mlp.up_proj(x), mlp.down_proj(
            torch.randn(3, 5, model.config.intermediate_size,
                        generator=torch.Generator().manual_seed(0))),
            model.lm_head(x)]
        with packed.frozen_linears(model, 3):
            frozen = [m for m in model.modules() if isinstance(m, packed.FrozenLinear)]
            assert frozen and all(m.packed is not None for m in frozen) == packed.packing_works()
            got = [*attn.qkv(x).split(attn.sizes, -1), *mlp.gate_up(x).chunk(2, -1), mlp.down_proj(
                torch.randn(3, 5, model.config.intermediate_size,
                            generator=torch.Generator().manual_seed(0))),
                model.lm_head(x)]
            for want, g in zip(expected, got):
                assert torch.allclose(g, want, rtol=1e-5, atol=1e-5)
        # one product each while sampling, and only then
        assert attn.qkv is None and mlp.gate_up is None
    ours, _ = grpo.generate(model, PROMPTS, 1, 24, 0.0, 1.0, EOS)
    assert ours == [greedy_full_recompute(model, p, 24) for p in PROMPTS]


def test_each_row_stops_at_eos_and_truncation_is_marked():
    model = tiny_model("llama")
    completions, truncated = grpo.generate(model, PROMPTS, 4, 12, 1.0, 1.0, EOS,
                                           torch.Generator().manual_seed(0))
    assert len(completions) == 12
    assert any(truncated) and not all(truncated)
    for c, t in zip(completions, truncated):
        assert (EOS not in c and len(c) == 12) if t else (c[-1] == EOS and c.count(EOS) == 1)


def test_g_samples_share_the_prompt_cache_and_greedy_copies_agree(tiny):
    completions, _ = grpo.generate(tiny, PROMPTS, 3, 16, 0.0, 1.0, EOS)
    singles, _ = grpo.generate(tiny, PROMPTS, 1, 16, 0.0, 1.0, EOS)
    assert completions == [c for c in singles for _ in range(3)]


@pytest.mark.parametrize("prompts", [PROMPTS, SHARED_PREFIX], ids=["prompts", "shared_prefix"])
def test_every_row_samples_from_the_full_model_s_logits_while_rows_leave_the_batch(
        any_tiny_model, prompts, monkeypatch):
    """Sampled rows stop at different times, also within one prompt's G samples, and leave the
    batch; at every step, each row still running draws from the logits of a full forward pass over
    its prompt and tokens so far."""
    assert grpo.common_prefix(prompts) == (1 if prompts is PROMPTS else 4)
    model, G, seen = any_tiny_model, 4, []
    sample_next = grpo.sample_next
    # sampling overwrites
    record = lambda logits, *args: seen.append(logits.clone()) or sample_next(logits, *args)
    monkeypatch.setattr(grpo, "sample_next", record)
    completions, _ = grpo.generate(model, prompts, G, 16, 1.0, 1.0, EOS,
                                   torch.Generator().manual_seed(0))
    assert len(seen[-1]) < len(seen[0])  # rows left the batch
    groups = [completions[i:i + G] for i in range(0, len(completions), G)]
    assert any(len({len(c) for c in group}) > 1 for group in groups)
    for i, c in enumerate(completions):
        for t in range(len(c)):
            want = logits(model, torch.tensor([prompts[i // G] + c[:t]]))[0, -1]
            # one of step t's rows is row i
            assert (seen[t] - want).abs().max(-1).values.min() < 1e-10


def test_sampling_is_reproducible_with_a_fixed_seed(tiny):
    run = lambda seed: grpo.generate(tiny, PROMPTS, 4, 16, 1.0, 0.9, EOS,
                                     torch.Generator().manual_seed(seed))[0]
    assert run(123) == run(123)
    assert run(123) != run(124)


def test_top_p_samples_exactly_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(4000, 1)
    tokens = grpo.sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert counts[3] == 0  # 0.5 + 0.3 < 0.9 needs token 2; token 3 is outside the nucleus
    assert torch.allclose(counts[:3], probs[0, :3] / 0.95, atol=0.03)


def test_top_p_widens_past_64_candidates_when_the_nucleus_is_wide():
    torch.manual_seed(0)
    logits = torch.randn(1000) * 0.01  # nearly flat: top_p 0.5 needs about 500 tokens
    nucleus_size = int((logits.softmax(-1).sort(descending=True).values.cumsum(0) < 0.5).sum()) + 1
    allowed = set(logits.argsort(descending=True)[:nucleus_size].tolist())
    peaked = torch.full((1000,), -30.0)
    peaked[[7, 3, 5]] = torch.tensor([0.4, 0.35, 0.25]).log()  # a nucleus of 2 tokens: 7 and 3
    # wide and narrow rows mixed: only the wide ones widen
    rows = torch.stack([logits, peaked]).repeat(3000, 1)
    tokens = grpo.sample_next(rows, 1.0, 0.5, torch.Generator().manual_seed(0))
    wide, narrow = tokens[0::2].tolist(), tokens[1::2]
    assert set(wide) <= allowed
    assert len(set(wide)) > 300
    assert set(narrow.tolist()) == {3, 7} and abs((narrow == 7).float().mean() - 0.4 / 0.75) < 0.05


def test_collate_keeps_each_prompt_once_and_masks_exactly_the_completion():
    samples = [grpo.Sample([1, 5, 9], [7, EOS]), grpo.Sample([1], [4, 4, 4, 4, EOS]),
               grpo.Sample([1, 5, 9], [EOS])]
    prompts, prompt_row, ids, mask, targets = grpo.collate(samples, EOS, "cpu")
    assert prompts == [[1, 5, 9], [1]]
    assert prompt_row.tolist() == [0, 1, 0]
    assert ids.tolist() == [[7, EOS, EOS, EOS, EOS], [4, 4, 4, 4, EOS], [EOS, EOS, EOS, EOS, EOS]]
    # the mask comes from lengths: EOS is trained on though EOS == pad
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert targets.tolist() == [7, EOS, 4, 4, 4, 4, EOS, EOS]


@pytest.mark.parametrize("prompts", [PROMPTS, SHARED_PREFIX], ids=["prefix_1", "prefix_4"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_completion_logprobs_equal_log_softmax_of_full_logits(kind, prompts):
    """Shared prompts, their common prefix run once, a prompt cache read by the completions,
    positions continued after each prompt: the same numbers as running each padded prompt +
    completion whole through the transformers twin."""
    model = tiny_model(kind)
    buffer = make_buffer(model, prompts=prompts)
    batch = grpo.collate(buffer, EOS, "cpu")
    assert len(batch[0]) == len(prompts) < len(buffer)  # each prompt runs once
    # several small chunks
    ours, entropy = grpo.completion_logprobs(model, buffer, EOS, temperature=0.7, chunk=5)
    ids, mask, predicts, targets = padded_sequences(buffer)
    full = (hf_twin(model)(input_ids=ids,
                           attention_mask=mask).logits / 0.7).log_softmax(-1)[predicts]
    assert torch.allclose(ours, full.gather(-1, targets[:, None]).squeeze(-1), atol=1e-10)
    # the sampling distribution's
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-10)


@pytest.mark.parametrize("keep", [True, False], ids=["softmax_kept", "recomputed"])
def test_token_logprobs_gradient_equals_autograd_of_log_softmax(keep):
    """The hand-written backward of the vocabulary projection, for the hidden states and (full
    fine-tuning) the weight, against autograd through log_softmax."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=g)
    upstream = torch.randn(7, dtype=torch.float64, generator=g)
    ours, entropy = grpo.TokenLogprobs.apply(h, w, targets, 0.7, keep)
    assert not entropy.requires_grad  # watched, never trained on
    (ours * upstream).sum().backward()
    ours_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    expected = (F.linear(h, w) / 0.7).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * upstream).sum().backward()
    assert torch.allclose(ours, expected, atol=1e-12)
    assert torch.allclose(ours_grads[0], h.grad, atol=1e-12)
    assert torch.allclose(ours_grads[1], w.grad, atol=1e-12)


def test_token_logprobs_kept_softmax_gives_the_recomputed_gradient_to_the_bit():
    """Keeping the forward's softmax (the default) or recomputing it in backward (grad_checkpoint)
    must not change a single bit of the gradient: runs stay the same whichever is chosen."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 64, generator=g).bfloat16()
    w = torch.randn(1000, 64, generator=g).bfloat16()
    targets = torch.randint(0, 1000, (300,), generator=g)
    upstream = torch.randn(300, generator=g)
    grads = []
    for keep in (True, False):
        x = h.clone().requires_grad_()
        (grpo.TokenLogprobs.apply(x, w, targets, 0.7, keep)[0] * upstream).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def record_ppo_loss(monkeypatch) -> list:
    calls, ppo_loss = [], grpo.ppo_loss
    spy = lambda logp, old, *a: calls.append((logp.detach(), old)) or ppo_loss(logp, old, *a)
    monkeypatch.setattr(grpo, "ppo_loss", spy)
    return calls


@pytest.mark.parametrize("learning_rate", [0.0, 1e-2])
def test_the_ratio_is_exactly_one_until_the_policy_moves(learning_rate, monkeypatch):
    """Old log-probs come from the very code and minibatches that training runs: the first optimizer
    step's from its own forward pass, the later steps' from a pass made before any update. With
    learning rate 0 every ratio is exactly 1; otherwise only the first step's."""
    model = tiny_model("llama", dtype=torch.float32)
    grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj")
    cfg = cfg_for(batch_size=4, gradient_accumulation_steps=1, learning_rate=learning_rate,
                  warmup_steps=0)
    calls = record_ppo_loss(monkeypatch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.learning_rate)
    grpo.update(model, opt, make_buffer(model), cfg, EOS, torch.Generator().manual_seed(0))
    assert len(calls) == 3  # 12 samples: three minibatches, three optimizer steps
    assert torch.equal(calls[0][0], calls[0][1])
    for logp, old in calls[1:]:
        assert torch.equal(logp, old) == (learning_rate == 0)


def test_the_first_step_keeps_its_own_log_probs_as_the_old_ones_for_later_epochs():
    model = tiny_model("llama", dtype=torch.float32)
    grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj")
    cfg = cfg_for(batch_size=4, gradient_accumulation_steps=1)
    minibatches = grpo.shuffled_minibatches(make_buffer(model), cfg.batch_size,
                                            torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = grpo.completion_logprobs(model, minibatches[0], EOS, cfg.temperature)
    grpo.accumulate_gradients(model, minibatches[:1], cfg, EOS)
    assert all(s.old_logp is not None for s in minibatches[0])
    assert all(s.old_logp is None for mb in minibatches[1:] for s in mb)
    assert torch.equal(torch.cat([s.old_logp for s in minibatches[0]]), expected)


def test_training_through_packed_base_weights_gives_the_same_loss_and_gradient():
    """fp32 on CPU: under frozen_linears(training=True) each LoRA layer's base multiplies by
    oneDNN-packed W (and W^T in backward); the adapter's gradient matches plain F.linear to fp32
    rounding."""
    model = tiny_model("llama", dtype=torch.float32)
    grpo.apply_lora(model, 4, 8.0, "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj")
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    buffer = make_buffer(model)
    cfg = cfg_for()
    params = [p for p in model.parameters() if p.requires_grad]
    bases = [m.base for m in model.modules() if isinstance(m, grpo.LoRALinear)]

    def grads(use_packed):
        model.zero_grad()
        with packed.frozen_linears(model, 16,
                                   training=True) if use_packed else contextlib.nullcontext():
            if use_packed:
                frozen = [m.base for m in model.modules() if isinstance(m, grpo.LoRALinear)]
                assert all(isinstance(f, packed.FrozenLinear) for f in frozen)
                assert all(f.packed_t is not None for f in frozen) == packed.packing_works()
            loss, _, _ = grpo.accumulate_gradients(model, [on_policy(buffer)], cfg, EOS)
        return loss, [p.grad.clone() for p in params]

    plain_loss, plain = grads(False)
    packed_loss, packed_grads = grads(True)
    assert [m.base for m in model.modules() if isinstance(m, grpo.LoRALinear)] == bases  # put back
    assert abs(plain_loss - packed_loss) < 1e-5
    for a, b in zip(plain, packed_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (a - b).abs().max()


def naive_logprobs(model, s, temperature):
    """The log-probs of a sample's completion tokens, its prompt + completion run whole."""
    scaled = logits(model, torch.tensor([s.prompt + s.completion]))[0] / temperature
    logp_all = scaled.log_softmax(-1)
    return logp_all[len(s.prompt) - 1:-1].gather(-1, torch.tensor(s.completion)[:, None])[:, 0]


def naive_loss(model, samples, cfg):
    """The unoptimized reference: each prompt + completion run whole through the model on its own
    (no cache, no padding), full log-softmax, plain averages; with beta, the k3 KL to the model
    with LoRA off."""
    per_seq = []
    for s in samples:
        logp = naive_logprobs(model, s, cfg.temperature)
        ratio = torch.exp(logp - s.old_logp)
        A = s.advantage
        loss = -torch.min(ratio * A, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * A)
        if cfg.beta:
            with torch.no_grad(), grpo.lora_disabled(model):
                ref = naive_logprobs(model, s, cfg.temperature)
            d = ref - logp
            loss = loss + cfg.beta * (torch.exp(d) - d - 1)
        per_seq.append(loss)
    if cfg.loss_agg == "seq":
        return torch.stack([t.mean() for t in per_seq]).mean()
    if cfg.loss_agg == "token":
        return torch.cat(per_seq).sum() / sum(len(t) for t in per_seq)
    return torch.cat(per_seq).sum() / (len(per_seq) * cfg.max_new_tokens)


@pytest.mark.parametrize("loss_agg", ["seq", "token", "dr_grpo"])
def test_grad_accumulation_matches_big_batch_and_the_naive_loss(loss_agg):
    """Also with a zero-advantage group, which accumulate_gradients never runs through the model."""
    model = tiny_model("llama")
    grpo.apply_lora(model, 4, 8.0, "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj")
    # a non-zero adapter so that the gradient reaches every LoRA matrix
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    buffer = make_buffer(model)
    # one question whose rewards were all equal: skipped, yet counted in the divisor
    for s in buffer[4:8]:
        s.advantage = 0.0
    cfg = cfg_for(loss_agg=loss_agg)
    with torch.no_grad():  # the old policy
        logp, _ = grpo.completion_logprobs(model, buffer, EOS, cfg.temperature)
    for s, old_logp in zip(buffer, logp.split([len(s.completion) for s in buffer])):
        s.old_logp = old_logp
    with torch.no_grad():  # move the policy so that ratios differ from 1 and some get clipped
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(step_batches):
        model.zero_grad()
        grpo.accumulate_gradients(model, step_batches, cfg, EOS)
        return [p.grad.clone() for p in params]

    shapes = []  # the token ids the model actually runs
    hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    big = grads([buffer])
    hook.remove()
    # the one token the two other prompts share, once; their own tokens (padded to the longer);
    # then their 8 completions as one row of exactly their tokens, no padding
    trained = buffer[:4] + buffer[8:]
    assert grpo.common_prefix([PROMPTS[0], PROMPTS[2]]) == 1
    assert shapes == [(1, 1), (2, max(len(PROMPTS[0]), len(PROMPTS[2])) - 1),
                      (1, sum(len(s.completion) for s in trained))]
    assert len({len(s.completion) for s in trained}) > 1  # there was padding to leave out
    # 4 micro-batches, the last one shorter
    micro = grads([buffer[i:i + 3] for i in range(0, len(buffer), 3)])
    for a, b in zip(big, micro):
        assert torch.allclose(a, b, atol=1e-12), (a - b).abs().max()
    model.zero_grad()
    naive_loss(model, buffer, cfg).backward()
    for a, p in zip(big, params):
        assert torch.allclose(a, p.grad, atol=1e-12), (a - p.grad).abs().max()
    assert any(g.abs().sum() > 0 for g in big)


def test_the_kl_term_takes_the_model_with_lora_off_as_reference_and_matches_the_naive_loss():
    """beta > 0: every sample runs (zero advantages too), its reference log-probs come from the
    pre-pass with LoRA off, and the gradient is that of the naive loss with its k3 KL term."""
    model = tiny_model("llama")
    grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj,down_proj")
    for p in model.parameters():  # an adapter away from zero: policy and reference differ
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    buffer = make_buffer(model)
    for s in buffer[4:8]:  # advantage 0: still pulled towards the reference
        s.advantage = 0.0
    cfg = cfg_for(beta=0.5, gradient_accumulation_steps=2, batch_size=4)
    minibatches = [buffer[i:i + 4] for i in range(0, len(buffer), 4)]
    grpo.record_old_logprobs(model, minibatches, cfg, EOS)
    with torch.no_grad(), grpo.lora_disabled(model):
        for s in buffer:
            assert torch.allclose(s.ref_logp, naive_logprobs(model, s, cfg.temperature),
                                  atol=1e-10)
    assert [s.old_logp is None for s in buffer] == [True] * 8 + [False] * 4  # first step's own
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    grpo.accumulate_gradients(model, minibatches[:2], cfg, EOS)
    ours = [p.grad.clone() for p in params]
    model.zero_grad()
    naive_loss(model, buffer[:8], cfg).backward()
    for a, p in zip(ours, params):
        assert torch.allclose(a, p.grad, atol=1e-12), (a - p.grad).abs().max()
    assert any(g.abs().sum() > 0 for g in ours)


def test_identical_rewards_give_zero_advantage():
    # six wrong but well-formed answers (0.15 each): their float mean is off by one ulp, yet A must
    # be exactly 0
    rewards = torch.tensor([[0.15] * 6, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [0.0] * 6, [0.85] * 6])
    for scale in (True, False):
        adv = grpo.group_advantages(rewards, scale)
        assert not adv.isnan().any()
        assert adv[0].eq(0).all() and adv[2].eq(0).all() and adv[3].eq(0).all()
        assert torch.allclose(adv[1].sum(), torch.tensor(0.0))
    half = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5, -0.5])
    assert torch.allclose(grpo.group_advantages(rewards, False)[1], half)
    assert torch.allclose(grpo.group_advantages(rewards, True)[1], half / (rewards[1].std() + 1e-4))


def test_ppo_loss_clips_only_in_the_direction_of_the_advantage():
    # ratios 1.5, 1.5, 0.5, 0.5 against old_logp = 0
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = grpo.ppo_loss(logp, torch.zeros(4), None, adv, torch.ones(4), 0.2, 0.2, 0.0)
    # -min(r A, clip(r) A): 1.5 with A>0 is capped at 1.2; 0.5 with A<0 is capped at 0.8
    assert torch.allclose(loss, torch.tensor(-1.2 + 1.5 - 0.5 + 0.8))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_warmup_raises_the_learning_rate_linearly_and_resume_continues_the_ramp():
    def adam(w):
        return torch.optim.AdamW([w], lr=1.0, weight_decay=0.0)

    w = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))
    opt, lrs, moves = adam(w), [], []
    for k in range(5):
        lrs.append(grpo.warmup_lr(opt, [w], 1e-2, 4))
        before = w.detach().clone()
        # any size: AdamW's first step is ~lr
        w.grad = torch.randn(1000, dtype=torch.float64) * 10.0 ** -k
        grpo.optimizer_step(opt, [w], 0.0)
        moves.append((w.detach() - before).abs().max().item())
    assert lrs == [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2]
    # without warmup the first step would move every weight by 1e-2
    assert abs(moves[0] - 2.5e-3) < 1e-6
    resumed = adam(w)
    # --resume restores the optimizer, and with it the count
    resumed.load_state_dict(opt.state_dict())
    assert grpo.warmup_lr(resumed, [w], 1e-2, 10) == 6e-3  # the 6th of 10
    assert grpo.warmup_lr(adam(w), [w], 1e-2, 0) == 1e-2


def test_kl_term_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logp = torch.tensor([-1.0, -2.0])
    zero_adv = torch.zeros(2)
    same, _ = grpo.ppo_loss(logp, logp, logp, zero_adv, torch.ones(2), 0.2, 0.2, 0.1)
    diff, _ = grpo.ppo_loss(logp, logp, logp + 0.3, zero_adv, torch.ones(2), 0.2, 0.2, 0.1)
    assert same.item() == 0 and diff.item() > 0


def test_fresh_lora_leaves_logits_unchanged_and_only_lora_trains(tiny):
    ids = torch.tensor([PROMPTS[2]])
    before = logits(tiny, ids)
    grpo.apply_lora(tiny, 8, 16.0, "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj")
    assert torch.equal(logits(tiny, ids), before)
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    assert set(grpo.trainable_state_dict(tiny)) == set(trainable)


def test_lora_r0_trains_the_full_model(tiny):
    grpo.apply_lora(tiny, 0, 0.0, "q_proj")
    assert all(p.requires_grad for p in tiny.parameters())


def test_lora_disabled_gives_the_base_model_and_merge_equals_the_adapter(tiny):
    ids = torch.tensor([PROMPTS[0]])
    base = logits(tiny, ids)
    grpo.apply_lora(tiny, 4, 8.0, "q_proj,down_proj")
    for p in tiny.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    adapted = logits(tiny, ids)
    assert not torch.allclose(adapted, base)
    with grpo.lora_disabled(tiny):
        assert torch.equal(logits(tiny, ids), base)
    layer = tiny.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.base.in_features, dtype=torch.float64)
    assert torch.allclose(F.linear(x, layer.merged_weight()), layer(x), atol=1e-12)


def test_token_weights_sum_to_the_aggregate_divisor():
    samples = [grpo.Sample([1], [0] * 3), grpo.Sample([1], [0] * 5)]
    seq = grpo.token_weights(samples, "seq", 10)
    assert [w.sum().item() for w in seq] == pytest.approx([0.5, 0.5])
    token = grpo.token_weights(samples, "token", 10)
    assert torch.cat(token).sum().item() == pytest.approx(1.0)
    assert token[0][0].item() == pytest.approx(1 / 8)
    dr = grpo.token_weights(samples, "dr_grpo", 10)
    assert dr[0][0].item() == pytest.approx(1 / 20)


def test_update_changes_only_lora_weights_and_reports_stats():
    model = tiny_model("llama", dtype=torch.float32)
    base = {n: p.clone() for n, p in model.named_parameters()}
    grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj")
    buffer = make_buffer(model)
    cfg = cfg_for(batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2, learning_rate=1e-2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=cfg.learning_rate)
    stats = grpo.update(model, opt, buffer, cfg, EOS, torch.Generator().manual_seed(0))
    # 12 samples = 3 minibatches -> steps of 2 + 1, two epochs
    assert stats["optimizer_steps"] == 2 * 2
    assert 0 <= stats["clip_frac"] <= 1 and stats["grad_norm"] > 0
    # nats; a uniform policy would reach the bound
    assert 0 < stats["entropy"] < math.log(model.config.vocab_size)
    state = dict(model.named_parameters())
    for n, p in base.items():  # frozen weights untouched (names now sit under .base)
        moved = n.replace("q_proj.weight", "q_proj.base.weight")
        moved = moved.replace("v_proj.weight", "v_proj.base.weight")
        assert torch.equal(state[moved], p)
    assert any(state[n].abs().sum() > 0 for n in state if n.endswith("lora_B"))


def test_checkpoint_round_trip(tmp_path, tiny):
    grpo.apply_lora(tiny, 4, 8.0, "q_proj")
    for p in tiny.parameters():
        if p.requires_grad:
            p.data.normal_()
    cfg = dataclasses.replace(grpo.Config(), lora_r=4, lora_alpha=8.0, lora_targets="q_proj")
    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad])
    path = str(tmp_path / "ckpt.pt")
    rundir.save_checkpoint(path, grpo.trainable_state_dict(tiny), opt, cfg, 7, 123,
                           torch.Generator())
    other = tiny_model("llama")
    grpo.apply_lora(other, 4, 8.0, "q_proj")
    ckpt = rundir.read_checkpoint(path, cfg)
    rundir.load_weights(other, ckpt)
    assert ckpt["step"] == 7 and ckpt["data_index"] == 123
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(logits(other, ids), logits(tiny, ids))


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path, tiny):
    grpo.apply_lora(tiny, 4, 8.0, "q_proj")
    cfg = dataclasses.replace(grpo.Config(), lora_r=4)
    path = str(tmp_path / "ckpt.pt")
    rundir.save_checkpoint(path, grpo.trainable_state_dict(tiny),
                           torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad]),
                           cfg, 1, 0, torch.Generator())
    with pytest.raises(BadInput, match="pass the same"):
        rundir.read_checkpoint(path, dataclasses.replace(cfg, model="Qwen/Qwen3-0.6B"))


def test_gradient_checkpointing_gives_the_same_gradient():
    def grads(checkpointing):
        model = tiny_model("llama")
        grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj,down_proj")
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        buffer = make_buffer(model)
        cfg = cfg_for(batch_size=len(buffer), grad_checkpoint=checkpointing)
        calls = []  # block forward passes: the completion pass runs each block again in backward
        for block in model.model.layers:
            block.register_forward_pre_hook(lambda m, a: calls.append(1))
        grpo.accumulate_gradients(model, [buffer], cfg, EOS)
        # 2 blocks x (the shared prefix, the prompts' own tokens, completions, recompute)
        assert len(calls) == (2 * 4 if checkpointing else 2 * 3)
        return [p.grad for p in model.parameters() if p.requires_grad]

    plain, checkpointed = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-12)


def test_the_gradient_is_the_same_bits_every_time_at_two_threads():
    """A prompt's G samples each read its keys and values, so backward sums G gradients into one
    prompt row. Indexing's backward adds fp32 rows with parallel atomic adds, in an order that
    follows the threads' timing; the training pass must sum them in a fixed order."""
    model = tiny_model("llama", dtype=torch.float32)
    grpo.apply_lora(model, 4, 8.0, "q_proj,k_proj,v_proj,down_proj")
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05, generator=g)
    # 4 prompts x 8 samples: each layer's prompt keys are 32 x 2 x 48 x 16, past the size where
    # indexing's backward goes parallel
    prompts = [torch.randint(3, 128, (48,), generator=g).tolist() for _ in range(4)]
    samples = [grpo.Sample(prompts[i % 4], torch.randint(3, 128, (5 + i,), generator=g).tolist())
               for i in range(32)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(8):
            model.zero_grad()
            logp, _ = grpo.completion_logprobs(model, samples, EOS, 1.0)
            (logp * torch.linspace(-1, 1, len(logp))).sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    finally:
        torch.set_num_threads(threads)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))


def test_step_stats_split_lengths_by_verdict_and_count_partial_credit():
    def row(correct, n, score, correctness):  # what a Sample reports of itself
        scores = {"reward": 0.0, "correct": correct, "format": 1.0, "length_reward": 0.0,
                  "overlong": 0.0,
                  "difficulty_bonus": 0.0, "score": score, "correctness": correctness}
        return grpo.Sample([0], [1] * n, advantage=0.5, scores=scores).row()

    stats = report.sample_stats([row(True, 40, 1.0, 1.0), row(False, 60, 0.5, 0.5),
                                 row(False, 80, 0.0, 0.0), row(False, 100, 0.2, 0.0)])
    assert (stats["len_right_mean"], stats["len_wrong_mean"]) == (40, 80)
    assert stats["partial_credit_rate"] == 0.5  # two of four scored strictly between 0 and 1
    assert stats["partial_credit_share"] == pytest.approx(0.5 / 1.5)  # of the correctness paid out
    assert math.isnan(report.sample_stats([row(False, 10, 0.0, 0.0)])["len_right_mean"])


class WordTokenizer:
    """Just enough of a tokenizer for rollout(): every prompt is two tokens, a completion one token
    per text."""
    eos_token_id = 0
    texts = {3: "<think>2 + 6 = 8</think><answer>8</answer>",
             4: "<think>2 + 5 = 8</think><answer>7</answer>"}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return messages[-1]["content"]

    def __call__(self, text, add_special_tokens):
        return types.SimpleNamespace(input_ids=[1, 2])

    def decode(self, ids, skip_special_tokens):
        return self.texts[ids[0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_random_reward_control_keeps_the_rate_and_drops_the_verdicts(seed, monkeypatch):
    completions = [[3], [4], [4], [4], [4], [3], [4], [4]]  # two right answers of eight
    fake = lambda *args, **kw: (completions, [False] * len(completions))
    monkeypatch.setattr(grpo, "generate", fake)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=1024))
    entries = [{"question": "q1", "answer": "8"}, {"question": "q2", "answer": "8"}]
    score = lambda answer, entry: float(answer == entry["answer"])
    real = grpo.rollout(model, WordTokenizer(), entries, score, grpo.Config(G=4),
                        torch.Generator().manual_seed(seed))
    assert [s.scores["correctness"] for s in real] == [1.0, 0, 0, 0, 0, 1.0, 0, 0]
    control = grpo.rollout(model, WordTokenizer(), entries, score,
                           grpo.Config(G=4, random_reward=True),
                           torch.Generator().manual_seed(seed))
    # the control's draws
    coins = torch.rand(8, generator=torch.Generator().manual_seed(seed)).tolist()
    assert [s.scores["correctness"] for s in control] == [float(c < 2 / 8) for c in coins]
    # metrics still see the real verdicts
    assert [s.scores["correct"] for s in control] == [s.scores["correct"] for s in real]
    assert all(s.scores["reward"] == pytest.approx(0.85 * s.scores["correctness"] + 0.15)
               for s in control)
    for b in (0, 4):  # advantages from the control's rewards
        group = torch.tensor([[s.scores["reward"] for s in control[b:b + 4]]])
        expected = grpo.group_advantages(group, True)[0].tolist()
        assert [s.advantage for s in control[b:b + 4]] == expected


def test_check_work_in_a_rollout_pays_only_the_right_answer_with_right_work(monkeypatch):
    completions = [[3], [4]]
    monkeypatch.setattr(WordTokenizer, "texts", {3: WordTokenizer.texts[3],
                                                 # wrong work
                                                 4: "<think>2 + 5 = 8</think><answer>8</answer>"})
    fake = lambda *args, **kw: (completions, [False] * len(completions))
    monkeypatch.setattr(grpo, "generate", fake)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=1024))
    score = lambda answer, entry: float(answer == entry["answer"])
    samples = grpo.rollout(model, WordTokenizer(), [{"question": "q", "answer": "8"}], score,
                           grpo.Config(G=2, check_work=True), torch.Generator())
    assert [s.scores["correct"] for s in samples] == [True, True]
    assert [s.scores["correctness"] for s in samples] == [1.0, 0.0]
    assert samples[0].advantage > samples[1].advantage


def test_the_faithful_rate_is_the_share_of_right_answers_whose_work_holds(monkeypatch):
    texts = {3: "<think>2 + 6 = 8</think><answer>8</answer>",
             4: "<think>2 + 5 = 8</think><answer>8</answer>",
             5: "<think>2 + 5 = 7</think><answer>7</answer>"}
    monkeypatch.setattr(WordTokenizer, "texts", texts)
    fake = lambda model, prompts, *args, **kw: ([[3], [4], [4], [5]][:len(prompts)],
                                                [False] * len(prompts))
    monkeypatch.setattr(grpo, "generate", fake)
    model = types.SimpleNamespace(lm_head=types.SimpleNamespace(weight=torch.zeros(1)))
    entries = [{"question": f"q{i}", "answer": "8"} for i in range(4)]
    exact = lambda answer, entry: float(answer == entry["answer"])
    metrics, rows = grpo.evaluate(model, WordTokenizer(), entries, exact, 8)
    assert metrics["eval_accuracy"] == 0.75
    assert metrics["eval_faithful_rate"] == pytest.approx(1 / 3)
    monkeypatch.setattr(WordTokenizer, "texts",
                        {i: "<think>x</think><answer>8</answer>" for i in (3, 4, 5)})
    always = lambda answer, entry: 1.0
    assert "eval_faithful_rate" not in grpo.evaluate(model, WordTokenizer(), entries, always, 8)[0]


def fake_rollout(pattern):
    """A rollout whose groups' correctness follows `pattern` (a list of per-group lists),
    cycling."""
    groups = iter(pattern * 100)

    def rollout(model, tok, entries, score_fn, cfg, generator, pass_rates=None):
        out = []
        for e in entries:
            for ok in next(groups):
                out.append(grpo.Sample([0], [1, 2], question=e["question"],
                                       scores={"correct": ok, "reward": float(ok)}))
        return out
    return rollout


def test_dynamic_sampling_keeps_no_zero_variance_group(monkeypatch):
    monkeypatch.setattr(grpo, "rollout", fake_rollout([[1, 1], [0, 1], [0, 0], [1, 0]]))
    cfg = dataclasses.replace(grpo.Config(), exploration_batchsize=2, G=2, buffer_size=8,
                              dynamic_sampling=True)
    task = ListTask(entry(i) for i in range(1000))
    questions = tasks.Questions(task, set())
    buffer, sampled, stats = grpo.fill_buffer(None, None, questions, None, cfg, None, "test")
    groups = [buffer[i:i + 2] for i in range(0, len(buffer), 2)]
    assert len(buffer) == 8 and all(len({s.scores["correct"] for s in g}) == 2 for g in groups)
    assert stats["dropped_group_rate"] == 0.5 and len(sampled) == 16 and stats["rollouts"] == 4


def test_dynamic_sampling_stops_at_its_bound(monkeypatch):
    # every group is all right: nothing to keep
    monkeypatch.setattr(grpo, "rollout", fake_rollout([[1, 1]]))
    cfg = dataclasses.replace(grpo.Config(), exploration_batchsize=2, G=2, buffer_size=8,
                              dynamic_sampling=True, dynamic_sampling_bound=3.0)
    questions = tasks.Questions(ListTask(entry(i) for i in range(1000)), set())
    buffer, sampled, stats = grpo.fill_buffer(None, None, questions, None, cfg, None, "test")
    assert buffer == [] and stats["rollouts"] == 2 * 3 and stats["dropped_group_rate"] == 1.0


def test_training_questions_skip_the_eval_questions(monkeypatch):
    monkeypatch.setattr(grpo, "rollout", fake_rollout([[1, 0]]))
    cfg = dataclasses.replace(grpo.Config(), exploration_batchsize=2, G=2, buffer_size=4)
    task = ListTask(entry(i) for i in range(10))
    questions = tasks.Questions(task, {"q0", "q2"})
    buffer, _, _ = grpo.fill_buffer(None, None, questions, None, cfg, None, "test")
    assert [s.question for s in buffer[::2]] == ["q1", "q3"] and questions.index == 4


def test_the_last_rollout_draws_only_the_questions_the_buffer_still_needs(monkeypatch):
    monkeypatch.setattr(grpo, "rollout", fake_rollout([[1, 0]]))
    cfg = dataclasses.replace(grpo.Config(), exploration_batchsize=4, G=2, buffer_size=11)
    questions = tasks.Questions(ListTask(entry(i) for i in range(100)), set())
    buffer, sampled, stats = grpo.fill_buffer(None, None, questions, None, cfg, None, "test")
    # 4 questions, then 2
    assert len(buffer) == len(sampled) == 12 and questions.index == 6 and stats["rollouts"] == 2
