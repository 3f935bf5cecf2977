"""The fault proxy itself, against a plain echo server (and a real Redis)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time

import pytest
import redis

from tests.reliability.proxy import FaultProxy, with_port


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture(scope="module")
def echo():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo):
    with FaultProxy(*echo) as p:
        yield p


def roundtrip(port: int, payload: bytes = b"ping", timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed by peer")
            got += chunk
        return got


def test_pass_forwards_both_ways(proxy):
    assert roundtrip(proxy.port, b"hello") == b"hello"
    big = bytes(range(256)) * 4096  # 1 MiB crosses many chunks
    assert roundtrip(proxy.port, big) == big


def test_down_refuses_then_recovers(proxy):
    # Given an open connection through the proxy
    s = socket.create_connection(proxy.address, timeout=2)
    s.sendall(b"x")
    assert s.recv(10) == b"x"
    # When the proxy goes down
    proxy.set_mode("down")
    # Then new connects are refused and the open one is cut
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=2)
    s.settimeout(2)
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass
    s.close()
    # And passing again restores service on the same port
    proxy.set_mode("pass")
    assert roundtrip(proxy.port) == b"ping"


def test_reset_sends_rst(proxy):
    s = socket.create_connection(proxy.address, timeout=2)
    s.sendall(b"x")
    assert s.recv(10) == b"x"
    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError):
        s.sendall(b"y")
        s.recv(10)
        s.sendall(b"z")  # a second write surfaces the RST if the first raced it
        s.recv(10)
    s.close()
    with pytest.raises((ConnectionResetError, ConnectionError)):
        roundtrip(proxy.port)


def test_blackhole_accepts_but_never_answers(proxy):
    proxy.set_mode("blackhole")
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        roundtrip(proxy.port, timeout=0.5)
    assert time.monotonic() - start < 2
    proxy.set_mode("pass")
    assert roundtrip(proxy.port) == b"ping"


def test_latency_delays_each_direction(proxy):
    proxy.set_mode("latency", latency=0.2)
    start = time.monotonic()
    assert roundtrip(proxy.port) == b"ping"
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.5, elapsed  # 0.2 s out + 0.2 s back
    proxy.set_mode("pass")
    start = time.monotonic()
    roundtrip(proxy.port)
    assert time.monotonic() - start < 0.2


def test_unknown_mode_is_refused(proxy):
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("flaky")


def test_with_port_keeps_credentials_and_path():
    assert with_port("postgresql://postgres@127.0.0.1:5432/db?x=1", 7) == "postgresql://postgres@127.0.0.1:7/db?x=1"
    assert with_port("amqp://guest:guest@127.0.0.1:5672/", 9) == "amqp://guest:guest@127.0.0.1:9/"


def test_real_redis_through_proxy(redis_url, redis_prefix):
    with FaultProxy("127.0.0.1", 6379) as p:
        client = redis.Redis.from_url(p.url_for(redis_url), socket_timeout=0.5, socket_connect_timeout=0.5)
        key = f"{redis_prefix}:proxy-test"
        client.set(key, b"1")
        assert client.get(key) == b"1"
        p.set_mode("blackhole")
        with pytest.raises(redis.exceptions.TimeoutError):
            client.get(key)
        p.set_mode("down")
        with pytest.raises(redis.exceptions.ConnectionError):
            client.get(key)
        p.set_mode("pass")
        assert client.get(key) == b"1"
        client.delete(key)
        client.close()
