"""Sharing strategies x (full fine-tuning, LoRA) on a pretrained T5 — the shape of the
experiment a researcher runs with a real checkpoint, here on a stand-in built offline.

    python -m polytask.experiments.pretrained_ablation --out runs/pretrained [--init DIR]

Without ``--init`` it builds the stand-in: a small T5 (Hugging Face ``transformers``, random
weights, d_model 64, 2+2 layers) with a sentencepiece tokenizer in T5's layout trained on the
tasks' text, saved as a hub directory holds one. The grid: ``sharing.strategy`` in none / hard /
soft / hierarchical x ``train.peft`` in {} / {method: lora, r: 8}, one seed, the ``tiny`` suite
(copy, reverse, parity). It prints, per run: trainable / total parameters, the median step time
and the test metrics; the ablation's ``table.md`` and plots are written as usual.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
from pathlib import Path

import yaml

from polytask.experiments.ablate import ablate


def build_stand_in(path: Path, texts: list[str], *, d_model: int = 64, layers: int = 2) -> Path:
    """A T5 directory (config.json, model.safetensors, spiece.model) with random weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentencepiece as spm
    import torch
    import transformers
    path.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto,
                                   vocab_size=300, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (path / "spiece.model").write_bytes(proto.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 10}))
    vocab = len(transformers.T5Tokenizer.from_pretrained(str(path)))
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // 4,
                                   num_heads=4, d_ff=2 * d_model, num_layers=layers,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                                   dropout_rate=0.0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/pretrained")
    p.add_argument("--init", default=None, help="a Hugging Face T5/BART directory")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init = args.init
    if init is None:
        from polytask.core.data.task_data import TaskData
        from polytask.experiments.suite import load_suite
        init = str(build_stand_in(out / "t5-stand-in",
                                  list(TaskData.load(load_suite("tiny")).corpus())))
    config = {
        "init": init, "tasks": "tiny", "sharing": {"strategy": "hard"},
        "data": {"max_source_len": 48, "max_target_len": 16, "eval_examples": 100},
        "train": {"max_steps": args.steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20,
                  "eval_every": args.steps // 2, "save_every": args.steps // 2,
                  "generation_max_tokens": 14},
        "grid": {"sharing.strategy": ["none", "hard", "soft", "hierarchical"],
                 "train.peft": [{}, {"method": "lora", "r": 8}]},
        "seeds": [0],
    }
    (out / "ablation.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ablate(out / "ablation.yaml", out, progress=False, jobs=args.jobs)
    print("| run | trainable | total | median step ms | " + " | ".join(
        ["copy", "reverse", "parity", "average"]) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in sorted((out / "runs").iterdir()):
        summary = json.loads((run / "summary.json").read_text())
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        seconds = [s["step_s"] for s in steps if s.get("event") == "train" and "step_s" in s]
        ms = f"{1e3 * statistics.median(seconds):.0f}" if seconds else "-"
        counts, test = summary["parameters"], summary["test"]
        print(f"| {run.name} | {counts['trainable']:,} | {counts['total']:,} | {ms} | " + " | ".join(
            f"{test[k]:.1f}" for k in ("copy", "reverse", "parity", "average")) + " |")


if __name__ == "__main__":
    main()
