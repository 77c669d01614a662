"""
bench.py: how fast grpo.py samples and trains, measured in one run against this machine's own
limits.

    python bench.py                    # a table; where auto picks bf16 on a CPU, fp32 beside it
    python bench.py --json             # the same numbers as one JSON object
    python bench.py --dtype float32    # one dtype only

Measured on the same model and batch, for each dtype: the matmul peak in that dtype; our KV-cache
sampler and Hugging Face `generate` (alternating, the faster of two runs each) on the same prompts,
batch (8 questions x 6 samples), fixed length (128 new tokens, no early stop) and sampling settings
(T = 0.7, top-p 0.95, no top-k); our sampler alone at grpo.py's default rollout size (32 questions x
6 at once); LoRA training throughput (forward + backward + AdamW step, the way grpo.py trains: each
minibatch runs a prompt once for all its samples); and whole GRPO steps (rollout, scoring, update)
at 8 x 6, 128 new tokens, one buffer of 48 (the median of --steps). The compute limits are the
matmul peak divided by the model's FLOPs per token: 2 x params to sample a token, 4 x params to
train one with LoRA (forward + the backward to the inputs; the LoRA weight gradients are small).
Ratios, not seconds, are what carry over to another machine. Every measurement follows a warm-up run
of the same code (HF generate's too), so the numbers are those of a run in progress, not of a first
call.
"""
import dataclasses
import json
import resource
import time

from dataclasses import dataclass

import torch

