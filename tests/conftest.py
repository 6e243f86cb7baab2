"""Shared fixtures: a tiny random-initialized transformer (no download) and a learnable synthetic task."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel


def load_benchmark(name: str):
    """The script ``benchmarks/{name}.py`` as a module (registered in sys.modules, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_bert(seed: int = 0, dtype=torch.float32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def synthetic_batches(n_batches: int, batch_size: int = 16, seq_len: int = 12, seed: int = 0):
    """Label 1 iff token 5 occurs in the sequence: learnable, balanced about half/half."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(6, 64, (batch_size, seq_len), generator=g)
        labels = torch.randint(0, 2, (batch_size,), generator=g)
        pos = torch.randint(1, seq_len, (batch_size,), generator=g)
        ids[labels == 1, pos[labels == 1]] = 5
        ids[:, 0] = 1
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def train_steps(model, opt, ctrl, data, start: int, stop: int) -> None:
    """Steps ``start`` to ``stop`` of an AROMA run on ``data`` (cycled), the controller after each."""
    model.train()
    for step in range(start, stop):
        model(**data[step % len(data)]).loss.backward()
        opt.step(); ctrl.scheduler.step(); opt.zero_grad()
        ctrl.step()


def save_and_resume(directory: Path, model, opt, ctrl, lr: float = 1e-2):
    """Checkpoint an AROMA run on ``tiny_bert(0)`` (adapter, controller, optimizer and schedule) into
    ``directory`` and load it into a new model, AdamW and controller, as a resumed run does."""
    from aroma_peft import AromaController, AromaModel, load_controller_state

    model.save_pretrained(directory, controller=ctrl)
    torch.save({"optimizer": opt.state_dict(), "scheduler": ctrl.scheduler.state_dict()}, directory / "optim.pt")
    model = AromaModel.from_pretrained(tiny_bert(0), directory, is_trainable=True)
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=lr)
    saved = torch.load(directory / "optim.pt", weights_only=True)
    opt.load_state_dict(saved["optimizer"])
    ctrl = AromaController(model, opt)
    ctrl.scheduler.load_state_dict(saved["scheduler"])
    ctrl.load_state_dict(load_controller_state(directory))
    return model, opt, ctrl


@pytest.fixture
def bert():
    return tiny_bert()
