"""Task weighting: how per-task losses become one update. See :mod:`polytask.losses.weighting.base`
for the interface; each method lives in its own file and registers itself by name."""
from polytask.losses.weighting.base import Weighting, task_gradients
from polytask.losses.weighting.dwa import DynamicWeightAverage
from polytask.losses.weighting.famo import FAMO
from polytask.losses.weighting.gradnorm import GradNorm
from polytask.losses.weighting.pcgrad import PCGrad, project_conflicting
from polytask.losses.weighting.static import StaticWeighting
from polytask.losses.weighting.uncertainty import UncertaintyWeighting

__all__ = ["Weighting", "task_gradients", "DynamicWeightAverage", "FAMO", "GradNorm", "PCGrad",
           "project_conflicting", "StaticWeighting", "UncertaintyWeighting"]
