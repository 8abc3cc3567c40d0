"""Does the constraint help? Constrained VAE-GAN settings against VAE-GAN, metric by metric.

Every cvaegan setting (its λ, d and whatever else varies) is compared with the VAE-GAN trials of
the same study: the difference of the seed means with a 95% Welch interval (unequal variances,
Welch–Satterthwaite degrees of freedom), and a verdict that says "no difference detected" when the
interval holds zero. The paper's Fig. 8 claim, "a higher concentration of low-entropy images",
is tested the same way on each trial's share of low-entropy images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.fidelity import FIDELITY_METRICS
from analysis.tables import (
    CONFIDENCE,
    LOW_ENTROPY_THRESHOLD,
    _setting,
    finished,
    low_entropy_share,
    varying_config,
)

# The metrics compared, with the direction that is better; the last is the Fig. 8 claim's.
DIRECTIONS = {
    "mode_entropy": "max",
    "mean_image_entropy": "min",
    **FIDELITY_METRICS,
    "low_entropy_share": "max",
}
NO_DIFFERENCE = "no difference detected"


def welch_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(mean(a) − mean(b), low, high) of the Welch t-interval; NaN bounds with < 2 values a side.

    se² = s_a²/n_a + s_b²/n_b; df = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)).
    """
    x = np.asarray([v for v in a if not pd.isna(v)], dtype=float)
    y = np.asarray([v for v in b if not pd.isna(v)], dtype=float)
    if not len(x) or not len(y):
        return math.nan, math.nan, math.nan
    difference = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return difference, math.nan, math.nan
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    if se == 0:
        return difference, difference, difference
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return difference, difference - half, difference + half


def verdict(low: float, high: float, direction: str) -> str:
    """Plain words for an interval of cvaegan − vaegan on a metric where `direction` is better."""
    if math.isnan(low) or math.isnan(high):
        return "too few seeds to tell"
    if low <= 0 <= high:
        return NO_DIFFERENCE
    higher = low > 0
    better = higher == (direction == "max")
    return f"{'higher' if higher else 'lower'} ({'better' if better else 'worse'})"


def with_low_entropy_share(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials with `final_low_entropy_share`: each trial's share of final samples whose
    entropy is below LOW_ENTROPY_THRESHOLD."""
    shares = [
        low_entropy_share(np.asarray(values, dtype=float)) if _is_list(values) else math.nan
        for values in trials.get("final_image_entropies", pd.Series([None] * len(trials)))
    ]
    return trials.assign(final_low_entropy_share=shares)


def _is_list(values: object) -> bool:
    return values is not None and not (pd.api.types.is_scalar(values) and pd.isna(values))


def constraint_effect(trials: pd.DataFrame) -> pd.DataFrame:
    """Per cvaegan setting and metric: both means, the difference with its Welch interval and the
    verdict. Empty when the study lacks finished trials of either model."""
    done = with_low_entropy_share(finished(trials))
    base = done[done["model"] == "vaegan"]
    constrained = done[done["model"] == "cvaegan"]
    if base.empty or constrained.empty:
        return pd.DataFrame()
    settings = varying_config(done)
    shared = [s for s in settings if base[s].nunique(dropna=False) > 1]  # e.g. dataset
    rows = []
    for keys, group in (
        constrained.groupby(settings, dropna=False) if settings else [((), constrained)]
    ):
        keys = keys if isinstance(keys, tuple) else (keys,)
        reference = base
        for column, value in zip(settings, keys, strict=True):
            if column in shared:
                reference = reference[reference[column] == value]
        for metric, direction in DIRECTIONS.items():
            column = f"final_{metric}"
            if column not in done or group[column].isna().all():
                continue
            difference, low, high = welch_interval(group[column], reference[column])
            rows.append(
                {
                    "setting": _setting(settings, keys),
                    "metric": metric,
                    "better": direction,
                    "vaegan": float(reference[column].mean()),
                    "cvaegan": float(group[column].mean()),
                    "difference": difference,
                    "ci95_low": low,
                    "ci95_high": high,
                    "seeds": f"{group['seed'].nunique()} vs {reference['seed'].nunique()}",
                    "verdict": verdict(low, high, direction),
                }
            )
    return pd.DataFrame(rows)


def hinge_activity(trials: pd.DataFrame) -> list[str]:
    """Per cvaegan setting, how often its hinge passed gradient before the final evaluation
    (final_constraint_active: mean and range over seeds), so a reader sees whether cvaegan was
    VAE-GAN (always on), a VAE (always off) or constrained."""
    done = finished(trials)
    constrained = done[done["model"] == "cvaegan"]
    if "final_constraint_active" not in constrained or constrained.empty:
        return []
    settings = [s for s in varying_config(done) if constrained[s].nunique(dropna=False) > 1]
    groups = constrained.groupby(settings, dropna=False) if settings else [((), constrained)]
    lines = []
    for keys, group in groups:
        keys = keys if isinstance(keys, tuple) else (keys,)
        share = group["final_constraint_active"].dropna()
        if share.empty:
            continue
        where = f"At {_setting(settings, keys)}, the" if settings else "The"
        lines.append(
            f"- {where} hinge passed gradient (L_gan > d) in {share.mean():.0%} of the steps "
            f"before the final evaluation ({share.min():.0%} to {share.max():.0%} over "
            f"{len(share)} seeds): always on is VAE-GAN with λ on its GAN term, always off a VAE."
        )
    return lines


def fig8_claim(effect: pd.DataFrame) -> list[str]:
    """The paper's Fig. 8 claim, tested in words per setting from `constraint_effect` rows."""
    rows = effect[effect["metric"] == "low_entropy_share"] if not effect.empty else effect
    if rows.empty:
        return ["Fig. 8's claim cannot be tested: no per-image entropies were recorded."]
    lines = []
    for row in rows.itertuples(index=False):
        share = (
            f"{row.cvaegan:.1%} of cvaegan's images against {row.vaegan:.1%} of VAE-GAN's have "
            f"entropy below {LOW_ENTROPY_THRESHOLD:g} nats (difference {row.difference:+.1%}, 95% "
            f"interval {row.ci95_low:+.1%} to {row.ci95_high:+.1%}, seeds {row.seeds})"
        )
        if row.verdict.startswith("higher"):
            outcome = "supported"
        elif row.verdict == NO_DIFFERENCE:
            outcome = "not supported: no difference detected"
        elif row.verdict.startswith("lower"):
            outcome = "contradicted: the concentration is lower"
        else:
            outcome = "not testable: too few seeds"
        where = f"At {row.setting}" if row.setting else "Here"
        lines.append(f"- {where}, the claim is **{outcome}**: {share}.")
    return lines
