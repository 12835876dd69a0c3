"""Print the installed packages whose versions differ from the lock files (`make test-latest` runs it)."""

import re
import sys
from importlib import metadata
from pathlib import Path


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    files = sys.argv[1:] or ["requirements.lock", "lock/assets.txt"]
    text = "\n".join(Path(f).read_text() for f in files)
    locked = {
        normalise(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", text, flags=re.M)
    }
    installed = {normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}
    rows = [
        f"  {name}: {locked.get(name, 'not locked')} -> {version}"
        for name, version in sorted(installed.items())
        if name != "loraredux" and locked.get(name) != version
    ]
    print(
        "\n".join(["versions that differ from the lock:", *rows])
        if rows
        else "every version is the lock's"
    )


if __name__ == "__main__":
    main()
