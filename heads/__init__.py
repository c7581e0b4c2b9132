"""polytask heads package."""
