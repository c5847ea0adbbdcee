"""Probe ClientApp: adds 1 + partition-id to the model, after an optional delay."""

import time
from typing import cast

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    time.sleep(float(cast(float, msg.content.config_records["config"]["delay"])))
    pid = int(context.node_config["partition-id"])
    arrays = msg.content.array_records["arrays"].to_numpy_ndarrays()
    out = ArrayRecord([a + 1.0 + pid for a in arrays])
    metrics = MetricRecord({"num-examples": 1, "partition-id": pid})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)
