"""
model.py: the decoder that grpo.py samples from and trains, for the Llama, Qwen2 and Qwen3 families
(SmolLM2 and Llama 3 are Llama, Qwen2.5 is Qwen2). As in nanoGPT's model.py, the project owns its
forward pass and copies a Hugging Face checkpoint's weights in, checking every shape. The parameter
names are Hugging Face's, so LoRA targets (q_proj, ...), checkpoints and the merged export mean the
same as in transformers.

    model, tok = weights.load("SmolLM-135M", "cpu", torch.float32)  # bundled, a hub id, a folder
    h = model(ids, pos, attention)                                  # (B, T, hidden), final-normed
    logits = model.lm_head(h)

`attention(layer, q, k, v)` decides which keys each query sees: q is (B, heads, T, head_dim), k and
v are (B, kv_heads, T, head_dim), rotated; it returns (B, T, heads, head_dim). `causal` is the plain
one; the prompts' (Prefill), the sampler's (DecodeCache) and the trainer's (PromptsThenCompletions),
at the end of this file, keep keys and values in plain preallocated tensors.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flags import fail

SUPPORTED = ("llama", "qwen2", "qwen3")


def upcast(x):
    """bf16/fp16 -> fp32 for norms, softmaxes and losses; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = upcast(x)  # at least fp32, as the models were trained
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(config) -> torch.Tensor:
    """The rotary embedding's inverse frequencies (head_dim / 2,), with the scaling these families
    use: none, linear, or Llama 3's (long wavelengths slowed by `factor`, a smooth blend
    between)."""
    p = getattr(config, "rope_parameters", None)
    p = p or {"rope_type": "default", "rope_theta": config.rope_theta}
    dim, kind = head_dim(config), p.get("rope_type", "default")
    inv_freq = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        return inv_freq / p["factor"]
    if kind == "llama3":
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low, high = p["low_freq_factor"], p["high_freq_factor"]
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / p["low_freq_factor"], inv_freq / p["factor"], inv_freq)
        blended = (1 - smooth) * scaled / p["factor"] + smooth * scaled
        medium = (wavelen >= old / p["high_freq_factor"]) & (wavelen <= old / p["low_freq_factor"])
        return torch.where(medium, blended, scaled)
    if kind != "default":
        fail(f"rope scaling {kind!r} is not supported by model.py (default, linear and llama3 are)")
    return inv_freq


def rotary(inv_freq, pos, dtype):
    """cos and sin (B, 1, T, head_dim) of positions pos (B, T), computed in fp32."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sdpa(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(head_dim) + mask) v with grouped-query heads (query head h reads key
    head h // (heads / kv_heads)); mask is boolean (True: may attend), broadcast over heads; causal:
    q and k are the same positions. Returns (B, T, heads, head_dim)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return plain_attention(q, k, v, mask, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=True).transpose(1, 2)


def plain_attention(q, k, v, mask=None, causal=False):
    """sdpa written out, scores and softmax in fp32: on a CPU in bf16 torch's fused kernel is ~1.6x
    slower than this (forward + backward at a training minibatch's shapes)."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    # the query heads of each key head, as rows, scaled first: the T x D queries, not the T x S
    # scores (the same numbers where D ** -0.5 is a power of two, as at head_dim 64)
    rows = (q.float() * D ** -0.5).reshape(B, KV, H // KV * T, D)
    s = (rows @ k.float().transpose(-1, -2)).view(B, KV, H // KV, T, S)
    if causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~(mask[:, :, None] if mask.dim() == 4 else mask), float("-inf"))
    p = s.softmax(-1).to(v.dtype).view(B, KV, H // KV * T, S)
    return (p @ v).view(B, H, T, D).transpose(1, 2)


def causal(layer, q, k, v):
    """Plain causal self-attention over the sequence itself: no cache, no padding."""
    return sdpa(q, k, v, causal=q.shape[2] > 1)


class Attention(nn.Module):
    # while sampling, packed.frozen_linears sets self.qkv
    fused = {"qkv": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, config):
        super().__init__()
        d, D = config.hidden_size, head_dim(config)
        H, KV = config.num_attention_heads, config.num_key_value_heads
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(d, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d, KV * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d, KV * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, d, bias=getattr(config, "attention_bias", False))
        if config.model_type == "qwen3":  # Qwen3 normalizes each head's query and key
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.head_dim = D
        self.sizes = (H * D, KV * D, KV * D)  # q, k, v in a fused product
        self.qkv = None  # the fused product, set while sampling (packed.frozen_linears)

    def forward(self, x, cos, sin, attention, layer: int):
        B, T, _ = x.shape
        if self.qkv is not None:  # one product for the three projections (while sampling)
            q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, T, -1, self.head_dim), k.view(B, T, -1, self.head_dim)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, H, T, D), (B, KV, T, D)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        return self.o_proj(attention(layer, q, k, v).reshape(B, T, -1))


class MLP(nn.Module):
    # while sampling, packed.frozen_linears sets self.gate_up
    fused = {"gate_up": ("gate_proj", "up_proj")}

    def __init__(self, config):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.gate_up = None

    def forward(self, x):
        if self.gate_up is not None:  # one product for both (while sampling)
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attention, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    """A decoder-only transformer. `config` is the checkpoint's Hugging Face config (kept for the
    export)."""

    def __init__(self, config):
        super().__init__()
        check_supported(config)
        self.config = config
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.model = nn.ModuleDict(dict(embed_tokens=embed, layers=blocks, norm=norm))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def forward(self, ids, pos=None, attention=causal, grad_checkpoint: bool = False):
        """Final-normed hidden states (B, T, hidden) of token ids (B, T) at positions pos (B, T)
        (default 0..T-1). grad_checkpoint: keep only each block's input and recompute the block in
        backward (the attention callable must then read the same keys when called again)."""
        pos = torch.arange(ids.shape[1], device=ids.device)[None] if pos is None else pos
        x = self.model.embed_tokens(ids)
        cos, sin = rotary(self.inv_freq, pos, x.dtype)
        for i, block in enumerate(self.model.layers):
            if grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, attention, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, attention, i)
        return self.model.norm(x)


