"""``flashmaps compare --task {kernels,mqar,drift}``: the glue between the ``compare`` command and the
tasks that compare normalizers by what they learn (``mqar``) and what they change in a pretrained model
(``drift``). ``kernels`` (the default) is the speed / memory / error / sparsity comparison of
``flashmaps.bench.compare``, run by the command itself.

The task options live on the ``compare`` parser (:func:`add_arguments`); :func:`dispatch` runs a task
and returns its exit status, or None for ``kernels``. Bad options end in ``parser.error`` (one line on
stderr, exit status 2). Results go to ``--out DIR``, by default ``./flashmaps-results/<task>-<UTC time>/``
(``$FLASHMAPS_RESULTS`` instead of ``./flashmaps-results`` when set).
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

__all__ = ["TASKS", "add_arguments", "dispatch", "Context"]

TASKS = ("kernels", "mqar", "drift")
#: the options of each learning task, with their "not given" values: refused with --task kernels
_TASK_OPTIONS = {"mqar": ("preset", "steps", "seeds", "lrs", "jobs"), "drift": ("model", "sentences")}
#: the options of the kernels comparison that the learning tasks do not read
_KERNEL_OPTIONS = ("dtype", "min_run_time", "seq", "batch", "heads", "kv_heads", "head_dim", "causal", "modes",
                   "backend")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--task`` and the options of every task, on the ``compare`` parser ``p``."""
    from . import drift, mqar

    p.add_argument("--task", choices=TASKS, default="kernels",
                   help="kernels (default): speed, memory, error vs float64, sparsity; mqar: train a tiny model "
                   "per normalizer on multi-query associative recall; drift: swap each normalizer into "
                   "all-MiniLM-L6-v2 and measure how far its sentence embeddings move")
    p.set_defaults(_task_parser=p)
    mqar.add_arguments(p)
    drift.add_arguments(p)


class Context:
    """What a task needs from the command line: errors, the normalizers, the device, the output folder,
    and the shared writers (``harness.write_results``, the plot functions)."""

    def __init__(self, args, parser: argparse.ArgumentParser):
        self.args, self.parser = args, parser
        self._out = None

    def error(self, message: str):
        """One line on stderr and exit status 2 (argparse's ``parser.error``)."""
        self.parser.error(message)

    def normalizers(self) -> list[str]:
        """The --normalizers specs, by default every registered normalizer's ``examples()`` (topk:5 rather
        than topk:64, whose k would cover these short sequences entirely), each spec once."""
        from flashmaps.cli import _split_names
        from flashmaps.normalizers import examples, parse

        given = _split_names(self.args.normalizers)
        if not given:
            return list(dict.fromkeys(n.spec for n in examples()))
        out = []
        for s in given:
            try:
                out.append(parse(s, argname="--normalizers").spec)
            except (ValueError, TypeError) as exc:
                self.error(str(exc))
        return list(dict.fromkeys(out))

    def kind(self) -> str:
        from .harness import device_kind

        try:
            return device_kind(self.args.device)
        except ValueError as exc:
            self.error(f"--device: {exc}")

    def out_dir(self) -> Path:
        """--out, else ./flashmaps-results/<task>-<UTC time>/ ($FLASHMAPS_RESULTS/<task>-<UTC time>/ if
        set) (created)."""
        if self._out is None:
            import os

            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            base = Path(os.environ.get("FLASHMAPS_RESULTS") or Path.cwd() / "flashmaps-results")
            out = self.args.out or base / f"{self.args.task}-{stamp}"
            out.mkdir(parents=True, exist_ok=True)
            self._out = out
        return self._out

    def meta(self) -> dict:
        from .harness import tags

        return dict(tags(self.kind()), task=self.args.task)

    def write(self, rows: list[dict], name: str, fields: tuple, extra: dict) -> list[Path]:
        """<out>/<name>.json and .csv through ``harness.write_results`` (``fields`` first)."""
        from .harness import write_results

        self._meta = self.meta()
        return list(write_results(rows, self.out_dir(), name, self._meta, extra, fields=fields))

    def plots(self, fn, *data) -> list[Path]:
        """``fn(*data, out_dir, meta)`` -> PNG paths; none (with a note) without matplotlib."""
        import sys

        try:
            return fn(*data, self.out_dir(), getattr(self, "_meta", None) or self.meta())
        except ImportError as exc:
            print(f"(no plots: {exc}; pip install 'flashmaps[bench]')", file=sys.stderr)
            return []


def dispatch(args) -> int | None:
    """Run ``args.task`` (None for ``kernels``: the caller runs the kernel comparison). Options of another
    task are refused with an error naming them."""
    from . import drift, mqar

    parser = args._task_parser
    for task, options in _TASK_OPTIONS.items():
        given = [o for o in options if getattr(args, o, None) is not None]
        if given and args.task != task:
            parser.error(f"{', '.join('--' + o.replace('_', '-') for o in given)} belong(s) to --task {task}, "
                         f"not --task {args.task}")
    if args.task == "kernels":
        return None
    given = [o for o in _KERNEL_OPTIONS if getattr(args, o, None) is not None]
    if given:
        parser.error(f"{', '.join('--' + o.replace('_', '-') for o in given)}: options of --task kernels, "
                     f"not read by --task {args.task}")
    ctx = Context(args, parser)
    run = {"mqar": mqar.run_command, "drift": drift.run_command}[args.task]
    return run(args, ctx)
