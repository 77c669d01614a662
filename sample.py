"""
sample.py: answer questions with a trained checkpoint, and export it.

    python sample.py --ckpt out/ckpt.pt                     # 5 held-out questions, reward parts
    python sample.py --ckpt out/ckpt.pt --prompt "Is 91 prime? Answer Yes or No."
    python sample.py --ckpt out/ckpt.pt --export merged/    # a plain HF model + a PEFT adapter

--export DIR writes the model with the LoRA adapter merged into its weights (transformers'
AutoModelForCausalLM.from_pretrained(DIR) loads it, no code of ours needed) and, in DIR/adapter, the
adapter alone in the layout PEFT reads (adapter_config.json + adapter_model.safetensors).
"""
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

import flags
import grpo
from model import to_hf
import reward
import rundir
import tasks
import weights
from flags import opt


@dataclass
class SampleConfig:
    ckpt: str = opt("out/ckpt.pt", "a ckpt.pt written by grpo.py or sft.py")
    prompt: str = opt("", "a question of your own (else held-out questions of --task)")
    task: str = opt("", "task of the held-out questions (default: the checkpoint's)")
    n: int = opt(5, "how many held-out questions", at_least=1)
    max_new_tokens: int = opt(300, "longest answer", at_least=1)
    temperature: float = opt(0.0, "sampling temperature (0: greedy)", at_least=0)
    export: str = opt("", "write the merged model here (and the PEFT adapter in DIR/adapter)")
    device: str = opt("auto", "cpu, cuda, or auto", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto",
                     "float32, bfloat16, float16, or auto (as grpo.py; --export always merges in "
                     "float32)", choices=("auto", "float32", "bfloat16", "float16"))


def merge_lora(model) -> None:
    """Replace every LoRA layer by a plain nn.Linear holding W + (alpha / r) B A."""
    for name, module in list(model.named_modules()):
        if isinstance(module, grpo.LoRALinear):
            base = module.base
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=base.weight.device, dtype=base.weight.dtype)
            merged.weight.data = module.merged_weight()
            if base.bias is not None:
                merged.bias.data = base.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, merged)


def export_peft_adapter(model, cfg, base_name: str, out: str) -> None:
    """The adapter in PEFT's layout: keys base_model.model.<module>.lora_A.weight, and its
    config."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tensors = {f"base_model.model.{k}.weight": v.contiguous()
               for k, v in grpo.trainable_state_dict(model).items()}
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
              "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False,
              "target_modules": cfg.lora_targets.split(","), "inference_mode": True}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load(ckpt_path: str, device: str = "auto", dtype: str = "auto"):
    """The model of a grpo.py or sft.py checkpoint, with its trained weights; and the run's
    config."""
    # read once; its config says which model and LoRA to build
    ckpt = rundir.read_checkpoint(ckpt_path)
    cfg = dataclasses.replace(grpo.Config(), **{k: v for k, v in ckpt["config"].items()
                                                if k in grpo.Config.__dataclass_fields__})
    model, tok = weights.load(cfg.model, *weights.resolve_device(device, dtype))
    grpo.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    rundir.load_weights(model, ckpt)
    return model.eval(), tok, cfg


def main(args: SampleConfig):
    model, tok, cfg = load(args.ckpt, args.device, "float32" if args.export else args.dtype)
    if args.export:
        if os.path.isfile(args.export):
            flags.fail(f"--export {args.export} is a file: give a folder")
        export_peft_adapter(model, cfg, cfg.model, os.path.join(args.export, "adapter"))
        merge_lora(model)
        to_hf(model).save_pretrained(args.export)
        tok.save_pretrained(args.export)
        print(f"merged model in {args.export}, adapter in {os.path.join(args.export, 'adapter')}")
        return
    if args.prompt:
        entries, score = [{"question": args.prompt, "answer": None}], None
    else:
        task, entries = tasks.held_out(args.task or cfg.task, args.n)
        score = task.score_answer
    prompts = [reward.encode_prompt(tok, e["question"]) for e in entries]
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(0)
    completions, _ = grpo.generate(model, prompts, 1, args.max_new_tokens, args.temperature,
                                   top_p=1.0, eos_id=tok.eos_token_id, generator=generator)
    for e, c in zip(entries, completions):
        text = tok.decode(c, skip_special_tokens=True)
        print("=" * 100 + f"\n{e['question']}\n" + "-" * 100 + f"\n{text}\n" + "-" * 100)
        if score:
            s = reward.score_completion(text, e, score)
            print(f"reference {e['answer']!r} | answer {s['answer']!r} | score {s['score']:.2f} | "
                  f"format {s['format']:.0f} | {len(c)} tokens")
        else:
            print(f"answer {reward.extract_answer(text)!r} | "
                  f"format {reward.format_reward(text):.0f} | {len(c)} tokens")


if __name__ == "__main__":
    flags.run(main, SampleConfig, __doc__)
