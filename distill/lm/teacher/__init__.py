"""Where the teacher signal comes from (live forward now; top-k cache and generations later)."""
