"""
Everything is in setup.cfg; this only ships the sample configuration in the package.

C{etc/persistproxy.toml} is where the sample configuration is edited (every key, with its
default); an install has no C{etc/}, so the build copies it to C{persistproxy/example.toml},
which C{twistd persistproxy --example-config} prints.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SAMPLE = Path(__file__).resolve().parent / "etc" / "persistproxy.toml"


class BuildWithSample(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "persistproxy" / "example.toml"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE, target)


setup(cmdclass={"build_py": BuildWithSample})
