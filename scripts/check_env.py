"""The venv's install check, run once by scripts/env.sh: imports what the commands use and
byte-compiles exactly the files those imports loaded.

pip installs with --no-compile: byte-compiling every file of torch, transformers and jax at
install time took 45 of the 78 s of `pip install -r requirements/lock.txt` on a 2-core CPU,
most of it for files nothing here imports. Compiling what the commands load (about 2 600
files, 5 s on two processes) keeps their start as fast as a fully compiled venv, also where
PYTHONDONTWRITEBYTECODE stops Python from caching bytecode on import."""

from __future__ import annotations

import concurrent.futures
import importlib
import py_compile
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "transformers.models.llama", "torch", "gguf",
           "scipy", "jinja2", "matplotlib", "sst_jax.cli", "sst_jax.pipeline", "experiments.runner",
           "experiments.study_report")
EXTRA = {"test": ("peft", "pytest")}


def main(layer: str) -> int:
    sys.path.insert(0, str(REPO))
    for name in MODULES + EXTRA.get(layer, ()):
        importlib.import_module(name)
    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted({m.__file__ for m in list(sys.modules.values())
                    if (getattr(m, "__file__", None) or "").endswith(".py") and Path(m.__file__).is_relative_to(site)})
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        list(pool.map(py_compile.compile, files, chunksize=64))
    print(f"[env] imports ok; byte-compiled {len(files)} installed modules they load", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runtime"))
