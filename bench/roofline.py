"""What the hardware can do (dense-matmul FLOP/s) and what a generation workload costs (useful FLOPs).

Counted per request, for a Llama-style decoder, the work any correct implementation must do:
  * every decoder linear layer (q, k, v, o, gate, up, down): 2 · params FLOPs per token fed;
  * each adapted module: 2 · r · (d_in + d_out) per token fed (x·Aᵀ, then ·Bᵀ);
  * attention: 4 · heads · head_dim · (p + 1) per layer for the token at position p (QKᵀ and PV);
  * the output head: 2 · hidden · vocab per generated token (only the last position needs logits).
Tokens fed = prompt + output − 1 (the last sampled token is never fed back). Not counted: padding,
embeddings, norms, rotary, softmax, activations and sampling (elementwise, memory-bound).
"""

import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig

ADAPTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: LlamaConfig) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear layer in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden),
        }

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linear layers (no embeddings, no output head)."""
        return self.layers * sum(d_in * d_out for d_in, d_out in self.module_dims().values())

    @property
    def adapted_fan_sum(self) -> int:
        """Σ (d_in + d_out) over the adapted modules of one layer."""
        dims = self.module_dims()
        return sum(sum(dims[name]) for name in ADAPTED_MODULES)


def request_flops(shape: ModelShape, prompt_len: int, output_len: int, rank: int) -> float:
    """Useful FLOPs of one request (rank 0: no adapter), as counted in the module docstring."""
    fed = prompt_len + output_len - 1
    per_token = 2 * shape.linear_params + 2 * rank * shape.adapted_fan_sum * shape.layers
    keys_read = fed * (fed + 1) / 2  # the token at position p attends to p + 1 keys
    attention = 4 * shape.layers * shape.heads * shape.head_dim * keys_read
    head = 2 * shape.hidden * shape.vocab * output_len
    return fed * per_token + attention + head


def peak_matmul_flops(size: int, repeats: int = 5) -> float:
    """Best float32 FLOP/s of a (size × size) @ (size × size) matmul: the roofline's compute ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
