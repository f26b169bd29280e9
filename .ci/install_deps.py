"""Installs this project's dependencies (from pyproject.toml) into the running interpreter.

Used by `make deps` (run from the project root). torch is installed only when missing: on the CPU machines of this project
`pip install torch==2.13.0` resolves to a local CPU wheel, whereas an open range would fetch a CUDA build.
"""
import importlib.util
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "tomli"])
    import tomli as tomllib


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args])


deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
if importlib.util.find_spec("torch") is None:
    try:
        pip("torch==2.13.0")
    except subprocess.CalledProcessError:
        pip("torch>=2.8")
pip(*[d for d in deps if not d.startswith("torch")])
