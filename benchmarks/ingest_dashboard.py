"""Ingest with the dashboard open (issue 15: throughput with it >= 0.95 of without): an admin's queue
page polls its panels from the process that receives, so its reads, renders and token writes could
slow what matters most, receiving.

    .venv/bin/python -m benchmarks.ingest_dashboard [--slices 300] [--size 512] [--repeats 3]
        [--history 25] [--settle 10] [--workers/--no-workers] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from sqlalchemy.engine import make_url

from benchmarks.ingest import DEFAULT_FAST_PATH, make_series, send, settled
from node.core.config import Settings
from node.db.models import JobState
from tests import peers
from tests.browser import CHROMIUM_ARGS, chromium
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually

QUIET = "(a) API on, nobody watching"
WATCHED = "(b) queue page open in Chromium"
TARGET = 0.95
# A rule that every CT series reaches and none passes: routing and a REJECTED job for each series
# (rows on the queue page), no segmentation taking the CPU from ingest.
RULE = {"name": "bench-never-enough-slices", "min_slices": 100_000}
USER = "bench-admin"
PANELS = ("/ui/queue", "/ui/workers", "/ui/destinations", "/ui/charts")
TICKS = os.sysconf("SC_CLK_TCK")
# Every fetch the page made of a panel: path, start (ms since the epoch), duration (ms).
PANEL_TIMINGS_JS = """
return performance.getEntriesByType('resource')
  .filter(e => new URL(e.name).pathname.startsWith('/ui/'))
  .map(e => [new URL(e.name).pathname, performance.timeOrigin + e.startTime, e.duration]);
"""
PANELS_LOADED_JS = (
    "return [...document.querySelectorAll('[data-poll]')].every(p => p.dataset.html !== undefined)"
)


@dataclass
class Sample:
    """One condition's turn in a round."""

    seconds: float  # storescu's time for the series
    node_cpu_s: float  # CPU seconds of the node's processes during the send
    browser_cpu_s: float  # and of Chromium's
    idle_node: float  # the node's CPU, in cores, over the settle before the send
    idle_browser: float
    start_ms: float  # the send's window, ms since the epoch
    end_ms: float


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {QUIET: [], WATCHED: []})
    panel_fetches: list[tuple[str, float, float]] = field(default_factory=list)


# --- CPU time from /proc ---------------------------------------------------------------------------


def _stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields from the state on (ppid at 1, pgrp 2, utime 11, stime 12)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            found[int(entry.name)] = text[text.rindex(")") + 2 :].split()
    return found


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / TICKS


def group_cpu(pgid: int) -> dict[int, float]:
    """CPU seconds of each process in the group (``segnode serve``, its worker and its pool)."""
    return {pid: _cpu(f) for pid, f in _stats().items() if int(f[2]) == pgid}


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of ``root`` and every process below it (chromedriver, Chromium and its children)."""
    stats = _stats()
    children: dict[int, list[int]] = {}
    for pid, f in stats.items():
        children.setdefault(int(f[1]), []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found[pid] = _cpu(stats[pid])
            todo.extend(children.get(pid, []))
    return found


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two readings; a process started between them counts whole."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


# --- the node ----------------------------------------------------------------------------------------


def node_config(database_url: str | None) -> dict[str, Any]:
    defaults = Settings()
    config: dict[str, Any] = {
        # The node's own defaults where the test harness would shorten them.
        "quiet_period_s": defaults.quiet_period_s,
        "assembly_poll_s": defaults.assembly_poll_s,
        "scp": {"max_associations": 16, "fast_path": DEFAULT_FAST_PATH},
        "api": {"enabled": True},
        "rules": [RULE],
    }
    if database_url:
        config["database_url"] = database_url
    return config


def start_node(node: SegnodeProcesses, workers: bool, password: str) -> int:
    """``segnode serve`` with its API, an admin who may log in, and (if any) its worker ready;
    the process group to count the node's CPU in."""
    node.upgrade()
    node.add_user(USER, "admin", password)
    proc = node.serve(workers=workers, upgrade=False)
    peers.wait_for_port(node.values["api"]["port"], timeout=60)
    if workers:
        node.wait_for_log("serve", " ready.", timeout=180)  # Celery's word for a worker taking tasks
    return proc.pid  # started in a session of its own: its pid is its group


