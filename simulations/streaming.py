"""A streaming fit stage for the legacy server loop: merge each reply as it arrives, then drop it.

Flower's legacy ``Server.fit_round`` (``flwr.server.server.fit_clients``) waits for every
client's ``FitRes`` before it calls ``strategy.aggregate_fit(results, failures)``, so the server
holds all N replies at once (GPT-2 XL-shaped payloads: ~0.6 GiB each, bench/privacy.py section
``large_layers``). fedke's strategies need only running sums (:class:`fedke.strategies.base.RoundAggregation`),
so this module's :class:`StreamingServer` replaces that one step and nothing else:

1. ``strategy.configure_fit`` samples the clients and builds their ``FitIns`` (unchanged);
2. one TRAIN message per sampled node is built exactly as Flower's ``GridClientProxy.fit`` builds
   it (``fitins_to_recorddict``, ``group_id`` = the round, ``ttl`` = the round timeout) and
   pushed with ``Grid.push_messages``;
3. the replies are polled with ``Grid.pull_messages`` one message id at a time (so at most one
   reply is pulled into this process at a time; the others wait in the SuperLink), each converted
   with ``recorddict_to_fitres`` and fed to ``aggregation.add_reply`` (decode, validate, add to the
   merger's sums), then deleted before the next pull;
4. ``aggregation.finish()`` merges, commits, computes the metrics and calls ``on_round_end``,
   exactly as ``aggregate_fit`` does.

Failures are those of the legacy loop: a reply carrying an error (a client exception, or the
SuperLink's reply to a message whose TTL expired) becomes the same ``ValueError`` that
``GridClientProxy`` raises; a reply whose status is not OK becomes ``(proxy, FitRes)``; a node that
has not replied when the round timeout (plus a grace period for the SuperLink's own TTL reply) has
passed becomes a ``TimeoutError``; an exception from the grid while pushing or pulling becomes a
failure of that node. With no round timeout the loop waits, as the legacy one does, for every reply.

Everything else stays the legacy ``Server.fit``: initial parameters, the server-side (oracle)
evaluation, federated evaluation through ``evaluate_round`` (the clients' small metrics dicts are
collected as before), the History, and the checkpoint hooks of
:class:`fedke.simulations.resume.ResumableStrategy` (which forwards ``begin_round``). The
merge is ``aggregate_fit`` fed the replies in arrival order (the legacy loop's order is that of a
set of futures): with CollabEdit's float64 running sums, identical up to float64 rounding and
bit-identical for the same order (tests/test_streaming.py).

Opt in with the run-config key ``streaming-aggregation = true`` (:func:`fedke.simulations.server_app.main`).
The strategy must offer ``begin_round`` (every :class:`fedke.strategies.EditMergeStrategy`); SecAgg+
runs keep their own workflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from logging import ERROR, INFO
from typing import Any

from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, Parameters, Scalar
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Server
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

__all__ = ["StreamingServer", "stream_fit"]

#: Seconds between two polls of the pending replies.
POLL_INTERVAL = 0.2
#: Seconds after the round timeout before a silent node counts as failed (lets the SuperLink's own
#: TTL-expiry reply arrive first, so the failure reads as in the legacy loop).
TIMEOUT_GRACE = 5.0


def _error_failure(reply: Message) -> ValueError:
    """The exception Flower's ``GridClientProxy`` raises for a reply that carries an error."""
    return ValueError(
        f"Message contains an Error (reason: {reply.error.reason}). "
        "It originated during client-side execution of a message."
    )


def _train_message(ins: FitIns, node_id: int, group_id: int | None, timeout: float | None) -> Message:
    """The TRAIN message ``GridClientProxy.fit`` would send for ``ins``."""
    return Message(
        content=compat.fitins_to_recorddict(ins, keep_input=True),
        message_type=MessageType.TRAIN,
        dst_node_id=node_id,
        group_id=str(group_id) if group_id else "",
        ttl=timeout,
    )


