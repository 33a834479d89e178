"""``flwr run .``'s ClientApp: each SuperNode is one editing client of the scenario.

``partition-id`` (from the node config) picks the client's private requests; nodes beyond the
scenario's number of clients stay idle (they send empty payloads).
"""

from __future__ import annotations

from flwr.client import ClientApp
from flwr.common import Context

from fedke.conflict import SECRET_ENV, ConflictAgent, load_secret, make_policy, world_augmentation

from .client import EditClient
from .message_client import message_api_mod
from .runtime import dealt_cases_for, testbed_for
from .scenario import Scenario


def make_client(scenario: Scenario, partition_id: int, *, secret: str | None = None, state=None) -> EditClient:
    """Client ``partition_id`` of the scenario. With ``conflict-detection`` on, its federation
    secret is ``secret`` (the node config's ``federation-secret``), else the run config's
    ``conflict-secret`` (simulations only), else ``$FEDKE_FEDERATION_SECRET``. ``state`` is where
    it keeps what must outlive one message (layer-wise targets): the ClientApp's ``context.state``."""
    bed = testbed_for(scenario)
    dealt = dealt_cases_for(scenario)
    cases_by_round = {r: cases for (client, r), cases in dealt.items() if client == partition_id}
    editor = bed.editor(**scenario.memit_overrides())
    agent = None
    if scenario.conflict_detection != "off":
        key = load_secret(secret or scenario.conflict_secret or None)
        if key is None:
            raise ValueError(f"conflict-detection = {scenario.conflict_detection!r} needs a federation secret on "
                             f"every client: set ${SECRET_ENV} (or the node config key federation-secret)")
        agent = ConflictAgent(key, mode=scenario.conflict_detection,
                              policy=make_policy(scenario.conflict_policy, scenario.conflict_priority),
                              augment=world_augmentation(bed.world) if scenario.conflict_augment else None,
                              name=str(partition_id))
    return EditClient(editor, bed.model, bed.tokenizer, cases_by_round, wire_dtype=scenario.wire_dtype,
                      residual_guard=scenario.residual_guard, conflict_agent=agent,
                      secure_aggregation=scenario.secure_aggregation, state=state)


def edit_client(context: Context) -> EditClient:
    """This node's client of the run's scenario (``partition-id`` and ``federation-secret`` from the node config)."""
    scenario = Scenario.from_run_config(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    secret = context.node_config.get("federation-secret")
    return make_client(scenario, partition_id, secret=str(secret) if secret else None, state=context.state)


def client_fn(context: Context):
    return edit_client(context).to_client()


def secure_aggregation_mod(msg, ctxt, call_next):
    """Flower's ``secaggplus_mod`` when the run config (or this node's config) asks for secure aggregation.

    With the mod in place every edit (TRAIN) message must follow the SecAgg+ stages, and the
    reply to the fit stage is the masked vector only (the mod clears the plain arrays). A node
    that must never reply in the clear sets ``secure-aggregation=true`` in its ``--node-config``:
    then a run without SecAgg+ fails on this node instead of receiving its payload.
    """
    from flwr.client.mod import secaggplus_mod

    wanted = bool(ctxt.run_config.get("secure-aggregation", False)) or \
        str(ctxt.node_config.get("secure-aggregation", "false")).lower() == "true"
    return secaggplus_mod(msg, ctxt, call_next) if wanted else call_next(msg, ctxt)


#: One ClientApp for both server styles: new-style messages (``flower-api = "message"``) are answered by
#: :func:`fedke.simulations.message_client.message_api_mod`, the legacy loop's by ``client_fn``.
app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod, message_api_mod(edit_client)])
