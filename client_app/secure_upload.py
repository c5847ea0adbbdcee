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

Usage in a ClientApp:

    @app.train(mods=[secure_upload_mod])
    def train(msg, context):
        if (request := secure_sum_request(msg)) is not None:
            return secure_sum_reply(msg, plaintext_arrays_for(msg, request))
        ...  # plain training
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextvars import ContextVar

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from feddifrc_core.secure_encoding import encode, encode_octaves
from wire.protocol import (
    LAYOUT,
    MODE_BOUNDED,
    MODE_ENCODED,
    MODE_OCTAVES,
    secure_sum_request,
)

# True only while secure_upload_mod hands a masked-vector stage to the handler: a reply built
# anywhere else would leave in plaintext (no mod installed, or a request without SecAgg+).
_MASKING: ContextVar[bool] = ContextVar("secure_upload_masking", default=False)


def secure_sum_reply(msg: Message, arrays: Mapping[str, np.ndarray]) -> Message:
    """Reply to the masked-vector stage with `arrays` (plaintext, this client's own) encoded as
    the request says, in the FitRes layout `secaggplus_mod` masks."""
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
    layout = [[name, list(x.shape), str(np.asarray(arrays[name]).dtype)]
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
