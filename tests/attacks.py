"""A Byzantine client for tests and the robust-aggregation benchmark (never in the product).

`sign_flip_attack(partition, scale)` is a Flower ClientApp mod: the node holding `partition`
trains honestly, then uploads g - scale * (w - g) instead of its model w, where g is the global
model it received: its update, sign-flipped and scaled (the attack of Blanchard et al. 2017 and
Fang et al. 2020 on FedAvg). Every other message and node passes untouched. Install it with
`client_app.app.make_client_app(overrides, mods=[sign_flip_attack(0, 10.0)])`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from wire import protocol


def sign_flip_attack(partition: int, scale: float) -> Mod:
    """A mod that makes `partition`'s train replies carry its update times -`scale`."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        attacker = int(context.node_config["partition-id"]) == partition
        if msg.metadata.message_type != protocol.TRAIN or not attacker or reply.has_error():
            return reply
        sent = protocol.from_record(msg.content[protocol.ARRAYS])  # g
        trained = protocol.from_record(reply.content[protocol.ARRAYS])  # w
        reply.content[protocol.ARRAYS] = protocol.to_record({
            # integer buffers (BatchNorm's step counter) stay honest: they are no update
            key: w if not np.issubdtype(w.dtype, np.floating)
            else (sent[key] - scale * (w - sent[key])).astype(w.dtype)
            for key, w in trained.items()})
        return reply

    return mod
