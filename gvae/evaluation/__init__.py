"""The classifiers that label generated images, so mode coverage, sharpness, fidelity and
diversity can be measured.

A classifier is trained once per dataset and cached on disk, keyed by everything that determines
its weights; every study, trial and process then scores samples with the very same network, which
keeps metrics comparable across runs.

Two kinds, chosen by the dataset: a digit (class) classifier for MNIST-like sets, and for CelebA a
classifier of the 40 binary face attributes, whose modes are the joint values of MODE_ATTRIBUTES.
Both also give the Frechet distance between generated and held-out real images in their
penultimate feature space (not comparable with published FIDs: another network).

Modules: classifiers (architectures, running them), training (fitting, the reference row),
cache (on disk, one training per key), measurement (Measurement and the Evaluator).
"""

from gvae.evaluation.cache import default_cache_dir, load_or_train_evaluator
from gvae.evaluation.classifiers import (
    ARCH_VERSION,
    ATTRIBUTE_ARCH_VERSION,
    PoolTo,
    build_attribute_classifier,
    build_classifier,
)
from gvae.evaluation.measurement import (
    STATE_FORMAT,
    Evaluator,
    Measurement,
    measurement_from_attribute_probs,
    measurement_from_probs,
)
from gvae.evaluation.training import (
    HELD_OUT_LIMIT,
    MODE_ATTRIBUTES,
    default_epochs,
    evaluator_key,
    train_evaluator,
)

__all__ = [
    "ARCH_VERSION",
    "ATTRIBUTE_ARCH_VERSION",
    "HELD_OUT_LIMIT",
    "MODE_ATTRIBUTES",
    "STATE_FORMAT",
    "Evaluator",
    "Measurement",
    "PoolTo",
    "build_attribute_classifier",
    "build_classifier",
    "default_cache_dir",
    "default_epochs",
    "evaluator_key",
    "load_or_train_evaluator",
    "measurement_from_attribute_probs",
    "measurement_from_probs",
    "train_evaluator",
]
