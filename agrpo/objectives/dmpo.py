"""DMPO (arXiv 2510.08233; yuchen-zhu-zyc/DMPO): ALGORITHMS.md, DMPO. Weighted denoising cross-entropy.

Antithetic rows: a pair draws lambda ~ U[lambda_min, lambda_max] and U_j ~ U(0, 1) over the C completion
positions; one row masks M = {U < lambda}, the other its complement (the prompt is never masked).

Once per batch (`prepare`, before the first update), with `estimate_rows` antithetic rows per completion,
the same masks for the policy and the reference (the base: the adapter off, or a frozen copy):

    log p^(o) = mean over rows of (C / |M|) sum_{j in M} log p(o_j | x~)      (0 for a row with |M| = 0)
    w+-_i = softmax over the valid completions of o_i's group of (log p^_ref - log p^_cur +- r / alpha)

fixed for the batch: later updates never recompute them. Loss of update u, with `rows` new antithetic rows
per completion (drawn for every update in `prepare`), summed over the valid completions of the whole batch:

    loss = sum_i (w+_i - w-_i) (1/rows) sum_rows (sum_{j in M} CE_j / |M|)      (CE_j = -log p_theta(o_j | x~))

No ratio, clip or KL. Rewards are centred within the group before the division by alpha (the softmax is
unchanged; equal rewards then give w+ = w- exactly, and r / alpha stays small).

Draws, from the micro-batch's generator in this order: the estimate rows, then the loss rows of every
update. Versus the official code: it draws lambda as 0.1 + 0.9 U, i.e. on [0.1, 1.0], while its comment and
the paper say [0.1, 0.9]; the default follows the paper, `lambda_max=1.0` reproduces the code. It also
averages the summed loss over its per-device micro-batches (a constant factor); here the sum runs over the
whole batch, as the formula. The masks span all C positions (EOS padding included), as the official default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.coupled_grpo import backward_pieces, masked_copies_logp, row_chunks


def antithetic_masks(
    shape: tuple[int, int], rows: int, lambda_min: float, lambda_max: float, generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """[B, rows, C] bool: rows/2 pairs a completion; pair p masks {U < lambda_p} (row 2p) and the complement
    (row 2p + 1), lambda_p ~ U[lambda_min, lambda_max]."""
    if rows < 2 or rows % 2:
        raise AgrpoError(f"antithetic rows come in pairs: got {rows}")
    b, c = shape
    lam = lambda_min + (lambda_max - lambda_min) * torch.rand((b, rows // 2), generator=generator, device=device, dtype=torch.float64)
    first = torch.rand((b, rows // 2, c), generator=generator, device=device, dtype=torch.float64) < lam[:, :, None]
    return torch.stack([first, ~first], 2).flatten(1, 2)


def scaled_logp(logp: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[b] log p^ = mean over rows of (C / |M|) sum_{j in M} log p (logp, masked [b, rows, C]; 0 for an empty row)."""
    size = masked.sum(-1)
    picked = torch.where(masked, logp, torch.zeros_like(logp)).sum(-1)
    return (picked * logp.shape[-1] / size.clamp(min=1)).mean(-1)


def masked_mean_ce(logp: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[b] mean over rows of sum_{j in M} CE_j / |M| (0 for an empty row)."""
    size = masked.sum(-1)
    return (torch.where(masked, -logp, torch.zeros_like(logp)).sum(-1) / size.clamp(min=1)).mean(-1)


def dmpo_weights(
    log_ref: torch.Tensor, log_cur: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor, group_size: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w+ [N], w- [N]) float64: softmax over each group's valid rows of log_ref - log_cur +- r / alpha (0 on
    invalid rows). Rewards are centred within the group first, which leaves the softmax unchanged."""
    if alpha <= 0:
        raise AgrpoError(f"dmpo.alpha must be > 0, got {alpha}")
    ok = valid.view(-1, group_size)
    r = torch.where(ok, rewards.double().view(-1, group_size), torch.zeros_like(ok, dtype=torch.float64))
    r = torch.where(ok, r - r.sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1), torch.zeros_like(r))
    base = (log_ref.double() - log_cur.double()).view(-1, group_size)

    def softmax(z):
        z = torch.where(ok, z, torch.full_like(z, -torch.inf))
        w = torch.softmax(z, dim=1)
        return torch.where(ok, w, torch.zeros_like(w)).flatten()  # an all-invalid group: zeros, not NaN

    return softmax(base + r / alpha), softmax(base - r / alpha)


