"""Probes of CoLA's diagnosis (issue 10, part 3): AROMA's chosen run with one thing changed.

    python benchmarks/aroma_probe.py gains --seed 0 --gain-lr-ratio 3     # a trainable gain per merged component
    python benchmarks/aroma_probe.py head-first --seed 0 --steps 200      # the head alone for the first steps

Each probe patches ``aroma_peft`` in this process (``patch_*`` returns the function that undoes it)
and trains one run of the study's spec, with the committed run's own options (``--run``, default
AROMA's chosen CoLA trial), through ``glue_study.run_one`` into its own work folder; the summary goes
to ``benchmarks/results/diagnostics/PROBE/``. They are probes, not the library: no resume.

``gains``. The study's diagnosis of CoLA (docs/study.md, "Why AROMA fits CoLA less"): under Adam each
factor grows by about the learning rate per step, so a component's norm is set by its inner loop's
length, and the update's largest singular value is a fifth of LoRA r=1's. This probe gives every
merged component a trainable gain ``g_i`` (1 at its merge, so the model's function does not change
there): the layer computes ``W0 x + s sum_i g_i b_i a_i x + s b_p a_p x``, the gains in their own
optimizer group at ``--gain-lr-ratio`` times the rate. The gains are not read by eqs. (5) and (6), the
Reset leaves their moments alone (it touches the live factors only), and the checkpoint and the
exported LoRA adapter do not hold them (the summary's dev metrics are measured in this process, on
the model with its gains). The reported trainable parameters count one gain per merged component;
``gains.json`` holds each module's final gains.

``head-first``. The classifier head starts at random, and the first component is trained and frozen
while it is (LoRA's one component goes on adapting to the head as it learns). This probe trains the
head alone for the first ``--steps`` steps (the live factors get no gradient; the run's budget, the
schedule and the dual loop are unchanged, and the first inner loop, ``T_in`` long, starts counting at
step 0), then AROMA as usual: "linear probing, then fine-tuning" (Kumar et al., 2022) inside one
budget. ``--steps`` must be below ``T_in``, so that no inner loop ends while the factors are frozen.
On a LoRA run (``--run cola/lora-r1/t06d1b49f``) the LoRA factors are frozen the same way, for the
same comparison. The reported trainable parameters are not those of the head-alone steps (AROMA's count
the factors throughout, LoRA's only the head, its count at step 0).
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
from aroma_peft.controller import AromaController  # noqa: E402
from aroma_peft.layer import AromaLinear  # noqa: E402
from aroma_peft.model import AromaModel  # noqa: E402

CAP = 64  # gains held per module; a module that merges more components is an error


def patch_gains(gain_lr_ratio: float):
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
                raise RuntimeError(f"aroma_probe gains: a module merged {k} components, more than CAP={CAP}")
            g = self.merged_gain[:k] - 1
            extra = F.linear(F.linear(x.to(torch.float32), self.merged_A) * g, self.merged_B)
            out = out + (self.scaling * extra).to(out.dtype)
        return out

    adapter = AromaModel.adapter_parameters

    def adapter_parameters(self):
        return adapter(self) + [layer.merged_gain for layer in self.aroma_layers.values()]

    count = AromaModel.get_nb_trainable_parameters

    def trainable(self):  # the gains of components not merged yet do not count
        n, total = count(self)
        unused = sum(CAP - layer.rank for layer in self.aroma_layers.values())
        return n - unused, total - unused

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
        patch_gains.model = run.model
        return run

    methods._prepare_aroma = prepare_and_keep

    def restore() -> None:
        (AromaLinear.__init__, AromaLinear.forward, AromaModel.adapter_parameters,
         AromaModel.get_nb_trainable_parameters, train.optimizer_groups, methods._prepare_aroma) = originals

    return restore


def patch_head_first(steps: int):
    """The live factors get no gradient until the controller has taken ``steps`` steps; returns the undo."""
    init, step = AromaController.__init__, AromaController.step

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if steps >= self.config.max_inner_steps:
            raise ValueError(f"head-first --steps {steps} must be below T_in = {self.config.max_inner_steps}: an inner "
                             "loop would end while the factors are frozen")
        for layer in self.layers:
            layer.lora_A.requires_grad_(False)
            layer.lora_B.requires_grad_(False)

    def patched_step(self):
        finished = step(self)
        if self.loop.step_count == steps:  # the factors train from the next optimizer step on
            for layer in self.layers:
                if layer.active:
                    layer.lora_A.requires_grad_(True)
                    layer.lora_B.requires_grad_(True)
        return finished

    prepare_peft = methods._prepare_peft

    def patched_prepare_peft(*args, **kwargs):  # LoRA: its factors frozen, thawed by after_step at `steps`
        run = prepare_peft(*args, **kwargs)  # the optimizer still gets every factor: they are in run.parameters
        if run.after_step is not None:
            raise ValueError(f"head-first: method {run.method!r} has a step hook of its own; the probe covers LoRA")
        factors = [p for name, p in run.model.named_parameters() if "lora_" in name and p.requires_grad]
        for p in factors:
            p.requires_grad_(False)

        def thaw(step: int) -> None:
            if step == steps:
                for p in factors:
                    p.requires_grad_(True)

        return dataclasses.replace(run, after_step=thaw)

    AromaController.__init__, AromaController.step = patched_init, patched_step
    methods._prepare_peft = patched_prepare_peft

    def restore() -> None:
        AromaController.__init__, AromaController.step = init, step
        methods._prepare_peft = prepare_peft

    return restore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=("gains", "head-first"))
    parser.add_argument("--spec", type=Path, default=ROOT / "benchmarks/studies/minilm_glue.json")
    parser.add_argument("--run", default="cola/aroma/tac1776de", help="the committed study run whose options to train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gain-lr-ratio", type=float, default=1.0, help="gains: their learning rate over the factors'")
    parser.add_argument("--steps", type=int, default=200, help="head-first: the steps the head trains alone")
    parser.add_argument("--max-steps", type=int, help="override the budget (a smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.gain_lr_ratio >= 0:
        parser.error(f"--gain-lr-ratio must be >= 0, got {args.gain_lr_ratio}")
    if not args.steps >= 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    committed = ROOT / "benchmarks/results/glue_study/runs" / f"{args.run}-s{args.seed}" / "study_run.json"
    if not committed.is_file():
        parser.error(f"--run/--seed: no committed study run at {committed}")
    torch.set_num_threads(args.threads)
    spec = glue_study.load_spec(args.spec)
    base = glue_study.Run(**json.loads(committed.read_text()))
    options = dict(base.options)
    if args.max_steps:
        options |= {"max_steps": args.max_steps, "eval_steps": args.max_steps}
    if args.probe == "gains":
        folder, tag, extra = "merged_gain", f"gain{args.gain_lr_ratio:g}", {"gain_lr_ratio": args.gain_lr_ratio}
        patch_gains(args.gain_lr_ratio)
    else:
        folder, tag, extra = "head_first", f"head{args.steps}", {"head_first_steps": args.steps}
        patch_head_first(args.steps)
    name = f"{args.run.replace('/', '-')}-{tag}" + (f"-T{args.max_steps}" if args.max_steps else "")
    run = dataclasses.replace(base, arm=name.split("-", 1)[1], options=options)
    spec["work"] = f"runs/diagnostics/{folder}"
    glue_study.run_one(spec, run, summary=False)
    out = glue_study.work_dir(spec, run)
    dest = ROOT / "benchmarks/results/diagnostics" / folder / f"{name}-s{args.seed}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in glue_study.SUMMARY_FILES:
        shutil.copy2(out / f, dest / f)
    (dest / "study_run.json").write_text(json.dumps(dataclasses.asdict(run) | extra, indent=2))
    if args.probe == "gains":
        gains = {n: [round(v, 4) for v in layer.merged_gain[:layer.rank].tolist()]
                 for n, layer in patch_gains.model.aroma_layers.items()}
        (dest / "gains.json").write_text(json.dumps(gains, indent=1))
    final = json.loads((dest / "final_metrics.json").read_text())
    print(json.dumps({k: final.get(k) for k in ("metrics", "trainable_params", "total_rank", "wall_time_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
