"""``MultiTaskModel``: one encoder-decoder per task, wired so that tasks share modules as the
sharing plan says (:func:`polytask.heads.build.build_model` assembles it from the run config).

How sharing is built (one mechanism for every strategy, :mod:`polytask.heads.plan`): every task gets
its own :class:`polytask.core.model.transformer.EncoderDecoder` (its *view*); then, slot by slot, all views of
a group are made to hold the SAME module object — the one of the group's first task. A task's
view is therefore a complete EncoderDecoder routed through exactly that task's modules
(``for_task``), and a mixed batch routes rows slot by slot (:mod:`polytask.heads.routing`), so a
shared layer runs once on all of its tasks' rows.

Who owns a parameter is read from tensor IDENTITY (which tasks run a module holding it), not
from the partition: under ``mmoe`` / ``ple`` every task has its own layer object, a fork whose
attention and shared experts are the same tensors in every task's fork
(:mod:`polytask.heads.experts`).

Which modules of an EncoderDecoder make up each slot: :mod:`polytask.heads.slots`.
"""
from __future__ import annotations


import torch
from torch import nn

from polytask.core.data.batch import Batch
from polytask.core.data.tasks import TaskSpec
from polytask.core.model.transformer import EncoderDecoder
from polytask.heads.cross_stitch import CrossStitch, CrossStitchView, decode_columns, encode_columns
from polytask.heads.experts import GateRecord, GatedExperts
from polytask.heads.plan import SharingPlan, slot_names
from polytask.heads.outputs import MultiTaskOutput, NotRun, TaskOutput
from polytask.heads.rank import RankHead
from polytask.heads.routing import decode_mixed, encode_mixed
from polytask.heads.slots import get_slot, set_slot
from polytask.losses.adversarial import TaskDiscriminator
from polytask.losses.penalties import soft_sharing_penalty

DECODER_HEADS = ("lm", "rank")  # heads that run the decoder; "classifier" stops at the encoder