def stream_fit(
    aggregation: Any,
    client_instructions: Sequence[tuple[ClientProxy, FitIns]],
    *,
    timeout: float | None,
    group_id: int | None,
    poll_interval: float = POLL_INTERVAL,
    timeout_grace: float = TIMEOUT_GRACE,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, int]:
    """Push one TRAIN message per instruction, feed every reply to ``aggregation`` as it arrives.

    ``aggregation`` is a :class:`fedke.strategies.base.RoundAggregation` (``add_reply`` /
    ``add_failure``); it is not finished here. Every proxy must be a Grid proxy (``grid`` and
    ``node_id`` attributes, as Flower's ``GridClientProxy``). Returns counts:
    ``{"pushed", "replies", "failures", "timed_out"}``.
    """
    counts = {"pushed": 0, "replies": 0, "failures": 0, "timed_out": 0}
    pending: dict[str, tuple[Any, ClientProxy]] = {}  # message id -> (grid, proxy)
    instructions = list(client_instructions)
    for proxy, _ in instructions:
        if not (hasattr(proxy, "grid") and hasattr(proxy, "node_id")):
            raise TypeError(f"streaming aggregation needs Grid client proxies (start_grid); got {type(proxy).__name__}")
    while instructions:  # one message built and pushed at a time: N copies of the update never coexist
        proxy, ins = instructions.pop(0)
        try:
            message = _train_message(ins, proxy.node_id, group_id, timeout)
            del ins
            ids = list(proxy.grid.push_messages([message]))
            del message
            if len(ids) != 1 or not ids[0]:
                raise ValueError(f"pushing the TRAIN message to node {proxy.node_id} returned ids {ids}")
        except Exception as failure:  # noqa: BLE001 - as the legacy loop: the node's exception is its failure
            aggregation.add_failure(failure)
            counts["failures"] += 1
            continue
        pending[ids[0]] = (proxy.grid, proxy)
        counts["pushed"] += 1
    deadline = None if timeout is None else clock() + float(timeout) + float(timeout_grace)
    while pending:
        for message_id in list(pending):
            grid, proxy = pending[message_id]
            try:
                replies = list(grid.pull_messages([message_id]))
            except Exception as failure:  # noqa: BLE001
                del pending[message_id]
                aggregation.add_failure(failure)
                counts["failures"] += 1
                continue
            if not replies:
                continue
            del pending[message_id]
            if len(replies) != 1:
                aggregation.add_failure(ValueError(f"Expected one Message but got: {len(replies)}"))
                counts["failures"] += 1
                continue
            reply = replies.pop()
            counts["replies"] += 1
            if _feed(aggregation, proxy, reply):
                counts["failures"] += 1
            del reply  # the reply's bytes die here, before the next pull
        if not pending:
            break
        if deadline is not None and clock() >= deadline:
            for message_id, (_, proxy) in pending.items():
                aggregation.add_failure(TimeoutError(
                    f"node {proxy.node_id}: no reply to message {message_id} within the round timeout of {timeout} s"))
                counts["failures"] += 1
                counts["timed_out"] += 1
            pending.clear()
            break
        sleep(poll_interval)
    return counts


def _feed(aggregation: Any, proxy: ClientProxy, reply: Message) -> bool:
    """One reply into the aggregation, as the legacy ``fit_clients`` sorts it; True if a failure.

    Never raises for a reply: one that cannot be read becomes a failure of its node, and the
    aggregation validates (and rejects) the rest. Should ``add_reply`` itself raise (a bug, since it
    rejects bad replies), the error is logged and counted as that node's failure, and the round goes on.
    """
    try:
        if reply.has_error():
            aggregation.add_failure(_error_failure(reply))
            return True
        fit_res = compat.recorddict_to_fitres(reply.content, keep_input=False)
        status_ok = fit_res.status.code == Code.OK
    except Exception as failure:  # noqa: BLE001 - the legacy proxy raises it in the client's thread
        aggregation.add_failure(failure)
        return True
    if not status_ok:
        aggregation.add_failure((proxy, fit_res))
        return True
    try:
        aggregation.add_reply(proxy, fit_res)
    except Exception as failure:  # noqa: BLE001 - the last net: one reply never ends the round
        log(ERROR, "streamed fit: handling the reply of node %s raised %s", getattr(proxy, "node_id", "?"),
            type(failure).__name__)
        aggregation.add_failure(failure)
        return True
    return False


class StreamingServer(Server):
    """Flower's legacy ``Server`` whose fit stage merges replies as they arrive (:func:`stream_fit`).

    Use it with ``flwr.server.compat.start_grid(server=StreamingServer(...), ...)``; everything but
    ``fit_round`` is the legacy server. The third element ``fit_round`` returns, the replies and
    failures, is ``([], [])``: nothing keeps the replies (``Server.fit`` does not use them).
    """

    def __init__(self, *, client_manager: ClientManager, strategy: Strategy, poll_interval: float = POLL_INTERVAL,
                 timeout_grace: float = TIMEOUT_GRACE) -> None:
        if not callable(getattr(strategy, "begin_round", None)):
            raise TypeError(f"streaming aggregation needs a strategy with begin_round (a fedke EditMergeStrategy); "
                            f"got {type(strategy).__name__}")
        super().__init__(client_manager=client_manager, strategy=strategy)
        self.poll_interval = float(poll_interval)
        self.timeout_grace = float(timeout_grace)
        #: Per round: the counts :func:`stream_fit` returned.
        self.stream_counts: list[dict[str, int]] = []

    def fit_round(self, server_round: int, timeout: float | None
                  ) -> tuple[Parameters | None, dict[str, Scalar], tuple[list, list]] | None:
        client_instructions = self.strategy.configure_fit(
            server_round=server_round, parameters=self.parameters, client_manager=self._client_manager)
        if not client_instructions:
            log(INFO, "configure_fit: no clients selected, cancel")
            return None
        log(INFO, "configure_fit: strategy sampled %s clients (out of %s); streaming their replies",
                 len(client_instructions), self._client_manager.num_available())
        aggregation = self.strategy.begin_round(server_round)
        counts = stream_fit(aggregation, client_instructions, timeout=timeout, group_id=server_round,
                            poll_interval=self.poll_interval, timeout_grace=self.timeout_grace)
        del client_instructions
        self.stream_counts.append(counts)
        log(INFO, "streamed fit: received %s replies and %s failures", counts["replies"], counts["failures"])
        parameters, metrics = aggregation.finish()
        return parameters, metrics, ([], [])
