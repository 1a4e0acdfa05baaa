"""The library workarounds in ``compat`` keep the libraries' answers (run where they apply)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def assert_prints_ok(script: str) -> None:
    """Run ``script`` in an interpreter of its own (it patches with gevent, which must not
    reach this test process) and expect it to finish by printing "ok"."""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_urllib3_zero_timeout_check_under_gevent_answers_like_urllib3() -> None:
    script = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import socket, time
        import gevent
        import urllib3.util.wait as wait
        from fusillade_celery.compat import patch_urllib3_zero_timeout_wait
        patch_urllib3_zero_timeout_wait()
        assert wait.wait_for_socket._fusillade_patched
        a, b = socket.socketpair()
        assert wait.wait_for_read(a, timeout=0) is False      # idle keep-alive: reusable
        assert wait.wait_for_write(a, timeout=0) is True
        b.send(b"x")
        assert wait.wait_for_read(a, timeout=0) is True       # unexpected data: not reusable
        a.recv(1)
        # A wait with a timeout still yields to other greenlets (gevent's poll).
        ticks = []
        g = gevent.spawn(lambda: [ticks.append(1) or gevent.sleep(0.01) for _ in range(5)])
        t0 = time.monotonic()
        assert wait.wait_for_read(a, timeout=0.1) is False
        assert time.monotonic() - t0 >= 0.09 and len(ticks) >= 3
        g.join()
        b.close()
        assert wait.wait_for_read(a, timeout=0) is True       # peer closed: dropped
        print("ok")
        """
    )
    assert_prints_ok(script)


def test_psycopg_wait_under_gevent_is_cooperative_and_correct(pg_url: str) -> None:
    script = textwrap.dedent(
        f"""
        from gevent import monkey; monkey.patch_all()
        import time
        import gevent, psycopg
        from psycopg import waiting
        from fusillade_celery.compat import patch_gevent_waits
        patch_gevent_waits()
        assert waiting.wait._fusillade_patched
        url = {pg_url!r}.replace("postgresql+psycopg://", "postgresql://")
        conns = [psycopg.connect(url, autocommit=True) for _ in range(5)]
        # Five 0.3 s queries on five connections overlap: each wait parks its greenlet only.
        t0 = time.monotonic()
        gevent.joinall([gevent.spawn(c.execute, "SELECT pg_sleep(0.3)") for c in conns])
        assert time.monotonic() - t0 < 0.9, time.monotonic() - t0
        # A large result arrives whole and in order.
        rows = conns[0].execute("SELECT g, repeat('x', 100) FROM generate_series(1, 50000) g")
        assert [r[0] for r in rows] == list(range(1, 50001))
        # A lock wait: one greenlet holds an advisory lock, another waits for it, a third
        # keeps running meanwhile.
        holder, waiter = conns[1], conns[2]
        holder.execute("SELECT pg_advisory_lock(42)")
        got = []
        g = gevent.spawn(lambda: got.append(waiter.execute("SELECT pg_advisory_lock(42)")))
        ticks = 0
        for _ in range(10):
            gevent.sleep(0.01); ticks += 1
        assert not got and ticks == 10
        holder.execute("SELECT pg_advisory_unlock(42)")
        g.join(5)
        assert got
        # A server-side kill surfaces as an error, not a hang.
        pid = conns[3].info.backend_pid
        conns[4].execute("SELECT pg_terminate_backend(%s)", [pid])
        try:
            conns[3].execute("SELECT 1")
        except psycopg.OperationalError:
            print("ok")
        """
    )
    assert_prints_ok(script)


def test_numeric_addresses_resolve_inline_under_gevent_and_names_as_before() -> None:
    script = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import socket
        import gevent
        from fusillade_celery.compat import resolve_numeric_addresses_inline
        unpatched = socket.getaddrinfo("127.0.0.1", 8080, 0, socket.SOCK_STREAM)
        resolve_numeric_addresses_inline()
        resolve_numeric_addresses_inline()  # once only: the wrapper is not wrapped again
        hub = gevent.get_hub()
        assert hub.resolver._fusillade_patched and not hasattr(hub.resolver._resolver, "_resolver")
        pool = hub.threadpool
        used = pool.size
        for host in ("127.0.0.1", "::1"):
            got = socket.getaddrinfo(host, 8080, 0, socket.SOCK_STREAM)
            assert got[0][4][:2] == (host, 8080), got
        assert socket.getaddrinfo("127.0.0.1", 8080, 0, socket.SOCK_STREAM) == unpatched
        assert pool.size == used  # no thread started for a numeric address
        # Names (and service names) still go to the resolver.
        assert socket.getaddrinfo("localhost", "http", 0, socket.SOCK_STREAM)[0][4][1] == 80
        assert pool.size > used
        print("ok")
        """
    )
    assert_prints_ok(script)
