"""The ext_proc service's descriptors with every file they import, as a protoset, for ghz
against servers that serve no reflection (the floors).

    python benchmarks/ghz/protoset.py OUT_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import descriptor_pb2


def write_protoset(out: Path) -> Path:
    """Write the protoset (imports before the files that need them) to ``out``; returns it."""
    files: dict[str, Any] = {}  # insertion order: dependencies first

    def add(fd: Any) -> None:
        if fd.name in files:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files[fd.name] = proto

    add(pb.DESCRIPTOR)
    out.write_bytes(descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString())
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write_protoset(Path(sys.argv[1]))
