"""Gradient estimators for categorical latent variables.

The contract is in :mod:`estimators.base`.
"""

from estimators.base import Estimator, EstimatorOutput, Objective
from estimators.baselines import (
    Baseline,
    LearnedBaseline,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    NoBaseline,
)
from estimators.gumbel_softmax import GumbelSoftmax, STGumbelSoftmax
from estimators.marginalization import Marginalization
from estimators.score_function import ScoreFunction
from estimators.temperature import ConstantTemperature, ExponentialTemperature

__all__ = [
    "Baseline",
    "ConstantTemperature",
    "Estimator",
    "EstimatorOutput",
    "ExponentialTemperature",
    "GumbelSoftmax",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "Marginalization",
    "MovingAverageBaseline",
    "NoBaseline",
    "Objective",
    "STGumbelSoftmax",
    "ScoreFunction",
]
