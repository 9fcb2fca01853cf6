"""Write a FileDescriptorSet for envoy.service.ext_proc.v3 from the xds-protos descriptors."""

from __future__ import annotations

import argparse

from envoy.service.ext_proc.v3 import external_processor_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor


def protoset() -> descriptor_pb2.FileDescriptorSet:
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        out.file.append(proto)

    add(external_processor_pb2.DESCRIPTOR)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-o", "--output", default="ext_proc.protoset")
    args = ap.parse_args()
    data = protoset().SerializeToString()
    with open(args.output, "wb") as f:
        f.write(data)
    print(f"wrote {args.output} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
