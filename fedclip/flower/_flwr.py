"""The Flower names fedclip uses, imported in one place: without flwr, one clear line."""

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.common import log
    from flwr.serverapp import Grid, ServerApp
except ImportError as e:
    raise ImportError(
        "fedclip's Flower backend needs flwr: install fedclip[flower] "
        "(pip install -e '.[flower]' in a checkout)"
    ) from e

__all__ = [
    "Array",
    "ArrayRecord",
    "ClientApp",
    "ConfigRecord",
    "Context",
    "Grid",
    "Message",
    "MessageType",
    "MetricRecord",
    "RecordDict",
    "ServerApp",
    "log",
]
