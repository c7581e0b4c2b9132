"""Instruction-formatted multi-task data: task specs, examples and templates, the tokenizer,
mixture sampling, collation into batches."""
