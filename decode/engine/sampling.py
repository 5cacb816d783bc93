"""Token distributions, sampling and the speculative acceptance rule.

Temperature, top-k and top-p are applied identically to the draft and the full
distributions, so speculative sampling reproduces the full model's *warped*
distribution exactly (that is what plain sampling with the same settings draws from).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from decode.engine import keys

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy decoding (argmax); top_k 0 and top_p 1 disable them.

    Bad values raise ValueError here rather than in each caller: a negative temperature
    would silently mean greedy and top_p 0 would sample uniformly from the whole
    vocabulary (warp keeps no token, so softmax spreads evenly), not "most restrictive".
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # isfinite: an infinite temperature or top_p would pass the range checks (NaN
        # fails them, but "finite" names the problem).
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (_is_real(t) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not (_is_real(p) and math.isfinite(p) and 0 < p <= 1):
            raise ValueError(f"top_p must be a finite number in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _is_real(value) -> bool:
    """A plain real number (Python or NumPy scalar), not a bool, string or array."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def warp(logits: Array, config: SamplingConfig) -> Array:
    """Logits [..., vocab] -> probabilities [..., vocab] after temperature / top-k / top-p.

    top_k >= vocab keeps every token, like top_k 0 (lax.top_k cannot take more values than
    there are). With top-k on, top-p ranks only the k largest logits (every other token is
    masked already), so no call sorts the whole vocabulary.
    """
    logits = logits.astype(jnp.float32) / max(config.temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    top_k = config.top_k if config.top_k < logits.shape[-1] else 0
    ranked = None  # the logits that top-p may keep, in descending order
    if top_k > 0:
        ranked = jax.lax.top_k(logits, top_k)[0]  # [..., k], descending
        logits = jnp.where(logits < ranked[..., -1:], neg, logits)
    if config.top_p < 1.0:
        if ranked is None:
            ranked = jnp.sort(logits, axis=-1)[..., ::-1]
        logits = jnp.where(logits < top_p_threshold(ranked, logits, config.top_p), neg, logits)
    return jax.nn.softmax(logits, axis=-1)


def top_p_threshold(ranked: Array, logits: Array, top_p: float) -> Array:
    """The smallest logit top-p keeps: [..., 1].

    ranked [..., n]: the n largest of logits [..., vocab] in descending order, n >= the
    tokens not masked yet (n = vocab, or k after top-k). Top-p keeps the smallest prefix of
    them whose mass reaches top_p (the token crossing it included), and every token tied
    with its last one. The mass is under the softmax of all of `logits`, so tokens tied
    with the k-th logit past the first k count, as they do in a sort of the whole vocabulary.
    """
    probs = jnp.exp(ranked - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    return jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)


def sample(rng: Array, probs: Array) -> Array:
    """Draws one token per row: probs [..., vocab] -> [...] int32."""
    return keys.categorical(rng, jnp.log(jnp.maximum(probs, 1e-30)))


def next_token(rng: Array, logits: Array, config: SamplingConfig) -> Array:
    """Greedy argmax or a sample from the warped distribution: logits [..., vocab] -> [...]."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(rng, warp(logits, config))


def accept_greedy(target_tokens: Array, draft_tokens: Array, draft_lens: Array) -> Array:
    """Number of leading draft tokens equal to the full model's argmax.

    target_tokens: [batch, draft_len] full-model argmax after each prefix; draft_tokens:
    [batch, draft_len]; draft_lens: [batch] proposed tokens per row. Returns [batch] int32.
    """
    draft_len = draft_tokens.shape[1]
    ok = (target_tokens == draft_tokens) & (jnp.arange(draft_len)[None] < draft_lens[:, None])
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def accept_speculative(
    rng: Array, target_probs: Array, draft_probs: Array, draft_tokens: Array, draft_lens: Array
) -> tuple[Array, Array]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    target_probs: [batch, draft_len + 1, vocab] full-model distributions after each prefix;
    draft_probs: [batch, draft_len, vocab]; draft_tokens: [batch, draft_len]; draft_lens: [batch].
    Draft token j is accepted with probability min(1, p_j(x) / q_j(x)); at the first
    rejection the replacement is drawn from norm(max(0, p_j - q_j)); when every proposed
    token is accepted, the bonus token is drawn from p at the next position.
    Returns (accepted [batch], next_token [batch]).
    """
    batch, draft_len = draft_tokens.shape
    accept_rng, resample_rng = keys.split(rng)
    p_x = jnp.take_along_axis(target_probs[:, :draft_len], draft_tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
    uniform = keys.uniform(accept_rng, (batch, draft_len))
    ok = (uniform * q_x < p_x) & (jnp.arange(draft_len)[None] < draft_lens[:, None])
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)

    rows = jnp.arange(batch)
    p_next = target_probs[rows, accepted]  # [batch, vocab]
    padded_q = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    q_next = padded_q[rows, accepted]
    rejected = (accepted < draft_lens)[:, None]
    residual = jnp.maximum(p_next - q_next, 0.0)
    residual_mass = jnp.sum(residual, axis=-1, keepdims=True)
    # p == q makes the residual empty; then rejection had probability 0, so fall back to p.
    residual = jnp.where(residual_mass > 0, residual / jnp.maximum(residual_mass, 1e-30), p_next)
    final = jnp.where(rejected, residual, p_next)
    return accepted.astype(jnp.int32), sample(resample_rng, final)
