"""envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit on the limiter's port."""

from __future__ import annotations

import math
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from services.kit.errors import InvalidArgument
from services.limiter.config import LimiterSettings
from services.limiter.envoy import UINT32_MAX, Descriptor, EnvoyLimiter

SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name

_OK = rls_pb2.RateLimitResponse.OK
_OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


class EnvoyRateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, limiter: EnvoyLimiter, settings: LimiterSettings) -> None:
        self.limiter = limiter
        self.s = settings

    def _descriptors(self, request: rls_pb2.RateLimitRequest) -> list[Descriptor]:
        s = self.s
        if not request.domain:
            raise InvalidArgument("domain", "rate limit domain must not be empty")
        if len(request.domain) > s.max_id_length:
            raise InvalidArgument("domain", f"is longer than {s.max_id_length} characters")
        if not request.descriptors:
            raise InvalidArgument("descriptors", "rate limit descriptor list must not be empty")
        if len(request.descriptors) > s.max_descriptors:
            raise InvalidArgument("descriptors", f"at most {s.max_descriptors} descriptors per request")
        if request.hits_addend > s.max_tokens:
            raise InvalidArgument("hits_addend", f"must be at most {s.max_tokens}")
        default_hits = request.hits_addend or 1
        out = []
        for i, d in enumerate(request.descriptors):
            path = f"descriptors[{i}]"
            if not d.entries:
                raise InvalidArgument(f"{path}.entries", "a descriptor needs at least one entry")
            if len(d.entries) > s.max_entries:
                raise InvalidArgument(f"{path}.entries", f"at most {s.max_entries} entries per descriptor")
            entries = []
            for j, e in enumerate(d.entries):
                if not e.key:
                    raise InvalidArgument(f"{path}.entries[{j}].key", "must not be empty")
                if len(e.key) > s.max_id_length:
                    raise InvalidArgument(
                        f"{path}.entries[{j}].key", f"is longer than {s.max_id_length} characters"
                    )
                if len(e.value) > 4 * s.max_id_length:
                    raise InvalidArgument(
                        f"{path}.entries[{j}].value", f"is longer than {4 * s.max_id_length} characters"
                    )
                entries.append((e.key, e.value))
            hits = default_hits
            if d.HasField("hits_addend"):
                hits = d.hits_addend.value
                if hits > s.max_tokens:
                    raise InvalidArgument(f"{path}.hits_addend", f"must be at most {s.max_tokens}")
            override = None
            if d.HasField("limit"):
                override = (d.limit.requests_per_unit, int(d.limit.unit))
            out.append(Descriptor(tuple(entries), hits, override))
        return out

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rls_pb2.RateLimitResponse:
        over, verdicts = await self.limiter.should_rate_limit(request.domain, self._descriptors(request))
        response = rls_pb2.RateLimitResponse(overall_code=_OVER if over else _OK)
        for v in verdicts:
            status = response.statuses.add(code=_OVER if v.over else _OK)
            lim = v.limit
            if lim is None:
                continue
            if lim.unlimited:
                status.limit_remaining = UINT32_MAX
                continue
            status.current_limit.CopyFrom(
                rls_pb2.RateLimitResponse.RateLimit(
                    name=lim.name,
                    requests_per_unit=lim.requests_per_unit,
                    unit=lim.unit,
                )
            )
            status.limit_remaining = max(0, min(v.remaining, UINT32_MAX))
            # Whole seconds, rounded up: upstream counts from the Unix second (window end - now).
            status.duration_until_reset.CopyFrom(duration_pb2.Duration(seconds=math.ceil(v.reset_ms / 1000)))
        return response
