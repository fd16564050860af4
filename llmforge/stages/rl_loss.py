"""The policy losses of online RL (grpo stages), by name: what a reply token's log-probability is
pushed by, given its reply's advantage A, the log-probability pi_old gave it when the replies were
sampled (`old`) and the frozen reference's (`ref`). Every variant adds the same KL penalty to the
reference, DeepSeekMath's k3 estimator kl * (ref/pi - log(ref/pi) - 1), and is averaged over each
reply's tokens then summed over replies (loss_mean: sequence) or summed over tokens /
max_new_tokens (constant, Dr. GRPO); the step divides by the number of replies.

  grpo   token-level ratio r = pi/pi_old, PPO's clipped surrogate
         -min(r A, clip(r, 1 - clip, 1 + clip_high) A)        (Shao et al. 2024, DeepSeekMath)
  gspo   the same surrogate on the *sequence* ratio s = exp(mean over the reply's tokens of
         log pi - log pi_old): the whole reply is clipped or not (Zheng et al. 2025, "Group
         Sequence Policy Optimization"; its GSPO-token form, s sg-scaled per token, so the
         gradient is s A times the mean of the tokens' grad log pi). The paper clips s to
         [1 - 3e-4, 1 + 4e-4]: its ratios are geometric means, far closer to 1 than a token's.
  cispo  REINFORCE with a clipped, stop-gradient importance weight:
         -sg(clip(r, 1 - clip, 1 + clip_high)) A log pi          (MiniMax 2025, "MiniMax-M1");
         no token's gradient is dropped, only its weight bounded. The paper clips from above
         only (set clip close to 1) and averages over the batch's tokens; here loss_mean decides.

With one update per rollout pi_old is pi itself (detached): r = 1, and all three give the policy
gradient A grad log pi (cispo and grpo exactly; gspo its reply mean). They part once
updates_per_rollout > 1 moves pi away from pi_old.
"""

from __future__ import annotations

import torch

LOSSES = ("grpo", "gspo", "cispo")


def policy_loss(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantage: torch.Tensor,
                rows: torch.Tensor, counts: torch.Tensor, o) -> dict:
    """logp, old, ref, advantage [N]: per reply token, rows [N] its reply, counts [B] tokens per
    reply. o: the stage's options (policy_loss, clip, clip_high, kl, loss_mean, max_new_tokens). Returns
    summed {loss, kl, clip_frac} (the step divides them by the replies)."""
    low, high = 1 - o.clip, 1 + (o.clip_high if o.clip_high is not None else o.clip)
    per_reply = 1 / counts.clamp(min=1)[rows]  # each token's share of its reply's mean
    log_ratio = logp - old
    if o.policy_loss == "gspo":  # the reply's geometric-mean ratio, as a per-token value with the token's gradient
        mean = torch.zeros_like(counts, dtype=logp.dtype).index_add(0, rows, log_ratio.detach() * per_reply)
        ratio = torch.exp(mean[rows]) * torch.exp(logp - logp.detach())
    else:
        ratio = torch.exp(log_ratio)
    if o.policy_loss == "cispo":
        surrogate = ratio.detach().clamp(low, high) * advantage * logp
        clipped = (ratio.detach() < low) | (ratio.detach() > high)
    else:
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
        clipped = ((ratio < low) & (advantage < 0)) | ((ratio > high) & (advantage > 0))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    weight = per_reply if o.loss_mean == "sequence" else torch.full_like(logp, 1 / o.max_new_tokens)
    return {"loss": ((o.kl * kl - surrogate) * weight).sum(), "kl": (kl.detach() * weight).sum(),
            "clip_frac": (clipped.float() * weight).sum()}
