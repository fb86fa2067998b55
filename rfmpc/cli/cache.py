"""``rfmpc cache ls | verify | clear --cache DIR [--json]``.

``verify`` checks every blob against the index (size, SHA-256, inner checksums) and exits 1 with
a report if any entry is damaged; ``--repair`` also removes damaged entries and orphan files.
"""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["add_cache_parser"]


def _open(args):
    from rfmpc.cache.disk import DiskCacheStore

    return DiskCacheStore(args.cache, create=False)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_ls(args) -> int:
    with _open(args) as store:
        infos = store.ls()
    if args.json:
        print(
            json.dumps(
                {
                    "cache": str(args.cache),
                    "count": len(infos),
                    "bytes": sum(i.nbytes for i in infos),
                    "entries": [i.to_dict() for i in infos],
                }
            )
        )
        return 0
    print(f"{len(infos)} entries, {sum(i.nbytes for i in infos)} bytes in {args.cache}")
    for i in infos:
        steps = ",".join(str(s) for s in i.steps)
        print(
            f"{i.entry_id}  {i.model_id}  cfg={i.config_hash[:12]}  steps={steps}/{i.num_steps}  "
            f"d={i.dim}  {i.nbytes} B  used {_fmt_time(i.last_used)}  {i.prompt!r}"
        )
    return 0


def cmd_verify(args) -> int:
    from rfmpc.cache import CacheIndexError

    try:
        with _open(args) as store:
            report = store.verify(repair=args.repair)
            collected = list(store.collected)
    except CacheIndexError as e:
        out = {"clean": False, "checked": 0, "ok": 0, "error": str(e), "problems": []}
        print(json.dumps(out) if args.json else f"DAMAGED INDEX: {e}")
        return 1
    out = report.to_dict()
    out["cache"] = str(args.cache)
    out["collected_on_open"] = collected
    if args.json:
        print(json.dumps(out))
    else:
        status = "clean" if report.clean else f"{len(report.problems)} damaged"
        print(f"{report.checked} entries checked, {len(report.ok)} ok: {status}")
        for p in report.problems:
            print(f"  {p.kind:11s} {p.entry_id}: {p.message}")
        for name in report.orphans:
            print(f"  orphan      {name}")
        for name in collected:
            print(f"  collected   {name} (unindexed blob removed on open)")
        if report.problems and not args.repair:
            print("run `rfmpc cache verify --repair` to remove the damaged entries")
    return 0 if report.clean else 1


def cmd_clear(args) -> int:
    with _open(args) as store:
        n = store.clear()
    if args.json:
        print(json.dumps({"cache": str(args.cache), "removed": n}))
    else:
        print(f"removed {n} entries from {args.cache}")
    return 0


def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cache ls|verify|clear`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("cache", help="inspect, verify or clear a trajectory cache")
    sub = p.add_subparsers(dest="cache_command", required=True)

    def common(sp):
        sp.add_argument("--cache", required=True, help="the cache directory")
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("ls", help="list entries, most recently used first")
    common(s)
    s.set_defaults(func=cmd_ls)
    s = sub.add_parser("verify", help="check every blob; exit 1 if any is damaged")
    common(s)
    s.add_argument("--repair", action="store_true", help="remove damaged entries and orphans")
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser("clear", help="remove every entry")
    common(s)
    s.set_defaults(func=cmd_clear)
    return p
