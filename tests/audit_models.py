"""Model specs for the audit tests: ``audit_models:digit_cnn`` loads in any process (Ray workers too)
whose path holds tests/, as ``package.module:function`` specs do."""

from __future__ import annotations

import heatlens as hl
from heatlens.debug import conv_net
from heatlens.debug.training import INPUT_SIZE


def digit_cnn() -> hl.Classifier:
    """The digit-sum conv net (seeded weights, 11 classes "0".."10") on (3,28,56) inputs."""
    return hl.wrap(conv_net(width=4), input_size=INPUT_SIZE, labels=[str(k) for k in range(11)], name="digit_cnn")