def describe(node: SegnodeProcesses, args: argparse.Namespace, history: int) -> list[str]:
    values = node.values
    url = values.get("database_url")
    database = (
        f"{make_url(url).render_as_string(hide_password=True)} (given), embedded broker"
        if url
        else "embedded SQLite, embedded broker (the default)"
    )
    path = "fast path" if values["scp"]["fast_path"] else "plain pynetdicom"
    workers = "1 worker process (serve's default; idle: no job reaches it)" if args.workers else "none"
    return [
        f"node: `segnode serve` with its API on 127.0.0.1:{values['api']['port']}; workers: {workers}",
        f"  database: {database}; receive path: {path}; max_associations 16; "
        f"quiet_period_s {values['quiet_period_s']:g}, assembly_poll_s {values['assembly_poll_s']:g} "
        "(node defaults)",
        f"  rules: {RULE['name']!r} (CT, min_slices {RULE['min_slices']:,}): every series is routed and "
        "recorded as a REJECTED job at its release (fast completion), nothing is segmented",
        f"  before the rounds: {history} small series sent and rejected, so that the queue page's "
        "tables (25 rows each) and charts have rows; each send adds one more",
        f"dashboard: Debian's Chromium ({' '.join(CHROMIUM_ARGS[:4])}) via Selenium, logged in on the "
        f"login page as {USER} (admin), queue page `/` open: /ui/queue, /ui/workers, /ui/destinations "
        "every 2 s, /ui/charts every 60 s; a fresh browser for each (b) turn, quit after it",
        f"each turn: {args.settle:g} s settle (CPU measured), sync, storescu; conditions alternate "
        "(a, b / b, a / ...), each series fresh",
    ]


# --- the dashboard -----------------------------------------------------------------------------------


@contextmanager
def dashboard(workdir: Path, base: str, password: str) -> Iterator[tuple[WebDriver, int]]:
    """Chromium logged in with the queue page open and every panel loaded; with chromedriver's pid
    (Chromium runs below it). Nothing of it outlives the block."""
    seen: set[int] = set()
    workdir.mkdir(parents=True, exist_ok=True)
    with chromium(workdir) as driver:
        process = driver.service.process
        assert process is not None, "chromedriver did not start"
        root = process.pid
        driver.get(base + "/login?next=/")
        driver.find_element(By.ID, "name").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys(password)
        driver.find_element(By.ID, "login-button").click()
        if not eventually(lambda: bool(driver.execute_script(PANELS_LOADED_JS)), timeout=60):
            raise RuntimeError(f"the queue page did not load:\n{driver.page_source[:2000]}")
        driver.execute_script("performance.setResourceTimingBufferSize(10000)")
        try:
            yield driver, root
        finally:
            seen = set(tree_cpu(root))
    # driver.quit() ended chromedriver and Chromium; a child that lingers is ended by its pid.
    if not eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in seen), timeout=15):
        for pid in seen:
            try:
                if b"chrom" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# --- one turn ------------------------------------------------------------------------------------------


def turn(
    node: SegnodeProcesses, pgid: int, paths: list[Path], settle_s: float, browser: int | None
) -> Sample:
    """Settle (CPU counted), then storescu the series (CPU and window recorded)."""

    def browser_cpu() -> dict[int, float]:
        return tree_cpu(browser) if browser is not None else {}

    node_idle, browser_idle, idle_start = group_cpu(pgid), browser_cpu(), time.perf_counter()
    time.sleep(settle_s)
    idle_s = time.perf_counter() - idle_start
    idle_node = spent(node_idle, group_cpu(pgid)) / idle_s
    idle_browser = spent(browser_idle, browser_cpu()) / idle_s
    window: dict[str, Any] = {}

    def measure() -> float:
        window["node"], window["browser"], window["start"] = group_cpu(pgid), browser_cpu(), time.time()
        seconds = send(paths, node.port, "SEGNODE")
        window["end"] = time.time()
        window["node_cpu"] = spent(window["node"], group_cpu(pgid))
        window["browser_cpu"] = spent(window["browser"], browser_cpu())
        return seconds

    seconds = settled(measure)
    return Sample(
        seconds,
        window["node_cpu"],
        window["browser_cpu"],
        idle_node,
        idle_browser,
        window["start"] * 1000,
        window["end"] * 1000,
    )


def run_round(
    r: int,
    node: SegnodeProcesses,
    pgid: int,
    root: Path,
    args: argparse.Namespace,
    password: str,
    jobs_before: int,
    results: Results,
) -> None:
    """Both conditions, each with a series of its own; (a) first in even rounds, (b) in odd ones."""
    series = make_series(root / f"round{r}", 2, args.slices, args.size)
    order = [QUIET, WATCHED] if r % 2 == 0 else [WATCHED, QUIET]
    base = f"http://127.0.0.1:{node.values['api']['port']}"
    for condition, paths in zip(order, series, strict=True):
        if condition == WATCHED:
            with dashboard(root / f"chromium{r}", base, password) as (driver, chromedriver):
                sample = turn(node, pgid, paths, args.settle, chromedriver)
                fetches = driver.execute_script(PANEL_TIMINGS_JS)
                results.panel_fetches.extend((str(p), float(s), float(d)) for p, s, d in fetches)
        else:
            sample = turn(node, pgid, paths, args.settle, None)
        results.samples[condition].append(sample)
        print(f"  round {r + 1}, {condition}: {sample.seconds:.2f} s", flush=True)
        node.wait_for_job_count(jobs_before + sum(len(done) for done in results.samples.values()))
    shutil.rmtree(root / f"round{r}", ignore_errors=True)
    shutil.rmtree(root / f"chromium{r}", ignore_errors=True)


