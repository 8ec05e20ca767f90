"""Smoke test of `mqchat bench`: a tiny relay run against our broker and stock amqtt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mqchat.bench import main


@pytest.mark.timeout(90)
def test_relay_smoke(tmp_path: Path) -> None:
    code = main(
        [
            "relay",
            "--systems",
            "ours,stock",
            "--messages",
            "300",
            "--rates",
            "200",
            "--duration",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "relay.json").read_text())
    for key in ("scenario", "timestamp", "machine", "versions", "parameters", "systems", "ratios"):
        assert key in data
    assert data["scenario"] == "relay"
    assert data["versions"]["amqtt"]
    assert set(data["systems"]) == {"ours", "stock"}
    for system in data["systems"].values():
        for qos in ("qos0", "qos1"):
            tp = system[qos]["throughput"]
            assert tp["received"] == 300
            assert tp["msg_per_s"] > 0
            (step,) = system[qos]["latency"]
            assert step["rate"] == 200
            assert step["received"] > 0
            assert step["p50_ms"] > 0
            assert step["p99_ms"] >= step["p50_ms"]
    assert data["ratios"]["qos1_throughput_ours_vs_stock"] > 0
    assert (tmp_path / "relay.png").stat().st_size > 0


@pytest.mark.timeout(90)
def test_acl_smoke(tmp_path: Path) -> None:
    assert main(["acl", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "acl.json").read_text())
    assert set(data["systems"]) == {"store", "cache"}
    for system in data["systems"].values():
        assert system["shares"]["answers"] == data["parameters"]["pairs"] > 0
        assert system["member"]["answers"] == data["parameters"]["users"]
        assert system["subscribes_per_s"] > 0
    assert data["ratios"]["member_store_vs_cache_mean"] > 0
    assert (tmp_path / "acl.png").stat().st_size > 0
