from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_KIND_UNSPECIFIED: _ClassVar[AdapterKind]
    ADAPTER_KIND_LORA: _ClassVar[AdapterKind]
    ADAPTER_KIND_BOTTLENECK: _ClassVar[AdapterKind]
    ADAPTER_KIND_PREFIX_TUNING: _ClassVar[AdapterKind]
    ADAPTER_KIND_PROMPT_TUNING: _ClassVar[AdapterKind]
    ADAPTER_KIND_PROMPT_TEMPLATE: _ClassVar[AdapterKind]

class Residency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_UNSPECIFIED: _ClassVar[Residency]
    RESIDENCY_DEVICE: _ClassVar[Residency]
    RESIDENCY_HOST: _ClassVar[Residency]
    RESIDENCY_DISK: _ClassVar[Residency]
ADAPTER_KIND_UNSPECIFIED: AdapterKind
ADAPTER_KIND_LORA: AdapterKind
ADAPTER_KIND_BOTTLENECK: AdapterKind
ADAPTER_KIND_PREFIX_TUNING: AdapterKind
ADAPTER_KIND_PROMPT_TUNING: AdapterKind
ADAPTER_KIND_PROMPT_TEMPLATE: AdapterKind
RESIDENCY_UNSPECIFIED: Residency
RESIDENCY_DEVICE: Residency
RESIDENCY_HOST: Residency
RESIDENCY_DISK: Residency

class InlineAdapter(_message.Message):
    __slots__ = ("files",)
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("name", "path", "inline", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    inline: InlineAdapter
    replace: bool
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., inline: _Optional[_Union[InlineAdapter, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "kind", "source", "ranks", "num_params", "num_bytes", "residency", "load_seconds", "requests_served", "registered_at_unix")
    class RanksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: AdapterKind
    source: str
    ranks: _containers.ScalarMap[str, int]
    num_params: int
    num_bytes: int
    residency: Residency
    load_seconds: float
    requests_served: int
    registered_at_unix: float
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[AdapterKind, str]] = ..., source: _Optional[str] = ..., ranks: _Optional[_Mapping[str, int]] = ..., num_params: _Optional[int] = ..., num_bytes: _Optional[int] = ..., residency: _Optional[_Union[Residency, str]] = ..., load_seconds: _Optional[float] = ..., requests_served: _Optional[int] = ..., registered_at_unix: _Optional[float] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class UnregisterAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
