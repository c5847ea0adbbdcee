"""Client half of the secure sums: answer Flower's SecAgg+ stages with a plaintext vector.

Contract (the server half is server_app/secure_aggregation.py; the request's record, the
layout key and the modes are wire/protocol.py's):
- One secure sum is four "train" messages (Flower's SecAgg+ stages: set-up, key sharing, masked
  vectors, unmasking). Flower's `secaggplus_mod` answers three of them itself; only the
  masked-vector stage reaches the ClientApp's train handler, with the server's own content plus
  a `secure-sum` ConfigRecord (`secure_sum_request`: stage id, rounding seed, clipping range and
  what to send: the arrays scaled by the server's public bounds, or their magnitude octaves).
- The handler computes its plaintext arrays and returns `secure_sum_reply(msg, arrays)`: encoded
  per the request (feddifrc_core.secure_encoding; a value beyond its bound raises
  `ClippingError` instead of being clipped), in the FitRes layout the mod reads, with
  num_examples 1 (weights travel inside the arrays, masked) and, in plaintext, only the layout
  (names, shapes, dtypes). The mod masks the arrays and drops them from the reply.
- `secure_upload_mod` routes train messages that carry SecAgg+ configs through Flower's mod and
  seeds numpy's global RNG (which Flower's stochastic rounding draws from) with the request's
  seed right after the handler returns, restoring the previous RNG state afterwards: reruns and
  resumes give bit-identical sums. Every other message passes through untouched.

Usage in a ClientApp (client_app/app.py): the handler computes its `protocol.Answer` and
`respond` packs it as the message asks, a plain reply or a share of a secure sum:

    @app.train(mods=[secure_upload_mod])
    def train(msg, context):
        return respond(msg, context, lambda: answer_for(msg))

A secure upload is two secure sums of the same answer (the magnitude round that fixes the public
bounds, then the sum itself): the answer is computed once, kept in the node's `context.state`
(client-side, like Flower's own SecAgg+ keys) between the two, and dropped after the second (the
server sends the stage's content, e.g. the global model, with the first sum only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextvars import ContextVar

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from feddifrc_core.secure_encoding import encode, encode_octaves
from feddifrc_core.secure_uploads import secure_vector
from wire import protocol
from wire.protocol import (
    LAYOUT,
    MODE_BOUNDED,
    MODE_ENCODED,
    MODE_OCTAVES,
    secure_sum_request,
)

# context.state keys of the answer kept between the magnitude round and the sum
_KEPT_ARRAYS, _KEPT_INFO = "feddifrc.secure-answer", "feddifrc.secure-answer-info"


def respond(msg: Message, context: Context, compute: Callable[[], protocol.Answer]) -> Message:
    """The reply to a set-up or train request: `compute()`'s answer in plaintext, or, inside
    SecAgg+'s masked-vector stage, this client's share of the stage's secure sum."""
    secure = secure_sum_request(msg)
    if secure is None:
        answer = compute()
        return protocol.reply(msg, answer.arrays, answer.metrics, answer.payload)
    request = protocol.read_request(msg)
    key = f"{request.stage or 'train'}@{request.server_round}"  # the same for both sums
    state = context.state
    info = state.config_records.get(_KEPT_INFO)
    if info is not None and info.get("key") == key:
        vector = protocol.from_record(state.array_records[_KEPT_ARRAYS])
        dtypes = json.loads(str(info["dtypes"]))
    elif secure.mode == MODE_BOUNDED:  # the server sends the content with the first sum only
        raise RuntimeError(f"no answer kept for {key} from the magnitude round (this node's "
                           "state was lost): this node drops out of the sum")
    else:
        answer = compute()
        reference = request.arrays if request.rule == "mean" and request.arrays else None
        vector, dtypes = secure_vector(answer.arrays, answer.metrics, answer.payload,
                                       request.rule, reference)
        # Kept for the sum that follows the magnitude round (one answer at a time).
        state[_KEPT_ARRAYS] = protocol.to_record(vector)
        state[_KEPT_INFO] = ConfigRecord({"key": key, "dtypes": json.dumps(dtypes)})
    if secure.mode == MODE_BOUNDED:  # the last sum of this answer
        for name in (_KEPT_ARRAYS, _KEPT_INFO):
            if name in state:
                del state[name]
    return secure_sum_reply(msg, vector, dtypes)

# True only while secure_upload_mod hands a masked-vector stage to the handler: a reply built
# anywhere else would leave in plaintext (no mod installed, or a request without SecAgg+).
_MASKING: ContextVar[bool] = ContextVar("secure_upload_masking", default=False)


def secure_sum_reply(msg: Message, arrays: Mapping[str, np.ndarray],
                     dtypes: Mapping[str, str] | None = None) -> Message:
    """Reply to the masked-vector stage with `arrays` (plaintext, this client's own) encoded as
    the request says, in the FitRes layout `secaggplus_mod` masks. `dtypes`: the dtype the server
    should restore per array where it is not the array's own (e.g. a float32 model sent as
    float64 example-weighted updates)."""
    request = secure_sum_request(msg)
    if request is None:
        raise ValueError("secure_sum_reply answers only a secure-sum request (secure_sum_request)")
    if not _MASKING.get():
        raise RuntimeError("a secure-sum request outside SecAgg+'s masked-vector stage: the arrays "
                           "would leave unmasked. Register the train handler with "
                           "mods=[secure_upload_mod]; refusing to answer.")
    c = request.clipping_range
    if request.mode == MODE_BOUNDED:
        encoded = encode(arrays, request.bounds, c)
    elif request.mode == MODE_OCTAVES:
        encoded = encode_octaves(arrays, c)
    elif request.mode == MODE_ENCODED:
        encoded = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
        for name, x in encoded.items():
            if not np.all(np.isfinite(x)) or (x.size and float(np.abs(x).max()) > c):
                raise ValueError(f"array '{name}' is not within +-{c:g} (secagg-clipping-range)")
    else:
        raise ValueError(f"unknown secure-sum mode {request.mode!r}")
    layout = [[name, list(x.shape), (dtypes or {}).get(name, str(np.asarray(arrays[name]).dtype))]
              for name, x in encoded.items()]
    # Flat 1-d arrays on the wire: flwr 1.39 leaves a 0-d array (e.g. BatchNorm's step counter)
    # unshifted and unscaled when it unmasks (an in-place update of a numpy scalar is lost).
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters([x.reshape(-1) for x in encoded.values()]),
                    num_examples=1, metrics={LAYOUT: json.dumps(layout)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_upload_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for secure-sum messages, with seeded stochastic rounding."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)  # not SecAgg+: plain training and every query
    request = secure_sum_request(msg)  # only the masked-vector stage carries one
    if request is None:
        return secaggplus_mod(msg, context, call_next)
    seed = request.rounding_seed

    def handler_then_seed(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        # Flower's quantize() is the next to draw from numpy's global RNG (its masks use their
        # own generators, the share decryption none).
        np.random.seed(seed)
        return reply

    saved, token = np.random.get_state(), _MASKING.set(True)
    try:
        return secaggplus_mod(msg, context, handler_then_seed)
    finally:
        _MASKING.reset(token)
        np.random.set_state(saved)  # this process's other users of numpy's RNG see no change
