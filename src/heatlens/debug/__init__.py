"""The debugging story: digit-sum datasets with planted shortcuts, training, and shortcut detection.

>>> from heatlens import debug
>>> train = debug.digit_sum_dataset("train", shortcut="marker")
>>> test = debug.digit_sum_dataset("test", shortcut="marker")
>>> run = debug.train_classifier("seed_cnn", train, epochs=5, test=test)
>>> report = debug.detect_shortcut(run.model, train, test)
>>> print(report.finding)
"""

from .datasets import (
    DESCRIPTIONS, SHORTCUTS, DigitSumDataset, digit_sum_dataset, label_colours, marker_box, plant_shortcut,
    remove_shortcut,
)
from .shortcut import (
    Ablation, ShortcutReport, Story, debugging_story, detect_shortcut, gradient_x_input, lime_ablation, lime_features_ablation,
    map_statistics, predict, relevance_shares, smoothgrad_noise_ablation, smoothgrad_samples_ablation,
)
from .training import ARCHITECTURES, TrainResult, accuracy, conv_net, gap_cnn, seed_cnn, tiny_vit, train_classifier

__all__ = [
    "DESCRIPTIONS", "SHORTCUTS", "ARCHITECTURES", "DigitSumDataset", "TrainResult",
    "accuracy", "conv_net", "digit_sum_dataset", "gap_cnn", "label_colours", "marker_box", "plant_shortcut",
    "remove_shortcut", "seed_cnn", "tiny_vit", "train_classifier",
    "Ablation", "ShortcutReport", "Story", "debugging_story", "detect_shortcut", "gradient_x_input", "lime_ablation", "lime_features_ablation",
    "map_statistics", "predict", "relevance_shares", "smoothgrad_noise_ablation", "smoothgrad_samples_ablation",
]
