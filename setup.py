"""Packaging that pyproject.toml cannot express: the repository's search_spaces/ (the one copy people edit) ships
inside the wheel as the package data of `dsm_tune.search_spaces`."""

from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["dsm_tune", "dsm_tune.*"]) + ["dsm_tune.search_spaces"],
      package_dir={"dsm_tune.search_spaces": "search_spaces"})