def check_supported(config) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text.model_type not in SUPPORTED:
        fail(f"model type {text.model_type!r} is not supported: model.py implements "
             f"{', '.join(SUPPORTED)} (SmolLM2, Llama 3, Qwen2.5, Qwen3)")
    if getattr(text, "hidden_act", "silu") != "silu":
        fail(f"activation {text.hidden_act!r} is not supported (model.py's MLP uses silu)")
    if getattr(text, "use_sliding_window", False) and text.sliding_window is not None and \
            text.sliding_window < text.max_position_embeddings:
        fail(f"a sliding attention window ({text.sliding_window} tokens) is not supported: use a "
             f"model without one")


def from_hf(hf) -> Model:
    """Our model holding the weights of a transformers model (the same tensors, not copies); every
    name and shape is checked."""
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = Model(hf.config)
    ours, theirs = model.state_dict(), hf.state_dict()
    for name, tensor in ours.items():
        if name not in theirs or theirs[name].shape != tensor.shape:
            raise ValueError(f"{name}: {tuple(tensor.shape)} here, "
                             f"{tuple(theirs[name].shape) if name in theirs else 'missing'} in the "
                             f"checkpoint")
    unused = set(theirs) - set(ours)
    if unused:
        raise ValueError(f"the checkpoint has weights model.py does not use, e.g. "
                         f"{sorted(unused)[0]}")
    model.load_state_dict(theirs, assign=True)
    if hf.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_frequencies(hf.config).to(hf.device)
    return model.eval()


