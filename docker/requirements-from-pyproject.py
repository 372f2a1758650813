"""Print the requirements of pyproject.toml (core dependencies plus the named extras), one per line.

Lets the Dockerfile install dependencies in a layer of their own, before the code is copied.
Usage: python requirements-from-pyproject.py pyproject.toml [extra ...]
"""

import sys
import tomllib


def requirements(path: str, extras: list[str]) -> list[str]:
    with open(path, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            sys.exit(f"{path} has no extra {extra!r} (it has: {', '.join(sorted(optional))})")
        # A self-reference such as "diffusion-serve[serve,train]" names other extras, not a package.
        reqs += [r for r in optional[extra] if not r.startswith(project["name"])]
    return reqs


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
