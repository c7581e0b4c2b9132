"""polytask losses: pluggable task losses, coupling penalties and task weighting.

A config names a loss (``TaskSpec.loss``) or a weighting (``weighting.method``) by its
registered name::

    criterion = losses.get("ce")(label_smoothing=0.1)
    weighting = losses.get_weighting("gradnorm")(task_names, alpha=1.5)

Built-in losses: ``ce``, ``generative``, ``adversarial``, ``orthogonality``, ``soft_sharing``.
Built-in weightings: ``static``, ``uncertainty``, ``dwa``, ``famo``, ``rlw`` (on the losses);
``gradnorm``, ``pcgrad``, ``mgda`` (+ ``mgda_ub``), ``cagrad``, ``nash_mtl``, ``imtl``,
``gradvac``, ``graddrop``, ``aligned_mtl``, ``upgrad``, ``db_mtl`` (on per-task gradients; see
:mod:`polytask.losses.weighting`).
"""

if not __name__.startswith("polytask."):  # the checkout's folder imported under its bare name
    raise ImportError(f"import polytask.{__name__}, not {__name__}: the package is installed as "
                      f"polytask.{__name__} (pip install -e .); a second copy under the bare "
                      "name would hold second copies of every registry")

from polytask.losses.registry import LOSSES, WEIGHTINGS, get, get_weighting, register, register_weighting

# Importing the modules registers their entries.
from polytask.losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from polytask.losses.generative import GenerativeLoss  # noqa: E402
from polytask.losses.adversarial import (AdversarialLoss, GradientReversal, TaskDiscriminator,  # noqa: E402
                                ganin_lambda, grad_reverse)
from polytask.losses.penalties import (OrthogonalityPenalty, SoftSharingPenalty,  # noqa: E402
                              orthogonality_penalty, soft_sharing_penalty)
from polytask.losses.weighting import Weighting, task_gradients  # noqa: E402

__all__ = [
    "LOSSES", "WEIGHTINGS", "get", "get_weighting", "register", "register_weighting",
    "CrossEntropyLoss", "GenerativeLoss", "AdversarialLoss", "GradientReversal",
    "TaskDiscriminator", "ganin_lambda", "grad_reverse", "OrthogonalityPenalty",
    "SoftSharingPenalty", "orthogonality_penalty", "soft_sharing_penalty", "Weighting",
    "task_gradients",
]
