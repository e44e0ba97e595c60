"""The debugging story: digit-sum datasets with planted shortcuts, training, and shortcut detection.

>>> from heatlens import debug
>>> train = debug.digit_sum_dataset("train", shortcut="marker")
>>> test = debug.digit_sum_dataset("test", shortcut="marker")
>>> run = debug.train_classifier("seed_cnn", train, epochs=5, test=test)
>>> report = debug.detect_shortcut(run.model, train, test)
>>> print(report.finding)
"""

from .datasets import DESCRIPTIONS, SHORTCUTS, DigitSumDataset, digit_sum_dataset, label_colours, marker_box
from .training import ARCHITECTURES, TrainResult, accuracy, conv_net, gap_cnn, seed_cnn, train_classifier

__all__ = [
    "DESCRIPTIONS", "SHORTCUTS", "ARCHITECTURES", "DigitSumDataset", "TrainResult",
    "accuracy", "conv_net", "digit_sum_dataset", "gap_cnn", "label_colours", "marker_box", "seed_cnn",
    "train_classifier",
]
