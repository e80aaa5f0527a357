"""``python -m flashmaps.normalizers``: print the table of registered normalizers;
``--readme PATH`` rewrites the table between the README's ``<!-- normalizers:begin/end -->`` markers."""

import argparse
import pathlib
import re
import sys

from . import table

BEGIN, END = "<!-- normalizers:begin -->", "<!-- normalizers:end -->"


def with_table(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{table()}\n{END}", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashmaps.normalizers", description=__doc__.split("\n")[0])
    ap.add_argument("--readme", type=pathlib.Path, help="rewrite the table in this file")
    args = ap.parse_args(argv)
    if args.readme is None:
        print(table())
        return 0
    try:
        args.readme.write_text(with_table(args.readme.read_text()))
    except (OSError, ValueError) as err:
        print(f"python -m flashmaps.normalizers: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
