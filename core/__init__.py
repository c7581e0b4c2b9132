"""polytask core package."""
