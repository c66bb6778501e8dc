"""A headless Chromium for the page's tests: Debian's ``chromium`` driven by Selenium through
Debian's ``chromedriver`` (the two always of one version), so nothing is downloaded at run time.

Without them the tests fail and say how to install them (``.ci/run`` does); on a machine where
they cannot be installed, ``VIDEOQA_SKIP_BROWSER_TESTS=1`` skips them instead, except in CI.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DESKTOP = (1280, 900)
PHONE = (375, 812)
WAIT_S = 180.0


# What a person with a screen reader or a keyboard, or with weak sight, would trip over: a control
# without a label, a button without a name, an image without alt text, text under WCAG's contrast
# (4.5:1; 3:1 for large text) against the first opaque background behind it.
_ACCESSIBILITY_PROBLEMS = r"""
const problems = [];
for (const control of document.querySelectorAll("input, textarea, select")) {
  if (!control.labels.length && !control.getAttribute("aria-label")) problems.push(`no label: #${control.id}`);
}
for (const button of document.querySelectorAll("button")) {
  if (!button.textContent.trim() && !button.getAttribute("aria-label")) problems.push(`nameless button: ${button.outerHTML}`);
}
for (const image of document.querySelectorAll("img")) if (!image.hasAttribute("alt")) problems.push("img without alt");
const rgba = (text) => { const v = (text.match(/[\d.]+/g) || []).map(Number); return v.length === 3 ? [...v, 1] : v; };
const luminance = ([r, g, b]) => {
  const f = (c) => ((c /= 255) <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4);
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
};
const backdrop = (e) => {
  for (; e; e = e.parentElement) { const c = rgba(getComputedStyle(e).backgroundColor); if (c[3] > 0) return c; }
  return [255, 255, 255, 1];
};
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node; (node = walker.nextNode()); ) {
  const element = node.parentElement;
  if (!node.textContent.trim() || !element.getClientRects().length) continue;
  const style = getComputedStyle(element);
  if (style.visibility === "hidden") continue;
  const [light, dark] = [luminance(rgba(style.color)), luminance(backdrop(element))].sort((a, b) => b - a);
  const ratio = (light + 0.05) / (dark + 0.05);
  const size = parseFloat(style.fontSize);
  const needed = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66) ? 3 : 4.5;
  if (ratio < needed) problems.push(`contrast ${ratio.toFixed(2)} < ${needed}: ${node.textContent.trim().slice(0, 40)}`);
}
return problems;
"""


def require_chromium() -> None:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not missing:
        return
    message = f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver"
    if os.environ.get("VIDEOQA_SKIP_BROWSER_TESTS") == "1" and not os.environ.get("CI"):
        pytest.skip(message + " (skipped: VIDEOQA_SKIP_BROWSER_TESTS=1)")
    pytest.fail(message + " (or set VIDEOQA_SKIP_BROWSER_TESTS=1 to skip these tests outside CI)", pytrace=False)


class Browser:
    """One Chromium tab, with the few things the tests do to it."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def open(self, url: str, size: tuple[int, int] = DESKTOP) -> None:
        self.resize(size)
        self.driver.get(url)
        self.wait(lambda: self.js("return document.readyState") == "complete", "the page to load")

    def resize(self, size: tuple[int, int]) -> None:
        """The viewport exactly ``size`` CSS pixels, as a phone of that width shows it."""
        width, height = size
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """The element's ``textContent`` as is (Selenium's ``.text`` folds white space)."""
        return str(self.js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null", css))

    def visible(self, css: str) -> bool:
        return bool(
            self.js("const e = document.querySelector(arguments[0]); return !!e && e.offsetParent !== null", css)
        )

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout_s, poll_frequency=0.2).until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}; the page shows:\n{self.text('body')}") from None

    def screenshot(self, path: Path) -> Path:
        """The whole page, not only the viewport."""
        width, height = self.js(
            "const d = document.documentElement; return [d.scrollWidth, Math.max(d.scrollHeight, innerHeight)]"
        )
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def accessibility_problems(self) -> list[str]:
        return list(self.js(_ACCESSIBILITY_PROBLEMS))

    def tab_order(self, presses: int) -> list[str]:
        """The ids (or job ids, or tag names) focused by pressing Tab ``presses`` times from the top."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        # Focus starts from the page's first heading, as after reading the title.
        self.js("const h = document.querySelector('h1'); h.tabIndex = -1; h.focus(); h.removeAttribute('tabindex')")
        order = []
        for _ in range(presses):
            ActionChains(self.driver).send_keys(Keys.TAB).perform()
            order.append(str(self.js("const e = document.activeElement; return e.id || e.dataset.job || e.tagName")))
        return order

    def console_errors(self) -> list[str]:
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]


def launch() -> Iterator[Browser]:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()
