"""A Hugging Face id as model.path: one quick look at the Hub decides, never ~50 s of retries per file.

The Hub is replaced by a local endpoint (HF_ENDPOINT / constants.ENDPOINT): a closed
port (unreachable) or a small HTTP server that knows no model (404). The cache is a private folder.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from steer.knobs import ConfigError
from steer.models.loader import load_policy_tokenizer, load_pretrained
from tests.conftest import REPO

HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


@pytest.fixture
def private_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and an endpoint nobody listens on."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def test_an_unreachable_hub_fails_at_once_with_one_line_and_no_run_folder(tmp_path):
    """The README's Hub line without network: exit status 2, one line naming the id and the ways
    out, no retries, no traceback, no run folder (it took 99 s and left outputs/.../run.log)."""
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf"),
           "STEER_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "src" / "run.py"), "model=hf", f"model.path={HUB_ID}", "threads=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model.path='{HUB_ID}': the Hugging Face Hub ({env['HF_ENDPOINT']}) is unreachable (ConnectError) "
        "and this id is not in the local cache; allowed: a local model folder, or HF_HUB_OFFLINE=1 with the model "
        "in the Hugging Face cache (HF_HOME)")
    assert "Traceback" not in result.stderr and "Retry" not in result.stderr
    assert not (tmp_path / "outputs").exists()
    assert elapsed < 120, elapsed  # start-up and imports only (~8 s quiet); the retries alone slept 46 s


def test_an_id_the_hub_does_not_know_is_named(private_hub, monkeypatch):
    from huggingface_hub import constants

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ConfigError, match=r"^model.path='org/no-such-model' is not a model the Hugging Face Hub "
                                              r"knows \(HTTP 404"):
            load_policy_tokenizer("org/no-such-model")
    finally:
        server.shutdown()


def test_offline_mode_names_the_cache(private_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=rf"^model.path='{HUB_ID}' is not in the local Hugging Face cache, the only "
                                          "place HF_HUB_OFFLINE=1 loads from"):
        load_pretrained(HUB_ID)


def test_an_unreachable_hub_loads_the_cached_copy(private_hub, caplog):
    """A model in the cache loads without the Hub (local_files_only), with one warning."""
    from steer.models.tiny import build_char_tokenizer, build_tiny_policy

    snapshot = private_hub / "models--org--cached-model" / "snapshots" / ("0" * 40)
    tokenizer = build_char_tokenizer()
    build_tiny_policy(tokenizer, hidden_size=16, num_layers=1, num_heads=2).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (private_hub / "models--org--cached-model" / "refs").mkdir()
    (private_hub / "models--org--cached-model" / "refs" / "main").write_text("0" * 40)
    loaded_tokenizer, policy = load_pretrained("org/cached-model")
    assert policy.config.hidden_size == 16 and len(loaded_tokenizer) == len(tokenizer)
    assert any("Hub is unreachable (ConnectError); loading the cached copy" in r.getMessage() for r in caplog.records)


def test_a_local_folder_never_asks_the_hub(tmp_path, private_hub):
    with pytest.raises(Exception) as raised:  # transformers' own error for a folder without a model
        load_pretrained(str(tmp_path))
    assert not isinstance(raised.value, ConfigError) and "Hugging Face Hub" not in str(raised.value)
