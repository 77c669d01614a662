"""
GRPO from scratch: teach a small language model to think before it answers, with reinforcement
learning from verifiable rewards. One file, read top to bottom; the model is model.py's.

    python sft.py --config recipes/quickstart.toml    # first, the warmup: the format, from examples
    python grpo.py --config recipes/quickstart.toml   # then GRPO from that adapter (SmolLM2-135M)
    python grpo.py --eval_only --init_from out/ckpt.pt --eval_samples 6    # --help: every flag

The model is asked to write `<think> ... </think> <answer> ... </answer>`; reward.py scores the
answer with reasoning-gym's verifier. One training step:

1. Rollout, until the buffer holds `buffer_size` samples: `G` completions (the group) of each of
   `exploration_batchsize` questions, from our KV-cache sampler. Reward r = w_correct * correctness
   + w_format * format (+ reward.total_reward's optional terms); correctness is 1 for the task's
   full marks, else 0 (reasoning-gym's partial credit only with --partial_credit).
2. Advantages, per group: A_i = (r_i - mean(r)) / (std(r) + eps); `--scale_rewards none` keeps only
   the centering (Dr. GRPO). A group of equal rewards gets A = 0.
3. Update: `ppo_epochs` passes over the buffer in minibatches of `batch_size` (a question's samples
   together), an AdamW step every `gradient_accumulation_steps` minibatches, its learning rate
   ramped up over the first `warmup_steps`. Per completion token, with ratio = exp(logp - old_logp):
       loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)  (+ beta * KL_k3)
   `--loss_agg`: `seq` (mean per sequence, then over sequences: DeepSeek), `token` (sum / number of
   tokens: DAPO), `dr_grpo` (sum / (sequences x max_new_tokens)). The divisor is the whole optimizer
   step's, so k accumulated minibatches give exactly the big batch's gradient.
4. Log a line; every `eval_interval` steps, held-out accuracy (greedy; --eval_samples K: mean@K,
   pass@K); save.

Choices worth knowing: old log-probs come from the training forward pass itself, so on the first
optimizer step the ratio is exactly 1; the KL's reference is the model with LoRA off; the buffer is
unpadded, each minibatch padded to its own longest; a prompt runs once for all its completions;
zero-advantage samples (without KL) are not run; on CPU, fixed weights are multiplied in oneDNN's
packed layout (packed.py). A run with nothing to learn from stops: --no_signal_steps.
"""
import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddp
import flags
import report
import reward
import rundir
import tasks
import weights
from flags import fail, opt
from model import DecodeCache, Prefill, PromptsThenCompletions, own_tokens_mask, upcast
from packed import frozen_linears


# --------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (python grpo.py --help), checked against its range

