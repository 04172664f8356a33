"""pgwshard: shard Prometheus Pushgateway pushes by grouping key behind Kong."""

__version__ = "0.1.0"

from .core.grouping import GroupingKey, parse_push_path  # noqa: E402
from .core.ring import Member, Ring  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    GroupingKeyError,
    NoMembersError,
    PgwshardError,
    UpstreamError,
)

__all__ = [
    "__version__",
    "ConfigError",
    "GroupingKey",
    "GroupingKeyError",
    "Member",
    "NoMembersError",
    "PgwshardError",
    "Ring",
    "UpstreamError",
    "parse_push_path",
]
