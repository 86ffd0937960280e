"""A request as the engine sees it: sampling parameters, tokens so far, state, and where its KV lives."""

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from server.engine.grammar import Grammar, GrammarState
from server.lora.adapter import LoraAdapter


# Temperatures below this sample as greedy: dividing float32 logits by a denormal (or by a number that
# rounds to 0 in the compute dtype) gives inf and NaN probabilities.
SAMPLING_EPS = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's presence and frequency penalties
# Past these, dividing logits by the penalty can overflow to inf (and sampling to NaN).
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's (after the first) and the top k
    # Logit adjustments (server/engine/logits_processors.py), in the order they apply:
    min_tokens: int = 0  # EOS and stop tokens are banned until this many tokens were generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    repetition_penalty: float = 1.0  # HF/vLLM: a prompt or output token's logit divided by it if > 0, else multiplied
    frequency_penalty: float = 0.0  # OpenAI: minus this times the token's count in the output so far
    presence_penalty: float = 0.0  # OpenAI: minus this once the token appeared in the output
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    grammar: Grammar | None = None  # structured outputs: only tokens the grammar allows (server/engine/grammar.py)
    # max_tokens was not sent: it is a default, cut to what the context leaves after the prompt (as vLLM does),
    # never a reason to refuse a prompt that fits.
    max_tokens_fits_context: bool = False

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append("max_tokens must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be >= 0")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            problems.append(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 20:
                problems.append(f"{name} must be in [0, 20]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            problems.append("min_tokens must be in [0, max_tokens]")
        if any(not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1] for _, bias in self.logit_bias):
            problems.append(f"logit_bias values must be in [{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}]")
        if not REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]:
            problems.append(f"repetition_penalty must be in [{REPETITION_PENALTY_RANGE[0]:g}, "
                            f"{REPETITION_PENALTY_RANGE[1]:g}]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                problems.append(f"{name} must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}]")
        if not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if self.grammar is not None and self.ignore_eos:
            problems.append("ignore_eos cannot be combined with structured outputs (the grammar decides the end)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def adjusts_logits(self) -> bool:
        """Whether any logit adjustment applies (a request without one costs the batch nothing)."""
        return bool(self.min_tokens or self.logit_bias or self.repetition_penalty != 1.0
                    or self.frequency_penalty or self.presence_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context
    ABORT = "abort"  # cancelled by the caller or a shutdown


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraAdapter | None = None
    tenant: str | None = None  # whose request: admission is shared round-robin across tenants
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    dropped_blocks: int = 0  # leading blocks of block_table given back: their keys fell out of every window
    num_computed: int = 0  # tokens whose keys/values are in the cache
    computed_length: int = 0  # its length at the last step that computed tokens (LongRoPE's switch: rope.py)
    prefix_key: tuple[str | None, str] | None = None  # whose cached KV blocks it may share (prefix_keys.py)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far (block_manager.py)
    named_blocks: int = 0  # leading blocks of block_table entered into the prefix cache
    cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    grammar: GrammarState | None = None  # where its output is in params.grammar

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        if self.params.grammar is not None:
            self.grammar = self.params.grammar.start()

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter is not None else None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose keys/values are not in the cache yet: 1 for a decode, more while prefilling."""
        return self.length - self.num_computed

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are due: asked for, and its first prefill is not over (not a recompute)."""
        return self.params.prompt_logprobs is not None and not self.output_ids

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, prompt and output so far are prefilled again."""
        self.block_table = []
        self.dropped_blocks = 0
        self.named_blocks = 0
        self.num_computed = self.computed_length = 0
        self.status = SequenceStatus.WAITING
