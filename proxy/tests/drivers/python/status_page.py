"""Loads Sluice's status page in headless Chromium (Selenium, chromedriver) and checks it.

Usage: status_page.py ADMIN_URL GROUP SCREENSHOT

Checks that the numbers the page shows are the ones of the /status document it rendered (read
in the same script turn, so no refresh can fall between), that they agree with a /status
fetched here, that the group under load shows a rate, and that the chart moves. Saves a
screenshot. Prints a line of JSON with what it saw; exits 1 with the reason on a failure.
"""

import json
import shutil
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

URL, GROUP, SCREENSHOT = sys.argv[1], sys.argv[2], sys.argv[3]


def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)


def fetch_status():
    with urllib.request.urlopen(URL.rstrip("/") + "/status", timeout=10) as r:
        return json.load(r)


# The page's own formatting, for comparing text with numbers.
def num(v):
    return "–" if v is None else str(v)


def wait(ms):
    if ms is None:
        return "–"
    if ms == 0:
        return "0 ms"
    if ms > 1e12:
        return "> 30 s"
    return f"≤ {ms} ms"


READ = """
const text = (id) => document.getElementById(id).textContent;
const rows = {};
for (const tr of document.querySelectorAll('#groups tbody tr')) {
  const cells = {};
  for (const td of tr.querySelectorAll('td')) cells[td.dataset.field] = td.textContent;
  rows[tr.dataset.group] = cells;
}
return {
  status: window.sluiceStatus || null,
  renders: window.sluiceRenders || 0,
  shown: {
    budget_max: text('budget-max'), budget_active: text('budget-active'),
    budget_idle: text('budget-idle'), budget_connecting: text('budget-connecting'),
    clients_active: text('clients-active'), clients_waiting: text('clients-waiting'),
    clients_idle: text('clients-idle'), server: text('server'), ready: text('ready'),
    pinned_now: text('pinned-now'), connects_ok: text('connects-ok'),
    connects_failed: text('connects-failed'),
  },
  rows: rows,
  chart: document.getElementById('line-active').getAttribute('points'),
  chart_budget: document.getElementById('line-budget').getAttribute('points'),
};
"""


def check_shown(seen):
    s, shown, rows = seen["status"], seen["shown"], seen["rows"]
    want = {
        "budget_max": num(s["budget"]["max"]),
        "budget_active": num(s["budget"]["active"]),
        "budget_idle": num(s["budget"]["idle"]),
        "budget_connecting": num(s["budget"]["connecting"]),
        "clients_active": num(s["clients"]["active"]),
        "clients_waiting": num(s["clients"]["waiting"]),
        "clients_idle": num(s["clients"]["idle"]),
        "server": s["server"],
        "pinned_now": num(s["pinned"]["now"]),
        "connects_ok": num(s["server_connects"]["ok"]),
        "connects_failed": num(s["server_connects"]["failed"]),
    }
    for key, value in want.items():
        if shown[key] != value:
            fail(f"{key}: the page shows {shown[key]!r}, its /status says {value!r}")
    names = [g["name"] for g in s["groups"]]
    if sorted(rows) != sorted(names):
        fail(f"groups shown {sorted(rows)} but /status has {sorted(names)}")
    for g in s["groups"]:
        row = rows[g["name"]]
        for field, value in [
            ("active", num(g["active"])),
            ("waiting", num(g["waiting"])),
            ("oldest", f"{g['oldest_wait_ms']} ms"),
            ("p50", wait(g["wait_p50_ms"])),
            ("p99", wait(g["wait_p99_ms"])),
        ]:
            if row[field] != value:
                fail(f"group {g['name']} {field}: shown {row[field]!r}, /status {value!r}")
        # Rates to one decimal: JavaScript rounds an exact tie up, Python to even.
        for field, value in [("tps", g["tps"]), ("rejections", g["rejections_per_second"])]:
            shown_ok = (row[field] == "–") if value is None else (
                row[field] != "–" and abs(float(row[field]) - value) <= 0.051)
            if not shown_ok:
                fail(f"group {g['name']} {field}: shown {row[field]!r}, /status {value!r}")


options = webdriver.ChromeOptions()
options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1400,1000", "--no-first-run", "--disable-extensions"]:
    options.add_argument(arg)
service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
driver = webdriver.Chrome(options=options, service=service)
try:
    driver.set_page_load_timeout(30)
    driver.get(URL)
    deadline = time.time() + 30
    seen = driver.execute_script(READ)
    while seen["renders"] < 3 or not seen["status"]["groups"]:
        if time.time() > deadline:
            fail(f"the page did not render /status three times in 30 s: {seen}")
        time.sleep(0.2)
        seen = driver.execute_script(READ)

    # Shown numbers are those of the document rendered, a few times over.
    for _ in range(3):
        check_shown(seen)
        time.sleep(1.1)
        seen = driver.execute_script(READ)
    check_shown(seen)

    # The document agrees with a /status fetched independently just after.
    mine = fetch_status()
    page = seen["status"]
    for key in ["server", "version"]:
        if page[key] != mine[key]:
            fail(f"{key}: page {page[key]!r}, /status {mine[key]!r}")
    if page["budget"]["max"] != mine["budget"]["max"]:
        fail(f"budget: page {page['budget']['max']}, /status {mine['budget']['max']}")
    busy = {g["name"]: g for g in page["groups"]}.get(GROUP)
    later = {g["name"]: g for g in mine["groups"]}.get(GROUP)
    if busy is None or later is None:
        fail(f"group {GROUP} missing: page {list(busy or {})}, /status {mine['groups']}")
    if not (busy["transactions"] <= later["transactions"]):
        fail(f"transactions went back: page {busy['transactions']}, later {later['transactions']}")
    if not (busy["tps"] and busy["tps"] > 0):
        fail(f"the group under load shows no rate: {busy}")
    if seen["rows"][GROUP]["tps"] in ("–", "0.0"):
        fail(f"the page shows no rate for {GROUP}: {seen['rows'][GROUP]}")

    # The chart moves: its points change as samples arrive.
    before = seen["chart"]
    time.sleep(2.5)
    after = driver.execute_script(READ)
    if not after["chart"] or after["chart"] == before:
        fail(f"the chart did not change in 2.5 s: {before!r}")
    if len(after["chart"].split()) < 2:
        fail(f"the chart has fewer than two points: {after['chart']!r}")

    driver.save_screenshot(SCREENSHOT)
    print(json.dumps({
        "renders": after["renders"],
        "shown": after["shown"],
        "group": after["rows"][GROUP],
        "chart_points": len(after["chart"].split()),
    }))
finally:
    driver.quit()