# --- the report -----------------------------------------------------------------------------------------


def report(results: Results, n: int) -> None:
    quiet, watched = results.samples[QUIET], results.samples[WATCHED]
    print("\n| condition | seconds per round | median | inst/s |\n| --- | --- | --- | --- |")
    medians = {}
    for condition, samples in results.samples.items():
        times = [s.seconds for s in samples]
        medians[condition] = statistics.median(times)
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {condition} | {runs} | {medians[condition]:.2f} | {n / medians[condition]:.0f} |")
    ratio = medians[QUIET] / medians[WATCHED]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"\nthroughput (b) / (a): {ratio:.2f}   (target >= {TARGET}: {verdict})")
    # Rounds pair turns seconds apart; the disk's slow and fast phases last longer than that.
    per_round = [a.seconds / b.seconds for a, b in zip(quiet, watched, strict=True)]
    rounds_text = ", ".join(f"{x:.2f}" for x in per_round)
    print(f"  median of each round's ratio: {statistics.median(per_round):.2f}   ({rounds_text})")

    def med(samples: list[Sample], value: Callable[[Sample], float]) -> float:
        return statistics.median(value(s) for s in samples)

    print("\nCPU, medians over rounds (settle: cores busy while nobody sends; send: CPU seconds in the send)")
    print("| condition | node, settle | Chromium, settle | node, send | Chromium, send |")
    print("| --- | --- | --- | --- | --- |")
    for condition, samples in results.samples.items():
        print(
            f"| {condition} | {med(samples, lambda s: s.idle_node):.3f} | "
            f"{med(samples, lambda s: s.idle_browser):.3f} | {med(samples, lambda s: s.node_cpu_s):.2f} | "
            f"{med(samples, lambda s: s.browser_cpu_s):.2f} |"
        )

    windows = [(s.start_ms, s.end_ms) for s in watched]
    print("\npanel fetches in Chromium (ms, request to last byte), between sends and during sends")
    print("| panel | between: fetches | median | max | during: fetches | median | max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for panel in PANELS:
        mine = [(start, ms) for path, start, ms in results.panel_fetches if path == panel]
        during = [ms for start, ms in mine if any(a <= start <= b for a, b in windows)]
        idle = [ms for start, ms in mine if not any(a <= start <= b for a, b in windows)]
        cells = []
        for found in (idle, during):
            if found:
                cells += [str(len(found)), f"{statistics.median(found):.0f}", f"{max(found):.0f}"]
            else:
                cells += ["0", "-", "-"]
        print(f"| {panel} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--history", type=int, default=25, help="small series rejected before the rounds (queue page rows)"
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds before each send (page polling, CPU counted)"
    )
    parser.add_argument(
        "--workers", action=argparse.BooleanOptionalAction, default=True, help="serve's worker process"
    )
    parser.add_argument("--database-url", default=None, help="default: the embedded SQLite database")
    args = parser.parse_args()

    started = time.perf_counter()
    password = secrets.token_urlsafe(18)
    root = Path(tempfile.mkdtemp(prefix="segnode-bench-ingest-dashboard-"))
    node = SegnodeProcesses(root / "node", node_config(args.database_url))
    try:
        pgid = start_node(node, args.workers, password)
        before = len(node.jobs())
        if args.history:
            small = make_series(root / "history", args.history, 4, 64)
            send([p for s in small for p in s], node.port, "SEGNODE")
            node.wait_for_job_count(before + args.history)
        print(
            f"series: {args.slices} instances, {args.size}x{args.size}, uncompressed; CPUs: {os.cpu_count()}"
        )
        for line in describe(node, args, args.history):
            print(line)
        results = Results()
        for r in range(args.repeats):
            run_round(r, node, pgid, root, args, password, before + args.history, results)
        report(results, args.slices)
        rejected = sum(j.state == JobState.REJECTED for j in node.jobs()[before:])
        print(f"\njobs made in the run: {len(node.jobs()) - before} ({rejected} REJECTED)")
        print(f"wall time: {time.perf_counter() - started:.0f} s")
    finally:
        node.stop_all()
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()
