"""Print the requirements of pyproject.toml (core dependencies plus the named extras), one per line.

Lets the Dockerfile install dependencies in a layer of their own, before the code is copied.
Usage: python requirements-from-pyproject.py [--build-system] pyproject.toml [extra ...]
--build-system adds the build backend's requirements ([build-system] requires), so that the code
can later be installed with --no-index --no-build-isolation.
"""

import sys
import tomllib


def requirements(path: str, extras: list[str], build_system: bool = False) -> list[str]:
    with open(path, "rb") as f:
        pyproject = tomllib.load(f)
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            sys.exit(f"{path} has no extra {extra!r} (it has: {', '.join(sorted(optional))})")
        # A self-reference such as "diffusion-serve[serve,train]" names other extras, not a package.
        reqs += [r for r in optional[extra] if not r.startswith(project["name"])]
    if build_system:
        reqs += pyproject.get("build-system", {}).get("requires", [])
    return reqs


if __name__ == "__main__":
    args = sys.argv[1:]
    build_system = "--build-system" in args
    args = [a for a in args if a != "--build-system"]
    print("\n".join(requirements(args[0], args[1:], build_system)))
