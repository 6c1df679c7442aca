"""The training settings, apart from the training code so that reading them costs no scikit-learn import.

(The command line builds its ``--n-estimators`` and other options from these defaults at start-up.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """One configuration for every dataset; defaults are the measured ones of docs/risk-model.md."""

    seed: int = 0
    n_estimators: int = 100
    max_samples: int = 256
    customer_estimators: int = 50
    customer_min_history: int = 50
    # Weight of a customer's own forest is n / (n + combine_n0) for n training rows behind it.
    combine_n0: float = 1000.0
    feedback_windows_days: tuple[float, ...] = (7.0, 14.0, 28.0)
    prior_strength: float = 5.0
