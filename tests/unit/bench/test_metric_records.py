"""bench/metric_records.py compares what it says it compares: the SDK's instruments and tallies."""

from __future__ import annotations

from bench.metric_records import VARIANTS, variant_meter
from services.kit.tallies import TallyCounter, TallyHistogram
from services.kit.telemetry import setup_telemetry


def test_the_sdk_variant_records_through_the_sdk_and_the_other_through_tallies() -> None:
    kinds = {}
    for variant in VARIANTS:
        telemetry = setup_telemetry("bench", environ={})
        try:
            meter = variant_meter(variant, telemetry)
            counter = meter.create_counter("bench.calls")
            histogram = meter.create_histogram("bench.duration", unit="s")
            kinds[variant] = (isinstance(counter, TallyCounter), isinstance(histogram, TallyHistogram))
        finally:
            telemetry.shutdown()
    assert kinds == {"sdk": (False, False), "tallies": (True, True)}
