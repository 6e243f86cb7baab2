"""What a task family gives the training engine: its data, its model head, its batches and its scores.

``train.run`` is the same for every family; a family (GLUE, commonsense, summarization) says how
to read its files, which model head to load (``pretrained.load_model_and_tokenizer``), how to turn
examples into rows and rows into a batch with a ``labels`` entry the model's loss reads, and how to
evaluate. ``get_family(opts)`` picks it from ``TrainOptions.family``.
"""

from __future__ import annotations

from typing import Protocol

FAMILIES = ("glue", "commonsense", "summarization")


class TaskFamily(Protocol):
    name: str
    head: int | str  # number of classifier labels, "causal-lm" or "seq2seq-lm"
    main_key: str  # the key of evaluate()'s metrics reported first

    def check(self, opts) -> None:
        """Refuse bad task names or options before any file is read."""

    def read(self, opts, splits: dict | None = None) -> tuple[list, dict[str, list]]:
        """(training examples, {eval split: examples}); every row checked, errors name the file and row."""

    def target_modules(self, model) -> list[str] | None:
        """The family's default target modules (None: every linear of the transformer blocks)."""

    def modules_to_save(self, model) -> list[str]:
        """Modules trained in full by every method (a classifier head; none for an LM)."""

    def encode(self, tokenizer, examples: list, max_len: int) -> list[dict]:
        """Training rows: ``input_ids`` (and whatever ``collate`` needs), with the loss's targets."""

    def collate(self, tokenizer, rows: list[dict], length: int | None = None) -> dict:
        """A padded batch of tensors (to its longest row, or to ``length``), ``labels`` included."""

    def eval_data(self, tokenizer, eval_splits: dict[str, list], max_len: int):
        """What ``evaluate`` reads, prepared once."""

    def evaluate(self, model, tokenizer, eval_data, batch_size: int, device) -> dict[str, float]:
        """Metrics over every eval split (keys prefixed by the split where there are several)."""

    def baseline(self, train_examples: list, eval_splits: dict[str, list]) -> dict[str, float]:
        """The majority-class (or trivial) floor the metrics are read against."""


def get_family(opts) -> TaskFamily:
    """The family of ``opts.family`` for ``opts.task``."""
    if opts.family == "glue":
        from .glue_family import GlueFamily

        return GlueFamily(opts.task)
    if opts.family == "commonsense":
        from .commonsense import CommonsenseFamily

        return CommonsenseFamily(opts)
    if opts.family == "summarization":
        from .summarization import SummarizationFamily

        return SummarizationFamily(opts)
    raise ValueError(f"task family {opts.family!r} is unknown: expected one of {', '.join(FAMILIES)}")
