"""The debugging story as an HTML report: what ``heatlens demo`` writes.

``story_report(story)`` turns a ``heatlens.debug.Story`` (data, training, detection, ablations) into
report sections; ``run_demo(...)`` runs the whole story on the embedded digits and writes
``<out>/report.html`` plus ``<out>/finding.json``, printing the milestones as it goes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .html import Section, explanation_section, figure_section, metrics_section, sanity_section, text_section, write_report

# explained with every metric and sanity check; cheap on the 28x56 digits
STORY_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "occlusion")
EVAL_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "occlusion")
METHOD_KWARGS = {"occlusion": {"window": 4, "stride": 4}, "smoothgrad": {"n_samples": 16}}


def training_figure(history: list[dict[str, float]]):
    """Loss and train / validation accuracy per epoch -> Figure."""
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 2.8))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], marker="o", label="validation (shortcut kept)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_figure(training: Any):
    """Train / validation / test accuracy bars: the generalisation gap at a glance -> Figure."""
    import matplotlib.pyplot as plt

    names = ["train", "validation", "test"]
    values = [training.train_acc, training.val_acc, training.test_acc or 0.0]
    fig, ax = plt.subplots(figsize=(4, 2.8))
    bars = ax.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52"])
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in values])
    ax.set(ylim=(0, 1.1), ylabel="accuracy", title="the generalisation gap")
    fig.tight_layout()
    return fig


def story_sections(story: Any, *, seed: int = 0, n_images: int = 6, sanity: bool = True,
                   evaluate: bool = True, on_step: Callable[[str], None] | None = None) -> list[Section]:
    """Report sections for a ``heatlens.debug.Story`` (the finding first: it is what readers came for).

    on_step: called after each costly section (faithfulness, sanity checks, ablation figures)."""
    report, training = story.report, story.training
    sections = [
        text_section("Finding", report.finding, evidence=_evidence_rows(report.evidence)),
        figure_section("Training", [(accuracy_figure(training), training.summary()),
                                    (training_figure(training.history), "training curves")]),
    ]
    for split in ("train", "test"):
        images = report.images[split]
        explanations = {m: e.select(slice(0, n_images)) for m, e in report.explanations[split].items()}
        sections.append(explanation_section(
            f"Explanations of {split} images", story.model.deprocess(images.x[:n_images]), explanations,
            labels=images.labels, true_labels=images.y[:n_images].tolist(), cell_width=168))
    sections.append(figure_section("Training vs test images", [(report.plot(), "top: training images, bottom: "
                                   "test images; columns: methods (magnitude maps, clipped at the 99th percentile)")]))
    test_x = report.images["test"].x
    if evaluate:
        sections.append(_faithfulness_section(story.model, test_x, seed))
        if on_step is not None:
            on_step("faithfulness")
    if sanity:
        sections.append(_sanity_section(story.model, test_x[:4], seed))
        if on_step is not None:
            on_step("sanity checks")
    if story.ablations:
        sections.append(figure_section("Ablations (the R255 practical)",
                                       [(a.plot(images=story.test.x[:2]), _ablation_caption(a))
                                        for a in story.ablations.values()]))
        if on_step is not None:
            on_step("ablation figures")
    sections.append(text_section("Set-up", _setup_text(story, seed), highlight=False))
    return sections


def _evidence_rows(evidence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shares as percentages, in the order the evidence table prints them."""
    shown = lambda v: f"{v:.1%}" if isinstance(v, float) else ("—" if v is None else v)  # noqa: E731
    return [{k: shown(v) for k, v in row.items()} for row in evidence]


def _faithfulness_section(model: Any, x: torch.Tensor, seed: int) -> Section:
    """Insertion / deletion of the story's methods against Random maps on the test images."""
    from ..metrics.compare import compare

    table = compare(model, x, list(EVAL_METHODS), ["insertion", "deletion"], method_kwargs=METHOD_KWARGS,
                    seed=seed, granularity=2, features_per_step=8, fill="zeros")
    curves = _curve_figure(table)
    return metrics_section("Faithfulness on test images (2x2 superpixels, zero fill)", table.to_wide(),
                           figures=[(curves, "deletion curves: the faster the score falls, the more faithful the map")])


def _curve_figure(table: Any):
    from ..viz.curves import plot_metrics

    ax = plot_metrics({m: table.results[(m, "deletion")] for m in table.methods})
    return ax.figure


