"""Commonsense reasoning with a causal LM (paper §4.3, Tables 3 and 13), in the LLM-Adapters format.

Each file is a JSON list of ``{instruction, input, output, answer}``; training is instruction tuning
with the LLM-Adapters (Alpaca) prompt and the loss on the response tokens only. Evaluation, as the
paper does it: greedy generation and the LLM-Adapters answer extraction (the first answer word
of the task's kind in the response); or, faster, the answer choice whose response ("the correct
answer is X") has the highest log-likelihood (``eval_mode="loglik"``). Metrics: accuracy per task
and their average; the floor beside them is each task's majority answer on its eval examples.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..pretrained import CAUSAL_LM
from .lm import IGNORE, generate, pad_rows, prompt_target_rows

TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")  # Table 3
# The answer words each task's response may name (LLM-Adapters, commonsense_evaluate.py: extract_answer).
ANSWER_WORDS = {
    "boolq": ("true", "false"), "piqa": ("solution1", "solution2"), "winogrande": ("option1", "option2"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    **{t: ("answer1", "answer2", "answer3", "answer4", "answer5")
       for t in ("social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa")},
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # Table 13: q, k, v, up, down
EVAL_MODES = ("generate", "loglik")
FIELDS = ("instruction", "input", "output", "answer")


@dataclass(frozen=True)
class Example:
    task: str
    instruction: str
    input: str
    output: str
    answer: str


def prompt(ex: Example) -> str:
    """The LLM-Adapters (Alpaca) prompt, up to the response."""
    if ex.input:
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{ex.instruction}\n\n### Input:\n{ex.input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n")


def read_file(path: str | Path, task: str) -> list[Example]:
    """Every row of an LLM-Adapters JSON file, checked; a bad one names the file and the row (0-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected an LLM-Adapters JSON list of "
                                "{instruction, input, output, answer})")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err}); expected a JSON list of "
                         "{instruction, input, output, answer}") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{instruction, input, output, answer}}, "
                         f"got {type(rows).__name__}{' (empty)' if rows == [] else ''}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {i}: a {type(row).__name__}, not an object with {', '.join(FIELDS)}")
        missing = [f for f in FIELDS if not isinstance(row.get(f, "" if f == "input" else None), str)]
        if missing:
            raise ValueError(f"{path}: row {i}: {', '.join(missing)} missing or not a string (each row needs "
                             f"string fields {', '.join(FIELDS)})")
        out.append(Example(task, row["instruction"], row.get("input", ""), row["output"], row["answer"].strip()))
    return out


def extract_answer(task: str, text: str) -> str:
    """The first answer word of ``task``'s kind in a generated response ("" when there is none)."""
    words = ANSWER_WORDS.get(task)
    if words is None:
        raise ValueError(f"no answer extraction for task {task!r}: expected one of {', '.join(ANSWER_WORDS)}")
    found = re.findall("|".join(words), text.strip())
    return found[0] if found else ""


def answer_choices(ex: Example) -> list[str]:
    """The choices the instruction offers ("Answer format: answer1/answer2/answer3"), else the task's words."""
    found = re.search(r"Answer format:\s*([\w/]+)", ex.instruction)
    return found.group(1).split("/") if found else list(ANSWER_WORDS[ex.task])


def majority_accuracy(answers: list[str]) -> float:
    """The accuracy of always answering the most frequent answer of ``answers``."""
    return Counter(answers).most_common(1)[0][1] / len(answers)


class CommonsenseFamily:
    name = "commonsense"
    head = CAUSAL_LM
    main_key = "average"

    def __init__(self, opts):
        self.opts = opts
        self.eval_tasks = list(opts.eval_tasks or TASKS)
        self.mode = opts.eval_mode

    def check(self, opts) -> None:
        for t in (opts.train_tasks or []) + self.eval_tasks:
            if t not in ANSWER_WORDS:
                raise ValueError(f"commonsense task {t!r} is unknown: expected one of {', '.join(ANSWER_WORDS)}")
        if self.mode not in EVAL_MODES:
            raise ValueError(f"--eval-mode {self.mode!r} is unknown: expected one of {', '.join(EVAL_MODES)}")
        if opts.data_dir is None:
            raise ValueError("commonsense needs --data-dir (a folder with <task>/test.json, LLM-Adapters layout)")

    def read(self, opts, splits=None):
        if splits is not None:
            return splits["train"], {t: splits[t] for t in self.eval_tasks}
        root = Path(opts.data_dir)
        if opts.train_file:
            train = read_file(opts.train_file, "mixed")
        else:
            tasks = opts.train_tasks or [t for t in TASKS if (root / t / "train.json").is_file()]
            if not tasks:
                raise FileNotFoundError(f"--data-dir {root}: no <task>/train.json (pass --train-file)")
            train = [ex for t in tasks for ex in read_file(root / t / "train.json", t)]
        return train, {t: read_file(root / t / "test.json", t) for t in self.eval_tasks}

    def target_modules(self, model) -> list[str] | None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        return TARGET_MODULES if set(TARGET_MODULES) <= names else None  # else every linear of the blocks

    def modules_to_save(self, model) -> list[str]:
        return []

    def encode(self, tokenizer, examples, max_len: int) -> list[dict]:
        return prompt_target_rows(tokenizer, [prompt(e) for e in examples], [e.output for e in examples], max_len)

    def collate(self, tokenizer, rows, length=None) -> dict:
        return pad_rows(tokenizer, rows, length)

    def eval_data(self, tokenizer, eval_splits, max_len: int):
        return eval_splits

    def predict(self, model, tokenizer, examples: list[Example], batch_size: int, device) -> list[str]:
        if self.mode == "generate":
            texts = generate(model, tokenizer, [prompt(e) for e in examples], batch_size, self.opts.max_new_tokens,
                             self.opts.max_seq_len, device)
            return [extract_answer(e.task, t) for e, t in zip(examples, texts)]
        return [c[int(torch.tensor(s).argmax())] for c, s in
                zip(*self.choice_scores(model, tokenizer, examples, batch_size, device))]

    @torch.no_grad()
    def choice_scores(self, model, tokenizer, examples, batch_size: int, device) -> tuple[list, list]:
        """(choices, summed log-likelihood of "the correct answer is X" after the prompt) per example."""
        choices = [answer_choices(e) for e in examples]
        flat = [(prompt(e), f"the correct answer is {c}") for e, cs in zip(examples, choices) for c in cs]
        rows = prompt_target_rows(tokenizer, [p for p, _ in flat], [t for _, t in flat], self.opts.max_seq_len,
                                  eos=False)
        model.eval()
        scores = []
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in pad_rows(tokenizer, rows[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)  # token t+1 given tokens up to t
            labels = batch["labels"][:, 1:]
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores += (picked * (labels != IGNORE)).sum(-1).tolist()
        model.train()
        per_example, i = [], 0
        for cs in choices:
            per_example.append(scores[i:i + len(cs)])
            i += len(cs)
        return choices, per_example

    def evaluate(self, model, tokenizer, eval_data, batch_size: int, device="cpu") -> dict:
        metrics = {}
        for task, examples in eval_data.items():
            preds = self.predict(model, tokenizer, examples, batch_size, device)
            metrics[f"{task}_accuracy"] = sum(p == e.answer for p, e in zip(preds, examples)) / len(examples)
        metrics["average"] = sum(metrics.values()) / len(eval_data)
        return metrics

    def baseline(self, train_examples, eval_splits) -> dict:
        floors = {f"{t}_accuracy": majority_accuracy([e.answer for e in ex]) for t, ex in eval_splits.items()}
        return floors | {"average": sum(floors.values()) / len(floors)}
