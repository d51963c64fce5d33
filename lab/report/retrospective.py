"""The retrospective, written from the store: one page for the whole lab and one per track,
rebuilt with the rest of the site (lab.report.site.write_pages). It follows the seeds'
phase-end template:

    success criteria          the hypotheses and their verdicts
    predictions vs results    each prediction beside its estimate and interval (track pages)
    surprises                 the refuted predictions
    open questions            the inconclusive predictions, the invalid experiments, the failures
    hardware observations     wall time and peak memory per track and profile

Nothing here is written by hand: a verdict that changes changes the retrospective. Smoke
results exercise code and are not evidence, so surprises and open questions come from the
other profiles whenever the store has any.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from dataclasses import dataclass

from lab.report.site import (
    _MARK,
    PROFILE_ORDER,
    TRACKS,
    Result,
    _fmt_bytes,
    _fmt_duration,
    _fmt_num,
    _interval_cell,
    _param_label,
    page_path,
    track_of,
)

DIR = "retrospective"
OUTCOMES = ("confirmed", "refuted", "inconclusive", "invalid", "check", "failed", "skipped", "measured")


@dataclass
class Entry:
    """One test's latest result in one profile."""

    nodeid: str
    profile: str
    track: str
    res: Result

    @property
    def outcome(self) -> str:
        row = self.res.row
        if row["status"] != "passed":
            return row["status"]
        return row["verdict"] or "measured"  # a test without a prediction: benchmarks, measurements

    @property
    def title(self) -> str:
        return self.res.row["title"] or self.nodeid

    def link(self) -> str:
        """A markdown link from a retrospective page to the test's hypothesis page."""
        target = page_path(self.res.row["hypothesis"]).as_posix()
        label = _text(self.title)
        params = self.res.params
        if params:
            label += f" ({_text(_param_label(params))})"
        return f"[{label}](../{target})"


def _text(s: str) -> str:
    """Escaped for a markdown table cell."""
    return html.escape(s).replace("|", "\\|").replace("\n", " ")


def entries(latest: dict[str, dict[str, Result]]) -> list[Entry]:
    out = []
    for nodeid in sorted(latest):
        for profile, res in latest[nodeid].items():
            track = track_of(json.loads(res.row["markers"] or "[]"))
            out.append(Entry(nodeid, profile, track, res))
    return out


def _profiles(es: list[Entry]) -> list[str]:
    present = {e.profile for e in es}
    return [p for p in PROFILE_ORDER if p in present] + sorted(present - set(PROFILE_ORDER))


def evidence_profiles(es: list[Entry]) -> list[str]:
    """The profiles whose results count as evidence: all but smoke, unless smoke is all there is."""
    profiles = _profiles(es)
    return [p for p in profiles if p != "smoke"] or profiles


def _track_name(track: str) -> str:
    return TRACKS.get(track, track)


# ---------------------------------------------------------------- sections


