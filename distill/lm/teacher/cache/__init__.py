"""Offline teacher signals: the teacher's top-k distribution per completion token, stored once
(`distill cache`), so training needs no teacher in memory."""