def to_hf(model: Model):
    """A transformers model with our weights (for the export: save_pretrained, PEFT)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf


# --------------------------------------------------------------------------------------------------
# Attention over cached keys and values, in plain tensors: grpo.py runs the prompts with Prefill,
# then its sampler decodes with DecodeCache and its training pass runs the completions with
# PromptsThenCompletions; each is the `attention` of Model.forward.

def attend(q, k, v, scale: float, bias=None, fused: bool | None = None):
    """softmax(q k^T * scale + bias) v, and the log-sum-exp of each query's scores (what merging two
    parts of one attention needs). On CPU: the flash-attention kernel behind
    F.scaled_dot_product_attention, which returns both."""
    if fused is None:
        fused = q.device.type == "cpu"
    if fused:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q, k, v, attn_mask=bias, scale=scale)
    # scores and softmax in fp32 at least, as SDPA keeps them
    s = upcast(q) @ upcast(k).transpose(-1, -2) * scale
    s = s if bias is None else s + bias
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp().to(v.dtype) @ v, lse


def own_tokens_mask(mask, n_before: int = 0):
    """Which keys each token may attend to (B, 1, T, n_before + T): the n_before keys in front (a
    shared prefix, a prompt) and its own sequence's real tokens up to itself. A padding token sees
    at least itself (no empty row)."""
    T = mask.shape[1]
    # (B, T, T)
    own = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril() & mask[:, None, :].bool()
    own |= torch.eye(T, dtype=torch.bool, device=mask.device)
    return torch.cat([own.new_ones(len(mask), T, n_before), own], -1)[:, None]


class Prefill:
    """Attention while the prompts run, keeping every layer's keys and values: first the shared
    prefix (one row), then each prompt's own tokens (B rows, left-padded: `mask`), which also see
    the prefix."""

    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers
        self.mask = None

    def __call__(self, layer, q, k, v):
        if self.k[layer] is not None:  # the prompts' own tokens, after the prefix's keys
            k = torch.cat([self.k[layer].expand(len(k), -1, -1, -1), k], 2)
            v = torch.cat([self.v[layer].expand(len(v), -1, -1, -1), v], 2)
        self.k[layer], self.v[layer] = k, v
        return sdpa(q, k, v, self.mask, causal=self.mask is None)


class DecodeCache:
    """Keys and values while decoding G samples of each of B prompts, per layer: the prompts' (B
    rows, as the prefill left them; `bias` masks their padding) and the completions' (B*G rows) in a
    buffer of `capacity` positions, written in place at `length`. `slot` maps each row still
    decoding to its place among the B*G samples (rows leave the batch as they finish)."""

    def __init__(self, prefill: Prefill, prompt_mask, G: int, capacity: int):
        self.prompt_k, self.prompt_v = prefill.k, prefill.v  # (B, KV, P, D) per layer
        B, KV, _, D = self.prompt_k[0].shape
        self.k = [k.new_empty(B * G, KV, capacity, D) for k in self.prompt_k]
        self.v = [v.new_empty(B * G, KV, capacity, D) for v in self.prompt_v]
        bias = torch.zeros(prompt_mask.shape, dtype=self.k[0].dtype, device=prompt_mask.device)
        self.bias = bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None]  # (B, 1, 1, P)
        self.G, self.length, self.slot = G, 0, torch.arange(B * G, device=prompt_mask.device)

    def keep(self, rows):
        """Only these rows go on decoding (a copy of the completions' cache, done rarely)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]
        self.slot = self.slot[rows]

    def __call__(self, layer, q, k, v):
        """One new token per row: q (n, H, 1, D), k and v (n, KV, 1, D). Two parts merged by their
        log-sum-exps, o = o_c + sigmoid(lse_p - lse_c) * (o_p - o_c): the prompt part runs once per
        prompt with the queries of all its G samples (query head h reads key head h // (H / KV)),
        the completion part per row."""
        t = self.length
        self.k[layer][:, :, t:t + 1], self.v[layer][:, :, t:t + 1] = k, v
        n, H, _, D = q.shape
        B, KV, _, _ = self.prompt_k[layer].shape
        R, G, scale = H // KV, self.G, D ** -0.5
        q = q.reshape(n, KV, R, D)
        full = n == B * G  # no row has left yet: the rows are the B x G grid
        # finished: zeros, unused
        grid = q if full else q.new_zeros(B * G, KV, R, D).index_copy_(0, self.slot, q)
        o_p, lse_p = attend(grid.view(B, G, KV, R, D).transpose(1, 2).reshape(B, KV, G * R, D),
                            self.prompt_k[layer], self.prompt_v[layer], scale, self.bias)
        o_p = o_p.view(B, KV, G, R, D).transpose(1, 2).reshape(B * G, KV, R, D)
        lse_p = lse_p.view(B, KV, G, R).transpose(1, 2).reshape(B * G, KV, R)
        if not full:
            o_p, lse_p = o_p[self.slot], lse_p[self.slot]
        o_c, lse_c = attend(q, self.k[layer][:, :, :t + 1], self.v[layer][:, :, :t + 1], scale)
        weight_p = torch.sigmoid(lse_p - lse_c).unsqueeze(-1).to(o_c.dtype)  # the prompt's share
        return torch.lerp(o_c, o_p, weight_p).reshape(n, 1, H, D)


class PromptsThenCompletions:
    """Attention of the training pass's completions: each reads its prompt's keys and values (a
    Prefill's, row `prompt_row`; the gradient flows back through them), then its own. It only
    reads, so a checkpointed block recomputed in backward sees exactly the keys it saw the first
    time."""

    def __init__(self, prompts: Prefill, prompt_mask, prompt_row, mask):
        self.k, self.v = prompts.k, prompts.v  # (U, KV, P, D) per layer
        self.prompt_row = prompt_row  # (N,): each completion's prompt
        self.completion_mask = own_tokens_mask(mask, prompt_mask.shape[1])  # (N, 1, C, P + C)
        prompt_visible = prompt_mask[prompt_row].bool()[:, None, None]  # (N, 1, 1, P)
        self.completion_mask[..., :prompt_mask.shape[1]] &= prompt_visible
        self.shape = mask.shape  # (N, C)
        self.real = mask.flatten().nonzero().squeeze(1)  # where the T real tokens sit in N x C

    def completions(self, layer, q, k, v):
        """q (1, H, T, D), k and v (1, KV, T, D): the real completion tokens, one completion after
        another. They attend laid out as (N, heads, C, D), zeros at the padding (which no real
        token sees); the output is (1, T, H, D) again."""
        q, k, v = self.padded(q), self.padded(k), self.padded(v)
        # index_select, not [prompt_row]: backward adds the gradients of a prompt's repeated rows in
        # order; indexing's backward adds them with parallel atomic adds (fp32), in no fixed order
        k = torch.cat([self.k[layer].index_select(0, self.prompt_row), k], 2)
        v = torch.cat([self.v[layer].index_select(0, self.prompt_row), v], 2)
        return sdpa(q, k, v, self.completion_mask).flatten(0, 1)[self.real][None]

    def padded(self, x):
        (N, C), (_, heads, _, D) = self.shape, x.shape
        rows = x.new_zeros(N * C, heads, D).index_copy(0, self.real, x[0].transpose(0, 1))
        return rows.view(N, C, heads, D).transpose(1, 2)
