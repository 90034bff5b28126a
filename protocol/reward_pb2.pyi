from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[ItemStatus]
    UNKNOWN_QUERY: _ClassVar[ItemStatus]
OK: ItemStatus
UNKNOWN_QUERY: ItemStatus

class Group(_message.Message):
    __slots__ = ("request_id", "query_id", "doc_id", "completions")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    query_id: str
    doc_id: str
    completions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., query_id: _Optional[str] = ..., doc_id: _Optional[str] = ..., completions: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    def __init__(self, groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ...) -> None: ...

class CompletionReward(_message.Message):
    __slots__ = ("format", "relevance", "total", "judgment")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    JUDGMENT_FIELD_NUMBER: _ClassVar[int]
    format: float
    relevance: float
    total: float
    judgment: int
    def __init__(self, format: _Optional[float] = ..., relevance: _Optional[float] = ..., total: _Optional[float] = ..., judgment: _Optional[int] = ...) -> None: ...

class GroupReward(_message.Message):
    __slots__ = ("request_id", "status", "error", "label", "rewards", "mean", "std")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    status: ItemStatus
    error: str
    label: int
    rewards: _containers.RepeatedCompositeFieldContainer[CompletionReward]
    mean: float
    std: float
    def __init__(self, request_id: _Optional[str] = ..., status: _Optional[_Union[ItemStatus, str]] = ..., error: _Optional[str] = ..., label: _Optional[int] = ..., rewards: _Optional[_Iterable[_Union[CompletionReward, _Mapping]]] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("groups",)
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupReward]
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupReward, _Mapping]]] = ...) -> None: ...