@dataclass
class DMPOSettings:
    alpha: float = field(default=0.04, metadata={"help": "temperature of the reward tilt: weights = group softmax of (log p_ref - log p +- r / alpha)"})
    rows: int = field(default=4, metadata={"help": "antithetic masked rows per completion in the loss of each update (even)"})
    estimate_rows: int = field(default=4, metadata={"help": "antithetic masked rows per completion for log p^ of the weights (even)"})
    lambda_min: float = field(default=0.1, metadata={"help": "lower end of each pair's mask ratio lambda"})
    lambda_max: float = field(
        default=0.9, metadata={"help": "upper end of lambda (the paper: 0.9; the official code draws up to 1.0)"}
    )


@register
class DMPO(Objective):
    name = "dmpo"
    settings = DMPOSettings
    summary = "DMPO: weighted denoising cross-entropy, group-softmax weights vs the reference fixed per batch (ALGORITHMS.md)"

    def needs_reference(self, cfg) -> bool:
        return True  # the weights compare the policy with the base, whatever beta says

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or DMPOSettings()
        if s.alpha <= 0:
            raise AgrpoError(f"dmpo.alpha must be > 0, got {s.alpha}")
        if s.rows < 2 or s.rows % 2 or s.estimate_rows < 2 or s.estimate_rows % 2:
            raise AgrpoError(f"dmpo.rows and dmpo.estimate_rows must be even and >= 2, got {s.rows}, {s.estimate_rows}")
        if not 0 <= s.lambda_min <= s.lambda_max <= 1:
            raise AgrpoError(f"dmpo needs 0 <= lambda_min <= lambda_max <= 1, got {s.lambda_min}, {s.lambda_max}")

    def _estimate(self, policy, part: Part, masked: torch.Tensor, max_rows: int) -> torch.Tensor:
        rows = torch.arange(part.rollout.tokens.shape[0], device=part.rollout.tokens.device)
        out = []
        for r in row_chunks(rows, max_rows // masked.shape[1]):
            out.append(scaled_logp(masked_copies_logp(policy, part.rollout, r, masked[r]), masked[r]))
        return torch.cat(out)

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        """Estimate masks, weights from policy and reference under them, then the loss masks of every update."""
        cfg, s = ctx.cfg, ctx.settings or DMPOSettings()
        for part in parts:
            if "weights" in part.state:  # fixed for the batch
                continue
            ro = part.rollout
            shape, dev = tuple(ro.completion.shape), ro.tokens.device
            est = antithetic_masks(shape, s.estimate_rows, s.lambda_min, s.lambda_max, part.generator, dev)
            masks = [antithetic_masks(shape, s.rows, s.lambda_min, s.lambda_max, part.generator, dev) for _ in range(cfg.inner_steps)]
            with torch.no_grad():
                log_cur = self._estimate(ctx.policy, part, est, cfg.max_rows_per_forward)
                log_ref = self._estimate(ctx.ref_logits_fn, part, est, cfg.max_rows_per_forward)
            rewards = torch.tensor([0.0 if r is None else float(r) for r in part.rewards], dtype=torch.float64, device=dev)
            valid = part.valid.to(dev)
            w_pos, w_neg = dmpo_weights(log_ref, log_cur, rewards, valid, cfg.group_size, s.alpha)
            part.state.update(estimate_masks=est, masks=masks, log_cur=log_cur, log_ref=log_ref, weights=(w_pos, w_neg))

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg = ctx.cfg

        def chunks(part):
            w_pos, w_neg = part.state["weights"]
            live = part.valid.to(w_pos.device) & ((w_pos - w_neg) != 0)
            return row_chunks(torch.nonzero(live).flatten(), cfg.max_rows_per_forward // part.state["masks"][inner].shape[1])

        def loss_of(part, rows, total):  # a sum over the batch: no normaliser
            masked = part.state["masks"][inner][rows]
            w_pos, w_neg = part.state["weights"]
            logp = masked_copies_logp(ctx.policy, part.rollout, rows, masked)
            coef = (w_pos - w_neg)[rows].to(logp.dtype)
            loss = (coef * masked_mean_ce(logp, masked)).sum()
            return loss, {"clip_frac": 0.0, "kl": 0.0, "loss_tokens": int(masked.sum())}

        return backward_pieces(ctx, parts, chunks, loss_of, lambda p: 0)
