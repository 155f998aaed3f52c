"""Per-token log-prob ops: label log-probs and metrics without [tokens, vocab] fp32 logits."""
from .dispatch import linear_logprobs, logits_logprobs
from .sequence import sequence_logps
from .types import LogProbs

__all__ = ["LogProbs", "logits_logprobs", "linear_logprobs", "sequence_logps"]
