"""Abstractive summarization (paper §4.4, Tables 4 and 14): ROUGE-1/2/L with ``rouge-score``.

Encoder-decoder models (BART, T5) read the document and are trained on the summary
(``AutoModelForSeq2SeqLM``); a decoder-only model (``decoder_only``) reads a prompt and is trained on
the summary tokens only. Data: JSON lines ``{document, summary}`` (XSum's fields): ``train.jsonl``
and ``test.jsonl`` in ``data_dir``, or one file (``data_dir`` itself, or ``train_file``) split in
file order, the first 80% to train and the last 20% to test. The floor beside the scores is
LEAD-1, the document's first sentence as its summary.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..jsonlines import json_lines
from ..pretrained import CAUSAL_LM, SEQ2SEQ_LM
from .lm import generate, pad_rows, prompt_target_rows, seq2seq_rows

TRAIN_FRACTION = 0.8


def decoder_prompt(document: str) -> str:
    return f"Summarize the following article in one sentence.\n\n{document}\n\nSummary: "


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line of a JSON-lines file of ``{document, summary}``; a bad one names the file and the line (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected JSON lines of {{document, summary}})")
    rows = []
    for n, row in json_lines(path):
        bad = [f for f in ("document", "summary") if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if bad:
            raise ValueError(f"{path}, line {n}: {', '.join(bad)} missing or not a string "
                             "(each line needs string fields document and summary)")
        rows.append({"document": row["document"], "summary": row["summary"]})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def split_in_order(rows: list, fraction: float = TRAIN_FRACTION) -> tuple[list, list]:
    cut = int(len(rows) * fraction)
    return rows[:cut], rows[cut:]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming, as the BART and AROMA papers report)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


def lead_1(document: str) -> str:
    """The document's first sentence."""
    return re.split(r"(?<=[.!?])\s+", document.strip(), maxsplit=1)[0]


class SummarizationFamily:
    name = "summarization"
    main_key = "rougeL"

    def __init__(self, opts):
        self.opts = opts
        self.decoder_only = opts.decoder_only
        self.head = CAUSAL_LM if opts.decoder_only else SEQ2SEQ_LM

    def check(self, opts) -> None:
        if opts.data_dir is None and opts.train_file is None:
            raise ValueError("summarization needs --data-dir (train.jsonl and test.jsonl, or one .jsonl file)")

    def read(self, opts, splits=None):
        if splits is not None:
            return splits["train"], {"test": splits["test"]}
        root = Path(opts.data_dir) if opts.data_dir else None
        if root is not None and root.is_dir() and (root / "train.jsonl").is_file():
            return read_jsonl(root / "train.jsonl"), {"test": read_jsonl(root / "test.jsonl")}
        train, test = split_in_order(read_jsonl(opts.train_file or root))
        return train, {"test": test}

    def target_modules(self, model) -> None:
        return None  # every linear of the blocks (Table 14 adapts the attention and feed-forward layers)

    def modules_to_save(self, model) -> list[str]:
        return []

    def encode(self, tokenizer, examples, max_len: int) -> list[dict]:
        # One target length, as Table 14's Max Target Length: summaries are cut at it in training and
        # generated up to it.
        docs, sums, target_len = [e["document"] for e in examples], [e["summary"] for e in examples], self.opts.max_new_tokens
        if self.decoder_only:
            return prompt_target_rows(tokenizer, self._prompts(tokenizer, docs, max_len),
                                      [_truncate(tokenizer, t, target_len) for t in sums], max_len)
        return seq2seq_rows(tokenizer, docs, sums, max_len, target_len)

    def _prompts(self, tokenizer, documents: list[str], max_len: int) -> list[str]:
        """Decoder prompts whose document gives way, so that the prompt's frame and a whole target (and the
        end of sequence) fit in ``max_len``: the same in training and at generation."""
        room = max_len - self.opts.max_new_tokens - len(tokenizer(decoder_prompt(""))["input_ids"]) - 1
        if room < 1:
            raise ValueError(f"--max-seq-len {max_len} leaves no room for the document beside the prompt and "
                             f"--max-new-tokens {self.opts.max_new_tokens}")
        return [decoder_prompt(_truncate(tokenizer, d, room)) for d in documents]

    def collate(self, tokenizer, rows, length=None) -> dict:
        return pad_rows(tokenizer, rows, length)

    def eval_data(self, tokenizer, eval_splits, max_len: int):
        return eval_splits

    def summarize(self, model, tokenizer, documents: list[str], batch_size: int, device) -> list[str]:
        max_len = self.opts.max_seq_len
        if self.decoder_only:
            texts = generate(model, tokenizer, self._prompts(tokenizer, documents, max_len), batch_size,
                             self.opts.max_new_tokens, max_len, device)
            return [t.strip().split("\n")[0] for t in texts]  # the summary is one line
        return generate(model, tokenizer, documents, batch_size, self.opts.max_new_tokens, max_len, device,
                        seq2seq=True)

    def evaluate(self, model, tokenizer, eval_data, batch_size: int, device="cpu") -> dict:
        rows = eval_data["test"]
        preds = self.summarize(model, tokenizer, [r["document"] for r in rows], batch_size, device)
        return rouge(preds, [r["summary"] for r in rows])

    def baseline(self, train_examples, eval_splits) -> dict:
        rows = eval_splits["test"]
        return rouge([lead_1(r["document"]) for r in rows], [r["summary"] for r in rows])


def _truncate(tokenizer, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (the prompt's frame and the summary must fit)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max(1, max_tokens)]
    return tokenizer.decode(ids)
