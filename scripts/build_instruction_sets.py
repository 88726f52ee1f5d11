"""Builds the instruction sets of `cl_jax.data.instructions` from this Python's standard library and writes them as
JSONL plus MANIFEST.json (SHA-256 of every file and of the whole build).

  python scripts/build_instruction_sets.py                    # -> cl_jax/data/instruction_sets/
  python scripts/build_instruction_sets.py --out /tmp/sets --check cl_jax/data/instruction_sets

The build is deterministic: rebuilding on the same Python minor version gives byte-identical files (the content
depends on the standard library, so another version gives other files). `--check DIR` exits 1 when the build
differs from the files in DIR.
"""
import argparse
import json
import os
import sys

from cl_jax.data import instructions

DEFAULT_OUT = os.path.join(os.path.dirname(instructions.__file__), "instruction_sets")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
  parser.add_argument("--check", default="", help="compare the build with the MANIFEST.json in this directory")
  args = parser.parse_args(argv)
  manifest = instructions.write_sets(args.out)
  sizes = {name: len(ex) for name, ex in instructions.build_sets().items()}
  print(f"wrote {len(manifest['files'])} sets to {args.out} (python {manifest['python']}, sha256 "
        f"{manifest['sha256'][:16]}...): " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
  if args.check:
    with open(os.path.join(args.check, "MANIFEST.json")) as f:
      other = json.load(f)
    if other["sha256"] != manifest["sha256"]:
      differ = sorted(k for k in manifest["files"] if other["files"].get(k) != manifest["files"][k])
      print(f"differs from {args.check} (python {other['python']}): {differ}", file=sys.stderr)
      return 1
    print(f"identical to {args.check}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
