"""Data: the synthetic fact world, CounterFact / zsRE loaders, and the shared record type."""

from fedke.data.records import EditCase, EditRequest, RecordError, case_from_counterfact
from fedke.data.world import World, WorldConfig, make_world

__all__ = ["EditCase", "EditRequest", "RecordError", "case_from_counterfact", "World", "WorldConfig", "make_world"]
