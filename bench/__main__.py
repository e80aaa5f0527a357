"""``python -m flashmaps.bench ARGS`` = ``flashmaps bench ARGS`` (the sweep; see ``flashmaps bench --help``)."""

import sys

from flashmaps.cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