def _sanity_section(model: Any, x: torch.Tensor, seed: int) -> Section:
    """Cascading model randomisation and the random-logit test for saliency and Grad-CAM."""
    from ..sanity import model_randomization, random_logit

    results = [model_randomization(model, x, "saliency", seed=seed),
               model_randomization(model, x, "gradcam", seed=seed),
               random_logit(model, x, "saliency", seed=seed)]
    return sanity_section("Sanity checks (Adebayo et al.)", results)


def _ablation_caption(ablation: Any) -> str:
    if ablation.parameter == "num_features":
        text = (f"{ablation.name} ({ablation.parameter}): the outlines of the k superpixels with the largest |weight| "
                "(green for the predicted sum, red against) on ~30 SLIC superpixels; lime's own quickshift "
                "gives these digits only 3-4 superpixels, where k barely matters")
    else:
        stats = "; ".join(f"{v}: rank correlation with the first {s.get('spearman_to_first', float('nan')):.2f}, "
                          f"with the last {s.get('spearman_to_last', float('nan')):.2f}"
                          for v, s in zip(ablation.values, ablation.stats))
        text = f"{ablation.name} ({ablation.parameter}) — {stats}"
    note = getattr(ablation, "note", "")
    return f"{text}. {note}" if note else text


def _setup_text(story: Any, seed: int) -> str:
    params = story.training.params
    return (f"Data: {story.train.description} Train {len(story.train)} images, test {len(story.test)} images "
            f"(the shortcut exists only in the training split and its validation part).\n\n"
            f"Model: {params.get('architecture', 'seed_cnn')}, trained {len(story.training.history)} epochs "
            f"with Adam; seed {seed}. Reproduce with: heatlens demo --shortcut {story.report.shortcut} --seed {seed}")


def run_demo(
    shortcut: str | None = "same_digit",
    out: str | Path = "heatlens-demo",
    *,
    seed: int = 0,
    epochs: int | None = None,
    device: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Run the debugging story (``heatlens.debug.debugging_story``) and write its report -> report path.

    Writes ``out/report.html`` (self-contained) and ``out/finding.json`` (the finding and its numbers).
    device: accepted for symmetry with the other commands; the story always runs on the CPU (a 0.1M
    parameter model on 28x56 images: moving batches to a GPU costs more than it saves), and says so.
    """
    from ..debug import debugging_story
    from ..debug.datasets import SHORTCUTS
    from ..validation import check_choice, check_positive_int

    if shortcut is not None:
        check_choice(shortcut, "shortcut", SHORTCUTS)
    if epochs is not None:
        check_positive_int(epochs, "epochs")
    if device not in (None, "cpu"):
        echo(f"note: the digit story runs on the CPU (tiny model); --device {device} is not used here")
    from ..debug.shortcut import STORY_STEPS

    start = time.perf_counter()
    echo(f"heatlens demo: digit sums with the {shortcut or 'no'} shortcut planted in the training split")
    n_epochs = epochs or 10
    # one progress display for the whole run: the bars of the ~100 batched passes inside stay off
    with _story_progress(n_epochs + STORY_STEPS + 3, enabled=progress) as step:
        story = debugging_story(shortcut, epochs=n_epochs, seed=seed, progress=progress,
                                methods=list(STORY_METHODS), on_step=step)
        sections = story_sections(story, seed=seed, on_step=step)
    echo(f"trained: {story.training.summary()}")
    echo(f"finding: {story.report.finding}")
    out = Path(out)
    path = write_report(out / "report.html", f"heatlens demo: the {shortcut or 'clean'} story", sections,
                        subtitle=story.report.description)
    _write_json(out / "finding.json", {**story.report.to_dict(), "training": {
        "train_acc": story.training.train_acc, "val_acc": story.training.val_acc,
        "test_acc": story.training.test_acc, "history": story.training.history}})
    echo(f"done in {time.perf_counter() - start:.0f} s")
    return path


@contextmanager
def _story_progress(total: int, *, enabled: bool) -> Iterator[Callable[[str], None]]:
    """One tqdm bar over the story's stages (its callback names the stage done), batching's bars off."""
    from .. import batching

    was = batching.progress_enabled()
    batching.set_progress(False)
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="heatlens demo", unit="stage", leave=False)

    def step(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    try:
        yield step
    finally:
        if bar is not None:
            bar.close()
        batching.set_progress(was)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")
    tmp.replace(path)
