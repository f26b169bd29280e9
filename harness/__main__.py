"""`python -m harness <command>`: the project's command-line entry.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported lazily so that ``--help`` works even where a command's dependencies are missing.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("harness.demo", "accuracy table of every variant on the embedded long-context workload (CPU ok), "
                             "plus compile-only kernel reports when the CuTe DSL is installed"),
    "bench": ("harness.bench", "side-by-side speed + accuracy of thrift kernels and baselines (GPU)"),
    "quality": ("harness.quality", "model-quality evaluation (NLL by position, passkey) on SmolLM2"),
    "heatmap": ("harness.heatmap", "per-block FP4 error heatmap for one head (the paper's Fig. 3)"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded = {}
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
                continue  # command not implemented in this checkout
            raise
        mod.add_arguments(p)
        loaded[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command not in loaded:
        parser.error(f"command {args.command!r} is not available in this checkout")
    return int(loaded[args.command].main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