def _counts_table(groups: dict[str, list[Entry]], first_col: str, link=None) -> list[str]:
    """One row per (group, profile): how many tests ended in each outcome."""
    lines = [
        f"| {first_col} | profile | " + " | ".join(OUTCOMES) + " |",
        "|---|---|" + "---|" * len(OUTCOMES),
    ]
    for name, es in groups.items():
        for p in _profiles(es):
            c = defaultdict(int)
            for e in es:
                if e.profile == p:
                    c[e.outcome] += 1
            label = link(name) if link else _text(name)
            lines.append(f"| {label} | {p} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    return lines


def _success_criteria(es: list[Entry]) -> list[str]:
    """The track page's criteria: every hypothesis with its verdict per profile."""
    profiles = _profiles(es)
    by_node: dict[str, dict[str, Entry]] = defaultdict(dict)
    for e in es:
        by_node[e.nodeid][e.profile] = e
    lines = ["| hypothesis | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    for nodeid in sorted(by_node):
        row = by_node[nodeid]
        any_e = next(iter(row.values()))
        cells = [row[p].outcome if p in row else "-" for p in profiles]
        lines.append(f"| {any_e.link()} | " + " | ".join(cells) + " |")
    return lines


def _predictions(e: Entry, verdicts: tuple[str, ...] | None = None):
    for v in e.res.verdicts:
        if v.get("kind", "prediction") == "check":
            continue
        if verdicts is None or v["verdict"] in verdicts:
            yield v


def _prediction_row(e: Entry, v: dict, with_profile: bool = True) -> str:
    cells = [e.link(), _text(v["text"]), f"`{v['claim'].replace('|', '/')}`"]
    if with_profile:
        cells.append(e.profile)
    cells += [_fmt_num(v["estimate"]), _interval_cell(v), str(v["n"] if v["n"] is not None else "-"), v["verdict"]]
    return "| " + " | ".join(cells) + " |"


PREDICTION_HEADER = [
    "| hypothesis | prediction | claim | profile | estimate | interval | n | verdict |",
    "|---|---|---|---|---|---|---|---|",
]


def _predictions_vs_results(es: list[Entry]) -> list[str]:
    rows = [_prediction_row(e, v) for e in es for v in _predictions(e)]
    return PREDICTION_HEADER + rows if rows else ["No predictions recorded."]


def _surprises(es: list[Entry]) -> list[str]:
    ev = set(evidence_profiles(es))
    rows = [_prediction_row(e, v) for e in es if e.profile in ev for v in _predictions(e, ("refuted",))]
    if not rows:
        return ["No prediction was refuted."]
    return [
        f"{len(rows)} predictions were refuted: the whole interval lies on the wrong side of the claim. "
        "Each is a finding about the models, or about the prediction.",
        "",
        *PREDICTION_HEADER,
        *rows,
    ]


def _open_questions(es: list[Entry]) -> list[str]:
    ev = set(evidence_profiles(es))
    inconclusive = [_prediction_row(e, v) for e in es if e.profile in ev for v in _predictions(e, ("inconclusive",))]
    invalid = [e for e in es if e.profile in ev and e.outcome == "invalid"]
    failed = [e for e in es if e.profile in ev and e.outcome == "failed"]
    out = []
    if inconclusive:
        out += [
            f"**Inconclusive ({len(inconclusive)}):** the interval straddles the claim; more seeds, a larger "
            "profile or a sharper experiment would decide them.",
            "",
            *PREDICTION_HEADER,
            *inconclusive,
            "",
        ]
    if invalid:
        out += [
            f"**Invalid ({len(invalid)}):** the experiment did not do what the claim needs "
            "(its validity checks failed), so it says nothing about the claim yet.",
            "",
            "| hypothesis | profile | failed checks |",
            "|---|---|---|",
        ]
        for e in invalid:
            checks = [c for c in json.loads(e.res.row.get("validity") or "[]") if not c[1]]
            why = "; ".join(f"{c[0]}" + (f" ({c[2]})" if c[2] else "") for c in checks) or "-"
            out.append(f"| {e.link()} | {e.profile} | {_text(why)} |")
        out.append("")
    if failed:
        out += [
            f"**Failed ({len(failed)}):** the test errored before a verdict.",
            "",
            "| hypothesis | profile | error |",
            "|---|---|---|",
        ]
        for e in failed:
            out.append(f"| {e.link()} | {e.profile} | `{_text(_headline(e.res.row['error']))}` |")
        out.append("")
    return out or ["None: every prediction was decided."]


def _headline(error: str | None) -> str:
    """The exception line of a pytest report (its first `E   ` line), else its last line."""
    lines = (error or "").strip().splitlines()
    raised = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (raised[0] if raised else lines[-1] if lines else "-")[:160]


def _hardware(es: list[Entry], runs: dict, per_track: bool) -> list[str]:
    """Wall time and peak memory per track and profile, the devices they ran on, and
    (on a track page) the slowest tests."""
    groups: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in es:
        if e.outcome != "skipped":
            groups[(e.track, e.profile)].append(e)
    lines = [
        "| track | profile | tests | total wall time | longest test | peak memory (largest) |",
        "|---|---|---|---|---|---|",
    ]
    for (track, profile), g in sorted(groups.items(), key=lambda kv: (kv[0][0], _profile_rank(kv[0][1]))):
        walls = [e.res.row["wall_time_s"] or 0.0 for e in g]
        mems = [e.res.row["peak_memory_bytes"] or 0 for e in g]
        longest = max(g, key=lambda e: e.res.row["wall_time_s"] or 0.0)
        lines.append(
            f"| {_text(_track_name(track))} | {profile} | {len(g)} | {_fmt_duration(sum(walls))} | "
            f"{_fmt_duration(longest.res.row['wall_time_s'])} ({longest.link()}) | {_fmt_bytes(max(mems))} |"
        )
    devices = defaultdict(set)
    for e in es:
        run = e.res.run or runs.get(e.res.row["run_id"], {})
        if run.get("device"):
            devices[e.profile].add(run["device"])
    if devices:
        lines += ["", "Devices: " + "; ".join(f"{p}: {', '.join(sorted(d))}" for p, d in sorted(devices.items()))]
    if per_track:
        slow = sorted((e for e in es if e.res.row["wall_time_s"]), key=lambda e: -e.res.row["wall_time_s"])[:5]
        if slow:
            lines += ["", "Slowest tests:", "", "| test | profile | wall time | peak memory |", "|---|---|---|---|"]
            for e in slow:
                lines.append(
                    f"| {e.link()} | {e.profile} | {_fmt_duration(e.res.row['wall_time_s'])} | "
                    f"{_fmt_bytes(e.res.row['peak_memory_bytes'])} |"
                )
    lines += [
        "",
        "Wall time is each test's own time (training included unless its run was already cached); "
        "peak memory is the process's peak resident memory while the test ran (on CUDA, torch's peak "
        "allocated device memory).",
    ]
    return lines


def _profile_rank(p: str) -> int:
    return PROFILE_ORDER.index(p) if p in PROFILE_ORDER else len(PROFILE_ORDER)


def _evidence_note(es: list[Entry]) -> list[str]:
    ev = evidence_profiles(es)
    if ev == ["smoke"]:
        return [
            '!!! note "Smoke results only"',
            "    These are smoke-profile results: tiny models and one seed. They exercise the code; "
            "they are not evidence for or against any claim.",
            "",
        ]
    return [f"Surprises and open questions are read from the {', '.join(ev)} profile results.", ""]


# ---------------------------------------------------------------- pages


def _page(title: str, intro: list[str], sections: list[tuple[str, list[str]]]) -> str:
    out = ["---", f"title: {json.dumps(title)}", "---", _MARK, f"# {html.escape(title)}", "", *intro]
    for heading, body in sections:
        out += ["", f"## {heading}", "", *body]
    return "\n".join(out) + "\n"


INTRO = (
    "Written from the results store at every site build, following the lab's phase-end template: "
    "success criteria, predictions against results, surprises, open questions and hardware observations. "
    "See [how to read a verdict](../guide/reading-verdicts.md)."
)


def track_page(track: str, es: list[Entry], runs: dict) -> str:
    return _page(
        f"Retrospective: {_track_name(track)}",
        [INTRO, "", "[The whole lab's retrospective](index.md)", "", *_evidence_note(es)],
        [
            ("Success criteria", ["The hypotheses of this track and their verdicts.", "", *_success_criteria(es)]),
            ("Predictions vs results", _predictions_vs_results(es)),
            ("Surprises", _surprises(es)),
            ("Open questions", _open_questions(es)),
            ("Hardware observations", _hardware(es, runs, per_track=True)),
        ],
    )


def lab_page(es: list[Entry], runs: dict) -> str:
    by_track: dict[str, list[Entry]] = defaultdict(list)
    for e in es:
        by_track[e.track].append(e)
    tracks = dict(sorted(by_track.items()))
    criteria = [
        "Every hypothesis counted by its outcome, per track (each track's page lists them, with every "
        "prediction beside its result).",
        "",
        *_counts_table(tracks, "track", link=lambda t: f"[{_text(_track_name(t))}]({t}.md)"),
    ]
    return _page(
        "Retrospective: the whole lab",
        [INTRO, "", *_evidence_note(es)],
        [
            ("Success criteria", criteria),
            ("Surprises", _surprises(es)),
            ("Open questions", _open_questions(es)),
            ("Hardware observations", _hardware(es, runs, per_track=False)),
        ],
    )


def retrospective_pages(latest: dict[str, dict[str, Result]], runs: dict) -> dict[str, str]:
    """{path under docs/: markdown} for the whole lab (retrospective/index.md) and each track."""
    es = entries(latest)
    if not es:
        return {f"{DIR}/index.md": _page("Retrospective", ["No results in the store yet."], [])}
    by_track: dict[str, list[Entry]] = defaultdict(list)
    for e in es:
        by_track[e.track].append(e)
    pages = {f"{DIR}/index.md": lab_page(es, runs)}
    for track, group in by_track.items():
        pages[f"{DIR}/{track}.md"] = track_page(track, group, runs)
    return pages
