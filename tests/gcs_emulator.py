"""A throw-away Cloud Storage for tests: `gcp-storage-emulator` on 127.0.0.1, in memory.

Beam's GCS filesystem builds a `google.cloud.storage.Client` for each call, and that
client honours `STORAGE_EMULATOR_HOST`; with `NO_GCE_CHECK=true` and no credentials on
the machine Beam falls back to an anonymous client. So pointing the environment at the
emulator is all gs:// paths need: no code path of the project knows about the emulator.

One shortcut, for tests only: with no Application Default Credentials on the machine,
Beam 2.77 spends ~25 s per process retrying `google.auth.default()` (exponential backoff)
before it settles on an anonymous client. The fixture primes Beam's process-wide
credential cache (`apache_beam.internal.gcp.auth._Credentials`) with that same outcome,
anonymous, and restores it afterwards; the tests then behave the same with or without
credentials on the machine. Production code does nothing of the kind.

Use the `gcs` fixture (import it into a test module: `from gcs_emulator import gcs`).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

BUCKET = "ecgtok-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def gcs():
    """Start the emulator for the test session; yields an `Emulator`."""
    pytest.importorskip("gcp_storage_emulator")
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    host = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "NO_GCE_CHECK")}
    os.environ["STORAGE_EMULATOR_HOST"] = host
    os.environ["NO_GCE_CHECK"] = "true"
    from apache_beam.internal.gcp import auth

    creds = auth._Credentials
    saved_creds = (creds._credentials_init, creds._credentials)
    creds._credentials_init, creds._credentials = True, None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Emulator(host, BUCKET)
    finally:
        server.stop()
        creds._credentials_init, creds._credentials = saved_creds
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
