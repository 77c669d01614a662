"""One GRPO update on fixed samples, in 1 process (python) or several (torchrun); saves the LoRA
weights. Used by test_robust.py: the weights must not depend on the number of processes."""
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp  # noqa: E402
import grpo  # noqa: E402
from conftest import EOS, tiny_model  # noqa: E402

if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    dist.init_process_group("gloo")
rank, world = ddp.rank_world()
model = tiny_model("llama")
grpo.apply_lora(model, 4, 8.0, "q_proj,v_proj,down_proj")
g = torch.Generator().manual_seed(0)
for p in model.parameters():
    if p.requires_grad:
        p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1
prompts = [[1, 5, 9, 17], [1, 44, 3]]
completions, _ = grpo.generate(model, prompts, 4, 10, 1.0, 1.0, EOS,
                               torch.Generator().manual_seed(1))
buffer = [grpo.Sample(prompts[i // 4], c, advantage=float(torch.randn(1, generator=g)))
          for i, c in enumerate(completions)]
cfg = dataclasses.replace(grpo.Config(), batch_size=4, gradient_accumulation_steps=2,
                          max_new_tokens=10, loss_agg=sys.argv[2], learning_rate=1e-2)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
stats = grpo.update(model, opt, buffer[rank::world], cfg, EOS, torch.Generator().manual_seed(rank))
assert stats["optimizer_steps"] == 1
if rank == 0:
    torch.save(grpo.trainable_state_dict(model), sys.argv[1])
if dist.is_initialized():
    dist.destroy_process_group()
