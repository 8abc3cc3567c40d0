"""The names a study file may use for datasets and metrics, in one torch-free place.

Validating a config or a study file needs these names but must not import torch (gvae study run
starts Ray while torch loads); the dataset registry (gvae.data) and the evaluator's measurement
(gvae.evaluation) are keyed by the same names, which tests hold equal.
"""

# The datasets gvae.data's registry loads.
DATASET_NAMES = ("mnist", "fashion-mnist", "mnist5k", "celeba", "stacked-mnist", "stacked-mnist5k")

# The paper's two statistics of a set of generated images.
PAPER_METRICS = ("mode_entropy", "mean_image_entropy")
# The other scalars an evaluation reports (besides the paper's, a curve's columns).
EVALUATION_METRICS = (
    "frechet_distance",
    "modes_covered",
    "kl_to_uniform",
    "classifier_score",
    "precision",
    "recall",
    "density",
    "coverage",
)
# Every scalar an evaluation reports: what an Optuna objective or the ASHA scheduler may name.
METRIC_NAMES = (*PAPER_METRICS, *EVALUATION_METRICS)
