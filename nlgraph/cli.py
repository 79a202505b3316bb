"""The ``nlgraph`` command line: one entry point, one verb per task.

Errors are one line on stderr with exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nlgraph._errors import NLGraphError

__all__ = ["main", "load_spec"]

EXAMPLES = {
    "list": "nlgraph list\n  nlgraph list --kind optimizer",
    "show": (
        "nlgraph show adam\n  nlgraph show titans --format yaml\n  nlgraph show mypkg.models:build"
    ),
    "validate": "nlgraph validate spec.json\n  cat spec.yaml | nlgraph validate -",
}


def load_spec(ref: str, stdin_text: str | None = None):
    """A graph from a library name, a ``.json``/``.yaml`` file, ``module:function`` or ``-``."""
    from nlgraph import library
    from nlgraph.serialize import from_json, from_yaml, load

    if ref == "-":
        text = sys.stdin.read() if stdin_text is None else stdin_text
        if text.lstrip().startswith("{"):
            return from_json(text, "<stdin>")
        return from_yaml(text, "<stdin>")
    path = Path(ref)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        return load(path)
    return library.get(ref)


def _cmd_list(args: argparse.Namespace) -> int:
    from nlgraph import library

    for entry in library.entries(args.kind):
        if args.verbose:
            print(f"{entry.name:28s} {entry.kind:10s} {entry.summary}")
        else:
            print(entry.name)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from nlgraph.serialize import to_json, to_yaml
    from nlgraph.validation import validate

    graph = load_spec(args.spec)
    spec = validate(graph.spec)
    if args.format == "json":
        print(to_json(spec))
    elif args.format == "yaml":
        print(to_yaml(spec), end="")
    else:
        from nlgraph.visualize import tree

        print(tree(spec))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from nlgraph.topology import tiers
    from nlgraph.validation import validate

    graph = load_spec(args.spec)
    spec = validate(graph.spec)
    n = len(tiers(spec))
    print(f"ok: {spec.name!r} is valid ({len(spec.levels)} levels in {n} tiers)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlgraph",
        description="Nested Learning as graphs of levels: declare, validate, draw, compile, train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SPEC is a library name (`nlgraph list`), a .json/.yaml file, or module:function.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=help,
            epilog="examples:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    p = verb("list", "list the library's definitions, one name a line")
    p.add_argument("--kind", choices=["optimizer", "memory", "model", "block"], default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="add kind and summary")
    p.set_defaults(func=_cmd_list)

    p = verb("show", "print a graph's levels with frequencies, objectives and optimizers")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--format", choices=["text", "json", "yaml"], default="text")
    p.set_defaults(func=_cmd_show)

    p = verb("validate", "check a spec; exit 0 when valid, 2 with the reason when not")
    p.add_argument("spec", metavar="SPEC", help="a JSON/YAML file, - for stdin, or a name")
    p.set_defaults(func=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except NLGraphError as err:
        if args.debug:
            raise
        print(f"nlgraph {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nlgraph {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
