"""A screenshot of the web page of ``vqgen serve`` for the README, taken in headless Chromium.

    python scripts/screenshot_page.py --checkpoint runs/demo --out docs/serve.png

It starts ``python -m vqgen.serve`` on the run on a free port, generates one image of the first
prompt, then ``--num`` images of the second (fixed seeds, so the picture is reproducible), and
saves the page at ``--width`` x ``--height`` pixels once the last image is done. The prompts are
``--prompt``s, or the first of the run's ``prompts/single.txt`` and ``prompts/two.txt`` (the
demo writes them). Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
STARTUP_S, GENERATION_S = 300, 300

FINISHED = """
    const tiles = [...document.querySelectorAll('#current .tile')];
    if (document.getElementById('error').textContent) return 'error';
    return !document.getElementById('generate').disabled && tiles.length > 0
        && tiles.every((tile) => tile.dataset.state === 'done');
"""


def default_prompts(run: Path) -> list[str]:
    """The first prompt of the run's single-object and two-object evaluation sets."""
    for root in (run, run.parent):  # a run dir, or its transformer/ dir
        files = [root / "prompts" / f"{name}.txt" for name in ("single", "two")]
        if all(f.is_file() for f in files):
            return [f.read_text().splitlines()[0] for f in files]
    raise SystemExit(f"error: no prompts/single.txt and prompts/two.txt in {run} or its parent: give --prompt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, device: str | None) -> subprocess.Popen:
    """``vqgen serve`` on the run, once its /health answers 200."""
    command = [sys.executable, "-m", "vqgen.serve", "--checkpoint", str(run), "--port", str(port), "--log-level", "warning"]
    if device:
        command += ["--device", device]
    server = subprocess.Popen(command, env={"HF_HUB_OFFLINE": "1", **os.environ})
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: vqgen serve exited with status {server.returncode} (its output is above)")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"error: vqgen serve did not answer /health within {STARTUP_S} s")


def browser(profile: str, width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path too, Selenium Manager never runs
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # the viewport itself at width x height (a window of that size has a smaller one)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def generate(driver: webdriver.Chrome, prompt: str, num: int, seed: int) -> None:
    """Fill the form, press Enter, and wait for the images."""
    for field, value in (("n", num), ("seed", seed), ("prompt", prompt)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    driver.find_element(By.ID, "prompt").send_keys("\n")
    if WebDriverWait(driver, GENERATION_S, poll_frequency=0.1).until(lambda d: d.execute_script(FINISHED)) == "error":
        raise SystemExit(f"error: the page says: {driver.find_element(By.ID, 'error').text}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="run dir (or transformer checkpoint dir)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--prompt", action="append", help="a prompt per generation (repeat; default: the run's prompts)")
    p.add_argument("--num", type=int, default=4, help="images of the last generation (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first generation; the next ones add 1 (default 0)")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--device", help="the server's device (default: cuda when available, else cpu)")
    args = p.parse_args()
    prompts = args.prompt or default_prompts(args.checkpoint)

    port = free_port()
    server = start_server(args.checkpoint, port, args.device)
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = browser(profile, args.width, args.height)
            try:
                driver.get(f"http://127.0.0.1:{port}/")
                WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "temperature").get_attribute("value"))
                driver.find_element(By.ID, "seed-random").click()  # fixed seeds: the same picture every time
                for i, prompt in enumerate(prompts):
                    generate(driver, prompt, args.num if i == len(prompts) - 1 else 1, args.seed + i)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    finally:
        server.terminate()  # SIGTERM: vqgen serve drains and exits
        server.wait(timeout=60)
    print(f"wrote {args.out} ({args.width}x{args.height}) from {args.checkpoint}: {len(prompts)} generations")


if __name__ == "__main__":
    main()
