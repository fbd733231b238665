"""`lorakit serve` as users run it: a real server process on a loopback port, spoken to over
HTTP; Ctrl-C drains and stops it; its mistakes are one line and exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from helpers import ctrl_c_reaches_it

from lorakit.cli import main

KEY = "test-key"


def start(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`lorakit serve ARGS --port 0` in its own process; (process, its URL, what it printed)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=ctrl_c_reaches_it,
    )
    lines: list[str] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on " in line:
            return proc, line.split("listening on ")[1].split(";")[0].split(" ")[0], lines
    proc.kill()
    pytest.fail(f"the server did not start: {lines} {proc.stderr.read()}")


def test_a_real_server_process_answers_over_http(adapters):
    proc, url, lines = start(str(adapters["a"]), "--adapter-root", str(adapters["cls_root"]), "--api-key", KEY)
    try:
        assert "adapters: a, c, d" in lines[0] and "(API key required)" in lines[1]
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            assert c.get("/health").status_code == 200
            models = c.get("/v1/models").json()
            assert [m["id"] for m in models["data"]][1:] == ["a", "c", "d"]
            r = c.post("/v1/classify", json={"model": "c", "input": ["good film", "bad"]})
            assert r.status_code == 200 and len(r.json()["data"]) == 2
            assert c.post("/v1/classify", json={"model": "zz", "input": "x"}).status_code == 404
        assert httpx.post(f"{url}/v1/classify", json={"model": "a", "input": "x"}).status_code == 401
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_answers_the_requests_in_flight_then_stops(adapters):
    proc, url, _ = start(str(adapters["x"]), "--max-batch", "1")  # one request at a time: a queue forms
    done: list[tuple[int, float]] = []

    def ask() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            r = c.post(
                "/v1/completions", json={"model": "x", "prompt": "count from 3 :", "max_tokens": 58, "temperature": 0}
            )
            done.append((r.status_code, time.time()))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=url, timeout=60) as c:  # Ctrl-C once every request is in (one runs, some wait)
        deadline = time.time() + 60
        while time.time() < deadline:
            metrics = dict(line.rsplit(" ", 1) for line in c.get("/metrics").text.splitlines() if line[:1] != "#")
            waiting = float(metrics["lorakit_queue_depth"])
            answered = float(metrics.get('lorakit_requests_total{endpoint="/v1/completions",status="200"}', 0))
            if waiting and waiting + answered >= 11:
                break
            time.sleep(0.005)
    interrupted = time.time()
    proc.send_signal(signal.SIGINT)
    for t in threads:
        t.join(120)
    out, err = proc.communicate(timeout=60)
    assert [code for code, _ in done] == [200] * 12
    assert any(at > interrupted for _, at in done)  # the queue was drained after Ctrl-C
    assert proc.returncode == 130, err  # Ctrl-C: status 130 in every command, after the drain
    assert "stopped after" in out and "Traceback" not in err


def test_mistakes_are_one_line(capsys, tmp_path, adapters):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "give adapter folders" in capsys.readouterr().err
    assert main(["serve", str(adapters["a"]), "--max-batch", "0"]) == 2
    assert "--max-batch must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "wanted"),
    [
        ("--max-loaded-mb", "nan", "a number >= 0"),
        ("--max-loaded-mb", "inf", "a number >= 0"),
        ("--max-wait-ms", "inf", "a number in [0, 60000]"),
        ("--max-wait-ms", "nan", "a number in [0, 60000]"),
        ("--max-wait-ms", "60001.0", "a number in [0, 60000]"),
        ("--port", "70000", "an integer in [0, 65535]"),
        ("--max-queue", "-3", "an integer >= 1"),
    ],
)
def test_options_are_checked_from_their_definitions(capsys, adapters, option, value, wanted):
    assert main(["serve", str(adapters["a"]), option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{option} must be {wanted}, got {value}" in err, err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_an_empty_api_key_is_refused_not_served_open(capsys, adapters, monkeypatch, how):
    import lorakit.serving.server as server

    served = []
    monkeypatch.setattr(server, "run", lambda app, host, port, announce: served.append(app))
    monkeypatch.setenv("LORAKIT_API_KEY", "")  # `export LORAKIT_API_KEY=$KEY` with KEY unset
    assert main(["serve", str(adapters["a"])] + (["--api-key", ""] if how == "flag" else [])) == 2
    err = capsys.readouterr().err
    source = "--api-key" if how == "flag" else "$LORAKIT_API_KEY"
    assert err.count("\n") == 1 and f"{source} is empty" in err
    assert served == []


def test_the_port_in_use_is_one_line(adapters):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(
            [sys.executable, "-m", "lorakit", "serve", str(adapters["a"]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"lorakit serve: error: cannot listen on 127.0.0.1:{port}")


def test_missing_web_libraries_name_the_extra(monkeypatch):
    import importlib

    from lorakit.serving.extra_check import ServeError, require_web

    real = importlib.import_module

    def fake(name, *args):
        if name == "fastapi":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ServeError, match=r"pip install 'lorakit\[serve\]'"):
        require_web()


def test_the_core_and_the_store_import_without_the_web_libraries():
    code = (
        "import sys, lorakit, lorakit.serving; "
        "heavy = ('fastapi', 'uvicorn', 'starlette', 'httpx', 'pydantic'); "
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_api_key_comes_from_the_flag_or_the_environment(adapters, monkeypatch, how):
    import lorakit.serving.server as server

    served = []
    monkeypatch.setattr(server, "run", lambda app, host, port, announce: served.append(app))
    monkeypatch.setenv("LORAKIT_API_KEY", "from-env")
    args = ["serve", str(adapters["a"])] + (["--api-key", "from-flag"] if how == "flag" else [])
    assert main(args) == 0
    guard = next(m for m in served[0].user_middleware if m.cls.__name__ == "Guard")
    assert guard.kwargs["api_key"] == ("from-flag" if how == "flag" else "from-env")
