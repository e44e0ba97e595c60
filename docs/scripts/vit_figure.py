"""Numbers and picture of docs/transformers.md: a tiny ViT trained on the marker shortcut.

Trains ``heatlens.debug.tiny_vit`` on digit sums with the marker shortcut, runs the debugging story,
the two randomisation sanity checks for four methods, and draws rollout vs Chefer vs Grad-CAM.
Run from the repository root: ``python docs/scripts/vit_figure.py`` (about 2-3 minutes on one core).
"""

from __future__ import annotations

import json
import time

import torch

import heatlens as hl
from heatlens import debug
from heatlens.sanity import model_randomization, random_logit
from heatlens.viz import explanation_grid, save_png

METHODS = ("saliency", "gradcam", "attention_rollout", "attention_relevance", "legrad")


def main() -> None:
    torch.set_num_threads(1)
    train = debug.digit_sum_dataset("train", shortcut="marker", n=3000)
    test = debug.digit_sum_dataset("test", shortcut="marker", n=600)
    tic = time.perf_counter()
    run = debug.train_classifier("tiny_vit", train, epochs=16, lr=3e-3, test=test, progress=False)
    print(run.summary(), f"({time.perf_counter() - tic:.0f} s wall)")
    report = debug.detect_shortcut(run.model, train, test, methods=list(METHODS), n_images=8)
    print(report.to_text())
    x = train.x[:16]
    rows = []
    for name in METHODS:
        mr = model_randomization(run.model, x, name, similarity=("spearman", "ssim"))
        rl = random_logit(run.model, x, name, similarity=("spearman", "ssim"))
        rows.append({"method": name, "randomization_spearman": round(mr.table[-1]["spearman"], 3),
                     "randomization_passed": mr.passed, "random_logit_spearman": round(rl.table and
                     sum(r["spearman"] for r in rl.table) / len(rl.table), 3), "random_logit_passed": rl.passed})
        print(rows[-1])
    print(json.dumps({"train_acc": run.train_acc, "test_acc": run.test_acc, "detected": report.detected,
                      "follow_rate": report.behaviour.get("follow_rate"), "sanity": rows}, indent=1))
    shown = train.subset(slice(0, 4))
    explanations = {name: hl.explain(run.model, shown.x, name) for name in ("attention_rollout", "attention_relevance",
                                                                         "gradcam")}
    fig = explanation_grid(explanations, shown.x.permute(0, 2, 3, 1).numpy(), shown.y, reduce="sum", cell_size=2.2)
    save_png(fig, "docs/img/transformers.png", dpi=80)


if __name__ == "__main__":
    main()