@dataclass
class Config:
    # model and data
    model: str = opt("SmolLM-135M", "hub id or folder; SmolLM-135M: SmolLM2-135M-Instruct, bundled")
    task: str = opt("syllogism:invalid_ratio=0.5", "reasoning-gym task (name:key=value settings, "
                    "a,b@weight mixes) or a .jsonl file; the default (sft.py's too) is balanced")
    eval_task: str = opt("", "evaluate on this task instead (as --task): does the skill carry?")
    out_dir: str = opt("out", "where log.jsonl, samples.jsonl, ckpt.pt and curves.png go")
    report_to: str = opt("", "send log rows to a tracker too", choices=("", "tensorboard", "wandb"))
    device: str = opt("auto", "cpu, cuda, or auto (cuda if any)", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "bf16 if fast", choices=("auto", "float32", "bfloat16", "float16"))
    seed: int = opt(0, "seed for questions, sampling and shuffling", at_least=0)
    # rollout
    max_new_tokens: int = opt(300, "longest completion; longer ones are cut", at_least=1)
    exploration_batchsize: int = opt(32, "questions per rollout, sampled at once", at_least=1)
    G: int = opt(6, "completions sampled per question (the group; GRPO compares them)", at_least=2)
    temperature: float = opt(0.7, "sampling temperature (also used for every log-prob)", above=0)
    top_p: float = opt(0.95, "nucleus sampling: top tokens of this much mass", above=0, at_most=1)
    buffer_size: int = opt(500, "samples collected per step before the update", at_least=1)
    # reward
    w_correct: float = opt(0.85, "weight of correctness (1 for the task's full marks, else 0)")
    partial_credit: bool = opt(False, "correctness: the fractional score (farmable: 58 for 8)")
    check_work: bool = opt(False, "a right answer counts only if its 'a op b = c' lines all hold")
    random_reward: bool = opt(False, "control: correctness is a coin at the rollout's real rate")
    w_format: float = opt(0.15, "weight of the <think>..</think><answer>..</answer> format")
    w_length: float = opt(0.0, "weight of Kimi 1.5's length reward (shorter right ones earn more)")
    w_overlong: float = opt(0.0, "weight of DAPO's soft overlong penalty (0 to -1)")
    overlong_buffer: int = opt(50, "the overlong penalty's ramp, in tokens", at_least=0)
    w_difficulty: float = opt(0.0, "bonus w * (1 - pass rate) for a right answer (scale none)")
    dynamic_sampling: bool = opt(False, "DAPO: drop all-right and all-wrong groups, sample more")
    dynamic_sampling_bound: float = opt(3.0, "at most this many times the rollouts", at_least=1)
    pool_size: int = opt(0, "curriculum: a pool of N questions, mid pass rates first", at_least=0)
    retire_after: int = opt(2, "curriculum: retire questions all-solved N visits", at_least=1)
    scale_rewards: str = opt("group", "divide by the group std, or not", choices=("group", "none"))
    # update
    batch_size: int = opt(16, "sequences per minibatch (one forward/backward)", at_least=1)
    gradient_accumulation_steps: int = opt(12, "minibatches per optimizer step", at_least=1)
    ppo_epochs: int = opt(1, "passes over the buffer per step", at_least=1)
    learning_rate: float = opt(5e-5, "AdamW learning rate", at_least=0)
    warmup_steps: int = opt(10, "the learning rate ramps up over N optimizer steps", at_least=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", at_least=0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping)", at_least=0)
    eps_low: float = opt(0.2, "PPO clip: ratio kept above 1 - eps_low", at_least=0, below=1)
    eps_high: float = opt(0.2, "PPO clip: ratio kept below 1 + eps_high (DAPO: higher)", at_least=0)
    loss_agg: str = opt("seq", "token losses averaged per sequence (seq: DeepSeek), per token "
                        "(token: DAPO) or over sequences x max_new_tokens (dr_grpo)",
                        choices=("seq", "token", "dr_grpo"))
    beta: float = opt(0.0, "KL penalty weight against the base model (LoRA off)", at_least=0)
    grad_checkpoint: bool = opt(False, "recompute blocks in backward: less memory, ~30% more time")
    # LoRA
    lora_r: int = opt(32, "LoRA rank; 0 trains the full model", at_least=0)
    lora_alpha: float = opt(64.0, "LoRA scale: the update is (alpha / r) * B @ A", above=0)
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj",
                            "linear layers given LoRA")
    # loop, eval, checkpoints
    max_steps: int = opt(100, "training steps (a step: fill the buffer, then update)", at_least=0)
    eval_interval: int = opt(10, "evaluate every N steps (0: only before and after)", at_least=0)
    eval_size: int = opt(500, "held-out questions (distinct, never trained on)", at_least=1)
    eval_seed: int = opt(tasks.EVAL_SEED, "seed of the held-out questions", at_least=0)
    eval_samples: int = opt(0, "K sampled answers per question too: mean@K, pass@K", at_least=0)
    no_signal_steps: int = opt(3, "stop after N steps in a row with every advantage 0", at_least=0)
    save_interval: int = opt(1, "write ckpt.pt every N steps (and at the end)", at_least=1)
    eval_only: bool = opt(False, "evaluate, write every answer (report.py pairs two), exit")
    resume: bool = opt(False, "continue the run in out_dir from its ckpt.pt")
    overwrite: bool = opt(False, "start anew where a run is (moved aside, not deleted)")
    init_from: str = opt("", "start from this checkpoint's weights (an sft.py or grpo.py ckpt.pt)")


# --------------------------------------------------------------------------------------------------
# LoRA: y = W x + (alpha / r) * B A x, with B = 0 at the start so the model starts exactly as the
# base model. A and B are kept in fp32 at least (in a bf16 model an AdamW step of 5e-5 would round
# away) and multiply in the model's dtype.

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.enabled = True
        like = dict(dtype=upcast(base.weight).dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
            y = torch.add(y, lora, alpha=self.scale)  # y + scale * lora in one pass
        return y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in W's dtype: explicit, never done behind your back."""
        merged = self.base.weight + self.scale * self.lora_B @ self.lora_A
        return merged.to(self.base.weight.dtype)


def apply_lora(model: nn.Module, r: int, alpha: float, targets: str) -> None:
    """Freeze the model and wrap every nn.Linear whose name ends in one of `targets` with LoRA.
    r = 0: no LoRA, every parameter trains."""
    if r == 0:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    names = tuple(targets.split(","))
    wrapped = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.split(".")[-1] in names]
    if not wrapped:
        fail(f"--lora_targets {targets}: no linear layer of this model has one of these names")
    for name, module in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, r, alpha))


def trainable_state_dict(model: nn.Module) -> dict:
    """What a checkpoint must keep: the LoRA weights, or every weight when the full model trains."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model (the reference policy of the KL), without a second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


# --------------------------------------------------------------------------------------------------
# Sampler. While decoding, each layer keeps the prompts' keys/values once (B rows) and the
# completions' (B*G rows) in a preallocated buffer written in place (model.DecodeCache).

def sample_next(logits, temperature, top_p, generator):
    """Next token ids (N,) from logits (N, V): greedy at temperature 0, else exact top-p. Overwrites
    the logits with unnormalized probabilities: a fresh (N, V) tensor costs more than the math."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = upcast(logits)
    w = logits.sub_(logits.amax(-1, keepdim=True)).mul_(1 / temperature).exp_()  # e^((l - max) / T)
    if top_p >= 1.0:
        return torch.multinomial(w, 1, generator=generator).squeeze(1)
    return sample_nucleus(w, w.sum(-1, keepdim=True), top_p, generator)


