"""The datalayer: what epp knows about each endpoint (membership, scraped metrics, own in-flight load)."""

from epp.datalayer.datastore import Datastore, InflightTicket

__all__ = ["Datastore", "InflightTicket"]
