"""The profile's idle-time accounting (benchmarks/kernels.py): gaps between merged kernel spans, by length."""

from benchmarks.kernels import idle_time


def test_idle_time_counts_gaps_between_merged_spans_by_length():
    # two overlapping kernels (other streams) merge; gaps of 1 µs, 2 µs, 50 µs and 170 µs
    spans = [(0, 10, "a"), (11, 20, "b"), (15, 30, "c"), (80, 90, "d"), (92, 100, "e"), (270, 300, "d")]
    idle = idle_time(spans)
    assert idle["span_us"] == 300
    assert idle["classes"]["under_5us"] == {"us": 3.0, "count": 2}
    assert idle["classes"]["5us_to_100us"] == {"us": 50.0, "count": 1}
    assert idle["classes"]["over_100us"] == {"us": 170.0, "count": 1}
    assert idle["largest"][0] == {"us": 170, "at_us": 100}
    assert idle["between"] == [{"kernels": "e → d", "count": 1, "us": 170.0}, {"kernels": "c → d", "count": 1,
                                                                               "us": 50.0}]
    busy = 10 + 19 + 10 + 8 + 30  # (0, 10), (11, 30), (80, 90), (92, 100), (270, 300)
    assert busy + sum(c["us"] for c in idle["classes"].values()) == idle["span_us"]


def test_idle_time_of_nothing_is_empty():
    assert idle_time([]) == {}
