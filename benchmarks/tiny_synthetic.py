"""AROMA end to end on a tiny random-initialized BERT and a synthetic task (no download, seconds on CPU).

Usage: python benchmarks/tiny_synthetic.py EPS_OUT LR MAX_INNER_STEPS MAX_STEPS
(the end-to-end test in tests/test_controller.py uses 0.1 1e-2 20 600).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import synthetic_batches, tiny_bert  # noqa: E402

from aroma_peft import AromaConfig, AromaController, get_aroma_model  # noqa: E402

eps, lr, tin, T = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = AromaConfig(target_modules=["query", "key", "value", "dense"], exclude_modules=["pooler.dense"],
                     modules_to_save=["classifier"], max_steps=T, max_inner_steps=tin, eps_out=eps, warmup_steps=10,
                     restart_warmup_steps=5, train_heads_after_convergence=False)
model = get_aroma_model(tiny_bert(), config)
opt = torch.optim.AdamW(model.adapter_parameters(), lr=lr)
ctrl = AromaController(model, opt)
data = synthetic_batches(20)
model.train()
started, losses = time.perf_counter(), []
for step in range(T):
    out = model(**data[step % 20])
    out.loss.backward()
    losses.append(out.loss.item())
    opt.step(); ctrl.scheduler.step(); opt.zero_grad()
    if ctrl.step():
        break
print(f"steps {ctrl.loop.step_count} of T={T}, {time.perf_counter() - started:.1f} s; "
      f"loss mean of first/last 20 steps {sum(losses[:20]) / 20:.3f} / {sum(losses[-20:]) / 20:.3f}")
print("trainable params at each transition:", [h["trainable_params"] for h in ctrl.history])
print("final ranks:", list(model.ranks().values()))
