"""Check a copied work tree against the stamp that `stamp.sh` wrote (no git needed).

    python3 benchmarks/gpu/check_tree.py .device/stamp

Every regular file listed in ``FILES`` (``git ls-files -s``) must exist and hash to its blob
id (git's ``sha1("blob <size>\\0" + content)``). Prints one line and exits 0 when the tree
matches, 2 (with the first differing paths) when it does not or the stamp is missing.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def mismatches(stamp: Path, root: Path) -> list[str]:
    bad = []
    for line in (stamp / "FILES").read_text().splitlines():
        meta, _, path = line.partition("\t")
        mode, sha = meta.split()[:2]
        if mode not in ("100644", "100755"):
            continue  # links and submodules are not compared
        file = root / path
        if not file.is_file():
            bad.append(f"{path} (missing)")
        elif blob_id(file.read_bytes()) != sha:
            bad.append(f"{path} (differs)")
    return bad


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: check_tree.py STAMP_DIR", file=sys.stderr)
        return 2
    stamp = Path(argv[0])
    if not (stamp / "FILES").is_file() or not (stamp / "COMMIT").is_file():
        print(f"error: no stamp in {stamp} (run benchmarks/gpu/stamp.sh here and carry it)", file=sys.stderr)
        return 2
    bad = mismatches(stamp, Path.cwd())
    commit = (stamp / "COMMIT").read_text().strip()
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        print(f"error: the tree is not {commit[:10]}'s: {shown}", file=sys.stderr)
        return 2
    print(f"check_tree: the tree is {commit[:10]}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
