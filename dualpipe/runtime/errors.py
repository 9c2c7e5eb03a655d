"""The errors a pipeline raises: one message on every rank (see
:mod:`dualpipe.runtime.failure` for how every rank comes to raise the same one)."""

from __future__ import annotations

__all__ = ["PipelineError", "PipelineTimeout"]


class PipelineError(RuntimeError):
    """A step failed; every rank of the pipeline raises it, with the same message.

    ``rank`` and ``action``: where *this* rank stopped.  ``failed_rank``: the pipeline
    rank where the failure began -- the rank whose code raised first, the rank whose
    process died, or the rank that stopped answering -- or ``None`` when no rank can
    tell (for example a handshake that timed out while every rank was responsive)."""

    def __init__(self, msg: str, rank: int | None = None, action: str | None = None,
                 failed_rank: int | None = None):
        self.rank, self.action, self.failed_rank = rank, action, failed_rank
        super().__init__(msg)


class PipelineTimeout(PipelineError):
    """A rank stopped answering: a peer did not send or receive within the timeout
    (``failed_rank`` names the rank that is not responding when it can be told)."""
