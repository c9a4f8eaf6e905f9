"""The dashboard page in a real browser (issue 18): headless Chromium (Debian's chromium and chromium-driver
packages, driven by selenium) loads the page of one node of a 3-node swarm running a job; the page lists the three
peers with this node marked, its loss curve gains points as rounds complete, and its last point is the round and
loss `swarmnode job ID --json` prints at the end. The screenshot is saved as docs/dashboard.png (the README shows
it). .ci/run installs the two packages; without them (a machine that lacks them) the test is skipped, saying so."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from node.devtools.localswarm import wait_for
from tests.conftest import REPO, run_cli
from tests.test_dashboard_live import dashboard_url
from tests.test_jobs_integration import JOB, start_nodes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = REPO / "docs" / "dashboard.png"
ROUNDS = 12
# rounds long enough (~1 s) that the page, updated about once a second, sees the curve grow between them
BROWSER_JOB = (JOB.replace("rounds = 5", f"rounds = {ROUNDS}").replace("local_steps = 10", "local_steps = 300")
               .replace("hidden = 64", "hidden = 256"))


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1600", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download: both given
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_the_swarm_and_a_loss_curve_that_grows_to_the_jobs_last_round(node_factory, tmp_path,
                                                                                       browser):
    nodes = start_nodes(node_factory, tmp_path, ["digits", "digits", "digits"])
    browser.get(dashboard_url(nodes[0]))

    def rows() -> list[list[str]]:  # read in one script: the page re-renders its rows at every update
        return browser.execute_script("return [...document.querySelectorAll('#peers tbody tr')]"
                                      ".map(r => [r.dataset.peer, r.className, r.textContent])")

    wait_for(lambda: len(rows()) == 3, 60, "the three peers in the page's table")
    table = rows()
    assert {peer for peer, _, _ in table} == {n.peer_id for n in nodes}
    assert [peer for peer, cls, _ in table if cls == "self"] == [nodes[0].peer_id]
    assert "(this node)" in next(text for peer, _, text in table if peer == nodes[0].peer_id)

    job_file = tmp_path / "job.toml"
    job_file.write_text(BROWSER_JOB)
    submitted = run_cli("submit", str(job_file), "--json", "--home", str(nodes[0].home))
    assert submitted.returncode == 0, submitted.stderr[-1500:]
    job_id = json.loads(submitted.stdout)["job_id"]

    def shown() -> dict | None:  # the job's box as the page shows it now: state, round line, loss curve points
        return browser.execute_script(
            "const box = document.getElementById(arguments[0]); if (!box) return null;"
            "const c = box.querySelector('canvas.loss');"
            "return {state: box.dataset.state, round: box.querySelector('.round').textContent,"
            "        points: JSON.parse((c && c.dataset.points) || '[]')};", f"job-{job_id}")

    seen: list[int] = []

    def done() -> dict | None:
        box = shown()
        if box is None:
            return None
        if not seen or seen[-1] != len(box["points"]):
            seen.append(len(box["points"]))
        return box if box["state"] == "done" and len(box["points"]) == ROUNDS else None

    box = wait_for(done, 200, f"the page to show the job done with {ROUNDS} points on its loss curve")
    assert len([n for n in seen if 0 < n < ROUNDS]) >= 2, seen  # the curve grew while the job ran
    cli = json.loads(run_cli("job", job_id, "--json", "--home", str(nodes[0].home)).stdout)
    last_round, last_loss = box["points"][-1]
    assert cli["state"] == "done" and last_round == cli["round"] == ROUNDS
    assert last_loss == pytest.approx(cli["train_loss"], rel=1e-12, abs=0.0)
    assert box["round"] == f"round {ROUNDS}/{ROUNDS}"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    shutil.copyfile(shot, SCREENSHOT)
