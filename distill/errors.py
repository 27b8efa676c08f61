"""Kept for users' imports: the error type lives in `distill.core.errors`."""
from distill.core.errors import DistillError

__all__ = ["DistillError"]
