"""The BullMQ backend over TLS (``rediss://``) against a redis-server with a certificate signed by
a throwaway CA: the CA is given in the URL, verification is on by default, and a certificate that
does not verify gives a clear error at once, with no password in it."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral import BackendConnectionError, JobState, QueueMessage, QueueService, QueueSettings

from conftest import REDIS_HOST, missing, unique_queue_name

PASSWORD = "tls-secret-pw-42"
SERVER_EXTENSIONS = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectKeyIdentifier=hash\n"
    "authorityKeyIdentifier=keyid\n"
)


@dataclass(frozen=True)
class Pki:
    ca: Path  # signed the server certificates
    other_ca: Path  # signed nothing here
    server: tuple[Path, Path]  # certificate and key for IP 127.0.0.1
    misnamed: tuple[Path, Path]  # certificate and key for another host name


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl is needed to make the TLS test's certificates")
    subprocess.run([str(openssl), *args], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-sha256"),
        *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN=corral test {name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return cert, key


def _make_server_cert(
    directory: Path, name: str, ca: tuple[Path, Path], alt_name: str
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(SERVER_EXTENSIONS + f"subjectAltName={alt_name}\n")
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={name}"),
        *("-keyout", str(key), "-out", str(request)),
    )
    _openssl(
        *("x509", "-req", "-in", str(request), "-days", "1", "-sha256"),
        *("-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial"),
        *("-extfile", str(extensions), "-out", str(cert)),
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    return Pki(
        ca=ca[0],
        other_ca=other_ca,
        server=_make_server_cert(directory, "server", ca, f"IP:{REDIS_HOST}"),
        misnamed=_make_server_cert(directory, "misnamed", ca, "DNS:redis.invalid"),
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def tls_servers(pki: Pki) -> Iterator[dict[str, int]]:
    """Two TLS-only redis-servers (no plain port) requiring a password: ``good`` presents the
    certificate for 127.0.0.1, ``misnamed`` one for another host name."""
    server = shutil.which("redis-server")
    if server is None:
        missing("redis-server is needed to start a TLS Redis")
    processes: list[subprocess.Popen[bytes]] = []
    ports: dict[str, int] = {}
    try:
        for name, (cert, key) in (("good", pki.server), ("misnamed", pki.misnamed)):
            port = free_port()
            process = subprocess.Popen(
                [
                    *(str(server), "--port", "0", "--tls-port", str(port), "--bind", REDIS_HOST),
                    *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
                    *("--tls-ca-cert-file", str(pki.ca), "--tls-auth-clients", "no"),
                    *("--requirepass", PASSWORD, "--save", "", "--appendonly", "no"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(process)
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection((REDIS_HOST, port), timeout=0.2):
                        break
                except OSError:
                    if process.poll() is not None:
                        missing("redis-server would not start with TLS (built without it?)")
                    assert time.monotonic() < deadline, "TLS redis-server did not start"
                    time.sleep(0.02)
            ports[name] = port
        yield ports
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(5)


def settings_for(port: int, query: str = "") -> QueueSettings:
    url = f"rediss://:{PASSWORD}@{REDIS_HOST}:{port}/0{query}"
    return QueueSettings(backend="bullmq", name=unique_queue_name("tls"), redis_url=url)


async def test_rediss_with_the_ca_in_the_url_runs_jobs(
    tls_servers: dict[str, int], pki: Pki
) -> None:
    settings = settings_for(tls_servers["good"], f"?ssl_ca_certs={pki.ca}")
    async with QueueService(settings) as service:

        @service.handler("secure")
        async def secure(message: QueueMessage) -> str:
            return f"over tls: {message.data}"

        ids = await service.enqueue_many([{"name": "secure", "data": i} for i in range(5)])
        await service.start_worker(burst=True)
        jobs = [await service.get_job(job_id) for job_id in ids]
    assert [(job.state, job.result) for job in jobs if job] == [
        (JobState.COMPLETED, f"over tls: {i}") for i in range(5)
    ]


@pytest.mark.parametrize(
    ("server", "query", "why"),
    [
        ("good", "", "certificate"),  # the system's CAs only
        ("good", "?ssl_ca_certs={other_ca}", "certificate"),
        ("misnamed", "?ssl_ca_certs={ca}", "IP address mismatch"),
    ],
    ids=["no-ca-given", "wrong-ca", "wrong-host"],
)
async def test_a_certificate_that_does_not_verify_is_a_clear_error(
    tls_servers: dict[str, int], pki: Pki, server: str, query: str, why: str
) -> None:
    settings = settings_for(tls_servers[server], query.format(ca=pki.ca, other_ca=pki.other_ca))
    started = time.monotonic()
    async with QueueService(settings) as service:
        with pytest.raises(BackendConnectionError) as info:
            await service.enqueue("secure", None)
    elapsed_s = time.monotonic() - started
    message = str(info.value)
    assert "TLS certificate verification failed" in message, message
    assert why in message and "ssl_ca_certs" in message, message
    assert PASSWORD not in message and PASSWORD not in repr(info.value)
    assert elapsed_s < 5, f"took {elapsed_s:.1f}s to fail"


async def test_a_worker_with_a_wrong_ca_logs_once_and_stops(
    tls_servers: dict[str, int], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = settings_for(tls_servers["good"], f"?ssl_ca_certs={pki.other_ca}")
    async with QueueService(settings) as service:
        worker = asyncio.create_task(service.start_worker())
        await asyncio.sleep(1.5)
        assert not worker.done()
        service.stop()
        await asyncio.wait_for(worker, 5)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "TLS certificate verification failed" in errors[0]
    assert not any(PASSWORD in r.getMessage() for r in caplog.records)
