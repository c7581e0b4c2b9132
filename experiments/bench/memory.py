"""Memory of one training step under each task weighting: what scale fits on one device.

    polytask bench memory                      # d 256, 2+2 layers, vocab 8000, b 8, L 64, k 3
    polytask bench memory --d-model 512 --layers 4 --d-ff 2048 --vocab 32000 --json mem.json
    python -m polytask.experiments.bench.memory --d-model 32 --layers 1 --vocab 200 --length 8

For every registered weighting (:data:`polytask.losses.WEIGHTINGS`) it builds, afresh and with the
same seed, the model of a run with ``k`` generation tasks under hard sharing (every backbone
parameter shared, as ``polytask train`` builds it: :func:`polytask.heads.build_model`, the
objective, the weighting and :func:`polytask.core.training.optim.make_optimizer`'s fused AdamW),
takes one warm-up step (AdamW creates its moments, GradNorm records L_i(0)), and measures the
next one. A step is what the training loop does (``_accumulate`` and ``_update`` of
:mod:`polytask.experiments.train`, one micro-batch, one process): inside
:func:`polytask.core.accelerate.accelerated`, forward of the multi-task model on a mixed batch
(row r belongs to task r mod k; random ids, no padding), the objective,
``weighting.backward(task_losses, shared, extra=..., last_shared=...)``, gradient clipping,
``optimizer.step()``; the gradients are set to ``None`` before it, as the loop leaves them.

Definitions (all fp32 bytes; P = trainable parameters, P_shared = those shared by the tasks,
the tensors gradient surgery acts on, P_W = GradNorm's W, the last shared encoder layer):

* **state**: what lives between steps — the distinct storages of parameters, buffers (model
  and weighting) and AdamW's state (two moments per parameter: 12 bytes per parameter in all).
* **step**: the peak, during the step, of the bytes PyTorch allocated and has not yet freed,
  from the profiler's allocator events (``profile_memory=True``,
  :func:`polytask.experiments.bench.attention.peak_bytes`): activations and saved tensors,
  gradients (the step ends holding them: 4 bytes per parameter), per-task gradients and their
  surgery copies, workspaces. Not the Python heap, nor memory a library allocates outside
  PyTorch's allocator.
* **peak** = state + step: the high-water mark of tensor memory over a training step.
* **B/param** = peak / P; **step B/param** = step / P.
* **extra** = step(method) - step(static), also given as extra / (k · P_shared · 4 B): in units
  of one set of k per-task fp32 gradient vectors over the shared parameters (``extra_in_kp4``).

Activations scale with batch x length x d_model x layers, the rest with P: the bytes per
parameter of large models approach state/P + (step - activations)/P as P grows at a fixed batch.
Memory is never asserted against a budget in tests, only against the bounds that must hold.
"""
from __future__ import annotations

import argparse
import gc
from dataclasses import asdict, dataclass

import torch
from torch import nn

from polytask import losses
from polytask.core.accelerate import accelerated
from polytask.core.data.batch import IGNORE_INDEX, Batch
from polytask.core.data.tasks import TaskSpec
from polytask.core.model.config import ModelConfig
from polytask.core.training.optim import make_optimizer
from polytask.experiments.bench import emit, output_options, parse
from polytask.experiments.bench.attention import peak_bytes
from polytask.experiments.bench.train import state_bytes
from polytask.heads import build_model
from polytask.heads.config import SharingConfig
from polytask.heads.objective import MultiTaskObjective

GRAD_CLIP = 1.0  # TrainConfig's default train.grad_clip


@dataclass(frozen=True)
class Size:
    """The model and batch measured. ``layers`` per stack (encoder and decoder alike);
    ``heads`` None: d_model // 64 (at least 1); ``tasks``: k, each with its own rows."""

    d_model: int = 256
    layers: int = 2
    d_ff: int = 1024
    vocab: int = 8000
    heads: int | None = None
    batch: int = 8
    length: int = 64
    tasks: int = 3

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.batch < self.tasks:
            raise ValueError(f"need 1 <= tasks ({self.tasks}) <= batch ({self.batch}): every task "
                             f"gets at least one row of the mixed batch")
        if min(self.d_model, self.layers, self.d_ff, self.length) < 1 or self.vocab < 8:
            raise ValueError(f"sizes must be positive and vocab >= 8, got {self}")

    @property
    def n_heads(self) -> int:
        return self.heads or max(1, self.d_model // 64)

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, d_model=self.d_model, n_heads=self.n_heads,
                           n_encoder_layers=self.layers, n_decoder_layers=self.layers,
                           d_ff=self.d_ff, max_length=max(512, self.length))

    def task_specs(self) -> list[TaskSpec]:
        return [TaskSpec(f"task{i}") for i in range(self.tasks)]


def mixed_batch(size: Size, seed: int = 1) -> Batch:
    """``size.batch`` rows of random ids, row r of task r mod k, source and target
    ``size.length`` tokens, no padding (every position costs memory)."""
    g = torch.Generator().manual_seed(seed)
    b, n = size.batch, size.length
    src = torch.randint(4, size.vocab, (b, n), generator=g)
    tgt = torch.randint(4, size.vocab, (b, n), generator=g)
    bos = torch.full((b, 1), size.model_config().bos_id)
    full = torch.ones(b, n, dtype=torch.bool)
    return Batch(task_ids=torch.arange(b) % size.tasks, src=src, src_mask=full,
                 tgt_in=torch.cat([bos, tgt[:, :-1]], 1), tgt_mask=full, labels=tgt,
                 class_ids=torch.full((b,), IGNORE_INDEX))