import flags
import grpo
from model import to_hf
import reward
import tasks
import weights
from flags import opt
from packed import frozen_linears


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def matmul_gflops(device, dtype, n=2048, reps=10, tries=5) -> float:
    """The peak: the best of `tries` timings (the machine's speed drifts, and a peak is a best
    case)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    s = min(timed(lambda: [a @ b for _ in range(reps)], device)[1] for _ in range(tries))
    return 2 * n ** 3 * reps / s / 1e9


@dataclass
class BenchConfig:
    json: bool = opt(False, "print one JSON object instead of a table")
    model: str = opt("SmolLM-135M", "the model to measure (as grpo.py's --model)")
    device: str = opt("auto", "cpu, cuda, or auto", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "float32, bfloat16, float16, or auto (as grpo.py)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    new_tokens: int = opt(128, "tokens sampled per row (no early stop)", at_least=1)
    steps: int = opt(3, "GRPO steps to time (the median is reported)", at_least=1)


def measure(args: BenchConfig, device: str, dtype: torch.dtype, why: str) -> dict:
    """Every figure of the table, for one dtype."""
    cfg = dataclasses.replace(grpo.Config(), model=args.model, max_new_tokens=args.new_tokens,
                              exploration_batchsize=8, buffer_size=48,  # 8 x 6: one optimizer step
                              batch_size=16, gradient_accumulation_steps=3)
    model, tok = weights.load(cfg.model, device, dtype, why)
    n_params = sum(p.numel() for p in model.parameters())
    task = tasks.make_task(cfg.task, 10**6, 0)
    entries = [task[i] for i in range(cfg.exploration_batchsize)]
    prompts = [reward.encode_prompt(tok, e["question"]) for e in entries]
    r = {"device": device, "dtype": str(dtype).replace("torch.", ""),
         "model_params_m": n_params / 1e6, "matmul_gflops": matmul_gflops(device, dtype)}
    sample_limit = r["matmul_gflops"] * 1e9 / (2 * n_params)

    # 1. sampling: ours vs HF generate, identical work; alternating, twice each, the faster run of
    # each counts (the machine's speed drifts by 10-20% over minutes: alternating exposes both to
    # the same drift)
    gen = torch.Generator(device=device).manual_seed(0)
    run_ours = lambda: grpo.generate(model, prompts, cfg.G, cfg.max_new_tokens, cfg.temperature,
                                     cfg.top_p, tok.eos_token_id, gen, stop_at_eos=False)
    ids, mask = (t.to(device) for t in grpo.pad(prompts, tok.eos_token_id, left=True))
    hf = to_hf(model).to(device)  # transformers' own model and generate, on the same weights
    run_hf = lambda: hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=0, num_return_sequences=cfg.G, max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.max_new_tokens, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        grpo.generate(model, prompts[:1], 1, 4, 1.0, 1.0, tok.eos_token_id)  # warm-ups
        hf.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=4,
                    pad_token_id=tok.eos_token_id)
        ours_s, hf_s = [], []
        for _ in range(2):
            (completions, _), s = timed(run_ours, device)
            ours_s.append(s)
            out, s = timed(run_hf, device)
            hf_s.append(s)
    n_tokens = sum(len(c) for c in completions)
    hf_tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    assert n_tokens == len(prompts) * cfg.G * cfg.max_new_tokens == hf_tokens
    r["sampler_tok_s"], r["hf_generate_tok_s"] = n_tokens / min(ours_s), n_tokens / min(hf_s)
    r["sampler_vs_hf"] = r["sampler_tok_s"] / r["hf_generate_tok_s"]
    r["sampler_vs_limit"] = r["sampler_tok_s"] / sample_limit
    # ... and at grpo.py's default rollout size (exploration_batchsize questions x G at once): more
    # rows per step use each weight read for more tokens. One run, the code already warm.
    wide = [reward.encode_prompt(tok, task[i]["question"])
            for i in range(grpo.Config().exploration_batchsize)]
    with torch.no_grad():
        _, s = timed(lambda: grpo.generate(model, wide, cfg.G, cfg.max_new_tokens, cfg.temperature,
                                           cfg.top_p, tok.eos_token_id, gen, stop_at_eos=False),
                     device)
    r["sampler_default_rows"] = len(wide) * cfg.G
    r["sampler_default_rows_tok_s"] = r["sampler_default_rows"] * cfg.max_new_tokens / s
    r["sampler_default_rows_vs_limit"] = r["sampler_default_rows_tok_s"] / sample_limit

    # 2. training: LoRA forward + backward + AdamW on the 48 sampled sequences, as grpo.py trains
    grpo.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    buffer = [grpo.Sample(prompts[i // cfg.G], c, advantage=1.0 if i % 2 else -1.0)
              for i, c in enumerate(completions)]
    minibatches = [buffer[i:i + cfg.batch_size] for i in range(0, len(buffer), cfg.batch_size)]

    # one optimizer step on the policy that sampled: old log-probs come from this very pass
    def train_step():
        for s in buffer:
            s.old_logp = None
        with frozen_linears(model, rows=1024, training=True):  # as grpo.update does
            grpo.accumulate_gradients(model, minibatches, cfg, tok.eos_token_id)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # warm-up: the first step also creates AdamW's state and grows the allocator's pools
    train_step()
    _, s = timed(train_step, device)
    # train_tok_s counts every sample's prompt + completion (the work of a trainer that runs each
    # sequence whole); a minibatch runs each of its prompts once for all their samples, so fewer
    # tokens go through the model: those are what train_vs_limit compares with the compute limit
    r["train_tok_s"] = sum(len(b.prompt) + len(b.completion) for b in buffer) / s
    computed = lambda mb: (sum(map(len, {tuple(b.prompt) for b in mb}))
                           + sum(len(b.completion) for b in mb))
    r["train_computed_tok_s"] = sum(computed(mb) for mb in minibatches) / s
    r["train_vs_limit"] = r["train_computed_tok_s"] / (sample_limit / 2)

    # 3. whole GRPO steps, each on 8 new questions: rollout (sampling, scoring, advantages), old
    # log-probs, update. The median of --steps steps: the update's time varies with the
    # completions' lengths (a minibatch pads to its longest) and with the machine
    steps = []
    for k in range(1, args.steps + 1):
        first = k * cfg.exploration_batchsize
        entries = [task[i] for i in range(first, first + cfg.exploration_batchsize)]
        rollout = lambda: grpo.rollout(model, tok, entries, task.score_answer, cfg, gen)
        batch, rollout_s = timed(rollout, device)
        synthetic = all(s.advantage == 0 for s in batch)
        # the base model earns no reward (no tags): time the update's real work anyway
        if synthetic:
            for i, s in enumerate(batch):
                s.advantage = 1.0 if i % 2 else -1.0
        update = lambda: grpo.update(model, optimizer, batch, cfg, tok.eos_token_id, gen)
        _, update_s = timed(update, device)
        steps.append({"step_s": rollout_s + update_s, "rollout_s": rollout_s, "update_s": update_s,
                      "tokens": sum(len(s.completion) for s in batch),
                      "synthetic_advantages": synthetic})
    median = sorted(steps, key=lambda x: x["step_s"])[len(steps) // 2]
    r.update({f"grpo_{k}": v for k, v in median.items()})
    r["grpo_steps_s"] = [x["step_s"] for x in steps]
    # of the process so far
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        r["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    r["sample_limit_tok_s"], r["wide_rows"] = sample_limit, len(wide)
    return r


def cpu_name() -> str:
    """The CPU's model name and its fast-bf16 flags (lscpu's), for the record beside every
    figure."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    fast = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(fast) or 'no fast bf16'})"


