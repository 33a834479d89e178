"""The client side of the Message API: an :class:`EditClient` answering new-style ``Message``s.

A Message-API strategy (:mod:`fedke.strategies.message`) sends ``RecordDict({"arrays":
ArrayRecord, "config": ConfigRecord})``; the reply is ``RecordDict({"arrays": ArrayRecord,
"metrics": MetricRecord})`` with the payload as named arrays (:mod:`fedke.records`) and its
``n_edits`` as ``"num-examples"``. The editing is :meth:`EditClient.edit` /
:meth:`EditClient.edit_layer_step` / :meth:`EditClient.evaluate_update`, exactly what a legacy
``fit`` / ``evaluate`` runs; only the wire form differs.

A ClientApp of your own answers with these functions::

    app = ClientApp()

    @app.train()
    def train(message, context):
        return train_reply(my_edit_client(context), message)

fedke's own ClientApp serves both server styles: :func:`message_api_mod` answers new-style
messages and passes the legacy ones (``fitins.*`` / ``evaluateins.*`` records) on to the
``NumPyClient`` path.
"""

from __future__ import annotations

from typing import Any, Callable

from flwr.app import Context, Message, MessageType, RecordDict

from fedke.codec import PayloadError
from fedke.records import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES, layer_step_from_named, named_arrays,
                           numeric_metrics, payload_to_named, to_array_record, update_from_named)

from .client import EditClient

__all__ = ["evaluate_reply", "is_message_api", "message_api_mod", "train_reply"]


def is_message_api(message: Message) -> bool:
    """Whether ``message`` is a new-style train / evaluate message (an ``"arrays"`` ArrayRecord and a
    ``"config"`` ConfigRecord) rather than the legacy loop's ``fitins.*`` / ``evaluateins.*`` records."""
    if message.metadata.message_type.split(".")[0] not in (MessageType.TRAIN, MessageType.EVALUATE):
        return False
    content = message.content
    return ARRAYS_KEY in content.array_records and CONFIG_KEY in content.config_records


def _config(message: Message) -> dict[str, Any]:
    """The message's config, with Flower's ``"server-round"`` as fedke's ``server_round`` where it lacks one."""
    config = dict(message.content.config_records[CONFIG_KEY])
    if "server_round" not in config and "server-round" in config:
        config["server_round"] = config["server-round"]
    return config


def train_reply(client: EditClient, message: Message) -> Message:
    """``client`` edits the round the message asks for; the reply carries its payload as named arrays."""
    config = _config(message)
    named = named_arrays(message.content.array_records[ARRAYS_KEY])
    if "layer_step" in config:
        step = client.check_layer_step(config)
        round_start, merged = layer_step_from_named(named, expected=client.layer_specs,
                                                    merged_expected=client.layer_specs[:step])
        payload, metrics = client.edit_layer_step(round_start, merged, config)
        arrays = payload_to_named(payload, dtype=client.wire_dtype, send_delta=False)
    else:
        if client.secure_aggregation:
            raise PayloadError("secure aggregation runs on the legacy path only (Flower's SecAgg+ workflow); "
                               "this client was asked to reply in the clear through the Message API")
        payload, metrics = client.edit(update_from_named(named, expected=client.layer_specs), config)
        arrays = payload_to_named(payload, dtype=client.wire_dtype)
    metrics["payload_bytes"] = int(sum(array.nbytes for array in arrays.values()))
    content = RecordDict({ARRAYS_KEY: to_array_record(arrays),
                          METRICS_KEY: numeric_metrics({**metrics, NUM_EXAMPLES: int(payload.n_edits)})})
    return Message(content=content, reply_to=message)


def evaluate_reply(client: EditClient, message: Message) -> Message:
    """``client`` evaluates its own edited requests on the global model (``"num-examples"``: how many)."""
    named = named_arrays(message.content.array_records[ARRAYS_KEY])
    loss, count, metrics = client.evaluate_update(update_from_named(named, expected=client.layer_specs),
                                                  _config(message))
    content = RecordDict({METRICS_KEY: numeric_metrics({**metrics, "loss": loss, NUM_EXAMPLES: int(count)})})
    return Message(content=content, reply_to=message)


def message_api_mod(make_client: Callable[[Context], EditClient]) -> Callable[[Message, Context, Any], Message]:
    """A ClientApp mod that answers new-style messages with ``make_client(context)`` and passes every other
    message (the legacy loop's) on unchanged."""

    def mod(message: Message, context: Context, call_next: Any) -> Message:
        if not is_message_api(message):
            return call_next(message, context)
        client = make_client(context)
        if message.metadata.message_type.split(".")[0] == MessageType.TRAIN:
            return train_reply(client, message)
        return evaluate_reply(client, message)

    return mod

