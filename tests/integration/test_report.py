"""`heedful report` on a real store (a SQLite file and a PostgreSQL server) filled through the store and
repository code: every plot is there, the summary matches counts made by hand, text from the store is
escaped, filters and bad input; and the page in headless Chromium (no console errors, every plot drawn,
a screenshot kept)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

from adapters.lifecycle import rollback_scope
from kernel.settings import Settings
from server.stores import open_store
from storage.repositories import AdapterRepository, Scope
from storage.store import CandidateRecord, CompletionRecord, EventRecord, SessionStart
from tests.e2e.test_vscode_client import drive_chromium, keep_artifact
from tests.procs import run_heedful
from tools.report import INDEX_PLOTS, PLOTS

BASE = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
EVE = '<b>eve&"x</b>'  # a developer id that is also markup
EVE_TEAM = "<i>ops</i>"
ROLLBACK_REASON = '<script>alert("x")</script> accept rate fell'
REJECT_REASON = "KL 7.0 > thresholds.kl_max = 5.0 <img src=x onerror=alert(1)>"
PAGE = Path(__file__).resolve().parent / "report_page.mjs"


def steps(*losses: float | str) -> list[dict[str, float | str]]:
    return [
        {"step": float(i), "loss": loss, "mean_kl": 0.01 * i, "reward_mean": 0.1 * i, "clip_fraction": 0.05 * i}
        for i, loss in enumerate(losses, start=1)
    ]


def write_config(tmp_path: Path, database_url: str) -> Path:
    config = tmp_path / "heedful.toml"
    # Retention off: the rows have fixed times in the past, and every command that opens the store applies it.
    config.write_text(f'[database]\nurl = "{database_url}"\n\n[privacy]\nretention_days = 0\n')
    return config


async def fill_store(database_url: str) -> dict[str, str]:
    """Three developers, eight completions with outcomes (and one the show policy held back), four adapter
    versions and one rollback.

    alice (team web, arm rl):      a1 accepted, a2 partly accepted, a3 rejected, a4 corrected (no outcome)
    bob (team web, arm baseline):  b1 rejected, b2 rejected and corrected, b3 accepted
    EVE (team EVE_TEAM, arm none): e1, nothing else

    Kept characters: a1 all 19 of its suggestion (no snapshot yet), a2 the 5 it took, b3 60 % of 19 at its
    latest snapshot (11.4: 11; an earlier one said 90 %).
    """
    settings = Settings()
    settings.database.url = database_url
    store = await open_store(settings, apply_retention=False)
    alice, web = Scope.developer("alice"), Scope.team("web")
    ids: dict[str, str] = {}
    try:
        async with store.unit() as s:
            repo = AdapterRepository(s)
            v1 = await repo.add_candidate(alice, path="/a/v1", step=3, kl=0.02, metrics={"steps": steps(0.9, 0.7, 0.5)})
            await repo.activate(alice, v1.id)
            ids["v1"] = v1.id
        async with store.unit() as s:
            repo = AdapterRepository(s)
            metrics = {"steps": steps(0.45, "nan"), "prm": {"held_out_accuracy": 0.8}}
            v2 = await repo.add_candidate(alice, path="/a/v2", step=2, kl=0.03, metrics=metrics, parent_id=v1.id)
            await repo.activate(alice, v2.id)
            ids["v2"] = v2.id
        async with store.unit() as s:
            await rollback_scope(s, alice, actor="guard:server", reason=ROLLBACK_REASON)
        async with store.unit() as s:
            repo = AdapterRepository(s)
            v3 = await repo.add_candidate(alice, path="/a/v3", step=1, kl=7.0, metrics={"steps": steps(0.4)})
            await repo.reject(alice, v3.id, REJECT_REASON)
            ids["v3"] = v3.id
            t1 = await repo.add_candidate(web, path="/t/v1", step=0, kl=None, metrics={})
            ids["t1"] = t1.id

        await store.start_session(SessionStart("s-alice", "alice", "web", "pytest", "1"))
        await store.start_session(SessionStart("s-bob", "bob", "web", "pytest", "1"))
        await store.start_session(SessionStart("s-eve", EVE, EVE_TEAM, "pytest", "1"))
        rows = [
            # id, session, developer, team, arm, adapter, latency, seconds after BASE, event kinds
            ("a1", "s-alice", "alice", "web", "rl", v1.id, 10.0, 0, ["shown", "accepted"]),
            ("a2", "s-alice", "alice", "web", "rl", v1.id, 20.0, 60, ["shown", "partial_accept"]),
            ("a3", "s-alice", "alice", "web", "rl", None, 30.0, 120, ["shown", "rejected"]),
            ("a4", "s-alice", "alice", "web", "rl", None, 40.0, 180, ["shown", "correction"]),
            ("b1", "s-bob", "bob", "web", "baseline", None, 50.0, 30, ["rejected"]),
            ("b2", "s-bob", "bob", "web", "baseline", None, 60.0, 90, ["rejected", "correction"]),
            ("b3", "s-bob", "bob", "web", "baseline", None, 70.0, 150, ["shown", "accepted", "edit_snapshot"]),
            ("e1", "s-eve", EVE, EVE_TEAM, "none", None, None, 200, ["shown"]),
        ]
        for cid, session, developer, team, arm, adapter, latency, after, kinds in rows:
            at = BASE + timedelta(seconds=after)
            await store.record_completion(
                CompletionRecord(
                    id=cid,
                    session_id=session,
                    developer_id=developer,
                    team_id=team,
                    prompt="def total(xs):",
                    prompt_token_ids=[1, 2],
                    candidates=[CandidateRecord("\n    return sum(xs)", [3, 4], [-0.1, -0.2], "stop")],
                    arm=arm,
                    adapter_version=adapter,
                    latency_ms=latency,
                    created_at=at,
                )
            )
            for i, kind in enumerate(kinds):
                text = "Always add type hints <em>please</em>" if kind == "correction" else None
                length = {"accepted": 19, "partial_accept": 5}.get(kind)
                delay, ratio = (120.0, 0.6) if kind == "edit_snapshot" else (None, None)
                when = at + timedelta(seconds=1 + i)
                await store.record_event(
                    EventRecord(
                        session, kind, cid, length, delay_s=delay, survival_ratio=ratio, text=text, created_at=when
                    )
                )
                if kind == "edit_snapshot":  # an earlier snapshot, recorded later: the delay decides
                    later = at + timedelta(seconds=9)
                    await store.record_event(
                        EventRecord(session, kind, cid, delay_s=30.0, survival_ratio=0.9, created_at=later)
                    )
        # One the show policy held back: not a served completion, its latency no served one's.
        await store.record_completion(
            CompletionRecord(
                id="a5",
                session_id="s-alice",
                developer_id="alice",
                team_id="web",
                prompt="def total(xs):",
                prompt_token_ids=[1, 2],
                candidates=[CandidateRecord("\n    # add them up", [5, 6], [-0.1, -0.2], "stop")],
                shown_index=None,
                arm="rl",
                latency_ms=5.0,
                created_at=BASE + timedelta(seconds=190),
            )
        )
    finally:
        await store.close()
    return ids


class Page(HTMLParser):
    """The report's plots (name -> the text of its <title>), summary cells and table rows."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.plots: dict[str, str] = {}
        self.plot_count: dict[str, int] = {}
        self.stats: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self._svg: str | None = None
        self._depth = 0
        self._in_title = False
        self._stat: str | None = None
        self._cell: list[str] | None = None
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and a.get("data-plot"):
            name = str(a["data-plot"])
            self._svg, self._depth = name, 0
            self.plot_count[name] = self.plot_count.get(name, 0) + 1
        elif self._svg is not None:
            self._depth += 1
            self._in_title = tag == "title" and self._depth == 1 and self._svg not in self.plots
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []
            self._stat = a.get("data-stat")

    def handle_endtag(self, tag: str) -> None:
        if self._svg is not None:
            if tag == "svg" and self._depth == 0:
                self._svg = None
            else:
                self._depth -= 1
            self._in_title = False
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            if self.rows:
                self.rows[-1].append(text)
            if self._stat:
                self.stats[self._stat] = text
            self._cell, self._stat = None, None

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass  # self-closing SVG shapes: no depth change

    def handle_data(self, data: str) -> None:
        if self._in_title and self._svg is not None:
            self.plots[self._svg] = self.plots.get(self._svg, "") + data
        if self._cell is not None:
            self._cell.append(data)


