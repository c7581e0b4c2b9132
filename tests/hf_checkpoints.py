"""Small Hugging Face T5 and BART checkpoint directories, built offline for tests: a tokenizer
trained here on a small corpus (T5: a sentencepiece model in T5's layout; BART: a byte-level
BPE from the ``tokenizers`` package) and a random ``transformers`` model sized to it, saved the
way a hub directory holds them (``config.json``, ``model.safetensors``, tokenizer files).

Imported by tests as ``hf_checkpoints`` (pytest puts ``tests/`` on ``sys.path`` for its
conftest). Returns the directory and the Hugging Face model and tokenizer (the oracles).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [f"the quick brown fox number {i} jumps over {i * 7} lazy dogs" for i in range(60)] + [
    "translate English to German: That is good.", "summarize: the cat sat on the mat",
    "question: what is two plus two? answer: four", "café naïve résumé and more words",
    "reverse the digits 3 1 4 1 5 9 2 6", "the answer is yes", "the answer is no",
] * 4


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Wider random weights than the 0.02-std init, so the model's choices depend on its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def t5_dir(root: Path, *, tied: bool = True) -> tuple[Path, torch.nn.Module, object]:
    import sentencepiece as spm
    import transformers
    path = Path(root) / ("t5" if tied else "t5-untied")
    path.mkdir(parents=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    (path / "spiece.model").write_bytes(proto.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 8}))
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(tokenizer) + 4, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2,
        num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=tied,
        feed_forward_proj="relu" if tied else "gated-gelu", dropout_rate=0.0)
    model = _randomise(transformers.T5ForConditionalGeneration(config), 1)
    model.save_pretrained(str(path))
    return path, model, tokenizer


def bart_dir(root: Path) -> tuple[Path, torch.nn.Module, object]:
    import tokenizers
    import transformers
    path = Path(root) / "bart"
    path.mkdir(parents=True)
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(path))                                  # vocab.json + merges.txt
    tokenizer = transformers.BartTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0)
    model = _randomise(transformers.BartForConditionalGeneration(config), 2)
    model.generation_config.forced_eos_token_id = None
    model.save_pretrained(str(path))
    return path, model, tokenizer


def hf_greedy(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              max_new_tokens: int) -> torch.Tensor:
    """Hugging Face greedy ``generate`` without forced tokens, the decoder start dropped."""
    import transformers
    c = model.config
    gen = transformers.GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_length=0,
        decoder_start_token_id=c.decoder_start_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, forced_bos_token_id=None, forced_eos_token_id=None,
        no_repeat_ngram_size=0, repetition_penalty=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=gen)
    return out[:, 1:]
