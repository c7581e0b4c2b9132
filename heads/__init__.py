"""polytask heads: task heads and parameter sharing as one mechanism.

``SharingConfig`` (the ``sharing:`` config section) -> ``make_plan`` (which tasks share each
backbone slot) -> ``build_model`` (a ``MultiTaskModel`` whose shared slots are one module
object) -> ``MultiTaskObjective`` (per-task losses + soft / adversarial / orthogonality terms).
``mmoe`` / ``ple``: per-task gated mixtures of feed-forward experts (``heads.experts``).
"""

if not __name__.startswith("polytask."):  # the checkout's folder imported under its bare name
    raise ImportError(f"import polytask.{__name__}, not {__name__}: the package is installed as "
                      f"polytask.{__name__} (pip install -e .); a second copy under the bare "
                      "name would hold second copies of every registry")

from polytask.heads.config import STRATEGIES, SharingConfig, register_plan, strategy_names
from polytask.heads.plan import SharingPlan, make_plan, slot_names
from polytask.heads.classifier import ClassifierHead, pool
from polytask.heads.rank import RankHead, label_scores, rank_classify
from polytask.heads.model import MultiTaskModel, MultiTaskOutput, TaskOutput
from polytask.heads.build import build_discriminator, build_model
from polytask.heads.objective import MultiTaskObjective, ObjectiveResult
from polytask.heads.experts import GatedExperts, balance_loss, gate_table

__all__ = [
    "STRATEGIES", "SharingConfig", "SharingPlan", "make_plan", "register_plan", "slot_names",
    "strategy_names", "ClassifierHead",
    "pool", "RankHead", "label_scores", "rank_classify", "MultiTaskModel", "MultiTaskOutput", "TaskOutput",
    "build_discriminator", "build_model", "MultiTaskObjective", "ObjectiveResult",
    "GatedExperts", "balance_loss", "gate_table",
]
