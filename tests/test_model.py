"""model.py against transformers: the same logits and gradients from the same weights, for each
family it supports, and a clear refusal of the others."""
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from model import Prefill, attend, from_hf, own_tokens_mask
from conftest import hf_twin, logits, tiny_model
from flags import BadInput

IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 8, 90, 3, 2], [7, 7, 90, 12, 3, 60, 61, 1, 44, 5]])


@pytest.mark.parametrize("arch, config", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),
    ("qwen3", {}),
], ids=["llama", "untied", "llama3-rope", "linear-rope", "biases", "qwen2", "qwen3"])
def test_logits_and_gradients_equal_transformers(arch, config):
    model = tiny_model(arch, **config)
    hf = hf_twin(model)
    # Hugging Face's names, nothing more or less
    assert set(model.state_dict()) == set(hf.state_dict())
    ours, theirs = logits(model, IDS), hf(IDS).logits
    assert torch.allclose(ours, theirs, atol=1e-12, rtol=0)
    weight = torch.randn(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(0))
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    grads = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-11, rtol=0), name


def test_qwen2_keeps_its_query_key_value_biases():
    attn = tiny_model("qwen2").model.layers[0].self_attn
    assert all(m.bias is not None for m in (attn.q_proj, attn.k_proj,
                                            attn.v_proj)) and attn.o_proj.bias is None
    assert not hasattr(tiny_model("llama").model.layers[0].self_attn, "q_norm")
    assert hasattr(tiny_model("qwen3").model.layers[0].self_attn, "q_norm")


def test_positions_shift_the_rotary_embedding_as_a_longer_sequence_would():
    """A sequence run at positions 3.. sees the keys it would see after 3 more tokens: the last
    logits of (a + b) equal those of b run with a's keys in front, which is what every cache relies
    on."""
    model = tiny_model("llama")
    a, b = IDS[:1, :3], IDS[:1, 3:]
    whole = logits(model, torch.cat([a, b], 1))[:, 3:]
    keys = Prefill(len(model.model.layers))
    model(a, attention=keys)
    keys.mask = own_tokens_mask(torch.ones_like(b), n_before=3)
    part = model.lm_head(model(b, torch.arange(3, 10)[None], keys))
    assert torch.allclose(whole, part, atol=1e-12)


def test_an_unsupported_architecture_is_refused_with_one_line():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(BadInput,
                       match="model type 'gpt2' is not supported: model.py implements llama, "
                             "qwen2, qwen3"):
        from_hf(gpt2)


def test_an_unknown_rope_scaling_is_refused():
    with pytest.raises(BadInput, match="rope scaling 'yarn'"):
        tiny_model("llama", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                             "factor": 4.0})


def test_a_sliding_window_shorter_than_the_context_is_refused_not_ignored():
    with pytest.raises(BadInput, match="sliding attention window"):
        tiny_model("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=0)


def test_attention_kernel_and_plain_computation_agree():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    bias = torch.zeros(2, 1, 1, 5)
    bias[0, ..., :2] = float("-inf")  # left padding
    o1, lse1 = attend(q, k, v, 0.3, bias, fused=True)
    o2, lse2 = attend(q, k, v, 0.3, bias, fused=False)
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(lse1, lse2, atol=1e-5)
    assert torch.allclose(o1, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3),
                          atol=1e-5)
    assert torch.allclose(lse1, ((q @ k.transpose(-1, -2)) * 0.3 + bias).logsumexp(-1), atol=1e-5)
