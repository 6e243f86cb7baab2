"""Probe (issue 10, part 3): does AROMA close CoLA's gap when its merged components may grow?

    python benchmarks/merged_gain_probe.py --seed 0 --gain-lr-ratio 1      # CoLA, AROMA's chosen trial

The study's diagnosis of CoLA (docs/study.md, "Why AROMA fits CoLA less"): under Adam each factor
grows by about the learning rate per step, so a component's norm is set by its inner loop's length;
AROMA's mutually orthogonal components add up to LoRA r=1's norm, but the update's largest singular
value is a fifth of LoRA r=1's, and the dev score follows it. This probe gives every merged component
a trainable gain ``g_i`` (1 at its merge, so the model's function does not change there): the layer
computes ``W0 x + s sum_i g_i b_i a_i x + s b_p a_p x``. A component that the task needs larger can
grow after its inner loop; one it does not can shrink. It costs one parameter per merged component.

It is a probe, not the library: it patches ``AromaLinear`` and ``AromaModel`` in this process and
trains one run of the study's spec (the committed run's own options) through ``glue_study.run_one``
into its own work folder. The gains are not read by eqs. (5) and (6), the Reset leaves their moments
alone (it touches the live factors only), the checkpoint and the exported LoRA adapter do not hold
them (no resume; the summary's dev metrics are measured in this process, on the model with its
gains). The reported trainable parameters count one gain per merged component. The summary goes to
``benchmarks/results/diagnostics/merged_gain/`` with ``gains.json`` (each module's final gains).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import glue_study  # noqa: E402
from aroma_peft import methods, train  # noqa: E402
from aroma_peft.layer import AromaLinear  # noqa: E402
from aroma_peft.model import AromaModel  # noqa: E402

CAP = 64  # gains held per module; a module that merges more components is an error


def patch(gain_lr_ratio: float):
    """Patch the classes in this process; returns the function that undoes it."""
    init, forward = AromaLinear.__init__, AromaLinear.forward
    originals = (init, forward, AromaModel.adapter_parameters, AromaModel.get_nb_trainable_parameters,
                 train.optimizer_groups, methods._prepare_aroma)

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.merged_gain = nn.Parameter(torch.ones(CAP, device=self.lora_A.device))

    def patched_forward(self, x):
        out = forward(self, x)  # the merged components enter at gain 1 (folded into W0)
        k = self.rank
        if k and not self.disabled:
            if k > CAP:
                raise RuntimeError(f"merged_gain_probe: a module merged {k} components, more than CAP={CAP}")
            g = self.merged_gain[:k] - 1
            extra = F.linear(F.linear(x.to(torch.float32), self.merged_A) * g, self.merged_B)
            out = out + (self.scaling * extra).to(out.dtype)
        return out

    def adapter_parameters(self):
        params = [p for layer in self.aroma_layers.values() for p in (layer.lora_A, layer.lora_B, layer.merged_gain)]
        for name in self.modules_to_save_names:
            params.extend(self.base_model.get_submodule(name).parameters())
        return params

    count = AromaModel.get_nb_trainable_parameters

    def trainable(self):
        n, total = count(self)
        layers = self.aroma_layers.values()
        return n - sum(CAP - layer.rank for layer in layers), total - sum(CAP - layer.rank for layer in layers)

    groups = train.optimizer_groups

    def optimizer_groups(run, lr, *args):
        out = groups(run, lr, *args)
        gains = {id(layer.merged_gain) for layer in run.model.aroma_layers.values()}
        for group in out:
            group["params"] = [p for p in group["params"] if id(p) not in gains]
        out.append({"params": [layer.merged_gain for layer in run.model.aroma_layers.values()],
                    "lr": lr * gain_lr_ratio})
        return out

    AromaLinear.__init__, AromaLinear.forward = patched_init, patched_forward
    AromaModel.adapter_parameters, AromaModel.get_nb_trainable_parameters = adapter_parameters, trainable
    train.optimizer_groups = optimizer_groups

    prepare = methods._prepare_aroma

    def prepare_and_keep(*args, **kwargs):
        run = prepare(*args, **kwargs)
        patch.model = run.model
        return run

    methods._prepare_aroma = prepare_and_keep

    def restore() -> None:
        (AromaLinear.__init__, AromaLinear.forward, AromaModel.adapter_parameters,
         AromaModel.get_nb_trainable_parameters, train.optimizer_groups, methods._prepare_aroma) = originals

    return restore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "benchmarks/studies/minilm_glue.json")
    parser.add_argument("--run", default="cola/aroma/tac1776de", help="the committed study run whose options to train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gain-lr-ratio", type=float, default=1.0, help="the gains' learning rate over the factors'")
    parser.add_argument("--max-steps", type=int, help="override the budget (a smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.gain_lr_ratio >= 0:
        parser.error(f"--gain-lr-ratio must be >= 0, got {args.gain_lr_ratio}")
    committed = ROOT / "benchmarks/results/glue_study/runs" / f"{args.run}-s{args.seed}" / "study_run.json"
    if not committed.is_file():
        parser.error(f"--run/--seed: no committed study run at {committed}")
    torch.set_num_threads(args.threads)
    spec = glue_study.load_spec(args.spec)
    base = glue_study.Run(**json.loads(committed.read_text()))
    options = dict(base.options)
    if args.max_steps:
        options |= {"max_steps": args.max_steps, "eval_steps": args.max_steps}
    name = f"{args.run.replace('/', '-')}-gain{args.gain_lr_ratio:g}" + (f"-T{args.max_steps}" if args.max_steps else "")
    run = dataclasses.replace(base, arm=name.split("-", 1)[1], options=options)
    spec["work"] = "runs/diagnostics/merged_gain"
    patch(args.gain_lr_ratio)
    glue_study.run_one(spec, run, summary=False)
    out = glue_study.work_dir(spec, run)
    dest = ROOT / "benchmarks/results/diagnostics/merged_gain" / f"{name}-s{args.seed}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in glue_study.SUMMARY_FILES:
        shutil.copy2(out / f, dest / f)
    (dest / "study_run.json").write_text(json.dumps(dataclasses.asdict(run) | {"gain_lr_ratio": args.gain_lr_ratio}, indent=2))
    gains = {n: [round(v, 4) for v in layer.merged_gain[:layer.rank].tolist()]
             for n, layer in patch.model.aroma_layers.items()}
    (dest / "gains.json").write_text(json.dumps(gains, indent=1))
    final = json.loads((dest / "final_metrics.json").read_text())
    print(json.dumps({k: final.get(k) for k in ("metrics", "trainable_params", "total_rank", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
