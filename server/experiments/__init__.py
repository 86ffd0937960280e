"""A/B experiments: variants as data, sticky assignment, outcomes and feedback, per-variant statistics."""
