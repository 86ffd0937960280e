"""The demo that ships: a tiny byte-level Llama that copies text, and LoRA adapters that transform
the copy."""
