"""The datalayer: what epp knows about each endpoint (membership, scraped metrics, own in-flight load)."""

from epp.datalayer.datastore import Datastore
from epp.datalayer.ledger import InflightTicket, LoadLedger

__all__ = ["Datastore", "InflightTicket", "LoadLedger"]
