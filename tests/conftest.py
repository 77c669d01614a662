"""Shared fixtures: tiny random models built from a config (no download), and the bundled real
model. Each tiny model is model.py's Model holding the weights of a random transformers model, its
twin (hf_twin), which the tests use as the independent reference."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

import grpo
from model import from_hf

EOS = 2
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=1, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=True,
              initializer_range=0.2)  # a large init spreads logits: no near-ties


def tiny_hf_model(arch: str = "llama", dtype=torch.float64, seed: int = 0, **config):
    """A 2-layer random transformers model. float64 by default so that cached and recomputed forward
    passes agree far beyond any argmax tie (the point of the tests is the algorithm, not fp32
    rounding)."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**COMMON, **config}))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **config}))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 16, **config}))
    # a louder EOS logit, so that some rows stop early and others run to the limit
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 3
        for name, p in model.named_parameters():  # biases start at 0: make them count
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
    # HF's RMSNorm computes in float32 even in a float64 model: make it float64 too, so
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):  # that the twin is exact in float64 as well
            m.forward = types.MethodType(exact_rms_norm, m)
    return model.to(dtype).eval()


def tiny_model(arch: str = "llama", dtype=torch.float64, seed: int = 0, **config):
    """model.py's Model with the weights of tiny_hf_model(arch, dtype, seed) (copies: the twin stays
    untouched)."""
    hf = tiny_hf_model(arch, dtype, seed, **config)
    model = from_hf(hf)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    if hf.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.hf_twin = [hf]  # in a list: not a submodule, so not among the model's parameters
    return model


def hf_twin(model):
    return model.hf_twin[0]


def logits(model, ids):
    """Full-sequence logits of our model: no cache, plain causal attention (no padding)."""
    return model.lm_head(model(ids))


def exact_rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct from the bundled GGUF (converted once to a cache dir), fp32."""
    import weights
    model, tok = weights.load("SmolLM-135M", "cpu", torch.float32)
    return model.eval(), tok


CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt "
                 "%}{{'<|im_start|>assistant\n'}}{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer with a chat template, built offline: 256 byte tokens + 2 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder that `--model` can load: a tiny random Llama (fp32) and the byte tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                            "pad_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id})
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def padded_sequences(samples: list, pad_id: int = EOS):
    """The plain layout, for reference computations: prompt + completion of each sample right-padded
    into one row. Returns ids, mask (N, L), `predicts` (N, L): True where the next token is a
    completion token, and the completion tokens in order (T,)."""
    seqs = [s.prompt + s.completion for s in samples]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    predicts = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        predicts[i, len(s.prompt) - 1: len(seq) - 1] = True
    targets = torch.tensor([t for s in samples for t in s.completion], dtype=torch.long)
    return ids, mask, predicts, targets


def on_policy(samples: list) -> list:
    """The samples with no old log-probs recorded: the next training pass is the sampling
    policy's."""
    for s in samples:
        s.old_logp = None
    return samples


class ListTask(list):
    score_answer = None  # the fake rollouts below score nothing


def entry(i):
    return {"question": f"q{i}", "answer": "Yes", "metadata": {"source_dataset": "toy"}}


# different lengths: left padding matters
PROMPTS = [[1, 5, 9, 17, 33], [1, 44], [1, 7, 7, 90, 12, 3, 60, 61]]


# prefilled once: 4 tokens
SHARED_PREFIX = [[1, 5, 9, 17, 33, 4], [1, 5, 9, 17, 44], [1, 5, 9, 17, 33, 4, 8, 90]]


def make_buffer(model, G=4, max_new_tokens=12, seed=0, prompts=PROMPTS):
    """Sampled completions of the tiny model with fake advantages, as rollout() would store them."""
    completions, _ = grpo.generate(model, prompts, G, max_new_tokens, 1.0, 1.0, EOS,
                                   torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    return [grpo.Sample(prompts[i // G], c, advantage=float(torch.randn(1, generator=g)))
            for i, c in enumerate(completions)]


def cfg_for(**kw):
    return dataclasses.replace(grpo.Config(), max_new_tokens=12, **kw)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expect_usage_error(args, tmp_path) -> str:
    """Run grpo.py with bad input: a one-line error, exit code 2, no traceback, nothing written.
    Returns stderr."""
    r = run_cli(*args, "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing half-written
    return r.stderr


def small_config(model_dir, out_dir, **kw):
    small = dict(model=model_dir, out_dir=str(out_dir), task="syllogism", max_new_tokens=8,
                 exploration_batchsize=2,
                 G=2, buffer_size=4, batch_size=2, gradient_accumulation_steps=2, eval_size=4,
                 eval_interval=1, lora_r=4, lora_alpha=8.0,
                 # auto would pick bf16 on some CPUs: the tests pin the dtype they check
                 dtype="float32",
                 # a random model never writes the tags: the tests train it all the same
                 no_signal_steps=0)
    return dataclasses.replace(grpo.Config(), **{**small, **kw})


def read_log(out_dir):
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "grpo.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
