"""excess: ES on the excess loss over a reference model, l - l_ref (RHO-LOSS in the ES frame).

Why: on noisy data the current model's loss alone cannot tell junk from clean text early on
(junk reaches its floor fast and sits below the clean loss for a while). A small reference
model trained on a clean set is as bad as the current model on junk and far better on clean
text, so the excess ``l - l_ref`` is small on junk and large on what is still to be learned.

The rule is the paper's ES weight applied to the excess, clipped at 0, with a floor:

    w = beta1 * max(s - l_ref, 0) + (1 - beta1) * max(l - l_ref, 0)
    w = w + excess_floor * mean_valid(w) + tiny

The score s stays the beta2 EMA of the raw loss, which plain steps keep up without the
reference; since l_ref is fixed per sample, ``s - l_ref`` is exactly the EMA of the excess.
A never-scored sample reads s_init (tiny), so its first term is 0, as in es. ``l_ref`` is the
per-sample state column ``ref_loss`` (es_llm.reference fills it once per run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import field_validator

from es_llm.sampling.methods.base import (
    Options,
    SamplingMethod,
    Visit,
    check_floor,
    register,
)
from es_llm.sampling.methods.trim import TrimOptions

if TYPE_CHECKING:
    import torch

    from es_llm.sampling.config import EvolvedSamplingConfig

__all__ = ["EXCESS_TINY", "REF_LOSS", "Excess", "ExcessOptions", "excess_weights"]

REF_LOSS = "ref_loss"  # the state column: the reference model's mean loss of each sample
# Added to every weight so a meta-batch without any excess is a uniform draw, not an empty one.
EXCESS_TINY = 1e-30


class ExcessOptions(Options):
    """The floor of method excess (x the meta-batch's mean clipped excess weight)."""

    # accepted (unused) with every method, like lp_floor: `compare --es` passes it to all runs
    foreign_is_error: ClassVar[bool] = False

    excess_floor: float = 0.5

    @field_validator("excess_floor")
    @classmethod
    def _v_excess_floor(cls, v: float) -> float:
        return check_floor("excess_floor", v)


def excess_weights(
    scores: torch.Tensor,
    losses: torch.Tensor,
    ref_loss: torch.Tensor,
    beta1: float,
    floor: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The excess ES weight of each sample (fp32, same device, no host sync; see module doc).

    The mean of the floor is over the valid samples with a finite weight; a sample with a
    non-finite reference loss gets a NaN weight, which the draw never takes.
    """
    import torch

    s = scores.to(torch.float32)
    lo = losses.to(torch.float32)
    ref = ref_loss.to(device=lo.device, dtype=torch.float32)
    w = beta1 * (s - ref).clamp_min(0.0) + (1.0 - beta1) * (lo - ref).clamp_min(0.0)
    ok = torch.isfinite(w)
    if valid is not None:
        ok &= valid.to(device=w.device, dtype=torch.bool)
    zero = torch.zeros((), dtype=torch.float32, device=w.device)
    mean = torch.where(ok, w, zero).sum() / ok.sum().clamp_min(1).to(torch.float32)
    return w + floor * mean + EXCESS_TINY


@register
class Excess(SamplingMethod):
    """Draw B of the meta-batch with probability ~ the clipped excess ES weight."""

    name = "excess"
    order = 9
    state = (REF_LOSS,)
    options = (ExcessOptions, TrimOptions)

    def weights(self, cfg: EvolvedSamplingConfig, visit: Visit) -> torch.Tensor:
        return excess_weights(
            visit.scores,
            visit.losses,
            visit.state[REF_LOSS],
            cfg.beta1,
            cfg.excess_floor,
            visit.valid,
        )
