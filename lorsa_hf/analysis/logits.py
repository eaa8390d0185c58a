"""What a head writes, read in token space: its logit effects and its direct logit attribution.

A direction `w` in the residual stream reaches the logits through the final norm and the unembedding. Logit
effects treat the norm as its gain (after centring, for a LayerNorm), since its scale is the same for every
token: `logits(w) = W_U (gain * w)`. The direct logit attribution of a head's actual output at a position uses
the norm's actual scale there, read from the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapters import get_adapter
from ..modeling_lorsa import LorsaForReplacement
from .reading import check_layer, request_activations, spliced_at


@dataclass
class Unembedding:
    """The unembedding W_U [vocab, d] and the final norm's gain [d] (centred first when `centred`)."""

    W_U: torch.Tensor
    gain: torch.Tensor
    centred: bool
    eps: float

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> Unembedding:
        norm = get_adapter(model).get_final_norm(model)
        W_U = model.get_output_embeddings().weight.detach().double().cpu()
        weight = getattr(norm, "weight", None)
        gain = torch.ones(W_U.shape[1], dtype=torch.float64) if weight is None else weight.detach().double().cpu()
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        return cls(W_U=W_U, gain=gain, centred=isinstance(norm, nn.LayerNorm), eps=eps)

    def through_norm(self, vectors: torch.Tensor) -> torch.Tensor:
        """Residual directions [..., d] as the unembedding sees them (gain applied, centred for a LayerNorm)."""
        vectors = vectors.double()
        if self.centred:
            vectors = vectors - vectors.mean(-1, keepdim=True)
        return vectors * self.gain

    def logits(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., vocab]: the logits each direction adds, up to the norm's scale."""
        return self.through_norm(vectors) @ self.W_U.T

    def standardized(self, vectors: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """How far above the vocabulary's mean, in standard deviations over the vocabulary, each direction
        [N, d] lifts the logit of its token [N]: scale-free, about N(0, 1) for a random direction."""
        directions = self.through_norm(vectors)
        mean, covariance = self._moments()
        spread = ((directions @ covariance) * directions).sum(-1).clamp(min=1e-300).sqrt()
        chosen = (directions * self.W_U[tokens.long()]).sum(-1)
        return (chosen - directions @ mean) / spread

    def standardized_matrix(self, vectors: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`standardized` for every direction [H, d] against every token [N]: [H, N]."""
        directions = self.through_norm(vectors)
        mean, covariance = self._moments()
        spread = ((directions @ covariance) * directions).sum(-1).clamp(min=1e-300).sqrt()
        return (directions @ self.W_U[tokens.long()].T - (directions @ mean)[:, None]) / spread[:, None]

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_cached_moments"):
            mean = self.W_U.mean(0)
            centred = self.W_U - mean
            self._cached_moments = (mean, centred.T @ centred / self.W_U.shape[0])
        return self._cached_moments


@dataclass
class LogitEffects:
    """Per head, the `k` tokens its output direction promotes most and suppresses most, with the logits it adds
    per unit of activation (up to the norm's scale). All [H, k]."""

    promoted: torch.Tensor
    promoted_logits: torch.Tensor
    suppressed: torch.Tensor
    suppressed_logits: torch.Tensor


@torch.no_grad()
def logit_effects(
    lorsa: LorsaForReplacement, layer: int, unembedding: Unembedding, k: int = 10, chunk: int = 256
) -> LogitEffects:
    """The tokens every head of Lorsa layer `layer` promotes and suppresses: W_O[i] through the final norm and
    the unembedding."""
    W_O = check_layer(lorsa, layer).W_O.detach().double().cpu()
    parts = []
    for start in range(0, W_O.shape[0], chunk):
        logits = unembedding.logits(W_O[start : start + chunk])
        top, bottom = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    return LogitEffects(*(torch.cat(column) for column in zip(*parts, strict=True)))


@dataclass
class Attribution:
    """A head's direct logit attribution at one position: the logits [vocab] its actual output there adds
    through the final norm (at the norm's actual scale) and the unembedding, and the activation it had."""

    logits: torch.Tensor
    activation: float

    def top(self, k: int = 10) -> tuple[list[int], list[float]]:
        values, indices = self.logits.topk(k)
        return indices.tolist(), values.tolist()


@torch.no_grad()
def direct_logit_attribution(
    model: PreTrainedModel, lorsa: LorsaForReplacement, layer: int, input_ids: torch.Tensor, position: int, head: int
) -> Attribution:
    """The logits that head `head` of Lorsa layer `layer` adds directly at `position` of `input_ids` [T], in a
    full forward of `model` with the Lorsa spliced at `layer`."""
    unembedding = Unembedding.from_model(model)
    norm = get_adapter(model).get_final_norm(model)
    read: dict[str, torch.Tensor] = {}
    with spliced_at(model, lorsa, layer) as module:
        handles = [
            module.register_forward_pre_hook(request_activations, with_kwargs=True),
            module.register_forward_hook(lambda m, a, out: read.update(a=out.activations()[0, position, head])),
            norm.register_forward_pre_hook(lambda m, a: read.update(residual=a[0][0, position])),
        ]
        try:
            model(input_ids=input_ids[None].to(module.W_Q.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        W_O = module.W_O[head].detach().double().cpu()
    residual = read["residual"].double().cpu()
    if unembedding.centred:
        residual = residual - residual.mean()
    scale = torch.rsqrt(residual.pow(2).mean() + unembedding.eps)
    activation = float(read["a"])
    return Attribution(logits=unembedding.logits(activation * W_O) * scale, activation=activation)


__all__ = ["Attribution", "LogitEffects", "Unembedding", "direct_logit_attribution", "logit_effects"]
