"""The ``lorafast`` command (``lorafast ...`` or ``python -m lorafast ...``).

``lorafast bench ...`` goes to :mod:`lorafast.bench.cli` (its own parser takes every flag,
``--help`` included), ``lorafast study ...`` to :mod:`lorafast.study`; every other command to
:mod:`lorafast.cli`.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from lorafast.bench.cli import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["study"]:
        from lorafast.study import main as study_main

        return study_main(argv[1:])
    from lorafast.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
