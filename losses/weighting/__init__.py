"""Task weighting: how per-task losses become one update. See :mod:`polytask.losses.weighting.base`
for the interface; each method lives in its own file and registers itself by name.

Objective-style (weights on the losses): ``static``, ``uncertainty``, ``dwa``, ``famo``, ``rlw``.
On per-task gradients (:class:`GradientWeighting`): ``gradnorm``, ``pcgrad``, ``mgda``,
``cagrad``, ``nash_mtl``, ``imtl``, ``gradvac``, ``graddrop``, ``aligned_mtl``, ``upgrad``,
``db_mtl``, and ``mgda_ub`` (MGDA's representation-gradient approximation). The training loop
forms their per-task gradients in one pass (:mod:`polytask.losses.weighting.engine`).
"""
from polytask.losses.weighting.base import (GradientWeighting, TaskGradients, Weighting,
                                            task_gradients)
from polytask.losses.weighting.aligned_mtl import AlignedMTL
from polytask.losses.weighting.cagrad import CAGrad
from polytask.losses.weighting.db_mtl import DBMTL
from polytask.losses.weighting.dwa import DynamicWeightAverage
from polytask.losses.weighting.famo import FAMO
from polytask.losses.weighting.graddrop import GradDrop
from polytask.losses.weighting.gradnorm import GradNorm
from polytask.losses.weighting.gradvac import GradVac
from polytask.losses.weighting.imtl import IMTL
from polytask.losses.weighting.mgda import MGDA
from polytask.losses.weighting.nash_mtl import NashMTL
from polytask.losses.weighting.pcgrad import PCGrad, pcgrad_coefficients, project_conflicting
from polytask.losses.weighting.rlw import RandomLossWeighting
from polytask.losses.weighting.static import StaticWeighting
from polytask.losses.weighting.uncertainty import UncertaintyWeighting
from polytask.losses.weighting.upgrad import UPGrad

__all__ = ["Weighting", "GradientWeighting", "TaskGradients", "task_gradients", "AlignedMTL",
           "CAGrad", "DBMTL", "DynamicWeightAverage", "FAMO", "GradDrop", "GradNorm", "GradVac",
           "IMTL", "MGDA", "NashMTL", "PCGrad", "pcgrad_coefficients", "project_conflicting", "RandomLossWeighting",
           "StaticWeighting", "UncertaintyWeighting", "UPGrad"]
