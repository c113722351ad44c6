from peftserve.v1 import adapters_pb2 as _adapters_pb2
from peftserve.v1 import generate_pb2 as _generate_pb2
from peftserve.v1 import server_info_pb2 as _server_info_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
