"""``python -m polytask.experiments.suite``: print the task table of docs/tasks.md (sizes from the data)."""
from polytask.experiments.suite import markdown_table

print(markdown_table(), end="")
