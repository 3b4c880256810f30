"""Packaging that pyproject.toml cannot express: the repository's search_spaces/ (the one copy people edit) ships
inside the wheel as the package data of `dsm_tune.search_spaces` (its subfolders as its subpackages)."""

from setuptools import find_namespace_packages, setup

SPACES = ["dsm_tune.search_spaces"] + [f"dsm_tune.search_spaces.{name}"
                                       for name in find_namespace_packages(where="search_spaces")]

setup(packages=find_namespace_packages(include=["dsm_tune", "dsm_tune.*"]) + SPACES,
      package_dir={"dsm_tune.search_spaces": "search_spaces"})
