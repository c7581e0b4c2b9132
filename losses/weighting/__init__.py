"""Task weighting: how per-task losses become one update. See :mod:`losses.weighting.base`
for the interface; each method lives in its own file and registers itself by name."""
from losses.weighting.base import Weighting, task_gradients
from losses.weighting.dwa import DynamicWeightAverage
from losses.weighting.famo import FAMO
from losses.weighting.gradnorm import GradNorm
from losses.weighting.pcgrad import PCGrad, project_conflicting
from losses.weighting.static import StaticWeighting
from losses.weighting.uncertainty import UncertaintyWeighting

__all__ = ["Weighting", "task_gradients", "DynamicWeightAverage", "FAMO", "GradNorm", "PCGrad",
           "project_conflicting", "StaticWeighting", "UncertaintyWeighting"]
