"""pgwshard: shard Prometheus Pushgateway pushes by grouping key behind Kong."""

__version__ = "0.1.0"

from .errors import ConfigError, GroupingKeyError, NoMembersError, PgwshardError, UpstreamError  # noqa: E402
from .grouping import GroupingKey, parse_push_path  # noqa: E402
from .ring import Member, Ring  # noqa: E402

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