class MultiTaskModel(nn.Module):
    """Per-task backbones wired by a :class:`SharingPlan`, task heads and an optional discriminator.

    Args:
        backbones: one EncoderDecoder per task, in ``tasks`` order; they become the per-task
            views (their slot modules are replaced by the group's module).
        tasks: the run's task specs; ``Batch.task_ids`` index this list.
        plan: which tasks share each slot.
        heads: task name -> classifier head, for the tasks whose head kind is ``classifier``.
        discriminator: the adversarial task discriminator (Liu et al. 2017), or None.
        cross_stitch: cross-stitch units between the task columns (Misra et al. 2016), or
            None; needs a plan where every slot is private (``none`` / ``soft``).
    """

    def __init__(self, backbones: list[EncoderDecoder], tasks: list[TaskSpec], plan: SharingPlan,
                 heads: dict[str, nn.Module] | None = None,
                 discriminator: TaskDiscriminator | None = None,
                 cross_stitch: CrossStitch | None = None) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if tuple(names) != plan.tasks or len(backbones) != len(tasks):
            raise ValueError(f"tasks {names}, plan tasks {list(plan.tasks)} and "
                             f"{len(backbones)} backbones must correspond one to one")
        if set(plan.slots) != set(slot_names(backbones[0].config)):
            raise ValueError(f"plan slots {list(plan.slots)} do not match the backbone's "
                             f"{slot_names(backbones[0].config)}")
        self.tasks, self.plan, self.config = list(tasks), plan, backbones[0].config
        self.task_index = {n: i for i, n in enumerate(names)}
        self.slots = nn.ModuleDict()
        self._first: dict[str, list[str]] = {}     # slot -> first task (in task order) per group
        self._table: dict[str, list[int]] = {}     # slot -> group index of every task
        self.cross_stitch = None  # set at the end; ``uses`` reads it
        for slot in plan.slots:
            firsts = [next(n for n in names if n in g) for g in plan.groups(slot)]
            modules = [get_slot(backbones[self.task_index[n]], slot) for n in firsts]
            if cross_stitch is None:  # (with cross-stitch every row runs every column)
                # A group none of whose tasks runs this slot (the decoder of classifier tasks)
                # gets a placeholder instead of a module nobody would train.
                modules = [m if any(self.uses(n, slot) for n in g) else NotRun(slot, sorted(g))
                           for m, g in zip(modules, plan.groups(slot))]
            self.slots[slot.replace(".", "_")] = nn.ModuleList(modules)
            self._first[slot] = firsts
            self._table[slot] = [plan.group_index(slot, n) for n in names]
            for n, bb in zip(names, backbones):
                set_slot(bb, slot, modules[plan.group_index(slot, n)])
        # a plain dict: views hold the registered modules, registering them again would
        # duplicate every shared tensor in the state dict
        self._views: dict[str, EncoderDecoder] = dict(zip(names, backbones))
        self._check_views_covered()
        heads = dict(heads or {})
        want = {t.name for t in tasks if t.head_kind == "classifier"}
        if not want <= set(heads) or set(heads) - {t.name for t in tasks if t.head_kind != "lm"}:
            raise ValueError(f"heads given for {sorted(heads)}, but the tasks with a classifier "
                             f"head are {sorted(want)} (rank tasks may add a RankHead)")
        for t in tasks:
            if t.head_kind == "rank":
                heads.setdefault(t.name, RankHead())
        self.heads = nn.ModuleList(heads.get(n, nn.Identity()) for n in names)
        self.discriminator = discriminator
        if cross_stitch is not None and any(len(g) > 1 for gs in plan.slots.values() for g in gs):
            raise ValueError(f"cross-stitch units connect private task columns; plan "
                             f"{plan.strategy!r} shares slots (use 'none' or 'soft')")
        self.cross_stitch = cross_stitch
        self._gated = [m for m in self.slots.modules() if isinstance(m, GatedExperts)]

    def _check_views_covered(self) -> None:
        registered = {id(p) for p in self.slots.parameters()}
        for name, view in self._views.items():
            loose = [n for n, p in view.named_parameters() if id(p) not in registered]
            if loose:
                raise RuntimeError(f"view of task {name!r} has parameters outside every plan "
                                   f"slot: {loose}; polytask.heads.model must map them to a slot")

    # --- plan lookups (the SlotTable that polytask.heads.routing reads) ------------------
    def module(self, slot: str, k: int) -> nn.Module:
        return self.slots[slot.replace(".", "_")][k]

    def group_view(self, slot: str, k: int) -> EncoderDecoder:
        """A view holding group ``k``'s module at ``slot`` (that of the group's first task)."""
        return self._views[self._first[slot][k]]

    def row_groups(self, slot: str, row_task: torch.Tensor) -> torch.Tensor:
        """``(b,)`` task indices -> ``(b,)`` group index at ``slot``."""
        return torch.tensor(self._table[slot], device=row_task.device)[row_task]

    def _last_shared_encoder_slot(self) -> str | None:
        enc = ["embedding"] + [f"encoder.{i}" for i in range(self.config.n_encoder_layers)] + ["encoder.norm"]
        shared = [s for s in enc if len(self.plan.groups(s)) == 1]
        return shared[-1] if shared and len(self.tasks) > 1 else None

    # --- the model ---------------------------------------------------------------------------
    def for_column(self, name: str) -> EncoderDecoder:
        """Task ``name``'s own EncoderDecoder (its modules, without cross-stitching)."""
        if name not in self._views:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(self._views)}")
        return self._views[name]

    def columns(self) -> list[EncoderDecoder]:
        """Every task's own EncoderDecoder, in task order."""
        return [self._views[t.name] for t in self.tasks]

    def for_task(self, name: str) -> EncoderDecoder | CrossStitchView:
        """The EncoderDecoder of task ``name``: ``encode``, ``decode``, ``logits``, ``new_cache``
        all run through that task's (shared, group or private) modules; with cross-stitch
        units, through all columns stitched together, read out at the task's column."""
        view = self.for_column(name)
        if self.cross_stitch is None:
            return view
        return CrossStitchView(self.columns(), self.cross_stitch, self.task_index[name])

    def _encode(self, src: torch.Tensor, src_mask: torch.Tensor, row_task: torch.Tensor,
                keep: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """-> memory ``(b, s, d)`` of each row's task, kept slot outputs, and with cross-stitch
        all columns' memories ``(k, b, s, d)`` (else None)."""
        if self.cross_stitch is None:
            return (*encode_mixed(self, src, src_mask, row_task, keep), None)
        columns = encode_columns(self.columns(), self.cross_stitch, src, src_mask)
        return columns[row_task, torch.arange(len(row_task), device=src.device)], {}, columns

    def head(self, name: str) -> nn.Module:
        return self.heads[self.task_index[name]]

    def predict_class(self, name: str, src_ids: torch.Tensor, src_mask: torch.Tensor,
                      candidates: list[list[int]] | None = None) -> torch.Tensor:
        """Class indices ``(b,)`` for classification task ``name``: argmax of the classifier
        head, or rank classification over ``candidates`` (label token ids) for a rank head."""
        spec = self.tasks[self.task_index[name]] if name in self.task_index else None
        if spec is None or spec.head_kind not in ("classifier", "rank"):
            raise ValueError(f"predict_class needs a classifier or rank task, got {name!r}; such "
                             f"tasks: {[t.name for t in self.tasks if t.head_kind != 'lm']}")
        view = self.for_task(name)
        if spec.head_kind == "rank":
            if candidates is None:
                raise ValueError(f"task {name!r} has a rank head: pass the labels' token ids")
            return self.head(name)(view, src_ids, src_mask, candidates)[0]
        row_task = torch.full((len(src_ids),), self.task_index[name], device=src_ids.device)
        return self.head(name)(self._encode(src_ids, src_mask, row_task)[0], src_mask).argmax(-1)

    def forward(self, batch: Batch) -> MultiTaskOutput:
        """Run a batch whose rows may belong to different tasks (``batch.task_ids``).

        Every row goes through the encoder; rows of lm / rank tasks then through the decoder
        (teacher forcing on ``batch.tgt_in``), and their group's LM head -> ``(n, t, V)`` when
        a task's ``logits`` are first read (see :class:`TaskOutput`); rows of classifier tasks
        through their head -> ``(n, C)``. Each encoder and decoder slot runs once per group.
        """
        row_task, src_mask = batch.task_ids, batch.src_mask
        if len(row_task) and (int(row_task.min()) < 0 or int(row_task.max()) >= len(self.tasks)):
            raise ValueError(f"batch.task_ids {row_task.unique().tolist()} outside "
                             f"[0, {len(self.tasks)}) for tasks {list(self._views)}")
        for gated in self._gated:   # a task without rows here must not keep stale gates
            gated.record = GateRecord()
        shared_slot = self._last_shared_encoder_slot()
        keep = (shared_slot,) if shared_slot else ()
        memory, kept, columns = self._encode(batch.src, src_mask, row_task, keep)
        kinds = torch.tensor([t.head_kind in DECODER_HEADS for t in self.tasks], device=row_task.device)
        dec_rows = kinds[row_task].nonzero(as_tuple=True)[0]
        if len(dec_rows):
            dec_task = row_task[dec_rows]
            if columns is None:
                hidden = decode_mixed(self, batch.tgt_in[dec_rows], batch.tgt_mask[dec_rows],
                                      memory[dec_rows], src_mask[dec_rows], dec_task)
            else:
                hidden = decode_columns(self.columns(), self.cross_stitch, batch.tgt_in[dec_rows],
                                        batch.tgt_mask[dec_rows], columns[:, dec_rows],
                                        src_mask[dec_rows])
                hidden = hidden[dec_task, torch.arange(len(dec_rows), device=hidden.device)]
        out: dict[str, TaskOutput] = {}
        for i, spec in enumerate(self.tasks):
            if spec.head_kind in DECODER_HEADS:
                if not len(dec_rows):
                    continue
                sel = (dec_task == i).nonzero(as_tuple=True)[0]
                if len(sel):
                    lm = self.group_view("lm_head", self._table["lm_head"][i])
                    rows_hidden = hidden if len(sel) == len(dec_rows) else hidden[sel]
                    out[spec.name] = TaskOutput(dec_rows[sel], head=spec.head_kind,
                                                hidden=rows_hidden, lm=lm)
            else:
                rows = (row_task == i).nonzero(as_tuple=True)[0]
                if len(rows):
                    logits = self.heads[i](memory[rows], src_mask[rows])
                    out[spec.name] = TaskOutput(rows, logits, spec.head_kind)
        shared = kept.get(shared_slot) if shared_slot else None
        private = memory if shared_slot not in (None, "encoder.norm") else None
        task_logits = None
        if self.discriminator is not None and shared is not None:
            task_logits = self.discriminator(shared, src_mask)
        return MultiTaskOutput(out, src_mask, row_task, shared, private, task_logits)

    def train(self, mode: bool = True) -> "MultiTaskModel":
        super().train(mode)
        for view in self._views.values():  # their stack-level dropouts are not registered here
            view.train(mode)
        return self

    def set_progress(self, progress: float) -> None:
        """Training progress p in [0, 1], for the gradient-reversal schedule (Ganin & Lempitsky)."""
        if self.discriminator is not None:
            self.discriminator.grl.set_progress(progress)

    # --- who owns what -----------------------------------------------------------------------
    def uses(self, name: str, slot: str) -> bool:
        """Whether task ``name`` runs slot ``slot``: a classifier head stops at the encoder, so
        its task never runs the decoder slots or the LM head (which the plan still gives it);
        with cross-stitch units every row runs every column."""
        if self.cross_stitch is not None or self.tasks[self.task_index[name]].head_kind in DECODER_HEADS:
            return True
        return not (slot.startswith("decoder") or slot == "lm_head")

    def _users(self) -> dict[int, set[str]]:
        """Parameter id -> the tasks that run a slot module holding it. Ownership is tensor
        IDENTITY, not the plan's partition: a tensor held by several tasks' modules (the
        forks of ``mmoe`` / ``ple``, the tied LM head = embedding) is used by all of them."""
        users: dict[int, set[str]] = {}
        for slot, groups in self.plan.slots.items():
            for k, group in enumerate(groups):
                running = {t for t in group if self.uses(t, slot)}
                for p in self.module(slot, k).parameters():
                    users.setdefault(id(p), set()).update(running)
        return users

    def _slot_params(self, keep, slots: list[str] | None = None) -> list[nn.Parameter]:
        """Parameters of the slot modules (of ``slots``, default all) whose set of using
        tasks (:meth:`_users`) satisfies ``keep``, in slot order, each once."""
        users = self._users()
        seen: dict[int, nn.Parameter] = {}
        for slot in self.plan.slots if slots is None else slots:
            for k in range(len(self.plan.groups(slot))):
                for p in self.module(slot, k).parameters():
                    if id(p) not in seen and keep(users[id(p)]):
                        seen[id(p)] = p
        return list(seen.values())

    def _stitch_params(self) -> list[nn.Parameter]:
        return [] if self.cross_stitch is None else list(self.cross_stitch.parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by more than one task (backbone modules of multi-task groups, and
        the cross-stitch weights)."""
        return self._slot_params(lambda users: len(users) > 1) + self._stitch_params()

    def task_parameters(self, name: str) -> list[nn.Parameter]:
        """Parameters owned by task ``name`` only: its private slot modules and its head (with
        cross-stitch units, its column, which the other tasks' losses also reach)."""
        self.for_task(name)
        own = self._slot_params(lambda users: users == {name})
        return own + list(self.head(name).parameters())

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """Every parameter task ``name`` uses (shared, group and private, and its head; with
        cross-stitch units, every column: each row runs through all of them)."""
        self.for_task(name)
        # with cross-stitch units every row runs through every column
        uses = (lambda users: True) if self.cross_stitch is not None else (lambda users: name in users)
        return self._slot_params(uses) + self._stitch_params() + list(self.head(name).parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """GradNorm's W (Chen et al. 2018): the parameters of the highest encoder layer that
        all tasks share (the encoder is the part every head uses); [] when none is."""
        if len(self.tasks) < 2:
            return []
        everyone = {t.name for t in self.tasks}
        for i in reversed(range(self.config.n_encoder_layers)):
            # by identity: under mmoe / ple, the tensors every task's fork holds
            found = self._slot_params(lambda users: users == everyone, [f"encoder.{i}"])
            if found:
                return found
        return []

    def adversary_parameters(self) -> list[nn.Parameter]:
        """The discriminator's parameters (no task owns them)."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def coupling_penalty(self) -> torch.Tensor:
        """Soft sharing (Duong et al. 2015): sum over task pairs of ||theta_a - theta_b||^2 over
        every backbone parameter; 0 for a plan without coupled copies. Summed slot by slot over
        the copies that exist (a classifier task has no decoder copy); a parameter reachable
        from two slots (the tied LM head is the embedding) counts once."""
        zero = self.module("embedding", 0).embed_tokens.weight.new_zeros(())
        if not self.plan.coupled or len(self.tasks) < 2:
            return zero
        total, seen = zero, set()
        for slot, groups in self.plan.slots.items():
            copies = []
            for k in range(len(groups)):
                params = [p for p in self.module(slot, k).parameters() if id(p) not in seen]
                if params:
                    copies.append(params)
            seen.update(id(p) for c in copies for p in c)
            if len(copies) > 1:
                total = total + soft_sharing_penalty(copies)
        return total
