"""The benchmark's smoke: `bench/run.py --quick` runs end to end and writes complete JSON.

It checks the machinery (the stand-in, the server, the load generator, every
measurement), never a timing target: figures from a shared CI machine are
not evidence. wrk is used when installed; otherwise the quick run falls back
to the benchmark's own Python load loop.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from .conftest import PYTHON, ROOT

SMOKE_TIMEOUT = 30  # seconds; the quick run takes about 10


def test_quick_benchmark_runs_without_errors_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [PYTHON, "bench/run.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())

    assert results["ok"] is True and results["errors"] == []
    assert results["meta"]["mode"] == "quick"
    assert results["meta"]["load_generator"] == ("wrk" if shutil.which("wrk") else "python")
    for key in ("nonstream_c1", "stream_c1", "events", "events_large"):
        assert results["direct"][key], key

    reference = results["reference"]
    for run in ("nonstream_c50", "stream_c50", "stream_spaced_c50", "nonstream_c1", "stream_c1"):
        assert reference[run]["requests"] > 0, ("reference", run)
        assert not any(reference[run]["errors"].values()), (
            "reference",
            run,
            reference[run]["errors"],
        )
    for run in ("nonstream_c50", "stream_c50", "stream_spaced_c50"):
        assert reference[run]["server_cpu_ms_per_request"] > 0, ("reference", run)
    assert reference["nonstream_added_p50_ms"] is not None

    assert set(results["routes"]) == {"gpt_chat", "openai"}
    for name, route in results["routes"].items():
        for run in (
            "nonstream_c50",
            "stream_c50",
            "stream_spaced_c50",
            "nonstream_c1",
            "stream_c1",
        ):
            assert route[run]["requests"] > 0, (name, run)
            assert not any(route[run]["errors"].values()), (name, run, route[run]["errors"])
            assert route[run]["server_cpu_ms_per_request"] > 0, (name, run)
        assert route["nonstream_added_p50_ms"] is not None
        for kind in ("nonstream", "stream", "stream_spaced"):
            assert route[f"{kind}_cpu_vs_reference"] > 0, (name, kind)
        assert route["events"]["events_timed"] > 0 and route["events"]["errors"] == []
        assert route["events_large"]["events_timed"] > 0
        sequential = route["sequential"]
        assert sequential["requests"] == results["meta"]["plan"]["sequential"]
        assert sequential["upstream_connections_opened"] >= 1
        held = route["held_streams"]
        assert held["opened"] == held["streams"] and held["dropped"] == 0
        assert held["rss_mb"] > 0

    metrics = {target["metric"] for target in results["targets"]}
    assert {
        "cpu_ms_per_nonstream_request",
        "cpu_ms_per_stream",
        "added_p50_ms_1_connection",
        "nonstream_rps_1_process",
        "first_event_ms_max",
        "upstream_connections_per_10k_sequential",
        "cpu_ms_per_nonstream_request_vs_reference",
        "cpu_ms_per_stream_vs_reference",
        "cpu_ms_per_stream_spaced_events_vs_reference",
    } <= metrics
    assert (
        "targets:" in completed.stdout
        and "Metric" in completed.stdout
        and "reference" in completed.stdout
    )
