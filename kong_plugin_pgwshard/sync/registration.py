"""Register the configured pushgateways in Consul, each with an HTTP check on /-/healthy.

Idempotent: the service ID is derived from the address, so a restart re-registers the same
entries. Every registration carries Meta {"managed-by": "pgwshard"}; entries with that meta
whose pushgateway left the config are deregistered, and entries anyone else made are left alone.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import consul

from ..core.ring import Member
from .health.consul import consul_error
from .settings import ConsulSettings

log = logging.getLogger("pgwshard.registration")
MANAGED_BY = {"managed-by": "pgwshard"}


def service_id(service: str, member: Member) -> str:
    return f"{service}-{member.host}-{member.port}"


def sync_registrations(client: consul.Consul, settings: ConsulSettings, pushgateways: Sequence[Member],
                       known_healthy: Collection[Member] = frozenset()) -> None:
    """Make the agent's pgwshard-managed registrations equal `pushgateways`.

    `known_healthy` start out passing instead of critical: an agent that returns without its
    registrations would otherwise report them critical until each first check, and the
    membership would shed healthy instances for a second. A dead one among them turns critical
    at its first check and leaves then.
    """
    reg = settings.register
    try:
        wanted = {service_id(settings.service, m): m for m in pushgateways}
        for sid, member in wanted.items():
            check = consul.Check.http(f"http://{member.name}/-/healthy", f"{reg.check_interval:g}s",
                                      timeout=f"{reg.check_timeout:g}s", deregister=f"{reg.deregister_after:g}s")
            if member in known_healthy:
                check["Status"] = "passing"
            client.agent.service.register(settings.service, service_id=sid, address=member.host, port=member.port,
                                          tags=[settings.tag] if settings.tag else None, check=check,
                                          meta=MANAGED_BY)
        for sid, service in client.agent.services().items():
            if (service.get("Meta") or {}).get("managed-by") == MANAGED_BY["managed-by"] and sid not in wanted \
                    and service.get("Service") == settings.service:
                client.agent.service.deregister(sid)
                log.info("deregistered %s: no longer in the config", sid)
    except Exception as err:  # noqa: BLE001 - py-consul raises requests' and its own errors
        mapped = consul_error(err, settings.address, "registration")
        if mapped is None:
            raise
        mapped.args = (f"consul registration failed: {mapped}",)  # the same error, saying where
        raise mapped from err
    log.info("registered %d pushgateways in consul as %r", len(wanted), settings.service)
