"""Method wrappers (methods.py): what the run directory reports for the PEFT baselines."""

import torch

from aroma_peft.methods import MethodOptions, prepare
from conftest import tiny_bert


def _batch(model, n=8, seq=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def test_adalora_ranks_follow_the_allocator_budget():
    """init_r per module before the first masking; target_r per module on average once the budget is final."""
    base = tiny_bert()
    opts = MethodOptions(r=2, init_r=6, alpha=8.0, tinit=1, tfinal=2, delta_t=1, modules_to_save=["classifier"])
    run = prepare("adalora", base, opts, max_steps=8, warmup_steps=1)
    n_modules = len(run.module_ranks())
    assert n_modules > 0 and set(run.module_ranks().values()) == {6}
    layers = {n: m for n, m in run.model.base_model.model.named_modules() if hasattr(m, "lora_E")}
    width = {n: m.in_features + m.out_features + 1 for n, m in layers.items()}
    head = sum(p.numel() for n, p in run.model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert run.trainable_count() == sum(6 * w for w in width.values()) + head

    optimizer = torch.optim.AdamW(run.parameters, lr=1e-2)
    for step in range(1, 8):
        run.model(**_batch(base)).loss.backward()
        optimizer.step()
        run.after_step(step)
        optimizer.zero_grad()
    ranks = run.module_ranks()
    # AdaLoRA's final budget is target_r times the number of modules (peft.AdaLoraConfig)
    assert sum(ranks.values()) == 2 * n_modules
    # the reported ranks are the kept triplets of the rank pattern, which hold E at zero elsewhere
    for n, m in layers.items():
        assert int((m.lora_E["default"] != 0).sum()) <= ranks[n]
    assert run.trainable_count() == sum(ranks[n] * width[n] for n in layers) + head
