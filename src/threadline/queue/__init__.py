"""Per-session turn queue: the pure core and the coordinators that feed it."""
