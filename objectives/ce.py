"""Cross-entropy on the reference tokens (SFT): the floor every objective must beat."""

import torch

from kdbench.registry import objective


@objective(
    "ce",
    behaviour="supervised",
    needs_teacher=False,
    needs_labels=True,
    paper="supervised fine-tuning baseline (maximum likelihood on the reference responses); no teacher",
)
def ce(s, t, *, labels):
    """Supervised fine-tuning: negative log-likelihood of the reference next token (no teacher).

    CE(y) = −log q(y) = logsumexp(s) − s[y],   q = softmax(s), y = labels
    """
    return torch.logsumexp(s, dim=-1) - s.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
