"""The load side of bench/web.py, run in its own process: requests pages one after
another over one keep-alive connection, bounded in count and in time."""

from __future__ import annotations

import http.client
import time


def run(port: int, token: str, pages: dict[str, str], requests: int, budget_s: float) -> dict[str, list[float]]:
    """Per page name, the seconds each of its requests took (a non-200 raises)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Host": f"127.0.0.1:{port}"}
    deadline = time.monotonic() + budget_s
    out: dict[str, list[float]] = {name: [] for name in pages}
    for name, path in pages.items():
        conn.request("GET", path, headers=headers)  # one warm-up request each
        conn.getresponse().read()
        for _ in range(requests):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}")
            out[name].append(time.perf_counter() - started)
    return out
