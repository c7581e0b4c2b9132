"""polytask heads: task heads and parameter sharing as one mechanism.

``SharingConfig`` (the ``sharing:`` config section) -> ``make_plan`` (which tasks share each
backbone slot) -> ``build_model`` (a ``MultiTaskModel`` whose shared slots are one module
object) -> ``MultiTaskObjective`` (per-task losses + soft / adversarial / orthogonality terms).
"""
from heads.config import STRATEGIES, SharingConfig
from heads.plan import SharingPlan, make_plan, register_plan, slot_names, strategy_names
from heads.classifier import ClassifierHead, pool
from heads.rank import RankHead, label_scores, rank_classify
from heads.model import MultiTaskModel, MultiTaskOutput, TaskOutput
from heads.build import build_discriminator, build_model
from heads.objective import MultiTaskObjective, ObjectiveResult

__all__ = [
    "STRATEGIES", "SharingConfig", "SharingPlan", "make_plan", "register_plan", "slot_names",
    "strategy_names", "ClassifierHead",
    "pool", "RankHead", "label_scores", "rank_classify", "MultiTaskModel", "MultiTaskOutput", "TaskOutput",
    "build_discriminator", "build_model", "MultiTaskObjective", "ObjectiveResult",
]
