"""Client half of differential privacy with client-side clipping: Flower's own client mods
(flwr 1.39 `flwr.clientapp.mod.fixedclipping_mod` / `adaptiveclipping_mod`) on the project's
train messages.

Flower's mods require exactly one ArrayRecord (the model) and one ConfigRecord, both ways; a
train message also carries the algorithm's payload (FedDifRC's bases), and the model holds
integer buffers that Flower's clipping cannot handle (feddifrc_core/differential_privacy.py).
`clip_reply` therefore shows the mod the train message as it expects it: the global model's
floating arrays and the train config in, the local model's floating arrays and the metrics out.
The mod clips (local - global) to the server's clipping norm (and adds the norm bit to the
metrics); the reply then carries the clipped arrays, the global model's integer buffers (no
client's step counter leaves the node under DP) and whatever else the handler replied.

The client's own run config chooses the mod, not the server: a client configured for
client-side clipping refuses (Flower's error reply) a train message without a clipping norm.

Secure aggregation (Flower's documented pairing with client-side fixed clipping): a secure-sum
stage's message passes through this mod untouched, and the train handler clips its answer with
`clip_for_secure_sum` (the same Flower mod, through `clip_reply`) before `secure_upload.respond`
encodes it: the clipped update (local - global) with weight 1 goes into the masked sum.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from feddifrc_core import differential_privacy as dp
from feddifrc_core.config import RunConfig
from wire import protocol

CLIPPING_MODS: dict[str, Mod] = {dp.CLIENT_FIXED: fixedclipping_mod,
                                 dp.CLIENT_ADAPTIVE: adaptiveclipping_mod}


def make_clipping_mod(run_config: Callable[[Context], RunConfig]) -> Mod:
    """The train handler's mod: Flower's clipping mod for the client-side DP modes, else nothing.
    `run_config(context)`: this node's parsed run config."""

    def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        flower_mod = CLIPPING_MODS.get(run_config(context).differential_privacy)
        if flower_mod is None or protocol.secure_sum_request(msg) is not None:
            return call_next(msg, context)
        return clip_reply(flower_mod, msg, context, call_next)

    return dp_clipping_mod


def clip_reply(flower_mod: Mod, msg: Message, context: Context,
               call_next: ClientAppCallable) -> Message:
    """`call_next`'s reply to the train message `msg`, its model clipped by `flower_mod`."""
    private, public = dp.split_private(protocol.from_record(msg.content.array_records[protocol.ARRAYS]))
    view = copy.copy(msg)  # the same metadata (replies to it are replies to `msg`), other content
    view.content = RecordDict({protocol.ARRAYS: protocol.to_record(private),
                               protocol.CONFIG: msg.content.config_records[protocol.CONFIG]})
    replies: list[Message] = []

    def handler(view_msg: Message, ctx: Context) -> Message:
        reply = call_next(msg, ctx)  # the handler sees the whole train message
        replies.append(reply)
        if reply.has_error():
            return reply
        local = protocol.from_record(reply.content.array_records[protocol.ARRAYS])
        # in the order of `private` (sorted): Flower's mod compares the two key lists
        local_private = {k: local[k] for k in private if k in local}
        return Message(RecordDict({protocol.ARRAYS: protocol.to_record(local_private),
                                   protocol.METRICS: reply.content.metric_records[protocol.METRICS]}),
                       reply_to=view_msg)

    out = flower_mod(view, context, handler)
    if out.has_error():  # the handler's own error reply, or the mod's refusal
        return replies[0] if replies and replies[0].has_error() else Message(out.error,
                                                                            reply_to=msg)
    reply = replies[0]
    clipped = protocol.from_record(out.content.array_records[protocol.ARRAYS])
    keys = list(reply.content.array_records[protocol.ARRAYS].keys())
    reply.content[protocol.ARRAYS] = protocol.to_record(
        {k: clipped[k] if k in clipped else public[k] for k in keys})
    reply.content[protocol.METRICS] = out.content.metric_records[protocol.METRICS]
    return reply


def clip_for_secure_sum(msg: Message, context: Context, cfg: RunConfig,
                        answer: protocol.Answer) -> protocol.Answer:
    """A train answer bound for a secure sum, as client-side DP needs it: its model clipped by
    Flower's mod, as in plaintext (`clip_reply`), and weight 1 (DP's mean is unweighted: the
    noise is calibrated to one client moving it by C / m). Any other answer is returned as is.

    `dp_clipping_mod` lets the secure-sum message through (its reply is a share, not a model),
    so the handler clips here, before `secure_upload.respond` encodes the answer."""
    flower_mod = CLIPPING_MODS.get(cfg.differential_privacy)
    if flower_mod is None or protocol.secure_sum_request(msg) is None:
        return answer
    if answer.payload:
        raise ValueError("differential privacy covers the model only: this algorithm uploads "
                         f"{sorted(answer.payload)} beside it, which no clipping bounds")

    def plain(m: Message, c: Context) -> Message:
        return protocol.reply(msg, answer.arrays, answer.metrics)

    reply = clip_reply(flower_mod, msg, context, plain)
    if reply.has_error():
        raise RuntimeError(f"Flower's clipping mod refused the train message: {reply.error.reason}")
    metrics = dict(reply.content.metric_records[protocol.METRICS])
    metrics[protocol.NUM_EXAMPLES] = 1
    return protocol.Answer(protocol.from_record(reply.content.array_records[protocol.ARRAYS]),
                           cast(dict[str, float | int], metrics))