def sample_nucleus(w, z, top_p: float, generator, k: int = 64):
    """Top-p from weights w (N, V) summing to z (N, 1). The nucleus almost always lies within the
    top 64 tokens: sort only those; the rare wider rows are drawn again from 8x as many."""
    p, idx = w.topk(min(k, w.shape[-1]), dim=-1)  # (N, k), sorted descending
    p = p / z
    cum = p.cumsum(-1)
    p = p * ((cum - p) < top_p)  # keep a token while the mass before it is still short of top_p
    tokens = idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(1)
    wide = cum[:, -1] < top_p
    if k < w.shape[-1] and bool(wide.any()):
        tokens[wide] = sample_nucleus(w[wide], z[wide], top_p, generator, 8 * k)
    return tokens


def pad(seqs: list, pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids and mask (N, longest), padded on the right, or on the left."""
    width = max(len(s) for s in seqs)

    def padded(row: list, fill: int) -> list:
        extra = [fill] * (width - len(row))
        return extra + row if left else row + extra

    return (torch.tensor([padded(list(s), pad_id) for s in seqs]),
            torch.tensor([padded([1] * len(s), 0) for s in seqs]))


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the prefix all prompts share, leaving each at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


def run_prompts(model, prompts: list[list[int]], pad_id: int):
    """Run prompts as the sampler and the training pass both do: the prefix all share (system
    prompt, chat template) once, as one row, then each prompt's own tokens, left-padded (positions
    count real tokens only). Returns every layer's keys and values (a Prefill), which of their
    positions are real (B, P), and the hidden state at each prompt's last token (B, d)."""
    device = model.model.embed_tokens.weight.device
    prefill = Prefill(len(model.model.layers))
    n = common_prefix(prompts)
    if n:
        model(torch.tensor([prompts[0][:n]], device=device), attention=prefill)
    ids, mask = pad([p[n:] for p in prompts], pad_id, left=True)  # (B, P - n)
    ids, mask = ids.to(device), mask.to(device)
    prefill.mask = own_tokens_mask(mask, n)
    h = model(ids, n + (mask.cumsum(-1) - 1).clamp(min=0), prefill)
    return prefill, torch.cat([mask.new_ones(len(prompts), n), mask], 1), h[:, -1]


@torch.no_grad()
def generate(model, prompts: list[list[int]], G: int, max_new_tokens: int, temperature: float,
             top_p: float, eos_id: int, generator=None,
             stop_at_eos: bool = True) -> tuple[list[list[int]], list[bool]]:
    """G completions of each prompt, in order (prompt 0's G, prompt 1's, ...), each ending with EOS
    unless cut at max_new_tokens (truncated). stop_at_eos=False: max_new_tokens each (for bench)."""
    device = model.lm_head.weight.device
    with frozen_linears(model, rows=len(prompts) * G):
        # 1) the prompts, keeping their keys and values
        prefill, prompt_mask, h = run_prompts(model, prompts, eos_id)
        logits = model.lm_head(h).repeat_interleave(G, 0)  # (B*G, V): the last position only
        # 2) decode, one token per row and step
        cache = DecodeCache(prefill, prompt_mask, G, max_new_tokens)
        pos = (prompt_mask.sum(1, keepdim=True) - 1).repeat_interleave(G, 0)  # (B*G, 1)
        N = logits.shape[0]
        out = torch.full((N, max_new_tokens), eos_id, device=device)
        lengths = torch.full((N,), max_new_tokens, device=device)
        rows = torch.arange(N, device=device)  # the output row of each row still in the batch
        done = torch.zeros(N, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_p, generator)
            out[rows, t] = torch.where(done, eos_id, tok)
            newly = (tok == eos_id) & ~done & stop_at_eos
            lengths[rows[newly]] = t + 1
            done |= newly
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            # finished rows leave the batch (and the cache) once they are a quarter of it: each
            # removal copies the cache, so rows leave in batches, not one by one
            if int(done.sum()) * 4 >= len(done):
                keep = (~done).nonzero().squeeze(1)
                cache.keep(keep)
                rows, tok, pos, done = rows[keep], tok[keep], pos[keep], done[keep]
            pos = pos + 1
            logits = model.lm_head(model(tok[:, None], pos, cache)[:, -1])
            cache.length += 1
        truncated = (lengths == max_new_tokens) & ~((out[:, -1] == eos_id) & stop_at_eos)
        lengths, out = lengths.tolist(), out.tolist()
        return [out[i][:lengths[i]] for i in range(N)], truncated.tolist()


# --------------------------------------------------------------------------------------------------
# Log-probs of completion tokens, through the same forward pass that training differentiates

def collate(samples: list["Sample"], pad_id: int, device):
    """A minibatch as completion_logprobs runs it: each distinct prompt once (U lists of tokens);
    each sample's prompt row (N,); completion ids and mask (N, C), right-padded; completion tokens
    in order (T,). Masks come from lengths, never from token values (pad == eos for many models)."""
    prompts = list(dict.fromkeys(tuple(s.prompt) for s in samples))
    row_of = {p: i for i, p in enumerate(prompts)}
    prompt_row = torch.tensor([row_of[tuple(s.prompt)] for s in samples])
    ids, mask = pad([s.completion for s in samples], pad_id)
    targets = ids[mask.bool()]
    return ([list(p) for p in prompts], *(t.to(device) for t in (prompt_row, ids, mask, targets)))


class TokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] for a chunk of positions, the gradient written out by hand:
    d logp / d logits = onehot(target) - softmax(logits). The softmax (chunk x V) is kept for
    backward, which writes the gradient into it, or (keep=False: less memory) recomputed there, to
    the same bits. In fp32 at least: a bf16 logit of 20 is rounded to 1/8, which would make every
    ratio jitter by several percent. Also the entropy at each position (no gradient), logged."""

    @staticmethod
    def forward(ctx, h, w, targets, temperature, keep=True):
        logits = F.linear(upcast(h) / temperature, upcast(w))  # (n, V)
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
        probs = (logits - lse[:, None]).exp_()
        entropy = lse - torch.linalg.vecdot(probs, logits)  # -sum p log p = lse - sum p * logits
        ctx.save_for_backward(h, w, targets, lse, probs if keep else None)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):  # grad: (n,)
        h, w, targets, lse, probs = ctx.saved_tensors
        x, w32 = upcast(h) / ctx.temperature, upcast(w)
        if probs is None:
            probs = F.linear(x, w32).sub_(lse[:, None]).exp_()  # as forward computed it
        d_logits = probs  # overwritten: backward runs once
        d_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
        d_logits = d_logits.mul_(-grad[:, None].to(d_logits.dtype))  # grad * (onehot - softmax)
        d_h = d_w = None
        if ctx.needs_input_grad[0]:
            d_h = (d_logits @ w32 / ctx.temperature).to(h.dtype)
        if ctx.needs_input_grad[1]:  # full fine-tuning: the tied embedding trains
            d_w = (d_logits.t() @ x).to(w.dtype)
        return d_h, d_w, None, None, None


def completion_logprobs(model, samples: list["Sample"], pad_id: int, temperature: float,
                        grad_checkpoint: bool = False, chunk: int = 1024):
    """Log-prob (T,) of each completion token of `samples`, in order, at `temperature`, and the
    entropy (T,) at each (no gradient). Each distinct prompt runs once (their shared prefix once, as
    the sampler runs them), then every completion on top of its prompt, the completions as one row
    without padding. The vocabulary projection runs only where a completion token is predicted, in
    chunks of `chunk` positions (SmolLM2: 1024 x 49k fp32 logits, 200 MB); with gradient, each
    chunk's softmax (as large) waits for backward: 0.9 GB for 16 x 300 tokens. grad_checkpoint: the
    completions' blocks and the softmaxes are recomputed in backward instead."""
    prompts, prompt_row, ids, mask, targets = collate(samples, pad_id, model.lm_head.weight.device)
    prefill, prompt_mask, h_last = run_prompts(model, prompts, pad_id)  # as the sampler ran them
    attention = PromptsThenCompletions(prefill, prompt_mask, prompt_row, mask)
    prompt_len = prompt_mask.sum(1)[prompt_row]  # (N,)
    pos = prompt_len[:, None] + torch.arange(ids.shape[1], device=ids.device)
    # the completions' T tokens (the targets) as one row, (T, d) out: padding would cost a token's
    # products; the attention callable lays them out per sample
    h = model(targets[None], pos[mask.bool()][None], attention.completions, grad_checkpoint)[0]
    # completion token t is predicted at completion position t - 1; token 0 at the prompt's last
    # (index_select: its backward sums a prompt's repeated rows in a fixed order, as in model.py)
    first = h_last.index_select(0, prompt_row)  # (N, d)
    lengths = mask.sum(1)
    h = h.roll(1, 0).index_copy(0, lengths.cumsum(0) - lengths, first)  # (T, d)
    w = upcast(model.lm_head.weight)  # one fp32 copy for every chunk, forward and backward
    chunks = [TokenLogprobs.apply(h[i:i + chunk], w, targets[i:i + chunk], temperature,
                                  not grad_checkpoint) for i in range(0, h.shape[0], chunk)]
    return torch.cat([logp for logp, _ in chunks]), torch.cat([entropy for _, entropy in chunks])


# --------------------------------------------------------------------------------------------------
# Rollout and buffer: questions -> G completions each -> rewards -> group advantages -> samples

@dataclass(eq=False)
class Sample:
    """One completion in the buffer. The update reads prompt, completion and advantage, and keeps
    the old (and reference) log-probs on it; the rest is what the log and samples.jsonl report."""
    prompt: list[int]  # the question, chat-formatted (shared by its group)
    completion: list[int]  # the sampled tokens, ending in EOS unless truncated
    advantage: float = 0.0
    question: str = ""
    text: str = ""  # the completion, decoded
    truncated: bool = False
    scores: dict = field(default_factory=dict)  # reward.add_rewards': reward, correct, format, ...
    old_logp: torch.Tensor | None = None  # per token, under the policy that sampled it
    ref_logp: torch.Tensor | None = None  # per token, under the base model (the KL's reference)

    def row(self) -> dict:
        """What the log reports of it (report.SAMPLE_STATS, rundir.SAMPLE_KEYS)."""
        return {**self.scores, "question": self.question, "text": self.text,
                "advantage": self.advantage, "truncated": self.truncated,
                "length": len(self.completion)}


