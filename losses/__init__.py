"""polytask losses package."""
