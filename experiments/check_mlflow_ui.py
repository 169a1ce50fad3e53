"""Open a run's MLflow store in the real UI with a headless browser: which view does a user land in?

Writes a store the way a run does (our logger: one finished run with a metric curve), starts
``mlflow ui`` on it (the README's command, on a free port), and loads two addresses in headless
Chromium: the experiment's plain address and :func:`steer.tracking.ui_url` (the model-training
view). For each it saves a screenshot and reads the rendered page: the training view lists the run
by name; MLflow 3's GenAI view shows its "Overview" of traces instead.

    python experiments/check_mlflow_ui.py --out ui-check          # screenshots in ui-check/
    python experiments/check_mlflow_ui.py --store outputs/<run>/mlflow.db --out ui-check

Needs a Chromium (Debian: ``apt-get install chromium``). Prints one line per address, e.g.
``model-training URL: runs table with grpo_seed1 (ui-check/training.png)``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

RUN_NAME = "grpo_seed1"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class PageView:
    url: str
    screenshot: Path
    shows_run_table: bool
    """The page lists the run by name (the model-training view's runs table)."""
    shows_genai_overview: bool
    """The page shows the GenAI view's trace overview."""


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def write_store(folder: Path) -> str:
    """A store as a run writes it: our logger, one finished run with a short metric curve."""
    from mlflow.entities import Metric

    from steer.tracking import RunFolderMLFlowLogger

    uri = f"sqlite:///{folder.resolve()}/mlflow.db"
    logger = RunFolderMLFlowLogger(experiment_name="steer-lab", tracking_uri=uri, run_name=RUN_NAME)
    logger.experiment.log_batch(logger.run_id, metrics=[Metric("reward/accuracy", 0.1 * s, 0, s) for s in range(5)])
    logger.finalize("success")
    return uri


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(uri: str, port: int, timeout_s: float = 120.0) -> subprocess.Popen:
    """``mlflow ui`` (the README's options) on ``port``, once it answers /health."""
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"mlflow ui did not answer on port {port} within {timeout_s:.0f} s")


def view(browser: str, url: str, screenshot: Path, budget_ms: int = 20000) -> PageView:
    """Load ``url`` headless: a screenshot, and the page's text after its scripts ran."""
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", f"--virtual-time-budget={budget_ms}"]
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    return PageView(url, screenshot, shows_run_table=RUN_NAME in dom, shows_genai_overview="Detect Issues" in dom or "Tool calls" in dom)


def check(out: Path, store: Path | None = None) -> dict[str, PageView]:
    from steer.tracking import ui_url

    browser = find_browser()
    if browser is None:
        raise SystemExit("no Chromium found (Debian: apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{Path(store).resolve()}" if store else write_store(Path(folder))
        port = _free_port()
        address = f"http://127.0.0.1:{port}"
        training = ui_url(uri, address=address)
        plain = training.split("?")[0]
        server = start_ui(uri, port)
        try:
            return {"plain experiment URL": view(browser, plain, out / "plain.png"),
                    "model-training URL": view(browser, training, out / "training.png")}
        finally:
            server.terminate()
            server.wait(timeout=30)


def main(argv: list[str]) -> dict[str, PageView]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ui-check"), help="folder for the screenshots")
    parser.add_argument("--store", type=Path, help="an existing mlflow.db (default: a fresh one like a run's)")
    args = parser.parse_args(argv)
    pages = check(args.out, args.store)
    for name, page in pages.items():
        seen = "runs table with " + RUN_NAME if page.shows_run_table else (
            "GenAI overview (traces), no runs table" if page.shows_genai_overview else "neither runs nor GenAI overview")
        print(f"{name}: {seen} ({page.screenshot}) <- {page.url}")
    return pages


if __name__ == "__main__":
    main(sys.argv[1:])