def group_advantages(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """rewards (B, G) -> advantages (B, G), each completion against its own group. Equal rewards
    give exactly 0 (the float mean of six 0.15s is one ulp off, which / (std + eps) makes 1e-4)."""
    equal = rewards.max(dim=1, keepdim=True).values == rewards.min(dim=1, keepdim=True).values
    centered = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(equal, 0.0)
    return centered / (rewards.std(dim=1, keepdim=True) + eps) if scale else centered


def rollout(model, tok, entries: list[dict], score_fn, cfg: Config, generator,
            pass_rates=None) -> list[Sample]:
    """Sample G completions of each entry (a question and its answer) and score them."""
    prompts = [reward.encode_prompt(tok, e["question"]) for e in entries]
    weights.check_context(model, prompts, cfg.max_new_tokens)
    completions, truncated = generate(model, prompts, cfg.G, cfg.max_new_tokens, cfg.temperature,
                                      cfg.top_p, tok.eos_token_id, generator)
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    lengths = [len(c) for c in completions]
    groups = [range(b * cfg.G, (b + 1) * cfg.G) for b in range(len(entries))]  # each entry's rows
    rates = pass_rates or [None] * len(entries)
    parts = [[reward.score_completion(texts[i], entry, score_fn, cfg.partial_credit, cfg.check_work)
              for i in rows] for entry, rows in zip(entries, groups)]
    if cfg.random_reward:  # the control: the verifier's verdicts replaced by coins
        coins = torch.rand(len(texts), generator=generator, device=generator.device).tolist()
        reward.random_correctness(parts, coins)
    scores = [reward.add_rewards(group, [lengths[i] for i in rows], cfg, rate)
              for group, rows, rate in zip(parts, groups, rates)]
    samples = []
    for entry, prompt, rows, group in zip(entries, prompts, groups, scores):
        rewards = torch.tensor([[s["reward"] for s in group]])
        advantages = group_advantages(rewards, cfg.scale_rewards == "group")[0].tolist()
        samples += [Sample(prompt, completions[i], advantages[g], entry["question"], texts[i],
                           truncated[i], group[g]) for g, i in enumerate(rows)]
    return samples


def rollout_size(cfg: Config, buffered: int, world: int) -> int:
    """Questions for the next rollout: exploration_batchsize or, without dynamic sampling, as many
    as the buffer still needs, rounded up to a multiple of the processes (500 at G = 6: 504)."""
    if cfg.dynamic_sampling:
        return cfg.exploration_batchsize
    groups_missing = math.ceil((cfg.buffer_size - buffered) / (cfg.G * world))
    return min(cfg.exploration_batchsize, world * groups_missing)


def fill_buffer(model, tok, questions: tasks.Questions, pool, cfg: Config, generator, desc: str):
    """Rollouts until the buffer holds buffer_size samples (over all processes); with dynamic
    sampling, all-right and all-wrong groups (no gradient) are dropped and more rollouts made, up
    to dynamic_sampling_bound times as many. Returns (buffer, every sample drawn, stats)."""
    rank, world = ddp.rank_world()
    max_rollouts = math.ceil(cfg.buffer_size / (cfg.exploration_batchsize * cfg.G))
    if cfg.dynamic_sampling:
        max_rollouts *= cfg.dynamic_sampling_bound
    buffer, sampled, rollouts, dropped = [], [], 0, 0
    bar = ddp.progress(total=cfg.buffer_size, desc=desc)
    while len(buffer) * world < cfg.buffer_size and rollouts < max_rollouts:
        n = rollout_size(cfg, len(buffer) * world, world)
        entries, rates, picks = tasks.draw_questions(questions, pool, n)
        new = rollout(model, tok, entries[rank::world], questions.task.score_answer, cfg, generator,
                      rates)
        rollouts += 1
        sampled += new
        for g, start in enumerate(range(0, len(new), cfg.G)):
            group = new[start:start + cfg.G]
            correct = [s.scores["correct"] for s in group]
            if pool:
                pool.record(picks[g], sum(correct) / cfg.G)
            if cfg.dynamic_sampling and len(set(correct)) == 1:
                dropped += 1
            else:
                buffer += group
        bar.n = min(len(buffer) * world, cfg.buffer_size)
        bar.refresh()
    bar.close()
    if pool:
        pool.retire_solved()
    stats = {"rollouts": rollouts, "buffer_samples": len(buffer) * world,
             "dropped_group_rate": dropped / (len(sampled) // cfg.G),
             **(pool.stats() if pool else {})}
    return buffer, sampled, stats


# --------------------------------------------------------------------------------------------------
# The loss. Every completion token carries a weight such that the weighted sum over one optimizer
# step's tokens is the chosen average (--loss_agg); minibatches then just add their weighted sums.

def token_weights(samples: list[Sample], loss_agg: str, max_new_tokens: int) -> list[torch.Tensor]:
    """Per-sample weight vectors (one weight per completion token) for the samples of one optimizer
    step. With several processes the counts are those of the step's samples on all of them."""
    counts = torch.tensor([len(samples), sum(len(s.completion) for s in samples)])
    n_seq, n_tok = ddp.all_sum(counts).tolist()
    divisor = {"seq": lambda n: n * n_seq, "token": lambda n: n_tok,
               "dr_grpo": lambda n: n_seq * max_new_tokens}[loss_agg]
    return [torch.full((len(s.completion),), 1.0 / divisor(len(s.completion)), dtype=torch.float64)
            for s in samples]


def ppo_loss(logp, old_logp, ref_logp, adv, weight, eps_low, eps_high, beta):
    """Clipped surrogate (+ k3 KL) per token, all (T,); returns the weighted sum and the clipped
    fraction. (tests/test_grpo.py's naive_loss is the same loss, one sequence at a time.)"""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if beta:
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1)  # k3: unbiased, always >= 0
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return (loss * weight).sum(), clipped.float()


# --------------------------------------------------------------------------------------------------
# The update: minibatches of the buffer, gradients accumulated over an optimizer step, AdamW

def shuffled_minibatches(buffer: list[Sample], batch_size: int, generator) -> list[list[Sample]]:
    """The questions in random order, each one's samples kept together (so that a minibatch runs
    each prompt once: see completion_logprobs), cut into minibatches of batch_size samples."""
    by_prompt = {}
    for s in buffer:
        by_prompt.setdefault(tuple(s.prompt), []).append(s)
    groups = list(by_prompt.values())
    order = [s for j in torch.randperm(len(groups), generator=generator).tolist()
             for s in groups[j]]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def has_gradient(sample: Sample, beta: float) -> bool:
    """Without the KL a zero advantage makes every token's loss exactly 0: such samples (groups of
    equal rewards) are not run, yet count in the step's divisor (token_weights), so the loss and
    its gradient are exactly the full buffer's."""
    return sample.advantage != 0 or beta > 0


def per_sample(logp: torch.Tensor, samples: list[Sample]) -> tuple[torch.Tensor, ...]:
    """Token log-probs (T,) of `samples` cut into each sample's own."""
    return logp.split([len(s.completion) for s in samples])


@torch.no_grad()
def record_old_logprobs(model, minibatches: list[list[Sample]], cfg: Config, pad_id: int) -> None:
    """Before any weight moves, each sample's old log-probs (the policy that sampled it) and, with
    the KL, its reference log-probs (LoRA off). The first optimizer step's minibatches get no old
    log-probs here: their own training pass is the old policy's (accumulate_gradients keeps it)."""
    trained = [[s for s in mb if has_gradient(s, cfg.beta)] for mb in minibatches]
    for s in (s for mb in minibatches for s in mb):
        s.old_logp = s.ref_logp = None

    def logprobs(mb: list[Sample]) -> tuple[torch.Tensor, ...]:  # at the weights of this moment
        return per_sample(completion_logprobs(model, mb, pad_id, cfg.temperature)[0], mb)

    for mb in filter(None, trained[cfg.gradient_accumulation_steps:]):
        for s, logp in zip(mb, logprobs(mb)):
            s.old_logp = logp
    if cfg.beta:
        with lora_disabled(model):
            for mb in filter(None, trained):
                for s, logp in zip(mb, logprobs(mb)):
                    s.ref_logp = logp


def accumulate_gradients(model, step_batches: list[list[Sample]], cfg: Config,
                         pad_id: int) -> tuple[float, list[float], torch.Tensor]:
    """Forward + backward over the minibatches of one optimizer step, gradients adding up in .grad.
    A sample without old log-probs is on the policy that sampled it (the first optimizer step): its
    old log-probs are this pass's own, detached, and are kept for later epochs. Returns the step's
    loss, each minibatch's clipped-token fraction and the entropy at every token it ran."""
    step_samples = [s for mb in step_batches for s in mb]
    weight_of = dict(zip(step_samples, token_weights(step_samples, cfg.loss_agg,
                                                     cfg.max_new_tokens)))
    total, clip_fracs, entropies = 0.0, [], []
    for mb in step_batches:
        mb = [s for s in mb if has_gradient(s, cfg.beta)]
        if not mb:
            continue
        logp, entropy = completion_logprobs(model, mb, pad_id, cfg.temperature, cfg.grad_checkpoint)
        entropies.append(entropy)
        logps = per_sample(logp, mb)
        for s, lp in zip(mb, logps):
            if s.old_logp is None:
                s.old_logp = lp.detach()
        old_logp = torch.cat([s.old_logp for s in mb])
        ref_logp = torch.cat([s.ref_logp for s in mb]) if cfg.beta else None
        adv = torch.cat([torch.full_like(lp, s.advantage) for s, lp in zip(mb, logps)])  # (T,)
        weight = torch.cat([weight_of[s] for s in mb]).to(logp.device, adv.dtype)
        loss, clipped = ppo_loss(logp, old_logp, ref_logp, adv, weight, cfg.eps_low, cfg.eps_high,
                                 cfg.beta)
        loss.backward()
        total += loss.item()
        clip_fracs.append(clipped.mean().item())
    return total, clip_fracs, torch.cat(entropies) if entropies else torch.zeros(0)


def warmup_lr(optimizer, params: list, lr: float, warmup_steps: int) -> float:
    """Set and return the next optimizer step's learning rate: lr * k / warmup_steps for the k-th of
    the first warmup_steps, then lr. AdamW's first steps move every weight by about lr whatever the
    gradient: at full size they can make a near-deterministic policy deterministic in one step. The
    count is the optimizer's own, so --resume continues the ramp."""
    state = optimizer.state.get(params[0], {})
    k = int(state["step"]) + 1 if "step" in state else 1
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr * min(1.0, k / warmup_steps) if warmup_steps else lr
    return optimizer.param_groups[0]["lr"]


def optimizer_step(optimizer, params: list, grad_clip: float) -> float:
    """Sum the gradients over processes, clip them and step, unless their norm is not finite (the
    same verdict on every rank): one bad batch must not poison the weights. Returns the norm."""
    ddp.sum_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.item()
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def update(model, optimizer, buffer: list[Sample], cfg: Config, pad_id: int, generator) -> dict:
    """ppo_epochs passes of shuffled minibatches over the buffer; an optimizer step every
    gradient_accumulation_steps minibatches (the last step of a pass may have fewer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    lr = warmup_lr(optimizer, params, cfg.learning_rate, cfg.warmup_steps)
    stats = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "optimizer_steps": 0,
             "skipped_steps": 0, "lr": lr, "entropy": float("nan")}
    if not ddp.all_sum(torch.tensor(sum(s.advantage != 0 for s in buffer))) and not cfg.beta:
        print("every advantage in this buffer is 0 (each group's rewards were equal): no update "
              "this step", flush=True)
        return stats
    local_batch = cfg.batch_size // ddp.rank_world()[1]  # each process takes its share
    accum = cfg.gradient_accumulation_steps
    losses, clips, norms = [], [], []
    entropy = torch.zeros(2, dtype=torch.float64)  # sum and count of the trained tokens' entropies
    # the base weights stay fixed all update long: packed once (rows: a layout hint, not a limit)
    with frozen_linears(model, rows=1024, training=True):
        minibatches = shuffled_minibatches(buffer, local_batch, generator)
        record_old_logprobs(model, minibatches, cfg, pad_id)
        bar = ddp.progress(total=cfg.ppo_epochs * len(minibatches), desc="update")
        for epoch in range(cfg.ppo_epochs):
            if epoch > 0:
                minibatches = shuffled_minibatches(buffer, local_batch, generator)
            for i in range(0, len(minibatches), accum):
                step_batches = minibatches[i:i + accum]
                loss, clip_fracs, token_entropy = accumulate_gradients(model, step_batches, cfg,
                                                                       pad_id)
                entropy += torch.tensor([token_entropy.sum().item(), len(token_entropy)],
                                        dtype=torch.float64)
                stats["lr"] = warmup_lr(optimizer, params, cfg.learning_rate, cfg.warmup_steps)
                norm = optimizer_step(optimizer, params, cfg.grad_clip)
                bar.update(len(step_batches))
                if not math.isfinite(norm):
                    stats["skipped_steps"] += 1
                    bar.write(f"non-finite loss or gradient (loss {loss}, grad norm {norm}): "
                              "optimizer step skipped")
                    continue
                losses.append(ddp.all_sum(torch.tensor(loss)).item())
                clips += clip_fracs
                norms.append(norm)
        bar.close()

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    entropy_sum, entropy_count = ddp.all_sum(entropy).tolist()
    return {**stats, "loss": mean(losses), "clip_frac": mean(clips), "grad_norm": mean(norms),
            "optimizer_steps": len(losses),
            "entropy": entropy_sum / entropy_count if entropy_count else float("nan")}


# --------------------------------------------------------------------------------------------------
# Evaluation: greedy answers to held-out questions and, with --eval_samples K, K sampled answers

@torch.no_grad()
def evaluate(model, tok, entries: list[dict], score_fn, max_new_tokens: int, k_sampled: int = 0,
             temperature: float = 1.0, top_p: float = 1.0,
             batch: int = 32) -> tuple[dict, list[dict]]:
    """Greedy answers to `entries` (each process answers its share): accuracy, format rate, lengths,
    standard errors. k_sampled = K > 0: also K answers sampled at `temperature` (the same seed in
    every eval: checkpoints draw from one random stream): mean@K, pass@K and the mixed rate (the
    questions GRPO learns from: K answers neither all right nor all wrong)."""
    rank, world = ddp.rank_world()
    mine, rows = entries[rank::world], []
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(tasks.EVAL_SEED + rank)
    for i in ddp.progress(iterable=range(0, len(mine), batch), desc="eval"):
        chunk = mine[i:i + batch]
        prompts = [reward.encode_prompt(tok, e["question"]) for e in chunk]
        completions, truncated = generate(model, prompts, 1, max_new_tokens, temperature=0.0,
                                          top_p=1.0, eos_id=tok.eos_token_id)  # greedy
        if k_sampled:
            sampled = generate(model, prompts, k_sampled, max_new_tokens, temperature, top_p,
                               tok.eos_token_id, generator)[0]
        for j, (entry, completion) in enumerate(zip(chunk, completions)):
            text = tok.decode(completion, skip_special_tokens=True)
            rows.append(dict(reward.score_completion(text, entry, score_fn),
                             question=entry["question"], reference=entry["answer"], text=text,
                             length=len(completion), truncated=truncated[j],
                             source=tasks.source(entry)))
            if k_sampled:
                texts = [tok.decode(s, skip_special_tokens=True)
                         for s in sampled[j * k_sampled:(j + 1) * k_sampled]]
                verdicts = [reward.score_completion(t, entry, score_fn)["correct"] for t in texts]
                rows[-1]["sampled_correct"] = sum(verdicts)
    rows = ddp.gather(rows)
    return report.eval_metrics(rows, [str(e["answer"]) for e in entries], k_sampled), rows


def eval_step(model, tok, eval_set, eval_entries, cfg: Config, run: rundir.Run, step: int,
              start_verdicts=None) -> tuple:
    """Evaluate, pair the verdicts with step 0's, print the line, keep a few answers. Returns
    (metrics, verdicts)."""
    metrics, rows = evaluate(model, tok, eval_entries, eval_set.score_answer, cfg.max_new_tokens,
                             k_sampled=cfg.eval_samples, temperature=cfg.temperature,
                             top_p=cfg.top_p)
    verdicts = [r["correct"] for r in rows]
    if start_verdicts and step > 0:
        metrics.update(report.paired_gain(start_verdicts, verdicts))
    print(report.eval_line(metrics), flush=True)
    kept = rows if cfg.eval_only else rows[:8]
    run.samples([{"step": step, "split": "eval", **r} for r in kept])
    return metrics, verdicts


# --------------------------------------------------------------------------------------------------
# The loop

def main(cfg: Config):
    ddp.check_split(cfg)
    device, dtype, why = weights.resolve_device(cfg.device, cfg.dtype)
    device = ddp.init(device)
    rank, world = ddp.rank_world()
    run = rundir.Run(cfg.out_dir, cfg.resume, cfg.overwrite, write=rank == 0, cfg=cfg)
    ckpt_path = run.ckpt_path if cfg.resume else cfg.init_from
    ckpt = rundir.read_checkpoint(ckpt_path, cfg) if ckpt_path else None
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)  # each samples its own
    train_set = tasks.make_task(cfg.task, tasks.TRAIN_QUESTIONS, cfg.seed)
    eval_set, eval_entries = tasks.held_out(cfg.eval_task or cfg.task, cfg.eval_size, cfg.eval_seed)
    eval_questions = {e["question"] for e in eval_entries}
    questions = tasks.Questions(train_set, held_out=eval_questions)  # never an eval question
    pool = tasks.Pool(cfg.pool_size, cfg.retire_after) if cfg.pool_size else None
    model, tok = weights.load(cfg.model, device, dtype, why)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eval_prompts = [reward.encode_prompt(tok, e["question"]) for e in eval_entries]
    weights.check_context(model, eval_prompts, cfg.max_new_tokens)
    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable: {sum(p.numel() for p in params) / 1e6:.2f}M params (LoRA r {cfg.lora_r}; "
          "0: the full model)")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    step, start_verdicts = 0, None
    if ckpt:
        rundir.load_weights(model, ckpt)
        print(f"{'resumed' if cfg.resume else 'initialised'} from {ckpt_path}")
    if cfg.resume:
        step, start_verdicts = rundir.restore(ckpt, optimizer, questions, pool, generator, rank)

    if cfg.no_signal_steps and not ckpt and not cfg.eval_only:  # a fresh model: any tags at all?
        probe = evaluate(model, tok, eval_entries[:32], eval_set.score_answer, cfg.max_new_tokens)
        report.stop_without_signal([probe[0]], cfg.no_signal_steps, cfg.task)
    run.save_config(flags.to_toml(cfg, "grpo"))
    if cfg.eval_only or step == 0:
        metrics, start_verdicts = eval_step(model, tok, eval_set, eval_entries, cfg, run, step)
        run.log({"step": step, **metrics})
        if cfg.eval_only:
            return
        report.stop_without_signal(run.rows, cfg.no_signal_steps, cfg.task)  # nothing well-formed
        print(report.before_training(metrics), end="")
    stop = rundir.StopOnSignal()  # SIGTERM or Ctrl-C: finish the step, checkpoint, exit
    while step < cfg.max_steps:
        t0 = time.time()
        # 1) rollout until the buffer is full: G completions per question, rewards, advantages
        buffer, sampled, fill_stats = fill_buffer(model, tok, questions, pool, cfg, generator,
                                                  desc=f"rollout {step + 1}")
        sample_s = time.time() - t0
        # 2) update the policy on minibatches of the buffer
        stats = update(model, optimizer, buffer, cfg, pad_id, generator)
        step += 1
        # 3) log the step (and evaluate)
        sampled_stats = report.sample_stats(ddp.gather([s.row() for s in sampled]))
        row = {"step": step, **sampled_stats, **fill_stats, **stats,
               "step_s": time.time() - t0, "sample_s": sample_s}
        row["tokens_per_s"] = row["n_tokens"] / row["step_s"]
        row["sample_tokens_per_s"] = row["n_tokens"] / sample_s
        warnings = report.collapse_warnings(run.rows + [row])
        print(report.step_line(row, cfg.max_steps, cfg.max_new_tokens) + warnings, flush=True)
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps:
            row.update(eval_step(model, tok, eval_set, eval_entries, cfg, run, step,
                                 start_verdicts)[0])
        run.log(row)
        group = [s.row() for s in sampled[:cfg.G]]  # one question's completions side by side
        run.samples([{"step": step, "split": "train", **{k: r[k] for k in rundir.SAMPLE_KEYS}}
                     for r in group])
        # 4) checkpoint; a signal is read by all processes together, after the step
        stopping = stop.requested()
        stalled = report.no_signal(run.rows, cfg.no_signal_steps, cfg.task)
        if step % cfg.save_interval == 0 or step == cfg.max_steps or stopping or stalled:
            run.save_checkpoint(trainable_state_dict(model), optimizer, cfg, step=step,
                                questions=questions, generator=generator, pool=pool,
                                start_verdicts=start_verdicts)
        if stalled:
            fail(stalled)  # one line, exit 2: the checkpoint and the log stay valid
        if stopping:
            break


if __name__ == "__main__":
    try:
        flags.run(main, Config, __doc__, program="grpo")
    finally:
        ddp.leave()
