"""Shared fixtures: tiny random models built from a config (no download), and the bundled real model."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

EOS = 2
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
              tie_word_embeddings=True, initializer_range=0.2)  # a large init spreads logits: no near-ties


def tiny_model(arch: str = "llama", dtype=torch.float64, seed: int = 0):
    """A 2-layer random model. float64 by default so that cached and recomputed forward passes agree far
    beyond any argmax tie (the point of the tests is the algorithm, not fp32 rounding)."""
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    with torch.no_grad():  # a louder EOS logit, so that some rows stop early and others run to the limit
        model.lm_head.weight[EOS] *= 3
    return model.to(dtype).eval()


@pytest.fixture(params=["llama", "qwen3"])
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct from the bundled GGUF (converted once to a cache dir), fp32."""
    import grpo
    model, tok = grpo.load_model("SmolLM-135M", "cpu", torch.float32)
    return model.eval(), tok


CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer with a chat template, built offline: 256 byte tokens + 2 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>")
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
