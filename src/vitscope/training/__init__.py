"""Seeded, resumable training of image classifiers, in one process or data-parallel under ``torchrun``.

One concern per module: :mod:`.recipe` (what a run is), :mod:`.datasets` (train/test splits),
:mod:`.augment` (seeded augmentation, normalisation), :mod:`.schedule` (learning rate),
:mod:`.init` (initialisations), :mod:`.checkpoints` (distributed context, checkpoints, weights
files), :mod:`.evaluation` (test accuracy) and :mod:`.loop` (:func:`train`, which drives them).
"""

from vitscope.training.augment import EpochAugmentation, derive_seed, normalize
from vitscope.training.checkpoints import TrainResult, save_weights
from vitscope.training.datasets import (
    DatasetSplits,
    TensorImageDataset,
    count_classes,
    data_config_for,
    fashion_mnist_splits,
    folder_splits,
    load_dataset,
)
from vitscope.training.evaluation import evaluate
from vitscope.training.init import freeze_position_embeddings, mimetic_init, sincos_2d
from vitscope.training.loop import train
from vitscope.training.recipe import INITS, ModelSpec, Recipe, TrainError
from vitscope.training.schedule import warmup_cosine

__all__ = [
    "INITS", "DatasetSplits", "EpochAugmentation", "ModelSpec", "Recipe", "TensorImageDataset", "TrainError", "TrainResult",
    "count_classes", "data_config_for", "derive_seed", "evaluate", "fashion_mnist_splits", "folder_splits", "load_dataset",
    "freeze_position_embeddings", "mimetic_init", "normalize", "save_weights", "sincos_2d", "train", "warmup_cosine",
]
