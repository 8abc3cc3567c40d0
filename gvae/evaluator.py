"""The evaluator's public names, for modules that import them from here; the code lives in the
gvae.evaluation package (classifiers, training, cache, measurement)."""

from gvae.evaluation import *  # noqa: F403
from gvae.evaluation import __all__  # noqa: F401
