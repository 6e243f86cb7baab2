"""Rows and batches for language-model fine-tuning: the loss on the target tokens only, greedy generation."""

from __future__ import annotations

import torch

IGNORE = -100  # the label torch's cross-entropy (and every transformers LM loss) skips


def prompt_target_rows(tokenizer, prompts: list[str], targets: list[str], max_len: int, eos: bool = True) -> list[dict]:
    """Causal-LM rows of ``prompt + target`` whose labels are -100 over the prompt: the loss reads the
    target's tokens (and the end-of-sequence token) only. As LLM-Adapters does, the prompt's tokens are
    those of the prompt tokenized alone; truncation keeps the first ``max_len`` tokens."""
    rows = []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = tokenizer(prompt + target, add_special_tokens=True)["input_ids"]
        if eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        n = min(len(prompt_ids), len(ids))
        labels = [IGNORE] * n + ids[n:]
        rows.append({"input_ids": ids[:max_len], "labels": labels[:max_len]})
    return rows


def seq2seq_rows(tokenizer, sources: list[str], targets: list[str], max_len: int, max_target_len: int) -> list[dict]:
    """Encoder-decoder rows: the source as ``input_ids``, the target as ``labels`` (the model shifts them
    into its decoder inputs)."""
    enc = tokenizer(sources, truncation=True, max_length=max_len)
    lab = tokenizer(text_target=targets, truncation=True, max_length=max_target_len)
    return [{"input_ids": enc["input_ids"][i], "labels": lab["input_ids"][i]} for i in range(len(sources))]


def pad_rows(tokenizer, rows: list[dict], length: int | None = None, side: str = "right") -> dict:
    """Pad ``input_ids`` (with an attention mask) and ``labels`` (with -100) to the longest row or ``length``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_in = length or max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "attention_mask": []}
    for r in rows:
        fill = n_in - len(r["input_ids"])
        ids, mask = r["input_ids"] + [pad] * fill, [1] * len(r["input_ids"]) + [0] * fill
        if side == "left":
            ids, mask = [pad] * fill + r["input_ids"], [0] * fill + [1] * len(r["input_ids"])
        batch["input_ids"].append(ids)
        batch["attention_mask"].append(mask)
    out = {k: torch.tensor(v) for k, v in batch.items()}
    if rows and "labels" in rows[0]:
        n_lab = n_in if len(rows[0]["labels"]) == len(rows[0]["input_ids"]) else max(len(r["labels"]) for r in rows)
        out["labels"] = torch.tensor([r["labels"] + [IGNORE] * (n_lab - len(r["labels"])) for r in rows])
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, max_len: int, device,
             seq2seq: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded for a decoder), decoded without special tokens."""
    model.eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer(p, truncation=True, max_length=max_len)["input_ids"] for p in chunk]
        batch = pad_rows(tokenizer, [{"input_ids": i} for i in ids], side="right" if seq2seq else "left")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id)
        new = out if seq2seq else out[:, batch["input_ids"].shape[1]:]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train()
    return texts
