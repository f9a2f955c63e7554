"""A Ray job server that refuses this client's token is reported as an authentication
problem naming what to set (exit 2), not as "cannot reach the Ray job server"."""
from __future__ import annotations

import http.server
import threading

import pytest

from pipeline import cli
from pipeline.run import submit


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request as Ray's token middleware does without a valid token."""

    status = 401

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"Unauthorized: Missing authentication token" if self.status == 401 else b"Forbidden: Invalid token"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def job_server(request):
    handler = type("Handler", (_Refusing,), {"status": getattr(request, "param", 401)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_missing_token_says_what_to_set(job_server, no_token, capsys):
    code = cli.main(["status", "advpure-x-1", "--address", job_server])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the Ray job server at {job_server} was reached but refused the request, an authentication problem" in err
    assert "export RAY_AUTH_MODE=token" in err and "RAY_AUTH_TOKEN" in err and "ray get-auth-token" in err
    assert "cannot reach" not in err and len(err.strip().splitlines()) == 1


def test_token_mode_without_a_token(job_server, no_token, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(submit.AuthError, match="no token found: set RAY_AUTH_TOKEN"):
        submit.client(job_server)


@pytest.mark.parametrize("job_server", [403], indirect=True)
def test_wrong_token_names_where_it_came_from(job_server, no_token, monkeypatch):
    secret = "0123456789abcdef" * 4
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secret)
    with pytest.raises(submit.AuthError) as info:
        submit.client(job_server)
    text = str(info.value)
    assert "the token from RAY_AUTH_TOKEN is not this cluster's" in text and secret not in text


def test_other_failures_stay_unreachable(no_token):
    assert submit.auth_problem("http://h:8265", ConnectionError("Connection refused")) is None
