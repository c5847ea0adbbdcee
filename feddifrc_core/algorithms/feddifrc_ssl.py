"""FedDifRC's self-supervised variant: TDCL + NDCR without labels or cross-entropy; the prompts
come from the SSL vocabulary (METHOD.md, "Self-supervised variant")."""

from __future__ import annotations

from feddifrc_core.algorithms.feddifrc import FedDifRC


class FedDifRCSSL(FedDifRC):
    name = "feddifrc-ssl"
    label_free = True

    def config_problem(self) -> str | None:
        if self.params.lambda_tdcl == 0 and self.params.lambda_ndcr == 0:
            return ("algorithm 'feddifrc-ssl' has no cross-entropy: lambda-tdcl and lambda-ndcr "
                    "cannot both be 0")
        return None
