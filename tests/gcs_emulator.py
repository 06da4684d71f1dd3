"""A throw-away Cloud Storage for tests: `gcp-storage-emulator` on 127.0.0.1, in memory.

Beam's GCS filesystem (2.77) builds a `google.cloud.storage.Client` for each call, and
that client sends its requests to `STORAGE_EMULATOR_HOST` when it is set. Nothing in
the project knows about the emulator: pointing the environment at it is all it takes.

Credentials: with no Application Default Credentials on a machine, Beam spends ~25 s per
process retrying `google.auth.default()` before it settles on an anonymous client, and
the pipeline reads records in guarded child processes, each paying that again. So the
fixture also provides ADC the ordinary way, through `GOOGLE_APPLICATION_CREDENTIALS`: a
service-account key made up on the spot whose `token_uri` is a tiny local token endpoint
(also on 127.0.0.1). Every process, children included, finds credentials at once and
never leaves the machine; the emulator ignores the bearer token.

Use the `gcs` fixture (import it into a test module: `from gcs_emulator import gcs`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

BUCKET = "ecgtok-test"
_ENV = ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK", "GOOGLE_APPLICATION_CREDENTIALS")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TokenHandler(BaseHTTPRequestHandler):
    """An OAuth token endpoint that grants every request a one-hour token."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps(
            {"access_token": "emulator-token", "expires_in": 3600, "token_type": "Bearer"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _fake_service_account(path: str, token_uri: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "ecgtok-test",
        "private_key_id": "test",
        "private_key": pem,
        "client_email": "tests@ecgtok-test.iam.gserviceaccount.com",
        "client_id": "0",
        "token_uri": token_uri,
    }
    with open(path, "w") as fh:
        json.dump(info, fh)


class Emulator:
    """A running emulator; `upload` copies local files in, `url` names objects."""

    def __init__(self, host: str, bucket: str) -> None:
        self.host = host
        self.bucket = bucket

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials())

    def upload(self, local_path: str, name: str) -> str:
        blob = self.client().bucket(self.bucket).blob(name)
        blob.upload_from_filename(local_path)
        return self.url(name)

    def upload_tree(self, local_root: str, prefix: str, keep=lambda rel: True) -> str:
        for folder, _dirs, files in os.walk(local_root):
            for f in files:
                full = os.path.join(folder, f)
                rel = os.path.relpath(full, local_root).replace(os.sep, "/")
                if keep(rel):
                    self.upload(full, f"{prefix.strip('/')}/{rel}")
        return self.url(prefix.strip("/"))

    def url(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"


def _wait_for(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """Start the emulator (and a token endpoint) for the session; yields an `Emulator`."""
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("cryptography")
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    key_file = str(tmp_path_factory.mktemp("adc") / "service-account.json")
    _fake_service_account(key_file, f"http://127.0.0.1:{tokens.server_address[1]}/token")
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["NO_GCE_CHECK"] = "true"
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = key_file
    try:
        _wait_for(port)
        yield Emulator(os.environ["STORAGE_EMULATOR_HOST"], BUCKET)
    finally:
        server.stop()
        tokens.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