def report(config: Path, tmp_path: Path, *args: str, name: str = "report.html") -> tuple[str, Page]:
    out = tmp_path / name
    result = run_heedful(config, "report", "--out", str(out), *args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out.resolve())
    document = out.read_text(encoding="utf-8")
    return document, Page(document)


def assert_every_plot(page: Page, *, index_plots: bool = True) -> None:
    expected = [p for p in PLOTS if index_plots or p not in INDEX_PLOTS]
    assert sorted(page.plots) == sorted(expected), page.plot_count
    assert all(n == 1 for n in page.plot_count.values()), page.plot_count
    assert all(title.strip() for title in page.plots.values()), page.plots


def assert_self_contained(document: str) -> None:
    lowered = document.lower()
    assert "<script" not in lowered
    assert "http://" not in lowered.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in lowered and "@import" not in lowered and "url(" not in lowered


async def test_report_has_every_plot_the_hand_counted_summary_and_escapes_store_text(
    database_url: str, tmp_path: Path
) -> None:
    ids = await fill_store(database_url)
    config = write_config(tmp_path, database_url)

    document, page = report(config, tmp_path)
    assert_every_plot(page)
    assert_self_contained(document)
    assert page.stats["developers"] == "3"
    assert page.stats["completions"] == "8"
    assert page.stats["held_back"] == "1"
    assert page.stats["accept_rate"] == "50.0% (3 of 6)"  # a1, a2, b3 of a1-a3, b1-b3
    assert page.stats["correction_rate"] == "25.0% (2 of 8)"  # a4, b2
    assert page.stats["kept_chars"] == "4.4 (35 over 8 shown)"  # 19 + 5 + 11; every completion was seen
    assert page.stats["adapters"] == "4 (1 active, 1 candidate, 1 rejected, 1 rolled back)"
    assert page.stats["rollbacks"] == "1"
    assert page.stats["window"] == "2026-11-02 10:00:00 to 2026-11-02 10:03:20 UTC"
    assert "no data yet" not in document

    # Latency percentiles (nearest rank) per arm and model.
    assert ["rl · adapter", "2", "10.0", "20.0", "20.0"] in page.rows
    assert ["rl · base", "2", "30.0", "40.0", "40.0"] in page.rows
    assert ["baseline · base", "3", "60.0", "70.0", "70.0"] in page.rows
    # Per developer and arm.
    assert ["alice", "rl", "4", "66.7% (2 of 3)", "25.0% (1 of 4)", "6.0 (24 over 4 shown)", "20.0"] in page.rows
    assert ["bob", "baseline", "3", "33.3% (1 of 3)", "33.3% (1 of 3)", "3.7 (11 over 3 shown)", "60.0"] in page.rows
    assert [EVE, "none", "1", "n/a", "0.0% (0 of 1)", "0.0 (0 over 1 shown)", "n/a"] in page.rows
    # Per developer and the version that served them.
    assert ["alice", ids["v1"], "2", "100.0% (2 of 2)", "0.0% (0 of 2)", "12.0 (24 over 2 shown)"] in page.rows
    assert ["alice", "base model", "2", "0.0% (0 of 1)", "50.0% (1 of 2)", "0.0 (0 over 2 shown)"] in page.rows
    # The versions and the rollback, with their reasons.
    statuses = {row[1]: row[2] for row in page.rows if len(row) == 8 and row[0] != "scope"}
    assert statuses == {ids["v1"]: "active", ids["v2"]: "rolled_back", ids["v3"]: "rejected", ids["t1"]: "candidate"}
    assert any(
        row[1:6] == ["developer:alice", "guard:server", ids["v2"], ids["v1"], ROLLBACK_REASON] for row in page.rows
    )

    # Text from the store is escaped, in tables and in the plots' titles alike.
    for raw in (EVE, EVE_TEAM, ROLLBACK_REASON, REJECT_REASON):
        assert raw not in document
    assert "&lt;b&gt;eve&amp;&quot;x&lt;/b&gt;" in document
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in document
    assert "&lt;img src=x onerror=alert(1)&gt;" in document

    # The same store gives the same bytes.
    again, _ = report(config, tmp_path, name="again.html")
    assert again == document

    # Filters: one developer; one team; a time.
    _, alice = report(config, tmp_path, "--developer", "alice", name="alice.html")
    assert (alice.stats["developers"], alice.stats["completions"]) == ("1", "4")
    assert alice.stats["accept_rate"] == "66.7% (2 of 3)" and alice.stats["correction_rate"] == "25.0% (1 of 4)"
    assert alice.stats["adapters"] == "3 (1 active, 1 rejected, 1 rolled back)"
    assert alice.stats["rollbacks"] == "1"
    _, web = report(config, tmp_path, "--team", "web", name="web.html")
    assert (web.stats["developers"], web.stats["completions"]) == ("2", "7")
    assert web.stats["accept_rate"] == "50.0% (3 of 6)" and web.stats["correction_rate"] == "28.6% (2 of 7)"
    assert web.stats["adapters"].startswith("4 ")
    _, later = report(config, tmp_path, "--since", "2026-11-02T10:01:40", name="later.html")
    assert (later.stats["developers"], later.stats["completions"]) == ("3", "4")  # a3, a4, b3, e1
    assert later.stats["accept_rate"] == "50.0% (1 of 2)" and later.stats["correction_rate"] == "25.0% (1 of 4)"
    _, two = report(config, tmp_path, "--developer", "bob", "--developer", EVE, name="two.html")
    assert (two.stats["developers"], two.stats["completions"]) == ("2", "4")


