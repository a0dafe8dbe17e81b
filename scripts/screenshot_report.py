"""Screenshot an HTML report with headless Chromium and check that the picture is not blank.

    python scripts/screenshot_report.py runs/compare/smoke/report.html report.png [--width 1280 --height 2000]

Exit status: 0 = the PNG was written and shows content; 1 = no PNG, or a blank one;
2 = no Chromium found (install it, e.g. `apt-get install chromium`).
The browser runs with a throw-away profile and without network features, so nothing is fetched
or kept: the report must be self-contained to render.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser: str, html_path: Path, png_path: Path, width: int, height: int, timeout: float) -> str:
    """Render ``html_path`` into ``png_path``; returns the browser's stderr (for diagnostics)."""
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--screenshot={png_path.resolve()}", f"--window-size={width},{height}",
            "--hide-scrollbars", html_path.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    return done.stderr


def blank_reason(png_path: Path, min_content: float = 0.01, min_colours: int = 16) -> str | None:
    """Why the image looks blank (None if it does not): fewer than ``min_content`` of the pixels
    differ from the most common (background) colour, or fewer than ``min_colours`` colours."""
    pixels = np.asarray(Image.open(png_path).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    content = 1.0 - counts.max() / len(pixels)
    if content < min_content:
        return f"only {content:.2%} of the pixels differ from the background colour {tuple(colours[counts.argmax()])}"
    if len(colours) < min_colours:
        return f"only {len(colours)} distinct colours"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"screenshot: {args.html} not found", file=sys.stderr)
        return 1
    browser = find_chromium()
    if browser is None:
        print(f"screenshot: no Chromium found (looked for {', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    if args.png.exists():
        args.png.unlink()
    stderr = screenshot(browser, args.html, args.png, args.width, args.height, args.timeout)
    if not args.png.is_file():
        print(f"screenshot: {browser} wrote no image; its output:\n{stderr.strip()[-2000:]}", file=sys.stderr)
        return 1
    reason = blank_reason(args.png)
    if reason:
        print(f"screenshot: {args.png} looks blank: {reason}", file=sys.stderr)
        return 1
    with Image.open(args.png) as image:
        print(f"screenshot: {args.png} ({image.width} x {image.height} px) shows the report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
