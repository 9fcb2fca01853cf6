from epp.cli import entrypoint

entrypoint()
