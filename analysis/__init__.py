"""The analysis behind `gvae report`: plain pandas over a study's Parquet tables.

Usable from a notebook as well as from the CLI::

    from analysis import load_study, tables, figures

    study = load_study("quick", storage="results")
    tables.table1(study.trials)              # Table 1: mode / mean image entropy per model
    figures.mode_entropy_curves(study.curves, study.trials)   # a matplotlib Figure
"""

from analysis.load import Study, load_study

__all__ = ["Study", "load_study"]
