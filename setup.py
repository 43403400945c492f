"""The repository's folders install as one package, ``fedaug``: ``common/`` is ``fedaug.common``, ``server/`` is
``fedaug.server`` and so on, so nothing with a generic name lands in site-packages. Everything else about the
distribution is in pyproject.toml; this file holds only the folder list, written once here."""

from setuptools import find_packages, setup

FOLDERS = ("common", "client", "server", "runtime", "serving", "simulations")
"""The design card's code folders at the repository root (fedaug/ itself holds the command line)."""

packages = ["fedaug", *(f"fedaug.{name}" for name in find_packages("fedaug"))]
for folder in FOLDERS:
    packages += [f"fedaug.{folder}", *(f"fedaug.{folder}.{name}" for name in find_packages(folder))]

setup(
    packages=packages,
    package_dir={"fedaug": "fedaug", **{f"fedaug.{folder}": folder for folder in FOLDERS}},
    package_data={"fedaug.serving": ["page.html"]},
)
