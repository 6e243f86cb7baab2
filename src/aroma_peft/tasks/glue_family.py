"""GLUE as a task family of the engine: a sequence classifier, its batches, its metrics (Table 2)."""

from __future__ import annotations

import torch

from .glue import TASKS, find_split_files, load_glue_hub, read_split
from .metrics import glue_metrics, main_metric, majority_baseline


def classifier_head_names(model) -> list[str]:
    """The sequence-classification head(s) of a transformers model, trained in full by every method."""
    names = [n for n in ("classifier", "score") if hasattr(model, n)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head; pass --modules-to-save")
    return names


class GlueFamily:
    name = "glue"

    def __init__(self, task: str):
        self.task = task
        self.spec = TASKS.get(task)
        if self.spec is None:
            raise ValueError(f"--task {task!r} is unknown: expected one of {', '.join(TASKS)}")
        self.head = self.spec.num_labels
        self.regression = self.spec.num_labels == 1
        metric = main_metric(task)
        self.main_key = f"dev_matched_{metric}" if task == "mnli" else metric

    def check(self, opts) -> None:
        pass  # the task was checked at construction

    def read(self, opts, splits=None):
        if splits is None:
            if opts.data_dir is None:
                splits = load_glue_hub(self.task)
            else:
                files = find_split_files(self.task, opts.data_dir)
                splits = {s: read_split(self.task, files[s]) for s in ("train",) + self.spec.eval_splits}
        return splits["train"], {s: splits[s] for s in self.spec.eval_splits}

    def target_modules(self, model) -> None:
        return None  # methods.default_target_modules: every linear of the blocks (Table 15)

    def modules_to_save(self, model) -> list[str]:
        return classifier_head_names(model)

    def encode(self, tokenizer, examples, max_len: int) -> list[dict]:
        a = [e.text_a for e in examples]
        b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_len)
        return [{k: enc[k][i] for k in enc} | {"labels": examples[i].label} for i in range(len(examples))]

    def collate(self, tokenizer, rows: list[dict], length: int | None = None) -> dict:
        feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
        padding = {"padding": "max_length", "max_length": length} if length else {}
        batch = tokenizer.pad(feats, return_tensors="pt", **padding)
        batch["labels"] = torch.tensor([r["labels"] for r in rows],
                                       dtype=torch.float32 if self.regression else torch.long)
        return dict(batch)

    def eval_data(self, tokenizer, eval_splits, max_len: int):
        return {s: self.encode(tokenizer, ex, max_len) for s, ex in eval_splits.items()}

    @torch.no_grad()
    def predict(self, model, tokenizer, rows: list[dict], batch_size: int, device="cpu") -> list:
        """Class indices (or STS-B scores) for ``rows``."""
        model.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # similar lengths: less padding
        preds = [None] * len(rows)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = self.collate(tokenizer, [rows[i] for i in idx])
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            out = logits.squeeze(-1) if self.regression else logits.argmax(-1)
            for i, p in zip(idx, out.tolist()):
                preds[i] = p
        model.train()
        return preds

    def evaluate(self, model, tokenizer, eval_data, batch_size: int, device="cpu") -> dict:
        merged = {}
        for split, rows in eval_data.items():
            preds = self.predict(model, tokenizer, rows, batch_size, device)
            metrics = glue_metrics(self.task, preds, [r["labels"] for r in rows])
            prefix = f"{split}_" if len(eval_data) > 1 else ""
            merged.update({prefix + k: v for k, v in metrics.items()})
        return merged

    def baseline(self, train_examples, eval_splits) -> dict:
        first = eval_splits[self.spec.eval_splits[0]]
        return majority_baseline(self.task, [e.label for e in train_examples], [e.label for e in first])
