"""A real browser for the console's tests: Debian's Chromium, driven by Playwright's Python API.

Playwright cannot download its own browser here, so it drives
/usr/bin/chromium (make install puts it there) with the flags this machine
needs: no sandbox (we run as root), and no background traffic to the
closed network. axe-core comes from npm (package-lock.json), installed by
`make install` into node_modules.
"""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, Page, Playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = ROOT / "build" / "console-screenshots"
VIEWPORT = {"width": 1280, "height": 860}


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def new_context(browser: Browser, **kw) -> BrowserContext:
    """A fresh profile (no cookies) that trusts the test cluster's self-made certificates."""
    return browser.new_context(ignore_https_errors=True, viewport=VIEWPORT, **kw)


def sign_in(page: Page, base: str, user: str, password: str, then: str = "/console/") -> None:
    page.goto(f"{base}{then}")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(base + then.split("?")[0]) + r"(\?.*)?$"))


def axe_violations(page: Page) -> list[dict]:
    """axe-core's serious and critical violations on the page as it is (WCAG 2.x A and AA rules).

    axe runs in the page through the DevTools protocol, which the page's CSP
    does not govern: the console's own CSP stays as strict as users get it.
    """
    page.evaluate(AXE.read_text())
    found = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations'],
            runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.slice(0, 3).map(n => n.html)}));
    }""")
    return [v for v in found if v["impact"] in ("serious", "critical")]


def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