def numel(params: list[nn.Parameter]) -> int:
    """Elements of the distinct tensors in ``params`` (a tied weight counts once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def measure(method: str, size: Size, seed: int = 0) -> dict:
    """Build a fresh run for ``method``, take a warm-up step, measure the next one."""
    torch.manual_seed(seed)
    specs = size.task_specs()
    sharing = SharingConfig(strategy="hard")
    model = build_model(size.model_config(), specs, sharing)
    objective = MultiTaskObjective(specs, sharing)
    weighting = losses.get_weighting(method)([t.name for t in specs])
    params = list(model.named_parameters()) + list(weighting.named_parameters())
    optimizer = make_optimizer(params, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.98),
                               device=torch.device("cpu"))
    trainable = [p for _, p in params if p.requires_grad]
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    last_shared = [p for p in model.last_shared_parameters() if p.requires_grad] or None
    batch = mixed_batch(size)
    model.train()

    def step() -> None:  # experiments.train: _accumulate (one micro-batch) and _update
        with accelerated(model):
            output = model(batch)
            result = objective(model, output, batch)
            representation = ({"representation": output.shared}   # mgda_ub
                              if getattr(weighting, "uses_representation", False) else {})
            weighting.backward(result.task_losses, shared, extra=result.extra_total(),
                               last_shared=last_shared, **representation)
        torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], GRAD_CLIP)
        optimizer.step()

    step()
    optimizer.zero_grad(set_to_none=True)
    state = state_bytes(nn.ModuleList([model, weighting]), optimizer)
    step_bytes = peak_bytes(step)
    return {"weighting": method, "params": numel(trainable), "shared_params": numel(shared),
            "last_shared_params": numel(last_shared or [shared[-1]]),
            "state_bytes": state, "step_bytes": step_bytes, "peak_bytes": state + step_bytes}


def run(size: Size, methods: list[str] | None = None, seed: int = 0) -> dict:
    """Measure every weighting in ``methods`` (default: all registered), one after the other in
    this process, each from a fresh build. Returns ``{"size", "n_heads", "threads", "rows"}``;
    each row holds the counts and bytes defined in the module docstring."""
    # static, the reference, first
    methods = methods or sorted(losses.WEIGHTINGS.names(), key=lambda m: m != "static")
    rows = []
    for method in methods:
        gc.collect()  # the previous run's model, optimizer and graph are gone before this one's
        rows.append(measure(method, size, seed))
    static = next((r for r in rows if r["weighting"] == "static"), None)
    for r in rows:
        r["bytes_per_param"] = r["peak_bytes"] / r["params"]
        r["step_bytes_per_param"] = r["step_bytes"] / r["params"]
        r["extra_bytes"] = r["step_bytes"] - static["step_bytes"] if static else None
        kp4 = size.tasks * r["shared_params"] * 4       # one set of k per-task gradients
        r["extra_in_kp4"] = r["extra_bytes"] / kp4 if static else None
    return {"size": asdict(size), "n_heads": size.n_heads, "threads": torch.get_num_threads(),
            "rows": rows}


def format_table(result: dict) -> str:
    s, first = result["size"], result["rows"][0]
    mib = 2**20
    lines = [f"one training step, fp32, fused AdamW, hard sharing, k = {s['tasks']} tasks; "
             f"d_model {s['d_model']}, {s['layers']}+{s['layers']} layers, d_ff {s['d_ff']}, "
             f"vocab {s['vocab']}, batch {s['batch']}, length {s['length']}; "
             f"P = {first['params'] / 1e6:.2f}M, P_shared = {first['shared_params'] / 1e6:.2f}M, "
             f"P_W = {first['last_shared_params'] / 1e6:.2f}M; {result['threads']} threads",
             "",
             "| weighting | state MiB | step MiB | peak MiB | B/param | step B/param "
             "| extra vs static MiB | extra / (k·P_shared·4 B) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        extra = "-" if r["extra_bytes"] is None else f"{r['extra_bytes'] / mib:+.1f}"
        units = "-" if r["extra_in_kp4"] is None else f"{r['extra_in_kp4']:+.2f}"
        lines.append(f"| {r['weighting']} | {r['state_bytes'] / mib:.1f} | "
                     f"{r['step_bytes'] / mib:.1f} | {r['peak_bytes'] / mib:.1f} | "
                     f"{r['bytes_per_param']:.1f} | {r['step_bytes_per_param']:.1f} | "
                     f"{extra} | {units} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polytask bench memory", description=__doc__.split("\n")[0])
    defaults = Size()
    for name in ("d_model", "layers", "d_ff", "vocab", "heads", "batch", "length", "tasks"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--weightings", nargs="+", default=None, choices=losses.WEIGHTINGS.names(),
                   help="default: every registered weighting")
    output_options(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parse(parser(), argv)
    size = Size(**{k: getattr(args, k) for k in ("d_model", "layers", "d_ff", "vocab", "heads",
                                                 "batch", "length", "tasks")})
    result = run(size, args.weightings)
    return emit(result, format_table(result), args.json)


if __name__ == "__main__":
    main()
