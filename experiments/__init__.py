"""polytask experiments package."""