def main(args: BenchConfig):
    device, dtype, why = weights.resolve_device(args.device, args.dtype)
    # where auto picked bf16 on a CPU, fp32 is measured beside it (the same code, the same work)
    dtypes = [(dtype, why)]
    if device == "cpu" and args.dtype == "auto" and dtype == torch.bfloat16:
        dtypes = [(torch.float32, "measured beside bf16"), (dtype, why)]
    runs = [measure(args, device, d, w) for d, w in dtypes]
    r = {**runs[-1], "cpu": cpu_name(), "runs": runs}
    if args.json:
        print(json.dumps(r))
        return
    cfg = grpo.Config()
    print(f"\n{args.model} on {device}, {cpu_name()}: 8 prompts x {cfg.G} samples, "
          f"{args.new_tokens} new tokens")
    table = [("", lambda r: r["dtype"]),
             ("matmul peak", lambda r: f"{r['matmul_gflops']:.0f} GFLOP/s"),
             ("sampling limit", lambda r: f"{r['sample_limit_tok_s']:.0f} tok/s"),
             ("our sampler 8x6", lambda r: f"{r['sampler_tok_s']:.0f} tok/s = "
                                           f"{r['sampler_vs_hf']:.2f}x HF, "
                                           f"{100 * r['sampler_vs_limit']:.0f}% lim"),
             ("HF generate 8x6", lambda r: f"{r['hf_generate_tok_s']:.0f} tok/s"),
             (f"our sampler {runs[0]['wide_rows']}x{cfg.G}",
              lambda r: f"{r['sampler_default_rows_tok_s']:.0f} tok/s = "
                        f"{100 * r['sampler_default_rows_vs_limit']:.0f}% lim"),
             ("LoRA training", lambda r: f"{r['train_computed_tok_s']:.0f} tok/s = "
                                         f"{100 * r['train_vs_limit']:.0f}% lim"),
             ("GRPO step 8x6",
              lambda r: f"{r['grpo_step_s']:.1f} s ({r['grpo_rollout_s']:.1f} + "
                        f"{r['grpo_update_s']:.1f})"),
             ("peak RSS", lambda r: f"{r['peak_rss_mb']:.0f} MB")]
    for name, cell in table:
        print(f"{name:<17}" + "".join(f"{cell(run):>36}" for run in runs))
    print("\nour sampler: tokens/s of 8 questions x 6 samples, against HF generate on the same "
          "work and against the sampling limit (matmul peak / 2 FLOPs per parameter); training: "
          "tokens through the model (prompts shared) against the training limit (peak / 4 FLOPs "
          f"per parameter); GRPO step: rollout + update, median of {args.steps}"
          + (" (update on ±1 advantages: the base model earns no reward)"
             if runs[-1]["grpo_synthetic_advantages"] else ""))


if __name__ == "__main__":
    flags.run(main, BenchConfig, __doc__)
