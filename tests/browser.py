"""Headless Chromium (Debian's /usr/bin/chromium) for the tests that look at a web page as a user would: the DOM
after the page's own JavaScript ran (`dom`), or a picture of it (`screenshot`).

    html = dom("http://127.0.0.1:9090/classic/graph?g0.expr=up")
    screenshot("http://127.0.0.1:16686/search", Path("docs/img/incident.png"))

Both run one `chromium --headless` process with a virtual-time budget: Chromium lets the page's timers and fetches
run until the page is idle or the budget of virtual time is spent, then dumps or paints. No driver, no DevTools
socket and no Python dependency: a page that has not rendered what the test looks for simply fails the assertion.

The flags keep Chromium off the network apart from the page: without --disable-background-networking and
friends it opens connections of its own (updates, sync, field trials), which this machine's closed network refuses.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio"]
# Virtual milliseconds the page may use: Prometheus' graph (one query_range, Rickshaw) and the trace page (one
# /api/traces call) need well under a second; virtual time only runs while the page is not waiting on the network.
VIRTUAL_TIME_BUDGET_MS = 15_000
TIMEOUT_S = 90


class BrowserError(RuntimeError):
    """Chromium is missing, failed or hung; the message carries the end of its stderr."""


def _run(url: str, args: list[str], budget_ms: int) -> str:
    if not CHROMIUM.exists():
        raise BrowserError(f"{CHROMIUM} is missing: run `bash deploy/host-setup.sh` (installs Debian's chromium)")
    # A fresh profile each time: nothing cached or remembered from an earlier page.
    with tempfile.TemporaryDirectory(prefix="oer-chromium-") as profile:
        argv = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                *args, url]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise BrowserError(f"chromium did not finish {url} within {TIMEOUT_S} s") from err
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited with {proc.returncode} on {url}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def dom(url: str, budget_ms: int = VIRTUAL_TIME_BUDGET_MS) -> str:
    """The page's DOM as HTML after its scripts ran (`--dump-dom`)."""
    return _run(url, ["--dump-dom"], budget_ms)


def visible_text(page_html: str) -> str:
    """The text of a DOM dump with tags, scripts and styles removed and whitespace collapsed: what a reader sees
    (roughly: hidden elements are kept)."""
    text = re.sub(r"(?is)<(script|style|template)\b.*?</\1>", " ", page_html)
    text = re.sub(r"(?s)<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def screenshot(url: str, path: Path, width: int = 1280, height: int = 900,
               budget_ms: int = VIRTUAL_TIME_BUDGET_MS) -> Path:
    """A PNG of the page at `width`x`height` CSS pixels, written to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="oer-shot-") as tmp:
        # Chromium writes the file relative to its working directory when given a bare name: give it a full path.
        shot = Path(tmp) / "shot.png"
        _run(url, [f"--window-size={width},{height}", f"--screenshot={shot}"], budget_ms)
        if not shot.exists():
            raise BrowserError(f"chromium wrote no screenshot of {url}")
        shutil.move(str(shot), path)
    return path
