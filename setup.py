"""Packaging hook: the op's C++/CUDA sources ship in the wheel.

`csrc/` stays at the repository top; `build_py` copies its sources into the built package as `ddetr/_csrc/`, so an
installed ddetr compiles the op on first use as a checkout does (`ddetr/ops/build.py` looks there first, then in
the checkout). Everything else about the package is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")


class BuildPyWithOpSources(build_py):
    """build_py that also copies csrc/*.{h,cpp,cu} to ddetr/_csrc/ in the build folder."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads csrc/ from the checkout itself
            return
        if not CSRC.is_dir():
            raise FileNotFoundError(f"{CSRC} is missing: the wheel needs the op's sources (MANIFEST.in grafts csrc)")
        target = Path(self.build_lib) / "ddetr" / "_csrc"
        self.mkpath(str(target))
        for source in sorted(CSRC.iterdir()):
            if source.suffix in SOURCE_SUFFIXES:
                self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildPyWithOpSources})
