"""The aggregation component with Flower's SecAgg+ (`secure-aggregation = "secaggplus"`).

It replaces `exchange` (docs/architecture.md, "Aggregation"; docs/privacy.md): every stage that
takes uploads from clients (FedDifRC's projection statistics and target sums, each round's model,
the algorithm's uploads beside it, the example counts and the training metrics) becomes two
secure sums over the stage's nodes (server_app/secure_aggregation.py):
1. the magnitude round: how many clients have their largest value in each power-of-two band,
   per array, which fixes every array's public bound (nothing is clipped silently);
2. the sum itself over those that took part in 1, scaled by the bounds (the stage's content, e.g.
   the global model, travels with 1 only: each client keeps its answer for 2).
Each client computes its answer once (client_app/secure_upload.py) and sends it in the form
`secure_uploads.secure_vector` gives: example-weighted where the stage's rule is a mean. The
strategy receives ONE reply for the stage, the arrays already combined by the stage's rule
(so the plain `combine` of that one upload returns them unchanged), the merged metrics, and the
nodes it stands for and those lost on the way (`protocol.sum_reply`).

The server never holds one client's vector: only masked vectors, the sums, the public layout
(names, shapes, dtypes) and the band counts of step 1. Node discovery stays plaintext (partition
ids are how the run samples and resumes), and so do participation and timing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from feddifrc_core.aggregation import Upload
from feddifrc_core.config import RunConfig
from feddifrc_core.secure_uploads import from_secure_sums
from server_app.aggregator import Aggregator
from server_app.progress_wait import Wait
from server_app.replies import RoundFailedError
from server_app.secure_aggregation import SecureAggregationError, secure_bounds, secure_sum
from wire import protocol


class SecureAggregator(Aggregator):
    """SecAgg+ for every set-up stage and training round; `combine` stays the plain one."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.settings = cfg.secagg_settings
        self.partitions: dict[int, int] = {}  # node id -> partition id (node discovery)
        self._summed: list[int] = []  # the partitions in the last stage's sum

    def exchange(self, grid: Grid, messages: Iterable[Message], wait: Wait) -> list[Message]:
        messages = list(messages)
        kinds = {m.metadata.message_type for m in messages}
        if kinds == {protocol.NODE_INFO}:
            replies = super().exchange(grid, messages, wait)
            self._learn_partitions(replies)
            return replies
        if not messages or kinds - {protocol.SETUP, protocol.TRAIN}:
            return super().exchange(grid, messages, wait)
        return [self._secure_stage(grid, messages, wait)]

    def _learn_partitions(self, replies: list[Message]) -> None:
        """Partition ids seed each client's rounding (a resumed run has new node ids); the
        settings are checked against the federation before any secure message."""
        self.partitions = {m.metadata.src_node_id: protocol.read_partition(m)
                           for m in replies if not m.has_error()}
        if len(self.partitions) >= self.cfg.min_train_nodes:  # else the strategy names the failure
            self.cfg.check_secure_aggregation(len(self.partitions))

    def _secure_stage(self, grid: Grid, messages: list[Message], wait: Wait) -> Message:
        # 1. one content for every node (SecAgg+ adds each node's key shares to its own copy)
        content = messages[0].content
        if any(m.content is not content for m in messages):
            raise ValueError("secure aggregation sends every node of a stage the same content")
        request = protocol.read_request(messages[0])
        purpose = f"setup-{request.stage}" if request.stage else f"round-{request.server_round}"
        what = f"set-up stage {request.stage!r}" if request.stage else f"round {request.server_round}"
        nodes = {m.metadata.dst_node_id: self.partitions[m.metadata.dst_node_id] for m in messages}
        seed, progress = self.cfg.seed, wait.from_last_reply
        min_nodes = max(2, min(self.cfg.min_train_nodes, len(nodes)))
        # 2. the public bounds, then the sum over the clients the bounds hold for
        try:
            bounds, magnitudes = secure_bounds(
                grid, nodes, content, self.settings, seed=seed, stage=f"{purpose}.magnitudes",
                min_nodes=min_nodes, timeout=wait.seconds, progress=progress)
            members = {n: nodes[n] for n in magnitudes.contributors}
            # the clients kept their answer from the magnitude round: only the config travels
            config_only = RecordDict({protocol.CONFIG: content.config_records[protocol.CONFIG]})
            total = secure_sum(
                grid, members, config_only, self.settings, seed=seed, stage=f"{purpose}.sum",
                bounds=bounds, min_nodes=min_nodes, timeout=wait.seconds, progress=progress)
        except SecureAggregationError as err:
            raise RoundFailedError(f"{what}: {err}") from err
        # 3. what the plain rules would give, as one reply standing for the contributors
        reference = request.arrays if request.rule == "mean" and request.arrays else None
        arrays, payload, metrics = from_secure_sums(total.arrays, total.dtypes, request.rule,
                                                    len(total.contributors), reference)
        lost = {n: f"secure aggregation, magnitude round: {r}"
                for n, r in magnitudes.dropped.items()}
        # (one lost while unmasking stays in the sum: its mask is rebuilt from the others' shares)
        lost.update({n: f"secure aggregation, sum: {r}" for n, r in total.dropped.items()
                     if n not in total.contributors})
        self._summed = sorted(self.partitions[n] for n in total.contributors)
        first = next(m for m in messages if m.metadata.dst_node_id == total.contributors[0])
        return protocol.sum_reply(first, arrays, metrics, payload, total.contributors, lost)

    def contributors(self, uploads: Sequence[Upload]) -> list[int]:
        """The partitions in the last stage's sum: its one upload stands for all of them."""
        if len(uploads) != 1:
            raise ValueError(f"a secure stage gives one upload, got {len(uploads)}")
        return list(self._summed)