def test_an_empty_store_gives_readable_empty_panels(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    result = run_heedful(config, "report", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "heedful-report.html"  # the default, in the current directory
    assert result.stdout.strip() == str(out)
    document = out.read_text(encoding="utf-8")
    page = Page(document)
    assert_every_plot(page)
    assert document.count("no data yet") == len(PLOTS)
    assert page.stats["completions"] == "0" and page.stats["accept_rate"] == "n/a"
    assert page.stats["adapters"] == "0"

    missing = run_heedful(config, "report", "--developer", "nobody", "--out", str(tmp_path / "n.html"))
    assert missing.returncode == 0 and "no completions of nobody" in missing.stderr


def test_bad_input_is_refused_with_the_fix(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    bad = run_heedful(config, "report", "--since", "last tuesday", "--out", str(tmp_path / "r.html"))
    assert bad.returncode == 2 and "--since 'last tuesday' is not a time" in bad.stderr
    assert not (tmp_path / "r.html").exists()

    folder = run_heedful(config, "report", "--out", str(tmp_path))
    assert folder.returncode == 1 and f"--out {tmp_path} is a directory" in folder.stderr

    unwritable = run_heedful(config, "report", "--out", str(tmp_path / "no" / "such" / "dir" / "r.html"))
    assert unwritable.returncode == 1 and "cannot write the report to" in unwritable.stderr

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    (tmp_path / "broken").mkdir()
    broken = write_config(tmp_path / "broken", f"sqlite+aiosqlite:///{garbage}")
    result = run_heedful(broken, "report", "--out", str(tmp_path / "r.html"))
    assert result.returncode == 1 and f"database {garbage} is corrupt or not a SQLite file" in result.stderr


async def test_the_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """Every plot is drawn with a size, nothing is fetched, the console stays clean; the screenshot is kept
    (and copied to HEEDFUL_TEST_ARTIFACTS when that is set)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'heedful.db'}"
    await fill_store(url)
    report(write_config(tmp_path, url), tmp_path)
    screenshot = tmp_path / "heedful-report.png"
    proc = drive_chromium(PAGE, str(tmp_path / "report.html"), str(screenshot))
    print(f"screenshot of the report: {screenshot}")
    assert proc.returncode == 0, f"the browser run failed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["requests"] == []
    plots = {p["name"]: p for p in result["plots"]}
    assert sorted(plots) == sorted(PLOTS) and len(result["plots"]) == len(PLOTS)
    for name, plot in plots.items():
        assert plot["width"] > 0 and plot["height"] > 0, (name, plot)
        assert plot["title"].strip(), name
    assert screenshot.stat().st_size > 0
    keep_artifact(screenshot)
