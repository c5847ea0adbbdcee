"""FedDifRC's self-supervised variant: TDCL + NDCR without labels or cross-entropy; the prompts
come from the SSL vocabulary (METHOD.md, "Self-supervised variant")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from feddifrc_core.algorithms.feddifrc import FedDifRC

if TYPE_CHECKING:
    from feddifrc_core.config import RunConfig


class FedDifRCSSL(FedDifRC):
    name = "feddifrc-ssl"
    needs_labels = False

    @classmethod
    def config_problem(cls, cfg: RunConfig) -> str | None:
        if cfg.lambda_tdcl == 0 and cfg.lambda_ndcr == 0:
            return ("algorithm 'feddifrc-ssl' has no cross-entropy: lambda-tdcl and lambda-ndcr "
                    "cannot both be 0")
        return None
