"""``flwr run .``'s ClientApp: each SuperNode is one editing client of the scenario.

``partition-id`` (from the node config) picks the client's private requests; nodes beyond the
scenario's number of clients stay idle (they send empty payloads).
"""

from __future__ import annotations

from flwr.client import ClientApp
from flwr.common import Context

from .client import EditClient
from .runtime import dealt_cases_for, testbed_for
from .scenario import Scenario


def make_client(scenario: Scenario, partition_id: int) -> EditClient:
    bed = testbed_for(scenario)
    dealt = dealt_cases_for(scenario)
    cases_by_round = {r: cases for (client, r), cases in dealt.items() if client == partition_id}
    editor = bed.editor(**scenario.memit_overrides())
    return EditClient(editor, bed.model, bed.tokenizer, cases_by_round, wire_dtype=scenario.wire_dtype)


def client_fn(context: Context):
    scenario = Scenario.from_run_config(context.run_config)
    partition_id = int(context.node_config.get("partition-id", 0))
    return make_client(scenario, partition_id).to_client()


app = ClientApp(client_fn=client_fn)
