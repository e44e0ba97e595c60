"""``heatlens demo --audit``: the seeds' debugging story at dataset scale.

Train the R255 digit-sum CNN on data with a planted shortcut (``heatlens.debug``), export the
training images as an ImageFolder, audit the folder like any user's dataset (``heatlens.audit``),
analyse it and write the report. The analysis is never told the shortcut or where it is: the
report's first finding should name the region and the classes it drives (with a clean model,
no shortcut should be reported).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEMO_METHODS = ("input_x_gradient", "saliency")  # cheap gradient methods: an audit of 1,000 digits takes seconds
DEMO_METRICS = ("deletion",)
MODEL_SPEC = "heatlens.audit.demo:digit_sum_model"


def digit_sum_model():
    """The untrained R255 CNN as a Classifier (28x56 RGB in [0,1], labels "0".."10").

    The model spec of the demo audit (with the trained weights as ``weights=``), so ``Audit.model()``
    loads it again.
    """
    from ..debug.datasets import HEIGHT, NUM_CLASSES, WIDTH
    from ..debug.training import seed_cnn
    from ..models.adapter import wrap

    return wrap(seed_cnn(), input_size=(3, HEIGHT, WIDTH), labels=[str(k) for k in range(NUM_CLASSES)],
                outputs="logits", name="seed_cnn")


@dataclass
class AuditDemo:
    """What the demo produced: the audit, its analysis, the training run and the files written."""

    audit: Any
    analysis: Any
    training: Any
    report: Path
    findings: Path
    seconds: dict[str, float]


def run_audit_demo(
    shortcut: str | None = "marker",
    *,
    out: str | Path = "heatlens-audit-demo",
    n_train: int = 2000,
    n_audit: int = 1000,
    epochs: int | None = None,
    seed: int = 0,
    methods: tuple[str, ...] = DEMO_METHODS,
    metrics: tuple[str, ...] = DEMO_METRICS,
    progress: bool = True,
) -> AuditDemo:
    """Train with ``shortcut`` planted, export ``n_audit`` training images, audit, analyse, report.

    epochs: default 3 with a shortcut (it is learnt at once) and 10 without (the digits take longer).
    Writes ``out/data`` (ImageFolder PNGs), ``out/model.pt`` (weights), ``out/audit`` (records,
    ``report.html``, ``findings.json``).
    """
    from ..debug import digit_sum_dataset, train_classifier
    from . import audit as run_audit
    from .analysis import analyse
    from .cli import export_digit_sum
    from .report import write_audit_report

    out = Path(out)
    say = print if progress else (lambda *a, **k: None)
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    train = digit_sum_dataset("train", shortcut, n=n_train, seed=seed)
    run = train_classifier("seed_cnn", train, epochs=epochs or (3 if shortcut else 10), seed=seed, progress=False)
    seconds["train"] = time.perf_counter() - tic
    say(f"trained on {len(train)} images with shortcut {shortcut!r}: {run.summary()}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(run.model.net.state_dict(), out / "model.pt")
    tic = time.perf_counter()
    written = export_digit_sum(out / "data", split="train", shortcut=shortcut, n=n_audit, seed=seed + 1)
    seconds["export"] = time.perf_counter() - tic
    say(f"exported {written} training images (shortcut kept) to {out / 'data'}")
    tic = time.perf_counter()
    a = run_audit(MODEL_SPEC, out / "data", methods=list(methods), metrics=list(metrics), out=out / "audit",
                  overwrite=True, weights=str(out / "model.pt"), seed=seed)
    seconds["audit"] = time.perf_counter() - tic
    say(f"audited: {a}")
    tic = time.perf_counter()
    model = a.model()
    analysis = analyse(a, model=model, seed=seed)
    seconds["analysis"] = time.perf_counter() - tic
    tic = time.perf_counter()
    report, findings = write_audit_report(a, analysis, model=model, title=f"heatlens audit demo: shortcut {shortcut}")
    seconds["report"] = time.perf_counter() - tic
    first = analysis.findings[0].title if analysis.findings else "nothing"
    say(f"first finding: {first}")
    return AuditDemo(audit=a, analysis=analysis, training=run, report=report, findings=findings, seconds=seconds)


def cli_demo(args: Any) -> int:
    """``heatlens demo --audit [--shortcut KIND|none] [--out DIR] [--epochs N] [--seed S]``."""
    shortcut = "marker" if args.shortcut is None else None if args.shortcut in ("none", "clean") else args.shortcut
    out = Path(args.out if args.out != "heatlens-demo" else "heatlens-audit-demo")
    demo = run_audit_demo(shortcut, out=out, epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    print(f"report: {demo.report}")
    print(f"findings: {demo.findings}")
    return 0
