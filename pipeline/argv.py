"""Catch mistyped options before Beam silently discards them."""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions


def _all_option_classes() -> list[type]:
    seen, stack = [], [PipelineOptions]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


def check_beam_args(argv: list[str]) -> None:
    """Raise UsageError naming the first option no PipelineOptions class knows."""
    # Importing the runners' option modules registers their classes.
    import apache_beam.options.pipeline_options  # noqa: F401
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    from ecgtok.pipeline.run import UsageError

    parser = _BeamArgumentParser(add_help=False, allow_abbrev=False)
    for cls in _all_option_classes():
        try:
            cls._add_argparse_args(parser)
        except (argparse.ArgumentError, TypeError):
            continue  # two classes declaring one flag is Beam's business, not the user's
    parser.error = lambda message: (_ for _ in ()).throw(UsageError(message))  # type: ignore[method-assign]
    _, unknown = parser.parse_known_args(argv)
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        raise UsageError(f"unknown option {flags[0].split('=')[0]}")
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0]!r}")
