"""Metrics, logs and the rule that no secret value ever leaves except as an answer."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.backends.vault_server import FakeVault
from tests.integration.conftest import MakeDaemon
from tests.integration.harness import Daemon, require_program, wait_until

CANARY = "canary-7f3a9c-do-not-log"
CANARY_JSON = json.dumps({"user": "u", "password": CANARY})


async def scrape(daemon: Daemon) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.metrics_port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


async def test_metrics_pass_promtool_and_have_the_design_families(daemon: Daemon) -> None:
    """/metrics is valid Prometheus text with every family of design.md section 7."""
    promtool = require_program("promtool")
    await daemon.get("{vault://env/db-password}")
    await daemon.get("{vault://env/db-password}")
    await daemon.get("{vault://env/absent}")
    text = await scrape(daemon)
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(check.communicate(text.encode()), 30)
    assert check.returncode == 0, out.decode()
    for family in (
        "secret_sidecar_requests_total",
        "secret_sidecar_request_duration_seconds_bucket",
        "secret_sidecar_cache_lookups_total",
        "secret_sidecar_backend_calls_total",
        "secret_sidecar_backend_call_duration_seconds_bucket",
        "secret_sidecar_refreshes_total",
        "secret_sidecar_rotations_total",
        "secret_sidecar_cache_entries",
        "secret_sidecar_oldest_value_age_seconds",
        "secret_sidecar_ready",
        "secret_sidecar_build_info",
    ):
        assert f"# TYPE {family.removesuffix('_bucket').removesuffix('_total')}" in text, family
    assert 'secret_sidecar_cache_lookups_total{result="hit"} 1.0' in text
    assert 'secret_sidecar_cache_lookups_total{result="miss"} 2.0' in text
    assert (
        'secret_sidecar_backend_calls_total{backend="env",outcome="not_found",vault="env"} 1.0'
        in text
    )
    assert "secret_sidecar_cache_entries 2.0" in text
    assert "secret_sidecar_ready 1.0" in text


async def test_event_loop_lag_is_sampled(daemon: Daemon) -> None:
    """The loop-lag histogram fills twice a second whether or not requests arrive."""

    async def sampled() -> bool:
        try:
            text = await scrape(daemon)
        except aiohttp.ClientConnectionError:  # the metrics listener starts after the socket
            return False
        families = {f.name: f for f in text_string_to_metric_families(text)}
        lag = families.get("secret_sidecar_event_loop_lag_seconds")
        counts = [s.value for s in lag.samples if s.name.endswith("_count")] if lag else []
        return bool(counts) and counts[0] >= 2

    await wait_until(sampled, 10, "two loop-lag samples")


async def test_metrics_can_be_disabled(make_daemon: MakeDaemon) -> None:
    """metrics.address "" opens no TCP port."""
    daemon = await make_daemon({"metrics": {"address": ""}}).started()
    try:
        await scrape(daemon)
    except aiohttp.ClientConnectionError:
        return
    raise AssertionError("metrics answered although disabled")


async def test_request_lines_and_audit_events(make_daemon: MakeDaemon) -> None:
    """With ``log.requests: all`` each request has a line (vault, cache outcome); the
    backend call has one. The audit trail logs a peer's first read of a reference at
    once and counts repeat reads into one event per interval (``log.audit_interval``)."""
    config = {"log": {"requests": "all", "audit_interval": 0.3}}
    daemon = await make_daemon(config).started()
    for _ in range(4):
        await daemon.get("{vault://env/db-password}")
    await asyncio.sleep(0.8)  # past an audit flush
    events = daemon.log_events()
    request = [e for e in events if e["event"] == "request" and e["endpoint"] == "/v1/secrets"]
    assert [(r["status"], r["vault"], r["cache"]) for r in request] == [
        (200, "env", "miss"),
        *[(200, "env", "hit")] * 3,
    ]
    assert [e["outcome"] for e in events if e["event"] == "backend.call"] == ["ok"]
    audit = [e for e in events if e["event"] == "secret.read"]
    assert [(a["outcome"], a["count"]) for a in audit] == [("miss", 1), ("hit", 3)]
    assert {a["ref"] for a in audit} == {"{vault://env/db-password}"}
    assert all(isinstance(a["uid"], int) and isinstance(a["pid"], int) for a in audit)


async def test_by_default_only_errors_have_request_lines_and_denials_are_audited_at_once(
    make_daemon: MakeDaemon,
) -> None:
    """A cached read costs no log line by default; an error still has its request line,
    and every failed read its own audit event, however many."""
    daemon = await make_daemon().started()
    for _ in range(3):
        await daemon.get("{vault://env/db-password}")
        await daemon.get("{vault://env/not-there}")
    events = daemon.log_events()
    request = [e for e in events if e["event"] == "request"]
    assert [(r["status"], r["cache"]) for r in request] == [(404, "not_found")] * 3
    audit = [(a["ref"], a["outcome"]) for a in events if a["event"] == "secret.read"]
    assert audit.count(("{vault://env/not-there}", "not_found")) == 3
    assert audit.count(("{vault://env/db-password}", "miss")) == 1  # then only counted


async def _every_path(daemon: Daemon) -> list[Any]:
    """Touch the canary through every endpoint and error path; return all bodies."""
    refs = [
        "{vault://env/canary}",
        "{vault://env/canary-json/password}",
        "{vault://env/canary-json/nokey}",
        "{vault://env/canary/key}",  # not JSON: the error must not quote the value
        "{vault://env/canary?base64_decode}",  # not base64: same
        "{vault://env/canary-json/user?ttl=bad}",
    ]
    bodies = [(await daemon.get(ref))[1] for ref in refs]
    bodies.append((await daemon.request("POST", "/v1/secrets:batch", json_body={"refs": refs}))[1])
    bodies.append((await daemon.request("POST", "/v1/refresh", params={"ref": refs[0]}))[1])
    bodies.append((await daemon.request("POST", "/v1/refresh"))[1])
    bodies.append((await daemon.request("GET", "/v1/status"))[1])
    bodies.append((await daemon.request("GET", "/readyz"))[1])
    return bodies


async def test_canary_secret_never_appears_in_logs_metrics_or_errors(
    make_daemon: MakeDaemon,
) -> None:
    """The value is in the answers asked for it and nowhere else: logs, metrics, errors."""
    config = {"prefetch": ["{vault://env/canary}"], "log": {"level": "debug"}}
    daemon = make_daemon(config, env={"CANARY": CANARY, "CANARY_JSON": CANARY_JSON})
    await daemon.started()
    bodies = await _every_path(daemon)
    answers = [bodies[0], bodies[1]]
    assert [a["value"] for a in answers] == [CANARY, CANARY]
    for body in bodies[2:]:
        text = json.dumps(body)
        if "results" in body:  # the batch: only the two reads carry it
            assert text.count(CANARY) == 2
            continue
        assert CANARY not in text, body
    # a credential in a refused query field must not reach the logs either
    await daemon.get("{vault://env/canary?token=" + CANARY + "}")
    await daemon.get("{vault://hcv/canary?token=" + CANARY + "}")
    await daemon.get("{vault://env/canary?ttl=" + CANARY + "}")
    assert CANARY not in await scrape(daemon)
    daemon.stop()
    assert CANARY not in daemon.logs()
    assert "secret.read" in daemon.logs()


async def test_vault_auth_is_measured_and_passes_promtool(make_daemon: MakeDaemon) -> None:
    """An hcv vault's token check at start shows up as backend_auth_total and the token's
    remaining TTL as a gauge; the exposition still lints."""
    promtool = require_program("promtool")
    vault = FakeVault()
    vault.enable_kv("secret", "v1")
    vault.put("secret", "db", {"password": "p"})
    vault.start()
    try:
        token = vault.create_token(ttl=3600)
        config = {"vaults": [{"prefix": "hv", "name": "hcv",
                              "config": {"port": vault.port, "token": token}}]}  # fmt: skip
        daemon = await make_daemon(config).started()
        assert (await daemon.get("{vault://hv/db/password}"))[1]["value"] == "p"
        text = await scrape(daemon)
    finally:
        vault.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    auth = ("vault", "hv"), ("backend", "hcv"), ("operation", "login"), ("outcome", "ok")
    assert samples[("secret_sidecar_backend_auth_total", tuple(sorted(auth)))] == 1
    ttl = samples[
        ("secret_sidecar_backend_token_ttl_seconds", (("backend", "hcv"), ("vault", "hv")))
    ]
    assert 3000 < ttl <= 3600
    assert token not in text
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(check.communicate(text.encode()), 30)
    assert check.returncode == 0, out.decode()
    assert token not in daemon.logs()
