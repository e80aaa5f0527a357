"""Run scripts/sm90-compile (printing every loop of each kernel) or flashmaps.bench.workcount with kernels/topk.py's
pre-pass mode forced.

Usage: python bench/replays/topk_forced_mode.py buffer|select|default NP sm90|workcount -- TOOL ARGS
  buffer: BUFFER for every k <= KMAX (KMAX huge, SELECT_UP_TO_S = {}); select: SELECT at NP points for every k
  (KMAX = 0, SELECT_POINTS = NP); default: the shipped rule. Run from the repository root (workcount needs
  TRITON_INTERPRET=1). Referenced by bench/TUNING.md ("top-k's pre-pass mode by measured cost")."""
import importlib.machinery
import importlib.util
import runpy
import sys

mode, npts, tool, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5:]
import flashmaps.kernels.topk as T  # noqa: E402

if mode == "buffer":
    T.KMAX, T.SELECT_UP_TO_S = 1 << 30, {}
elif mode == "select":
    T.KMAX, T.SELECT_POINTS = 0, npts
if tool == "workcount":
    sys.argv = ["workcount"] + rest
    runpy.run_module("flashmaps.bench.workcount", run_name="__main__")
    sys.exit(0)
loader = importlib.machinery.SourceFileLoader("sm90_compile", "scripts/sm90-compile")
mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("sm90_compile", loader))
loader.exec_module(mod)
resources = mod._resources


def _with_loops(kernel):
    """The script's resources column plus every loop: [start-end: instructions i / wgmma groups w]."""
    loops = mod.sass_loops(mod._cuobjdump(kernel.asm["cubin"], "-sass"))["loops"]
    return resources(kernel) + " LOOPS:" + " ".join(f"[{a:x}-{b:x}:{n}i/{g}w]" for a, b, n, g, _ in loops)


mod._resources = _with_loops
sys.exit(mod.main(rest))
