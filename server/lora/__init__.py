"""The LoRA math: adapter loading and validation, device slots, the batched path, merging."""
